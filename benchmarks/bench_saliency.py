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
import registry
import torch

BENCH = registry.get("saliency")  # the cases and providers


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

    return harness.BenchSpec("saliency", build, make_fn, floor, BENCH.providers)


def main(argv: list[str] | None = None) -> None:
    harness.run_registered(BENCH, harness.bench_args(BENCH, __doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
