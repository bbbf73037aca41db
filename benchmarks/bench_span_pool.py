"""Span pooling (docs/method.md#span-pooling), attention-weighted, forward and forward+backward: eager
vs compile vs fused.

    python benchmarks/bench_span_pool.py --quick --device cpu
    python benchmarks/bench_span_pool.py --max-seconds 60

Floor per call (L stacked layers, N = B·T tokens of which C are covered by U units, width D, e bytes):
    fwd      bytes = L·(C·D·e + 4·C + U·D·e) + 8·U       FLOPs = 2·L·C·D
    fwd+bwd  bytes = fwd + L·(U·D·e + N·D·e + 4·C)       FLOPs = 4·L·C·D
(the backward reads dh_u and writes the dense gradient [L, N, D], zeros included).
"""

from __future__ import annotations

import argparse
from typing import Any

import harness
import registry
import torch

BENCH = registry.get("span_pool")  # the cases and providers


def make_spec(args: argparse.Namespace) -> harness.BenchSpec:
    device = harness.pick_device(args.device)
    dtype = getattr(torch, args.dtype)

    def build(p: dict[str, Any]) -> dict[str, Any]:
        L, B, T, D = p["L"], p["B"], p["T"], p["D"]
        units = harness.synth_unit_batch(B, T, p["gran"], True, args.seed, device)
        ranges = units.student_ranges
        train = p["mode"] == "fwd+bwd"
        hidden = harness.random_hidden((L, B * T, D), dtype, device, args.seed).requires_grad_(train)
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        weights = torch.rand(L, B * T, device=device, generator=gen) + 0.05  # saliency-like, positive
        U = ranges.shape[0]
        grad_out = torch.randn(L, U, D, device=device, generator=gen).to(dtype) if train else None
        covered = int((ranges[:, 1] - ranges[:, 0]).sum())
        x = {"hidden": hidden, "ranges": ranges, "weights": weights, "grad_out": grad_out, "covered": covered}
        x["plan"] = units.live_plan().student  # the fused op's layout plan: nothing read back from the device
        x["grad_leaves"] = [hidden] if train else []
        return x

    provider_fn = harness.op_providers("span_pool", "mta_kernels.ops.span_pool")

    def make_fn(provider: str, p: dict[str, Any], x: dict[str, Any]):
        f = provider_fn(provider)
        kwargs = {"plan": x["plan"]} if provider == "mta_kernels" else {}
        return harness.forward_or_train(
            p["mode"],
            lambda: f(x["hidden"], x["ranges"], x["weights"], **kwargs),
            lambda out: out.backward(x["grad_out"]),
        )

    def floor(p: dict[str, Any], x: dict[str, Any]) -> tuple[float, float]:
        L, B, T, D = p["L"], p["B"], p["T"], p["D"]
        e, C, U, N = x["hidden"].element_size(), x["covered"], x["ranges"].shape[0], B * T
        fwd_bytes = L * (C * D * e + 4 * C + U * D * e) + 8 * U
        if p["mode"] == "fwd":
            return fwd_bytes, 2.0 * L * C * D
        return fwd_bytes + L * (U * D * e + N * D * e + 4 * C), 4.0 * L * C * D

    return harness.BenchSpec("span_pool", build, make_fn, floor, BENCH.providers)


def main(argv: list[str] | None = None) -> None:
    harness.run_registered(BENCH, harness.bench_args(BENCH, __doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
