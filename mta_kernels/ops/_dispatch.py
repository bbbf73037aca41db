"""Which implementation an op runs: the Triton kernels or the plain-torch path.

CUDA tensors run the Triton kernels. CPU tensors run the torch path, except under
``TRITON_INTERPRET=1`` where the Triton kernels themselves run on the CPU (that is how CI tests
them). ``use_backend`` overrides the choice, for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from collections.abc import Iterator

import torch

from mta_kernels.constants import BACKENDS
from mta_kernels.ops._triton import HAS_TRITON

_forced: contextvars.ContextVar[str] = contextvars.ContextVar("mta_kernels_backend", default="auto")


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``"triton"`` or ``"torch"`` for ops called inside the block (``"auto"`` restores the rule)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` should launch the Triton kernels."""
    forced = _forced.get()
    if forced != "auto":
        if forced == "triton" and not HAS_TRITON:
            raise RuntimeError("use_backend('triton') needs triton installed (pip install triton)")
        if forced == "triton" and not (t.is_cuda or triton_interpreting()):
            raise RuntimeError(
                "use_backend('triton') on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return forced == "triton"
    if not HAS_TRITON:
        if t.is_cuda:
            _warn_no_triton()
        return False
    return t.is_cuda or (t.device.type == "cpu" and triton_interpreting())


def prefer_stacked(t: torch.Tensor) -> bool:
    """Whether a caller should hand the ops all its layer pairs stacked in one call (``[L, ...]``): on
    the Triton path and while torch.compile traces (the choice reads a context variable, which the
    tracer does not follow), launches cost more than the copy that stacking makes; on the eager torch
    path copies cost more, and each layer pair runs on views of its own layers."""
    return torch.compiler.is_compiling() or use_triton(t)


def triton_installed() -> bool:
    """Whether the Triton package is importable (without it every op runs its torch path)."""
    return HAS_TRITON


def triton_runs_on(device_type: str) -> bool:
    """Whether the Triton kernels can run on a device type: CUDA, or the CPU under ``TRITON_INTERPRET=1``."""
    return HAS_TRITON and (device_type == "cuda" or (device_type == "cpu" and triton_interpreting()))


@functools.cache
def _warn_no_triton() -> None:
    warnings.warn(
        "mta_kernels: triton is not installed, so CUDA tensors run the (slower) torch path; "
        "pip install triton for the fused kernels",
        RuntimeWarning,
        stacklevel=3,
    )
