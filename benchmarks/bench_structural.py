"""DSA structural loss (docs/method.md#dsa-loss): stacked (ΣU)² eager, block-diagonal eager, torch.compile,
fused op.

    python benchmarks/bench_structural.py --quick --device cpu
    python benchmarks/bench_structural.py --max-seconds 90

Floor per call (L layer pairs, B sequences of N_b units, widths Ds/Dt, e bytes per element):
    bytes    = L·U·(Ds + Dt)·e + 4·L·U + 4·(B+1)      (+ L·U·Ds·e for the gradient with fwd+bwd)
    FLOPs    = L·Σ_b min(pairwise, feature-space):
      fwd      pairwise 2·N_b²·(Ds + Dt)          feature 2·N_b·(Ds² + Dt² + Ds·Dt)
      fwd+bwd  pairwise 2·N_b²·(2·Ds + Dt)        feature 2·N_b·(2·Ds² + Dt² + 2·Ds·Dt)
(the feature-space identity (docs/method.md#dsa-loss) wins when a sequence has more units than
dimensions). Priced per operand precision (benchmarks/NOTES.md, "Floors"): fp32 inputs entirely at the
fp32 rate; 16-bit inputs' Gram products at the tensor-core rate and the gradient's E·Ŝ product
(fp32 operands in the kernel: 2·N_b²·Ds, or 2·N_b·(Ds² + Ds·Dt) in feature space) at the fp32 rate.
"""

from __future__ import annotations

import argparse
from typing import Any

import harness
import registry
import torch

BENCH = registry.get("structural")  # the cases and providers


def make_spec(args: argparse.Namespace) -> harness.BenchSpec:
    device = harness.pick_device(args.device)
    dtype = getattr(torch, args.dtype)

    def build(p: dict[str, Any]) -> dict[str, Any]:
        L, B, T = p["L"], p["B"], p["T"]
        n, _ = harness.units_per_sequence(T, p["gran"])
        U = n * B
        train = p["mode"] == "fwd+bwd"
        student = harness.random_hidden((L, U, p["Ds"]), dtype, device, args.seed).requires_grad_(train)
        teacher = harness.random_hidden((L, U, p["Dt"]), dtype, device, args.seed + 1)
        cu = torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=device)
        gen = torch.Generator(device=device).manual_seed(args.seed + 2)
        weights = torch.rand(L, U, device=device, generator=gen) + 0.05
        return {
            "student": student,
            "teacher": teacher,
            "cu": cu,
            "weights": weights,
            "counts": [n] * B,
            "grad_leaves": [student] if train else [],
        }

    provider_fn = harness.op_providers(
        "structural_loss", "mta_kernels.ops.structural", {"eager_stacked": "structural_loss_stacked"}
    )

    def make_fn(provider: str, p: dict[str, Any], x: dict[str, Any]):
        f = provider_fn(provider)
        return harness.forward_or_train(
            p["mode"],
            lambda: f(x["student"], x["teacher"], x["cu"], x["weights"]),
            lambda loss: loss.sum().backward(),
        )

    def floor(p: dict[str, Any], x: dict[str, Any]) -> tuple[float, float, float]:
        e = x["student"].element_size()
        return structural_floor_by_rate(p["mode"], p["L"], x["counts"], p["Ds"], p["Dt"], e)

    return harness.BenchSpec("structural", build, make_fn, floor, BENCH.providers)


def structural_floor(mode: str, L: int, counts: list[int], Ds: int, Dt: int, e: int) -> tuple[float, float]:
    """(bytes, FLOPs) floor of the DSA loss over L layer pairs with ``counts[b]`` units in sequence b."""
    U, B = sum(counts), len(counts)
    bytes_ = L * U * (Ds + Dt) * e + 4 * L * U + 4 * (B + 1)
    flops = 0.0
    for n in counts:
        if n < 2:
            continue
        if mode == "fwd":
            flops += min(2.0 * n * n * (Ds + Dt), 2.0 * n * (Ds * Ds + Dt * Dt + Ds * Dt))
        else:
            flops += min(2.0 * n * n * (2 * Ds + Dt), 2.0 * n * (2 * Ds * Ds + Dt * Dt + 2 * Ds * Dt))
    if mode != "fwd":
        bytes_ += L * U * Ds * e
    return bytes_, L * flops


def structural_floor_by_rate(
    mode: str, L: int, counts: list[int], Ds: int, Dt: int, e: int
) -> tuple[float, float, float]:
    """:func:`structural_floor` split by rate: (bytes, FLOPs at the tensor-core rate, FLOPs at the fp32
    rate). fp32 inputs (e = 4): all fp32. 16-bit inputs: the gradient's E·Ŝ part is fp32."""
    bytes_, total = structural_floor(mode, L, counts, Ds, Dt, e)
    if e >= 4:
        return bytes_, 0.0, total
    grad = 0.0
    if mode != "fwd":
        for n in counts:
            if n < 2:
                continue
            pair, feature = 2.0 * n * n * (2 * Ds + Dt), 2.0 * n * (2 * Ds * Ds + Dt * Dt + 2 * Ds * Dt)
            grad += 2.0 * n * n * Ds if pair <= feature else 2.0 * n * (Ds * Ds + Ds * Dt)
    return bytes_, total - L * grad, L * grad


def main(argv: list[str] | None = None) -> None:
    harness.run_registered(BENCH, harness.bench_args(BENCH, __doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
