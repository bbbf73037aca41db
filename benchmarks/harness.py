"""Benchmark runner: every ``bench_*.py`` script describes its cases (shape parameters), how to build the
inputs, what each provider runs and the floor of a case; :func:`run_bench` does the rest, the same way for
every op:

1. the device ceilings (copy bandwidth, bf16 and fp32 matmul rates) are measured ONCE per results folder
   and cached in ``ceilings.json`` there, so every script of one run divides by the same numbers;
2. per case and provider: one checked call (outputs and gradients kept for the check; it also absorbs
   compilation and autotuning, timed as ``first_call_s``), one peak-memory call, then the timing;
3. the check: the eager reference is also run on float64 copies of the inputs (the oracle), and each
   provider's outputs and gradients must lie within the tolerance rule
   (docs/method.md#numerical-tolerance-rule): error against the oracle at most 2 × the eager
   reference's error in the same dtype + a small floor (``within_rule`` in the records, a
   ``CHECK`` mark in the log otherwise);
4. an out-of-memory error is recorded as status ``"OOM"``, any other failure as ``"error: ..."``, a
   provider left out for time as ``"skipped: ..."``: a case never silently disappears;
5. the results folder gets ``<name>.json`` and ``<name>.csv`` rewritten after every case (a stage
   killed by a timeout keeps what it measured) and ``<name>_time.png`` / ``<name>_memory.png`` at the end.

The pieces live beside this file: ``timing.py`` (median and quantiles of a call), ``memory.py`` (peak
memory, OOM), ``machine.py`` (device, results folder, environment, ceilings), ``synthetic.py`` (unit
batches, hidden states, presets), ``results.py`` (JSON/CSV files and plots). This module re-exports the
names the scripts use (``harness.PRESETS``, ``harness.run_bench``, ...).

Run the scripts as files (``python benchmarks/bench_saliency.py ...``); they import this module as a
sibling. Peak memory is measured on CUDA only; on the CPU it is recorded as null.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, when imported from elsewhere

import registry  # noqa: E402
from machine import (  # noqa: E402
    BENCH_DIR,
    REPO_ROOT,
    backend_label,
    ceilings_for,
    device_name,
    environment,
    measure_ceilings,
    pick_device,
    results_dir,
    slug,
)
from memory import free_memory, is_oom, peak_memory_bytes  # noqa: E402
from results import CASE_KEYS, case_label, load_results, plot_results, write_results  # noqa: E402
from synthetic import (  # noqa: E402
    PRESETS,
    TOKEN_COVERAGE,
    UNIT_STATS_SOURCE,
    UNITS_PER_TOKEN,
    Preset,
    random_hidden,
    synth_ranges,
    synth_unit_batch,
    units_per_sequence,
)
from timing import QUANTILES, _clear_grads, synchronize, time_fn  # noqa: E402

__all__ = [
    "BENCH_DIR",
    "CASE_KEYS",
    "PRESETS",
    "PROVIDERS",
    "QUANTILES",
    "REPO_ROOT",
    "TOKEN_COVERAGE",
    "UNITS_PER_TOKEN",
    "UNIT_STATS_SOURCE",
    "BenchSpec",
    "Preset",
    "add_common_args",
    "bench_args",
    "backend_label",
    "case_label",
    "ceilings_for",
    "device_name",
    "environment",
    "forward_or_train",
    "free_memory",
    "is_oom",
    "load_results",
    "measure_ceilings",
    "op_providers",
    "peak_memory_bytes",
    "pick_device",
    "plot_results",
    "random_hidden",
    "results_dir",
    "run_bench",
    "run_registered",
    "slug",
    "synchronize",
    "synth_ranges",
    "synth_unit_batch",
    "time_fn",
    "tolerance_check",
    "units_per_sequence",
    "write_results",
]

PROVIDERS = tuple(registry.PROVIDERS)  # every provider a bench may have


@dataclasses.dataclass
class BenchSpec:
    """What a bench script provides to :func:`run_bench`.

    build(params) -> inputs (any object; ``inputs["grad_leaves"]``, if present, lists the tensors
        whose gradients the timed call writes: they are reset between runs and compared across
        providers);
    make_fn(provider, params, inputs) -> a zero-argument callable that does the timed work (forward,
        or forward + backward) and returns the forward output (compared across providers);
    floor(params, inputs) -> (bytes, FLOPs[, fp32 FLOPs]) the fewest bytes any implementation must move
        through device memory and the useful FLOPs it must do: FLOPs priced at the bf16 tensor-core rate,
        fp32 FLOPs (fp32 operands, which the kernels keep in fp32) at the fp32 rate (benchmarks/NOTES.md);
    oracle_provider: the provider whose float64 run is the oracle of the tolerance check (``"eager"``,
        the reference), or None where no float64 run makes sense (a training step).
    """

    name: str
    build: Callable[[dict[str, Any]], dict[str, Any]]
    make_fn: Callable[[str, dict[str, Any], dict[str, Any]], Callable[[], Any]]
    floor: Callable[[dict[str, Any], dict[str, Any]], Sequence[float]]
    providers: Sequence[str]
    oracle_provider: str | None = "eager"


def op_providers(
    op: str, fused_module: str, more_references: dict[str, str] | None = None
) -> Callable[[str], Callable[..., Any]]:
    """The function each provider of a one-op bench times, by provider name.

    ``eager``: ``mta_kernels.reference.<op>``; ``compile``: that function under ``torch.compile``
    (compiled on first use, once per returned picker, i.e. once per ``make_spec``); ``mta_kernels``: the
    fused op ``<fused_module>.<op>``; ``more_references`` maps further provider names to other
    ``mta_kernels.reference`` functions (e.g. ``{"eager_stacked": "structural_loss_stacked"}``). Any
    other name is a ValueError. The package is imported when a function is picked, not here.
    """

    @functools.cache
    def compiled() -> Callable[..., Any]:
        from mta_kernels import reference

        return torch.compile(getattr(reference, op))

    def pick(provider: str) -> Callable[..., Any]:
        from mta_kernels import reference

        if provider == "eager":
            return getattr(reference, op)
        if more_references and provider in more_references:
            return getattr(reference, more_references[provider])
        if provider == "compile":
            return compiled()
        if provider == "mta_kernels":
            return getattr(importlib.import_module(fused_module), op)
        raise ValueError(provider)

    return pick


def forward_or_train(
    mode: str, forward: Callable[[], Any], backward: Callable[[Any], None]
) -> Callable[[], Any]:
    """The timed call of a ``mode`` = ``"fwd"`` / ``"fwd+bwd"`` case: ``forward`` alone, or ``forward``
    then ``backward(output)``; either returns the forward output (compared across providers)."""
    if mode == "fwd":
        return forward

    def fwd_bwd() -> Any:
        out = forward()
        backward(out)
        return out

    return fwd_bwd


def bench_args(
    bench: registry.Bench,
    description: str,
    argv: Sequence[str] | None = None,
    add: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The command line of a registered bench: the common options, ``--case`` (its case sets) and the
    script's own (its ``add_args(parser)``, when it has one); ``--tag`` defaults to the case set."""
    parser = argparse.ArgumentParser(description=description)
    add_common_args(parser)
    parser.add_argument("--case", default=bench.default_set, choices=list(bench.case_sets))
    add = add or getattr(bench.module(), "add_args", None)
    if add is not None:
        add(parser)
    args = parser.parse_args(argv)
    if args.tag is None:
        args.tag = args.case
    return args


def run_registered(
    bench: registry.Bench,
    args: argparse.Namespace,
    post: Callable[[list[dict[str, Any]]], None] | None = None,
) -> Path:
    """Run a registered bench's case set (``args.case``) with its script's spec (and its script's
    ``post_process(case_records)``, when it has one, as ``post``)."""
    module = bench.module()
    post = post or getattr(module, "post_process", None)
    return run_bench(
        module.make_spec(args), bench.cases(args.case, args.quick), args, skip=bench.skip, post=post
    )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--out", default=None, help="results folder (default: results/<device>-<date>)")
    parser.add_argument("--tag", default=None, help="suffix of the result file names")
    parser.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-seconds", type=float, default=float("inf"), help="time budget for the cases")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-check", action="store_true", help="skip the cross-provider value check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch intra-op threads (default 1: stable when shared)",
    )
    parser.add_argument("--words-per-token", type=float, default=None, help="override the measured density")
    parser.add_argument("--phrases-per-token", type=float, default=None, help="override the measured density")


def apply_threads(args: argparse.Namespace, device: torch.device) -> None:
    """On the CPU, few threads: several spinning intra-op threads on a busy machine inflate timings 10x."""
    if device.type == "cpu":
        torch.set_num_threads(getattr(args, "threads", None) or 1)


def apply_unit_overrides(args: argparse.Namespace) -> None:
    if args.words_per_token is not None:
        UNITS_PER_TOKEN["word"] = args.words_per_token
        TOKEN_COVERAGE["word"] = max(TOKEN_COVERAGE["word"], args.words_per_token)
    if args.phrases_per_token is not None:
        UNITS_PER_TOKEN["phrase"] = args.phrases_per_token
        TOKEN_COVERAGE["phrase"] = max(TOKEN_COVERAGE["phrase"], args.phrases_per_token)


def configure_compile() -> None:
    """Let torch.compile recompile per case instead of silently falling back to eager after 8 shapes."""
    import logging

    import torch._dynamo.config as dc

    # Graph-break warnings of the reference (`.tolist()`, boolean indexing) would flood the GPU log.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dc, name):
            setattr(dc, name, 1024)
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dc, name):
            setattr(dc, name, 4096)


# ------------------------------------------------------------------------------------------- checks
# The tolerance rule (docs/method.md#numerical-tolerance-rule), per output and gradient tensor:
#     max|fused − oracle| <= RULE_FACTOR · max|eager − oracle| + RULE_FLOOR · max|oracle|
# The floor is relative to the tensor's scale so that one rule fits losses (~1) and gradients (~1e-6).
RULE_FACTOR = 2.0
RULE_FLOOR = 1e-5


def _collect_values(out: Any, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Forward output(s) and the gradients of the leaves, as float64 CPU tensors."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    vals = [o.detach().double().cpu() for o in outs if isinstance(o, torch.Tensor)]
    vals += [t.grad.detach().double().cpu() for t in leaves if t.grad is not None]
    return vals


def _rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    """Largest ‖a − b‖ / ‖b‖ over the tensors (an informative column, not the pass/fail check)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    worst = 0.0
    for x, y in zip(a, b):
        if not torch.isfinite(x).all():
            return float("inf")
        den = max(float(y.norm()), 1e-12)
        worst = max(worst, float((x - y).norm()) / den)
    return worst


def _max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).abs().max()) if x.numel() else 0.0


def tolerance_check(
    fused: list[torch.Tensor], eager: list[torch.Tensor], oracle: list[torch.Tensor]
) -> tuple[bool | None, float | None, float | None]:
    """The tolerance rule over matching lists of tensors (outputs then gradients).

    Returns ``(within_rule, worst error / bound, worst eager error relative to the oracle's scale)``;
    ``(None, None, None)`` when the lists do not match (nothing to compare)."""
    if not (len(fused) == len(eager) == len(oracle)) or not oracle:
        return None, None, None
    if any(f.shape != o.shape or e.shape != o.shape for f, e, o in zip(fused, eager, oracle)):
        return None, None, None
    worst_ratio, worst_eager = 0.0, 0.0
    for f, e, o in zip(fused, eager, oracle):
        if not torch.isfinite(f).all():
            return False, float("inf"), None
        scale = float(o.abs().max()) if o.numel() else 0.0
        err_e = _max_abs_err(e, o)
        bound = RULE_FACTOR * err_e + RULE_FLOOR * scale
        err_f = _max_abs_err(f, o)
        ratio = err_f / bound if bound > 0 else (0.0 if err_f == 0 else float("inf"))
        worst_ratio = max(worst_ratio, ratio)
        worst_eager = max(worst_eager, err_e / scale if scale > 0 else 0.0)
    return worst_ratio <= 1.0, worst_ratio, worst_eager


def _to_float64(x: Any, copies: dict[int, torch.Tensor]) -> Any:
    """A float64 copy of the inputs: floating tensors become float64 (one copy per tensor, recorded in
    ``copies`` by the id of the original; leaves that require grad stay leaves that require grad), float
    dtypes become torch.float64."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            return x
        if id(x) not in copies:
            copies[id(x)] = x.detach().double().requires_grad_(x.requires_grad)
        return copies[id(x)]
    if isinstance(x, torch.dtype):
        return torch.float64 if x.is_floating_point else x
    if isinstance(x, dict):
        return {k: _to_float64(v, copies) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float64(v, copies) for v in x)
    return x


def oracle_values(
    spec: BenchSpec, params: dict[str, Any], inputs: dict[str, Any], device: torch.device
) -> tuple[list[torch.Tensor] | None, str | None]:
    """The oracle: ``spec.oracle_provider`` (the eager reference) run once on float64 copies of the
    inputs. Returns (values, None), or (None, why not)."""
    if spec.oracle_provider is None:
        return None, "no oracle for this bench"
    copies: dict[int, torch.Tensor] = {}
    originals = list(inputs.get("check_leaves", inputs.get("grad_leaves", ())))
    try:
        _clear_grads(originals)
        x64 = _to_float64(inputs, copies)
        out = spec.make_fn(spec.oracle_provider, params, x64)()
        synchronize(device)
        # a leaf the function uses through another object (a module's parameters listed as leaves) keeps
        # its own gradient; its float64 copy then has none
        check = [
            copies[id(t)] if id(t) in copies and copies[id(t)].grad is not None else t for t in originals
        ]
        return _collect_values(out, check), None
    except Exception as exc:  # noqa: BLE001 - no oracle is a recorded fact, not a crash
        return None, _error_status(exc)
    finally:
        _clear_grads(originals)
        free_memory(device)


def _error_status(exc: BaseException) -> str:
    if is_oom(exc):
        return "OOM"
    msg = " ".join(str(exc).split())
    return f"error: {type(exc).__name__}: {msg[:300]}"


def run_provider(
    spec: BenchSpec,
    provider: str,
    params: dict[str, Any],
    inputs: dict[str, Any],
    device: torch.device,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """Check call, memory call and timing of one provider on one case. Never raises (OOM -> "OOM")."""
    rec: dict[str, Any] = {"provider": provider, "status": "ok"}
    leaves = list(inputs.get("grad_leaves", ()))
    vals = None
    fn = None
    try:
        fn = spec.make_fn(provider, params, inputs)
        _clear_grads(leaves)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        rec["first_call_s"] = round(time.perf_counter() - t0, 4)
        if not args.no_check:
            vals = _collect_values(out, list(inputs.get("check_leaves", leaves)))
        del out
        _clear_grads(leaves)
        rec["peak_mem_bytes"] = peak_memory_bytes(fn, device, leaves)
        p50, p20, p80 = time_fn(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, grad_to_none=leaves)
        rec.update(ms_p50=p50, ms_p20=p20, ms_p80=p80)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, never dropped
        rec["status"] = _error_status(exc)
        vals = None
    finally:
        del fn
        _clear_grads(leaves)
        free_memory(device)
    return rec, vals


def _add_ratios(records: list[dict[str, Any]], check_ref: str = "eager") -> None:
    """Speed-up and memory ratio of every provider against every other one of the same case."""
    by_p = {r["provider"]: r for r in records}
    for r in records:
        for q, other in by_p.items():
            if q == r["provider"]:
                continue
            if r.get("ms_p50") and other.get("ms_p50"):
                r[f"speedup_vs_{q}"] = other["ms_p50"] / r["ms_p50"]
            if r.get("peak_mem_bytes") and other.get("peak_mem_bytes"):
                r[f"mem_ratio_vs_{q}"] = other["peak_mem_bytes"] / r["peak_mem_bytes"]


def _add_floor(rec: dict[str, Any], floor: Sequence[float], ceil: dict[str, Any]) -> None:
    """Floor of a case: ``floor`` is (bytes, FLOPs at the bf16 tensor-core rate[, FLOPs at the fp32
    rate]); time floor = max(bytes / bandwidth, FLOPs16 / bf16 rate + FLOPs32 / fp32 rate)."""
    bytes_, flops16 = floor[0], floor[1]
    flops32 = floor[2] if len(floor) > 2 else 0.0
    bw = ceil["bandwidth_GBps"] * 1e9
    peak16 = ceil["matmul_TFLOPs"] * 1e12
    peak32 = ceil.get("matmul_fp32_TFLOPs", ceil["matmul_TFLOPs"]) * 1e12
    floor_ms = max(bytes_ / bw, flops16 / peak16 + flops32 / peak32) * 1e3
    flops = flops16 + flops32
    rec.update(floor_bytes=bytes_, floor_flops=flops, floor_flops_fp32=flops32, floor_ms=floor_ms)
    if rec.get("ms_p50"):
        s = rec["ms_p50"] * 1e-3
        rec.update(GBps=bytes_ / s / 1e9, TFLOPs=flops / s / 1e12)
        rec["pct_of_floor"] = 100.0 * floor_ms / rec["ms_p50"]


def run_bench(
    spec: BenchSpec,
    cases: Sequence[dict[str, Any]],
    args: argparse.Namespace,
    *,
    skip: Callable[[str, dict[str, Any]], str | None] | None = None,
    post: Callable[[list[dict[str, Any]]], None] | None = None,
    late: Sequence[str] = ("compile",),
) -> Path:
    """Run every case with every provider; write ``<name>[_<tag>].json/.csv`` and plots; return the JSON.

    Two passes: first every case with the providers not in ``late``, then every case with the ``late``
    ones (torch.compile: its compilation costs seconds to minutes per shape), so that a time budget
    cut spends the time on the cheap measurements of every shape first. ``skip(provider, params)`` may
    return a reason to leave a provider out of a case (recorded as ``"skipped: <reason>"``); once
    ``--max-seconds`` is spent, what is left is recorded as ``"skipped: time budget"``. Results are
    rewritten after every provider. ``post(case_records)`` may add derived columns to a case.
    """
    device = pick_device(args.device)
    apply_threads(args, device)
    apply_unit_overrides(args)
    configure_compile()
    folder = results_dir(device, args.out)
    ceil = ceilings_for(device, folder, quick=args.quick)
    providers = [p for p in spec.providers if not args.providers or p in args.providers.split(",")]
    passes = [[p for p in providers if p not in late], [p for p in providers if p in late]]
    stem = spec.name + (f"_{args.tag}" if args.tag else "")
    json_path = folder / f"{stem}.json"
    meta = {
        "bench": spec.name,
        "tag": args.tag,
        "quick": args.quick,
        "dtype": args.dtype,
        "providers": providers,
        "argv": sys.argv,
        "env": environment(device),
        "ceilings": ceil,
        "timing": {
            "method": "triton.testing.do_bench" if device.type == "cuda" else "perf_counter loop",
            "quantiles": QUANTILES,
            "warmup_ms": args.warmup_ms,
            "rep_ms": args.rep_ms,
            "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        },
    }
    deadline = time.monotonic() + args.max_seconds
    print(f"[{stem}] device={meta['env']['device']} results={folder}", flush=True)
    print(
        f"[{stem}] ceilings: copy {ceil['bandwidth_GBps']:.0f} GB/s, "
        f"{ceil['matmul_dtype']} matmul {ceil['matmul_TFLOPs']:.1f} TFLOP/s",
        flush=True,
    )
    by_case: list[dict[str, dict[str, Any]]] = [{} for _ in cases]  # case -> provider -> record
    ref_values: list[list[torch.Tensor] | None] = [None for _ in cases]  # "eager"'s outputs, for the check
    oracles: list[tuple[list[torch.Tensor] | None, str | None] | None] = [None for _ in cases]  # float64

    def flat() -> list[dict[str, Any]]:
        return [by_case[i][p] for i in range(len(cases)) for p in providers if p in by_case[i]]

    for pass_providers in passes:
        if not pass_providers:
            continue
        for i, params in enumerate(cases):
            recs = by_case[i]
            inputs, build_status = None, None
            wanted = [p for p in pass_providers if not (skip and skip(p, params))]
            if wanted and time.monotonic() < deadline:
                try:
                    inputs = spec.build(params)
                except Exception as exc:  # noqa: BLE001
                    build_status = _error_status(exc)
                    free_memory(device)
            values: dict[str, list[torch.Tensor]] = {}
            for provider in pass_providers:
                reason = skip(provider, params) if skip else None
                if reason:
                    rec = {"provider": provider, "status": f"skipped: {reason}"}
                elif time.monotonic() >= deadline:
                    rec = {"provider": provider, "status": "skipped: time budget"}
                elif build_status is not None:
                    rec = {"provider": provider, "status": f"inputs: {build_status}"}
                else:
                    rec, vals = run_provider(spec, provider, params, inputs, device, args)
                    if vals is not None:
                        values[provider] = vals
                        if provider == "eager":
                            ref_values[i] = vals
                rec = {**params, **rec}
                if inputs is not None:
                    _add_floor(rec, spec.floor(params, inputs), ceil)
                recs[provider] = rec
                write_results(json_path, meta, flat())  # partial: a killed stage keeps what it measured
            ref = "eager" if ref_values[i] is not None else next(iter(values), None)
            if values and not args.no_check and oracles[i] is None and inputs is not None:
                oracles[i] = oracle_values(spec, params, inputs, device)
            oracle, why_not = oracles[i] or (None, "not run")
            for provider, vals in values.items():
                ref_vals = ref_values[i] if ref == "eager" else values[ref]
                recs[provider]["check_ref"] = ref
                recs[provider]["rel_err_vs_ref"] = _rel_err(vals, ref_vals)
                if oracle is not None and ref_values[i] is not None:
                    ok, ratio, eager_err = tolerance_check(vals, ref_values[i], oracle)
                    recs[provider].update(within_rule=ok, err_over_bound=ratio, eager_err_rel=eager_err)
                    if ok is None:
                        recs[provider]["oracle"] = "the oracle's outputs do not match this provider's"
                else:
                    why = why_not if oracle is None else "no eager run"
                    recs[provider].update(within_rule=None, oracle=why)
            case_records = [recs[p] for p in providers if p in recs]
            _add_ratios(case_records)
            if post:
                post(case_records)
            if pass_providers is passes[0] and not any(not (skip and skip(p, params)) for p in passes[1]):
                ref_values[i] = oracles[i] = None  # no later pass needs them
            del inputs, values
            free_memory(device)
            _print_case(stem, [recs[p] for p in pass_providers])
            write_results(json_path, meta, flat())
    if not args.no_plots:
        try:
            plot_results(json_path)
        except Exception as exc:  # noqa: BLE001 - a plot failure must not lose the numbers
            print(f"[{stem}] plotting failed: {exc!r}", flush=True)
    print(f"[{stem}] wrote {json_path}", flush=True)
    return json_path


def _print_case(stem: str, recs: list[dict[str, Any]]) -> None:
    print(f"[{stem}] {case_label(recs[0])}", flush=True)
    for r in recs:
        if r["status"] == "ok":
            mem = r.get("peak_mem_bytes")
            mem_s = f"{mem / 2**20:9.1f} MiB" if mem is not None else "      n/a    "
            err = r.get("rel_err_vs_ref")
            err_s = f"rel.err {err:.1e}" if isinstance(err, float) else ""
            if r.get("within_rule") is False:
                err_s += f"  <-- CHECK: {r['err_over_bound']:.2g} x the tolerance rule's bound (float64)"
            elif r.get("within_rule") is None and r.get("oracle"):
                err_s += f"  (no rule check: {r['oracle'][:60]})"
            print(
                f"    {r['provider']:14s} {r['ms_p50']:10.4f} ms [{r['ms_p20']:.4f}, {r['ms_p80']:.4f}]"
                f" {mem_s}  floor {r.get('pct_of_floor', float('nan')):5.1f}%  {err_s}",
                flush=True,
            )
        else:
            print(f"    {r['provider']:14s} {r['status']}", flush=True)


def main_ceilings(argv: Sequence[str] | None = None) -> None:
    """``python benchmarks/harness.py --ceilings``: measure (or read back) a results folder's ceilings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ceilings", action="store_true", required=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    folder = results_dir(device, args.out)
    ceil = ceilings_for(device, folder, quick=args.quick)
    (folder / "environment.json").write_text(json.dumps(environment(device), indent=2) + "\n")
    print(json.dumps(ceil, indent=2))


if __name__ == "__main__":
    main_ceilings()
