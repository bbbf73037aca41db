"""The one registry of the benchmark cases: every bench (an op, the whole loss, a training step) is one
:class:`Bench` entry here, with its case sets (the shapes), its providers and where torch.compile is
measured; its script (``bench_<name>.py``) says how to build the inputs of a case and what each provider
runs (``make_spec``), and is the bench's command line. ``run.py`` runs any set of entries and appends
their results to one CSV (``results.py``: the machine and the versions on every row), ``plot.py`` draws
it.

A new op: one :func:`register` call here and a script with ``make_spec``. A new provider: one entry in
:data:`PROVIDERS` and its name in the providers of the benches that have it (the scripts' ``make_fn``
say what it runs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from synthetic import PRESETS

Case = dict[str, Any]

PROVIDERS: dict[str, str] = {
    "eager_stacked": "the published formulation: mta_kernels.reference saliency and pooling, DSA as one "
    "(ΣU)×(ΣU) matrix per side with cross-sequence pairs masked (reference.structural_loss_stacked)",
    "eager": "the same with the block-diagonal reference DSA (reference.structural_loss, a loop over "
    "sequences)",
    "compile": "torch.compile of eager (measured last, at selected shapes: each new shape recompiles)",
    "mta_kernels": "the fused ops (mta_kernels.ops.*), and mta_kernels.MTALoss for the full loss",
    "no_mta": "step benchmark only: the same step without the MTA term (the baseline of the share)",
}
"""Every provider a bench may have, with what it runs (the legend of the results)."""

SELECTED_ONLY = "compile measured at selected shapes only (GPU time budget)"


@dataclass(frozen=True)
class Bench:
    """One benchmark.

    Attributes:
        name: the result files' stem and the CSV's ``bench`` column.
        script: the module with ``make_spec(args)`` (and the command line).
        providers: in the order they run (``compile`` last: a stage timeout during compilation loses
            the least).
        case_sets: ``{name: cases(quick)}``, the first one the default (``--case``); ``quick`` gives tiny
            CPU shapes.
        compile_at: the cases where ``compile`` is measured (None: all); elsewhere it is recorded as
            skipped.
        x: the swept parameter (the plots' x axis).
    """

    name: str
    script: str
    providers: tuple[str, ...]
    case_sets: dict[str, Callable[[bool], list[Case]]]
    compile_at: Callable[[Case], bool] | None = None
    x: str = "T"
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def default_set(self) -> str:
        return next(iter(self.case_sets))

    def cases(self, which: str | None = None, quick: bool = False) -> list[Case]:
        return self.case_sets[which or self.default_set](quick)

    def skip(self, provider: str, case: Case) -> str | None:
        """Why ``provider`` is left out of ``case`` (None: it runs)."""
        if provider == "compile" and self.compile_at is not None and not self.compile_at(case):
            return SELECTED_ONLY
        return None

    def module(self) -> Any:
        return importlib.import_module(self.script)


BENCHES: dict[str, Bench] = {}


def register(bench: Bench) -> Bench:
    unknown = [p for p in bench.providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"bench {bench.name!r}: providers {unknown} are not in registry.PROVIDERS")
    BENCHES[bench.name] = bench
    return bench


def get(name: str) -> Bench:
    if name not in BENCHES:
        raise KeyError(f"no bench {name!r} registered; known: {sorted(BENCHES)}")
    return BENCHES[name]


def _informative_first(cases: list[Case]) -> list[Case]:
    """T = 512 and 2048 of every series first: a time-budget cut keeps them."""
    return sorted(cases, key=lambda p: p["T"] not in (512, 2048))


TS = (256, 512, 1024, 2048)


# ---------------------------------------------------------------------------------------- saliency
def _saliency_sweep(quick: bool) -> list[Case]:
    if quick:
        return [dict(case="quick", L=2, B=2, T=t, D=64) for t in (32, 64)]
    out = []
    for D, B in ((768, 16), (1600, 16)):  # GPT-2 student / GPT-2-XL teacher widths
        out += [dict(case="sweep", L=1, B=B, T=T, D=D) for T in TS]
    for D, B in ((2048, 8), (4096, 8)):  # TinyLlama / Mistral widths
        out += [dict(case="sweep", L=1, B=B, T=T, D=D) for T in (512, 2048)]
    return _informative_first(out)


def _saliency_issue(quick: bool) -> list[Case]:
    # The saliency issue's case: peak memory of six stacked layers at T=4096.
    return _saliency_sweep(True) if quick else [dict(case="issue", L=6, B=8, T=4096, D=2048)]


register(
    Bench(
        "saliency",
        "bench_saliency",
        ("eager", "mta_kernels", "compile"),
        {"sweep": _saliency_sweep, "issue": _saliency_issue},
        # torch.compile recompiles per shape: in the sweep it is measured at the teacher width only
        compile_at=lambda p: p["case"] != "sweep" or p["D"] == 1600,
    )
)


# --------------------------------------------------------------------------------------- span_pool
def _span_pool_sweep(quick: bool) -> list[Case]:
    modes = ("fwd", "fwd+bwd")
    if quick:
        return [dict(case="quick", mode=m, gran="word", L=2, B=2, T=t, D=64) for m in modes for t in (32, 64)]
    out = []
    for m in modes:
        for D in (768, 1600):
            out += [dict(case="sweep", mode=m, gran="word", L=1, B=16, T=T, D=D) for T in TS]
        out += [dict(case="sweep", mode=m, gran="phrase", L=1, B=16, T=T, D=1600) for T in (512, 2048)]
        out += [dict(case="sweep", mode=m, gran="word", L=1, B=8, T=T, D=4096) for T in (512, 2048)]
    return _informative_first(out)


register(
    Bench(
        "span_pool",
        "bench_span_pool",
        ("eager", "mta_kernels", "compile"),
        {"sweep": _span_pool_sweep},
        # data-dependent sizes in the reference's gathers recompile per shape: D = 1600, T = 512, 2048
        compile_at=lambda p: (
            p["case"] != "sweep" or (p["D"] == 1600 and p["gran"] == "word" and p["T"] in (512, 2048))
        ),
    )
)


# -------------------------------------------------------------------------------------- structural
def _structural_sweep(quick: bool) -> list[Case]:
    if quick:
        return [
            dict(case="quick", mode=m, preset="tiny", gran="word", L=2, B=3, T=t, Ds=48, Dt=80)
            for m in ("fwd", "fwd+bwd")
            for t in (32, 64)
        ]
    out = []
    gpt2 = dict(preset="gpt2", Ds=768, Dt=1600)
    for B in (16, 8):
        out += [dict(case="sweep", mode="fwd+bwd", gran="word", L=1, B=B, T=T, **gpt2) for T in TS]
    out += [dict(case="sweep", mode="fwd", gran="word", L=1, B=16, T=T, **gpt2) for T in TS]
    out += [dict(case="sweep", mode="fwd+bwd", gran="phrase", L=2, B=16, T=T, **gpt2) for T in (512, 2048)]
    mistral = dict(preset="mistral", Ds=2048, Dt=4096)
    out += [dict(case="sweep", mode="fwd+bwd", gran="word", L=1, B=8, T=T, **mistral) for T in (512, 2048)]
    return _informative_first(out)


register(
    Bench(
        "structural",
        "bench_structural",
        ("eager_stacked", "eager", "mta_kernels", "compile"),
        {"sweep": _structural_sweep},
        # the per-sequence loop recompiles for every new cu_units (its values are specialised)
        compile_at=lambda p: (
            p["case"] == "quick"
            or (p["preset"] == "gpt2" and p["B"] == 16 and p["gran"] == "word" and p["T"] in (512, 2048))
        ),
    )
)


# ---------------------------------------------------------------------------------------- mta_loss
def complete_loss_case(p: Case) -> Case:
    """A loss case with its preset's pair count and widths (``K``, ``Ds``, ``Dt``)."""
    pre = PRESETS[p["preset"]]
    return {**p, "K": pre.num_pairs, "Ds": pre.d_student, "Dt": pre.d_teacher}


def _mta_loss_sweep(quick: bool) -> list[Case]:
    if quick:
        return [complete_loss_case(dict(case="quick", preset="tiny", B=2, T=t)) for t in (32, 64)]
    out = [dict(case="sweep", preset="gpt2", B=16, T=T) for T in (2048, 1024, 256)]
    out += [dict(case="sweep", preset="gpt2", B=8, T=T) for T in (512, 2048)]
    out += [dict(case="sweep", preset="qwen", B=8, T=T) for T in (512, 2048)]
    out += [dict(case="sweep", preset="mistral", B=8, T=T) for T in (512, 2048)]
    return [complete_loss_case(p) for p in out]


def _mta_loss_target(quick: bool) -> list[Case]:
    if quick:
        return _mta_loss_sweep(True)
    return [complete_loss_case(dict(case="target", preset="gpt2", B=16, T=512))]


register(
    Bench(
        "mta_loss",
        "bench_mta_loss",
        ("eager_stacked", "eager", "mta_kernels", "compile"),
        {"sweep": _mta_loss_sweep, "target": _mta_loss_target},
        # compiling the whole composition costs minutes per new shape: the target and one sweep shape
        compile_at=lambda p: (
            p["case"] in ("quick", "target") or (p["preset"] == "gpt2" and p["B"] == 16 and p["T"] == 2048)
        ),
    )
)


# -------------------------------------------------------------------------------------------- step
def _step_gpt2(quick: bool) -> list[Case]:
    if quick:
        return [dict(case="quick", preset="tiny", B=2, T=32)]
    return [dict(case="step", preset="gpt2", B=16, T=512)]


register(
    Bench("step", "bench_step", ("no_mta", "eager_stacked", "eager", "mta_kernels"), {"gpt2": _step_gpt2})
)
