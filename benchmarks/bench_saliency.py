"""Token saliency (docs/method.md#token-saliency), forward only: eager reference vs torch.compile vs the
fused op.

    python benchmarks/bench_saliency.py --quick --device cpu      # tiny CPU smoke run
    python benchmarks/bench_saliency.py --case issue               # T=4096, D=2048, B=8, six stacked layers
    python benchmarks/bench_saliency.py --case sweep --max-seconds 60

Floor per call (L stacked layers, B sequences of T tokens, width D, e bytes per element):
    bytes = L·B·T·D·e (read hidden) + 4·L·B·T (write float32 saliency) + B·T (mask)
    FLOPs = 2·L·B·T²·D: the useful work, one T×T Gram product per sequence and layer, without using its
            symmetry (T²·D would count each pair once). The kernel does twice that (4·L·B·T²·D): the
            column sums of a row softmax need the row statistics first, so a kernel that never stores the
            T×T matrix computes the scores twice; "% of floor" is against the useful 2·L·B·T²·D.
    Priced at the bf16 tensor-core rate for 16-bit inputs, at the fp32 rate for fp32 inputs (the kernel
    keeps fp32 operands in fp32: an IEEE dot).
"""

from __future__ import annotations

import argparse
from typing import Any

import harness
import torch

# compile last: a stage timeout during compilation then loses the least.
PROVIDERS = ("eager", "mta_kernels", "compile")


def cases(which: str, quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [dict(case="quick", L=2, B=2, T=t, D=64) for t in (32, 64)]
    if which == "issue":
        # The saliency issue's case: peak memory of six stacked layers at T=4096.
        return [dict(case="issue", L=6, B=8, T=4096, D=2048)]
    out = []
    for D, B in ((768, 16), (1600, 16)):  # GPT-2 student / GPT-2-XL teacher widths
        out += [dict(case="sweep", L=1, B=B, T=T, D=D) for T in (256, 512, 1024, 2048)]
    for D, B in ((2048, 8), (4096, 8)):  # TinyLlama / Mistral widths
        out += [dict(case="sweep", L=1, B=B, T=T, D=D) for T in (512, 2048)]
    # Most informative first (a time-budget cut keeps them): T = 512 and 2048 of every series.
    return sorted(out, key=lambda p: p["T"] not in (512, 2048))


def compile_only_at_selected(provider: str, p: dict[str, Any]) -> str | None:
    """torch.compile recompiles per shape: in the sweep it is measured at the teacher width only."""
    if provider != "compile" or p["case"] != "sweep" or p["D"] == 1600:
        return None
    return "compile measured at selected shapes only (GPU time budget)"


def make_spec(args: argparse.Namespace) -> harness.BenchSpec:
    device = harness.pick_device(args.device)
    dtype = getattr(torch, args.dtype)

    def build(p: dict[str, Any]) -> dict[str, Any]:
        hidden = harness.random_hidden((p["L"], p["B"], p["T"], p["D"]), dtype, device, args.seed)
        mask = torch.ones(p["B"], p["T"], dtype=torch.bool, device=device)
        return {"hidden": hidden, "mask": mask}

    provider_fn = harness.op_providers("token_saliency", "mta_kernels.ops.saliency")

    def make_fn(provider: str, p: dict[str, Any], x: dict[str, Any]):
        f = provider_fn(provider)
        return lambda: f(x["hidden"], x["mask"])

    def floor(p: dict[str, Any], x: dict[str, Any]) -> tuple[float, float, float]:
        L, B, T, D = p["L"], p["B"], p["T"], p["D"]
        e = x["hidden"].element_size()
        flops = 2.0 * L * B * T * T * D  # useful work: one Gram product, symmetry not used
        bytes_ = L * B * T * D * e + 4 * L * B * T + B * T
        return (bytes_, flops, 0.0) if e == 2 else (bytes_, 0.0, flops)

    return harness.BenchSpec("saliency", build, make_fn, floor, PROVIDERS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--case", default="sweep", choices=["sweep", "issue"])
    args = parser.parse_args(argv)
    if args.tag is None:
        args.tag = args.case
    harness.run_bench(make_spec(args), cases(args.case, args.quick), args, skip=compile_only_at_selected)


if __name__ == "__main__":
    main()
