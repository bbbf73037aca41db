"""Timing of one benchmark call: median and 20th/80th percentiles in milliseconds.

CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs), or the same protocol with
CUDA events when triton is absent. CPU: a ``perf_counter`` loop with the same warm-up and repeat budgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

QUANTILES = (0.5, 0.2, 0.8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of ``fn``'s run time in milliseconds.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); without triton, the same
    protocol with CUDA events. CPU: a ``perf_counter`` loop with the same warm-up and repeat budgets
    (at least 3 timed runs).
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _time_cuda_events(fn, warmup_ms, rep_ms, grad_to_none)
        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
        p50, p20, p80 = q
        return float(p50), float(p20), float(p80)
    return _time_cpu(fn, warmup_ms, rep_ms, grad_to_none)


def _clear_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _time_cpu(
    fn: Callable[[], Any], warmup_ms: float, rep_ms: float, grad_to_none: Sequence[torch.Tensor] | None
) -> tuple[float, float, float]:
    _clear_grads(grad_to_none)
    t0 = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(0, int(warmup_ms / estimate_ms) - 1)):
        _clear_grads(grad_to_none)
        fn()
    times: list[float] = []
    n_rep = max(3, int(rep_ms / estimate_ms))
    for _ in range(n_rep):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def _time_cuda_events(
    fn: Callable[[], Any], warmup_ms: float, rep_ms: float, grad_to_none: Sequence[torch.Tensor] | None
) -> tuple[float, float, float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        _clear_grads(grad_to_none)
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    n_rep = max(1, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        _clear_grads(grad_to_none)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])
