"""Triton when it is installed, a stand-in when it is not.

The ops import ``triton`` and ``triton.language`` from here. Without Triton, ``import mta_kernels`` and
every op on CPU tensors still work (the torch path); the stand-in only lets the kernel definitions be
read, and launching one raises. ``_dispatch.use_triton`` never picks the Triton path without Triton.
"""

from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the CPU path needs no Triton
    HAS_TRITON = False

    class _MissingKernel:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Any:
            raise RuntimeError(
                f"mta_kernels: the Triton kernel {self.fn.__name__} cannot run: triton is not installed "
                "(pip install triton, or run the torch path with mta_kernels.use_backend('torch'))"
            )

    class _MissingModule:
        """Attribute access succeeds (kernel signatures, dtype tables); nothing can be launched."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attr: str) -> Any:
            if attr == "jit":
                return lambda fn=None, **_: _MissingKernel(fn) if fn is not None else _MissingKernel
            return f"<{self._name}.{attr} without triton>"

    triton = _MissingModule("triton")  # type: ignore[assignment]
    tl = _MissingModule("triton.language")  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "triton", "tl"]
