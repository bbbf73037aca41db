"""Shared test utilities: the SPEC §8 tolerance rule, devices, and an allocation watch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Devices the op tests run on: the GPU where there is one, else the CPU (Triton under the interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Low-precision dtypes the kernels accept. float64 is the oracle's.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item() if x.numel() else 0.0


def assert_within_rule(
    fused: torch.Tensor,
    eager: torch.Tensor,
    oracle: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-5,
    what: str = "",
) -> None:
    """SPEC §8: the fused error against the float64 oracle is at most ``factor`` × the error of the
    eager reference run in the same input dtype, plus an absolute ``floor``."""
    assert fused.shape == oracle.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(fused.detach()).all(), f"{what}: non-finite values in the fused result"
    err_fused = max_abs_err(fused, oracle)
    err_eager = max_abs_err(eager, oracle)
    bound = factor * err_eager + floor
    assert err_fused <= bound, f"{what}: fused error {err_fused:.3e} > {factor} x eager error {err_eager:.3e} + {floor:g}"


class AllocationWatch(TorchDispatchMode):
    """Records the element count of every tensor an op under the mode returns (allocations included)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.largest_op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.largest_op = t.numel(), str(func)
        return out


@contextlib.contextmanager
def watch_allocations() -> Iterator[AllocationWatch]:
    """``with watch_allocations() as w: ...`` then ``w.largest`` is the biggest tensor seen."""
    watch = AllocationWatch()
    with watch:
        yield watch
