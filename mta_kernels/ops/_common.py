"""What the op files share: the grid limit, block-size clamps, the accumulation dtype as a Triton type,
the output cast (with the interpreter's bf16 rounding by hand), the autograd guard of the ops whose
gradient is computed in the forward, and the check that a layout plan is the plan of the tensor an op
was given."""

from __future__ import annotations

import torch

from mta_kernels.ops._dispatch import triton_interpreting
from mta_kernels.ops._triton import tl, triton

GRID_AXIS0_MAX = 2**31 - 1
"""Programs of a one-axis grid (axis 0 allows 2³¹ − 1; axes 1 and 2 only 65535)."""


def grid_1d(programs: int, what: str) -> tuple[int]:
    """``(programs,)``, or a ValueError naming ``what`` (the op and its sizes) past the grid limit."""
    if programs > GRID_AXIS0_MAX:
        raise ValueError(f"{what}: {programs} programs exceed the grid limit 2**31 - 1")
    return (programs,)


def pow2_block(n: int, lo: int, hi: int) -> int:
    """The next power of 2 of ``n``, clamped to ``[lo, hi]`` (block sizes of the kernels)."""
    return min(hi, max(lo, triton.next_power_of_2(n)))


def tl_acc(dtype: torch.dtype):
    """The Triton accumulation type of an accumulation dtype: ``tl.float64`` for float64, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def bf16_rtne_by_hand(dtype: torch.dtype) -> bool:
    """The kernels round fp32 -> bf16 by hand: under the CPU interpreter, which truncates that cast."""
    return triton_interpreting() and dtype == torch.bfloat16


@triton.jit
def to_output(x, dtype: tl.constexpr, BF16_RTNE_BY_HAND: tl.constexpr):
    """Cast an fp32/fp64 block to the output dtype, rounding to nearest even. Triton's CPU interpreter
    truncates fp32 -> bf16 (the GPU rounds): under the interpreter that cast is done with integer ops."""
    if BF16_RTNE_BY_HAND:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def check_gradient_in_forward(op: str, compute_grad: bool) -> None:
    """The backward of an op whose gradient the forward computed: there must be one (``compute_grad``),
    and no double backward (``create_graph=True``): the saved gradient is a constant, so a second
    derivative through it would be silently 0. Refuse rather than return a wrong Hessian term."""
    if not compute_grad:
        raise RuntimeError(f"mta_kernels::{op}: called with compute_grad=False, it has no gradient")
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"mta_kernels::{op} does not support double backward (create_graph=True): its gradient is "
            "computed in the forward pass and has no derivative of its own"
        )


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are one tensor: the same object, or views of the same memory with the same layout."""
    if a is b:
        return True
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )
