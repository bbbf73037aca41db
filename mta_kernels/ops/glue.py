"""Small kernels of the glue between the ops: one launch where the torch composition takes many.

- :func:`dsa_denominator`: ``Σ_b [n_b ≥ 2] ((Σ_{u in b} W_u)² − Σ_{u in b} W_u²)`` per layer, the
  denominator of the weighted DSA loss (docs/method.md#dsa-loss), in float64, in one program per layer
  that walks the sequences in order (deterministic).
- :func:`normalised_weights`: ``ŵ_i = a_i / Σ_{k covered, same sequence} a_k`` on covered tokens, 0
  elsewhere (docs/method.md#span-pooling), one program per (sequence, layer).
"""

from __future__ import annotations

import torch

from mta_kernels._triton import tl, triton

__all__ = ["dsa_denominator", "normalised_weights"]


@triton.jit
def _dsa_denominator_kernel(
    W,  # [L or 1, U] unit weights, any float dtype (stride_wl = 0 broadcasts one row)
    CU,  # int32 [B+1]
    OUT,  # [L] output dtype
    B,
    stride_wl,
    stride_wu,
    BU: tl.constexpr,
):
    i_l = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BU).to(tl.int64)
    b_den = tl.zeros([BU], dtype=tl.float64)  # the total sits in slot 0
    for b in range(0, B):
        lo = tl.load(CU + b).to(tl.int64)
        hi = tl.load(CU + b + 1).to(tl.int64)
        b_s1 = tl.zeros([BU], dtype=tl.float64)
        b_s2 = tl.zeros([BU], dtype=tl.float64)
        for u0 in range(lo, hi, BU):
            m = u0 + o < hi
            b_w = tl.load(W + i_l * stride_wl + (u0 + o) * stride_wu, mask=m, other=0.0).to(tl.float64)
            b_s1 += b_w
            b_s2 += b_w * b_w
        s1 = tl.sum(b_s1, axis=0)
        s2 = tl.sum(b_s2, axis=0)
        b_den += tl.where((o == 0) & (hi - lo >= 2), s1 * s1 - s2, 0.0)
    tl.store(OUT + i_l, tl.sum(b_den, axis=0).to(OUT.dtype.element_ty))


def dsa_denominator(
    weights: torch.Tensor, cu_units: torch.Tensor, L: int, dtype: torch.dtype
) -> torch.Tensor:
    """``[L]`` weighted DSA denominator (float64 sums, cast to ``dtype``) in one launch.

    Args:
        weights: ``[L, U]`` or ``[1, U]`` unit weights (read in place). cu_units: int32 ``[B+1]``, valid.
    """
    out = torch.empty(L, dtype=dtype, device=weights.device)
    if L == 0:
        return out
    _dsa_denominator_kernel[(L,)](
        weights,
        cu_units,
        out,
        cu_units.shape[0] - 1,
        weights.stride(0) if weights.shape[0] > 1 else 0,
        weights.stride(1),
        BU=64,
        num_warps=1,
    )
    return out


@triton.jit
def _normalised_weights_kernel(
    A,  # [L, B, T] saliency, contiguous
    T2U,  # int32 [B*T] unit of each token, -1 = uncovered
    OUT,  # [L, B, T] contiguous
    B,
    T,
    BT: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_l = tl.program_id(1).to(tl.int64)
    base = (i_l * B + i_b) * T
    o = tl.arange(0, BT).to(tl.int64)
    b_sum = tl.zeros([BT], dtype=tl.float32)
    for t0 in range(0, T, BT):
        m = t0 + o < T
        cov = tl.load(T2U + i_b * T + t0 + o, mask=m, other=-1) >= 0
        b_sum += tl.where(cov, tl.load(A + base + t0 + o, mask=m, other=0.0).to(tl.float32), 0.0)
    total = tl.sum(b_sum, axis=0)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)  # all-zero sequence: weights 0
    for t0 in range(0, T, BT):
        m = t0 + o < T
        cov = tl.load(T2U + i_b * T + t0 + o, mask=m, other=-1) >= 0
        b_a = tl.load(A + base + t0 + o, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + base + t0 + o, tl.where(cov, b_a * inv, 0.0), mask=m)


def normalised_weights(saliency: torch.Tensor, token_to_unit: torch.Tensor) -> torch.Tensor:
    """``[L, B, T]`` float32 normalised covered-token weights in one launch.

    Args:
        saliency: float32 ``[L, B, T]`` (made contiguous). token_to_unit: int32 ``[B*T]`` (-1 uncovered).
    """
    L, B, T = saliency.shape
    a = saliency.contiguous()
    out = torch.empty_like(a)
    if a.numel() > 0:
        BT = min(1024, max(16, triton.next_power_of_2(T)))
        _normalised_weights_kernel[(B, L)](a, token_to_unit, out, B, T, BT=BT, num_warps=4)
    return out
