"""Peak device memory of one call, out-of-memory detection, freeing memory between cases."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any

import torch
from timing import _clear_grads


def peak_memory_bytes(
    fn: Callable[[], Any], device: torch.device, grad_to_none: Sequence[torch.Tensor] | None = None
) -> int | None:
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before it (CUDA only).

    The inputs (and anything else alive) are in the baseline and so are not counted; what the call
    returns, the autograd graph it keeps and the gradients it writes are.
    """
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    _clear_grads(grad_to_none)
    return int(peak)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
