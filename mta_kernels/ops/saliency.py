"""Token saliency (docs/method.md#token-saliency): the mean attention each token receives under a parameter-free
self-attention of a layer's hidden states, computed flash-style without the T×T matrix.

For one sequence and layer, hidden ``H`` ``[T, D]``, valid tokens V, ``n = |V|``::

    r_i  = 1 / (std(H_i) + 1e-5)                 std over D, unbiased, not centred in the product
    S_ji = r_j r_i (H_j · H_i) / sqrt(D)         j, i in V, i != j
    A_j· = softmax over i in V \\ {j} of S_j·
    a_i  = (1/n) Σ_{j in V} A_ji                 0 for padding; 1 for the lone token when n == 1

Triton path (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``), three launches, each on a one-axis
grid of (block, sequence, layer) programs (``_grid``):

0. ``_row_scale_kernel``  T/BR · B · L programs: r_i in fp32, two passes over D (mean, then the centred
   sum of squares), so bf16 rows with |h| ~ 1e4 neither overflow nor cancel.
1. ``_row_stats_kernel``  T/BM · B · L programs: a block of query rows j runs an online softmax over the
   key blocks; the score tile is ``tl.dot`` of the *raw* hidden rows over D in chunks of BD, scaled
   by ``r_j r_i log2(e) / sqrt(D)`` afterwards. Stores the row max ``m2_j`` and ``log2`` of the row sum
   *separately* (+inf max for rows that have no keys: padding, or n < 2). Keeping the max apart matters:
   scores are not centred (docs/method.md#token-saliency), so rows with a large common direction have S2 ~ 1e4 and a stored
   log-sum-exp would round to ~1e-3 there; pass 2 recomputes the same tiles, rounded alike (no fp
   fusion, ``SCORE_LAUNCH_OPTIONS``), so ``S2 - m2`` is exact for the row's largest score.
2. ``_colsum_kernel``     T/BN · B · L programs: a block of key columns i loops over all query blocks j,
   recomputes the score tile and accumulates ``Σ_j exp2((S2_ji - m2_j) - log2 l_j)``; then divides by n and
   applies the n == 1 and padding rules. Each output column has one owner: no atomics, deterministic.

The key loop of pass 1 and the query loop of pass 2 run only over ``[first valid, last valid]`` of the
sequence, so left/right padding costs no FLOPs; holes inside are masked element-wise.

Torch path (CPU tensors without the interpreter, or ``use_backend("torch")``): the same math in
chunks of at most 256 query rows × T keys (and a bounded number of sequences per chunk), so it never
holds a T×T matrix either; a chunk holds all keys of its rows, so one pass suffices there.

No gradient: the saliency is a constant weight. ``token_saliency`` returns a tensor that
does not require grad (``hidden`` is detached), so ``out.backward()`` raises torch's "does not require
grad" error rather than silently giving a zero gradient; calling the raw op
``torch.ops.mta_kernels.token_saliency`` on a tensor that requires grad gives an output whose backward
raises ``RuntimeError("token_saliency has no gradient ...")``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mta_kernels.ops._common import grid_1d, pow2_block
from mta_kernels.ops._dispatch import triton_interpreting, use_triton
from mta_kernels.ops._triton import tl, triton

__all__ = ["MaskStats", "mask_stats", "token_saliency"]

SALIENCY_STD_EPS = 1e-5
_LOG2E = 1.4426950408889634
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# Torch path: at most this many query rows per chunk, and chunks of at most max(_TORCH_CHUNK_ELEMS,
# 256 * T) scores: below T ≈ 725 a chunk may hold T² scores (a constant 2 MB), above never.
_TORCH_CHUNK_ROWS = 256
_TORCH_CHUNK_ELEMS = 1 << 19


# ------------------------------------------------------------------------------------ Triton kernels
@triton.jit
def _program_coords(pid, B, T, BLOCK: tl.constexpr):
    """(block of T, sequence b, layer l) of this program, all int64, from a one-axis grid of
    ``cdiv(T, BLOCK) · B · L`` programs: axis 0 allows 2³¹ − 1 programs, axes 1 and 2 only 65535, so no
    batch or layer count can exceed a grid limit. Blocks of one sequence are adjacent (shared keys in L2)."""
    pid = pid.to(tl.int64)
    num_blocks = tl.cdiv(T, BLOCK).to(tl.int64)
    i_g = pid // num_blocks
    return pid % num_blocks, i_g % B, i_g // B


@triton.jit
def _row_scale_kernel(
    h_ptr,  # [L, B, T, D] any strides, any float dtype
    r_ptr,  # [L, B, T] fp32, contiguous (out)
    B,
    T,
    D,
    stride_hl,
    stride_hb,
    stride_ht,
    stride_hd,
    eps,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    # r_i = 1 / (std_i + eps), std unbiased over D. Two passes (mean, then Σ (x - mean)²) in fp32:
    # the one-pass Σx² - n·mean² cancels catastrophically for rows with a large mean. Correctly rounded
    # division and square root (div_rn, sqrt_rn): the default lowering is div.full / sqrt.approx, whose
    # error would differ from the oracle's in every score of the row.
    pid_t, i_b, i_l = _program_coords(tl.program_id(0), B, T, BR)
    o_t = pid_t * BR + tl.arange(0, BR).to(tl.int64)  # [BR]
    m_t = o_t < T
    p_row = h_ptr + i_l * stride_hl + i_b * stride_hb + o_t[:, None] * stride_ht  # [BR, 1]

    b_sum = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD).to(tl.int64)  # [BD]
        m_x = m_t[:, None] & (o_d < D)[None, :]  # [BR, BD]
        b_x = tl.load(p_row + o_d[None, :] * stride_hd, mask=m_x, other=0.0).to(tl.float32)
        b_sum += tl.sum(b_x, axis=1)
    b_mean = tl.div_rn(b_sum, tl.full([BR], D, tl.float32))  # [BR]

    b_ss = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD).to(tl.int64)
        m_x = m_t[:, None] & (o_d < D)[None, :]
        b_x = tl.load(p_row + o_d[None, :] * stride_hd, mask=m_x, other=0.0).to(tl.float32)
        b_c = tl.where(m_x, b_x - b_mean[:, None], 0.0)  # [BR, BD]
        b_ss += tl.sum(b_c * b_c, axis=1)
    b_std = tl.sqrt_rn(tl.div_rn(b_ss, tl.full([BR], D - 1, tl.float32)))
    b_r = tl.div_rn(tl.full([BR], 1.0, tl.float32), b_std + eps)
    tl.store(r_ptr + (i_l * B + i_b) * T + o_t, b_r, mask=m_t)


@triton.jit
def _score_tile(
    p_q,  # [BM, 1] pointers to the query rows (layer and batch offsets applied)
    p_k,  # [1, BN] pointers to the key rows
    m_q,  # [BM] query rows in range
    m_k,  # [BN] key rows in range
    D,
    stride_hd,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # H_q · H_kᵀ over D in chunks of BD, fp32 accumulation; the raw (unscaled) rows go into the dot so
    # bf16/fp16 inputs stay on the tensor cores with exact products.
    b_s = tl.zeros([BM, BN], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = (d0 + tl.arange(0, BD)).to(tl.int64)  # [BD]
        m_d = o_d < D
        b_q = tl.load(p_q + o_d[None, :] * stride_hd, mask=m_q[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        b_k = tl.load(p_k + o_d[:, None] * stride_hd, mask=m_d[:, None] & m_k[None, :], other=0.0)  # [BD, BN]
        if DOT_FP32:
            b_q = b_q.to(tl.float32)
            b_k = b_k.to(tl.float32)
        b_s = tl.dot(b_q, b_k, b_s, input_precision=DOT_PRECISION)  # [BM, BN]
    return b_s


@triton.jit
def _row_stats_kernel(
    h_ptr,  # [L, B, T, D]
    r_ptr,  # [L, B, T] fp32 row scales
    valid_ptr,  # [B, T] int8
    span_ptr,  # [B, 2] int32: first valid token, last valid token + 1
    n_ptr,  # [B] int32 valid tokens
    max_ptr,  # [L, B, T] fp32 (out): base-2 row max m2_j, +inf for rows without keys
    lsum_ptr,  # [L, B, T] fp32 (out): log2 of the row sum Σ exp2(S2 - m2), in [0, log2 T]
    B,
    T,
    D,
    stride_hl,
    stride_hb,
    stride_ht,
    stride_hd,
    qk_scale,  # log2(e) / sqrt(D)
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Pass 1: m2_j = max_i S2_ji and log2 l_j = log2 Σ_{i valid, i != j} exp2(S2_ji - m2_j), S2_ji = r_j r_i (H_j·H_i) log2(e)/sqrt(D),
    # with an online (running max) softmax over key blocks.
    pid_m, i_b, i_l = _program_coords(tl.program_id(0), B, T, BM)
    h_base = h_ptr + i_l * stride_hl + i_b * stride_hb
    rl_base = (i_l * B + i_b) * T  # offset of this (layer, sequence) in [L, B, T]
    n_valid = tl.load(n_ptr + i_b)
    span_lo = tl.load(span_ptr + 2 * i_b)
    span_hi = tl.load(span_ptr + 2 * i_b + 1)

    row_lo = pid_m * BM
    o_m = row_lo + tl.arange(0, BM).to(tl.int64)  # [BM] query rows j
    m_m = o_m < T
    b_vq = tl.load(valid_ptr + i_b * T + o_m, mask=m_m, other=0) != 0  # [BM]
    b_rq = tl.load(r_ptr + rl_base + o_m, mask=m_m, other=0.0) * qk_scale  # [BM]
    p_q = h_base + o_m[:, None] * stride_ht  # [BM, 1]

    # Keys only inside [span_lo, span_hi); no keys at all when this block has no valid row or n < 2.
    has_work = (n_valid >= 2) & (span_lo < row_lo + BM) & (span_hi > row_lo)
    key_lo = (span_lo // BN) * BN
    key_hi = tl.where(has_work, span_hi, key_lo)

    b_max = tl.full([BM], float("-inf"), dtype=tl.float32)  # running max (base 2)
    b_sum = tl.zeros([BM], dtype=tl.float32)  # running Σ exp2(S2 - b_max)
    for n0 in range(key_lo, key_hi, BN):
        o_n = n0 + tl.arange(0, BN).to(tl.int64)  # [BN] key columns i
        m_n = o_n < T
        b_vk = tl.load(valid_ptr + i_b * T + o_n, mask=m_n, other=0) != 0  # [BN]
        b_rk = tl.load(r_ptr + rl_base + o_n, mask=m_n, other=0.0)  # [BN]
        p_k = h_base + o_n[None, :] * stride_ht  # [1, BN]
        b_s = _score_tile(p_q, p_k, m_m, m_n, D, stride_hd, BM, BN, BD, DOT_FP32, DOT_PRECISION)
        b_s = b_s * b_rq[:, None] * b_rk[None, :]  # [BM, BN] S2
        m_s = b_vk[None, :] & (o_m[:, None] != o_n[None, :])  # [BM, BN] valid key, not the diagonal
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_max_new = tl.maximum(b_max, tl.max(b_s, axis=1))
        # A row that has seen no key yet keeps max -inf: shift by 0 so that no -inf - -inf occurs.
        b_shift = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)
        b_sum = b_sum * tl.exp2(b_max - b_shift) + tl.sum(tl.exp2(b_s - b_shift[:, None]), axis=1)
        b_max = b_max_new

    # A valid row of a sequence with n >= 2 has at least one key, so b_sum > 0 there.
    b_has_keys = b_vq & (n_valid >= 2)
    tl.store(max_ptr + rl_base + o_m, tl.where(b_has_keys, b_max, float("inf")), mask=m_m)
    tl.store(lsum_ptr + rl_base + o_m, tl.log2(tl.where(b_has_keys, b_sum, 1.0)), mask=m_m)


@triton.jit
def _colsum_kernel(
    h_ptr,  # [L, B, T, D]
    r_ptr,  # [L, B, T] fp32 row scales
    valid_ptr,  # [B, T] int8
    span_ptr,  # [B, 2] int32
    n_ptr,  # [B] int32
    max_ptr,  # [L, B, T] fp32 row max from pass 1
    lsum_ptr,  # [L, B, T] fp32 log2 row sum from pass 1
    out_ptr,  # [L, B, T] fp32 (out): saliency
    B,
    T,
    D,
    stride_hl,
    stride_hb,
    stride_ht,
    stride_hd,
    qk_scale,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Pass 2: a_i = (1/n) Σ_j exp2((S2_ji - m2_j) - log2 l_j) over query rows j with keys, i valid, i != j.
    # This program owns key columns [pid_n*BN, pid_n*BN + BN) of one (layer, sequence) and sums over
    # every query block itself: one writer per output, no atomics, a fixed summation order.
    pid_n, i_b, i_l = _program_coords(tl.program_id(0), B, T, BN)
    h_base = h_ptr + i_l * stride_hl + i_b * stride_hb
    rl_base = (i_l * B + i_b) * T
    n_valid = tl.load(n_ptr + i_b)
    span_lo = tl.load(span_ptr + 2 * i_b)
    span_hi = tl.load(span_ptr + 2 * i_b + 1)

    col_lo = pid_n * BN
    o_n = col_lo + tl.arange(0, BN).to(tl.int64)  # [BN] key columns i
    m_n = o_n < T
    b_vk = tl.load(valid_ptr + i_b * T + o_n, mask=m_n, other=0) != 0  # [BN]
    b_rk = tl.load(r_ptr + rl_base + o_n, mask=m_n, other=0.0)  # [BN]
    p_k = h_base + o_n[None, :] * stride_ht  # [1, BN]

    has_work = (n_valid >= 2) & (span_lo < col_lo + BN) & (span_hi > col_lo)
    query_lo = (span_lo // BM) * BM
    query_hi = tl.where(has_work, span_hi, query_lo)

    b_acc = tl.zeros([BN], dtype=tl.float32)
    for m0 in range(query_lo, query_hi, BM):
        o_m = m0 + tl.arange(0, BM).to(tl.int64)  # [BM] query rows j
        m_m = o_m < T
        b_max = tl.load(max_ptr + rl_base + o_m, mask=m_m, other=float("inf"))  # [BM]
        b_lsum = tl.load(lsum_ptr + rl_base + o_m, mask=m_m, other=0.0)  # [BM]
        b_rq = tl.load(r_ptr + rl_base + o_m, mask=m_m, other=0.0) * qk_scale  # [BM]
        p_q = h_base + o_m[:, None] * stride_ht  # [BM, 1]
        b_s = _score_tile(p_q, p_k, m_m, m_n, D, stride_hd, BM, BN, BD, DOT_FP32, DOT_PRECISION)
        b_s = b_s * b_rq[:, None] * b_rk[None, :]  # [BM, BN] S2
        # Rows without keys carry m2 = +inf; masking them (not only relying on exp2(-inf) = 0) keeps
        # garbage (even NaN) hidden states at padding positions out of the sum.
        m_p = (b_max != float("inf"))[:, None] & b_vk[None, :] & (o_m[:, None] != o_n[None, :])
        b_s = (b_s - b_max[:, None]) - b_lsum[:, None]  # [BM, BN] log2 A_ji
        b_p = tl.where(m_p, tl.exp2(tl.where(m_p, b_s, float("-inf"))), 0.0)
        b_acc += tl.sum(b_p, axis=0)

    b_a = tl.div_rn(b_acc, tl.full([BN], tl.maximum(n_valid, 1), tl.float32))
    b_a = tl.where(n_valid == 1, 1.0, b_a)  # the lone valid token of an n == 1 sequence
    b_a = tl.where(b_vk, b_a, 0.0)
    tl.store(out_ptr + rl_base + o_n, b_a, mask=m_n)


# ------------------------------------------------------------------------------------- host launchers
class MaskStats(NamedTuple):
    """What the saliency reads of an attention mask, computed once per mask by :func:`mask_stats` and
    handed to every saliency call over that mask (both sides, every layer group of a loss).

    Attributes:
        valid: bool ``[B, T]``, the mask's non-zero entries.
        count: int32 ``[B]``, valid tokens per sequence.
        span: int32 ``[B, 2]``, ``[first valid, last valid + 1)`` per sequence (``[T, 0)`` without any).
    """

    valid: torch.Tensor
    count: torch.Tensor
    span: torch.Tensor


def mask_stats(attention_mask: torch.Tensor) -> MaskStats:
    """The :class:`MaskStats` of an attention mask ``[B, T]`` (bool or 0/1 integers), on its device: no
    host sync."""
    valid = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    count, span = _count_and_span(valid)
    return MaskStats(valid, count, span)


def _count_and_span(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: valid-token count ``n`` int32 ``[B]`` and span ``[first, last + 1)`` int32 ``[B, 2]``.

    A sequence without valid tokens gets the empty span ``[T, 0)``. Computed on the device: no sync.
    """
    B, T = valid.shape
    pos = torch.arange(1, T + 1, device=valid.device, dtype=torch.int32)  # position + 1
    n = valid.sum(dim=-1, dtype=torch.int32)
    last = (valid * pos).amax(dim=-1) if T > 0 else n  # last valid + 1, 0 without valid tokens
    # leading tokens before the first valid one: T without valid tokens
    first = (valid.cumsum(dim=-1, dtype=torch.int32) == 0).sum(dim=-1, dtype=torch.int32)
    return n, torch.stack([first, last], dim=-1)


def _block_sizes(T: int, D: int, fp32_operands: bool) -> tuple[int, int, int]:
    """Query block BM, key block BN, D chunk BD (powers of two >= 16, the tl.dot minimum).

    fp32 (and fp64) operands take BD <= 32: at BD = 64 ptxas spilled 24–72 B per thread for sm_90 and the
    tiles used 64 KB of shared memory (AOT compile, docs/design/gpu-readiness.md)."""
    bt = pow2_block(T, 16, 64)
    bd = pow2_block(D, 16, 32 if fp32_operands else 64)
    return bt, bt, bd


# Launch options of the two score passes. No FMA contraction: pass 2 must round S2 = (H_j·H_i) r_j r_i
# exactly as pass 1 does before its row max, so that S2 − m2 is exactly 0 at the row's largest score. With
# contraction the compiler fuses pass 2's scale-and-subtract into one fma (S2 unrounded) while pass 1's
# tl.where keeps its mul: up to 0.5 ulp of S2 apart (≈ 5e-4 at S2 ≈ 9000, i.e. hidden states with outlier
# channels). tests/test_triton_compile.py checks the PTX.
SCORE_LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=False)
_ROW_SCALE_BR = 16


def _row_scale_bd(D: int) -> int:
    """D chunk of the row-scale kernel."""
    return pow2_block(D, 16, 128)


def _grid(T: int, block: int, B: int, L: int) -> tuple[int]:
    """One-axis grid of ``cdiv(T, block) · B · L`` programs (see ``_program_coords``)."""
    return grid_1d(triton.cdiv(T, block) * B * L, f"token_saliency (T={T}, B={B}, L={L})")


def _saliency_triton(
    hidden: torch.Tensor,
    valid: torch.Tensor,
    out: torch.Tensor,
    count_and_span: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Triton path: ``hidden`` ``[L, B, T, D]`` (any strides), ``valid`` bool ``[B, T]`` (and its
    :class:`MaskStats` count and span, when the caller has them); writes ``out`` float32 contiguous
    ``[L, B, T]``."""
    L, B, T, D = hidden.shape
    n, span = _count_and_span(valid) if count_and_span is None else count_and_span
    valid_i8 = valid.contiguous().view(torch.int8)  # bool bytes are 0/1: a view, no copy
    r = torch.empty(L, B, T, device=hidden.device, dtype=torch.float32)
    row_max = torch.empty(L, B, T, device=hidden.device, dtype=torch.float32)
    row_lsum = torch.empty(L, B, T, device=hidden.device, dtype=torch.float32)
    strides = hidden.stride()
    # bf16/fp16 stay in their dtype for the dot (products are exact in fp32, tensor cores); fp32 uses
    # an IEEE dot (TF32 would be ~1e-3 off the oracle); fp64, and everything under the interpreter
    # (no bf16 arithmetic there), is cast to fp32 first.
    dot_fp32 = triton_interpreting() or hidden.dtype not in (torch.bfloat16, torch.float16)
    BM, BN, BD = _block_sizes(T, D, dot_fp32)
    precision = "ieee" if dot_fp32 else None  # None: the default, which only matters for fp32 operands
    qk_scale = _LOG2E / math.sqrt(D)

    _row_scale_kernel[_grid(T, _ROW_SCALE_BR, B, L)](
        hidden, r, B, T, D, *strides, SALIENCY_STD_EPS, BR=_ROW_SCALE_BR, BD=_row_scale_bd(D)
    )
    common = dict(BM=BM, BN=BN, BD=BD, DOT_FP32=dot_fp32, DOT_PRECISION=precision, **SCORE_LAUNCH_OPTIONS)
    _row_stats_kernel[_grid(T, BM, B, L)](
        hidden, r, valid_i8, span, n, row_max, row_lsum, B, T, D, *strides, qk_scale, **common
    )
    _colsum_kernel[_grid(T, BN, B, L)](
        hidden, r, valid_i8, span, n, row_max, row_lsum, out, B, T, D, *strides, qk_scale, **common
    )


def _saliency_torch(hidden: torch.Tensor, valid: torch.Tensor, out: torch.Tensor) -> None:
    """Torch path, same math in chunks of <= 256 query rows × T keys: ``hidden`` ``[L, B, T, D]``,
    ``valid`` bool ``[B, T]``; writes ``out`` float32 contiguous ``[L, B, T]``.

    The row-normalised copy of the hidden states is made per chunk of sequences, never for all L·B at
    once; the score scale is applied to the query chunk (c × D) rather than to the scores (c × T)."""
    L, B, T, D = hidden.shape
    G = L * B
    h = hidden.reshape(G, T, D)  # a view for stacked / contiguous layers
    key_valid = valid.expand(L, B, T).reshape(G, T)  # [G, T]
    n = key_valid.sum(dim=-1)  # [G]
    row_votes = key_valid & (n >= 2)[:, None]  # [G, T] query rows that have keys and vote
    row_weight = row_votes.to(torch.float32)[:, None, :]  # [G, 1, T]
    key_invalid = ~key_valid[:, None, :]  # [G, 1, T]
    # Host data on this path (the CPU, or a test forcing the torch path): the masks are applied only
    # where they change something. Rows without keys (padding, n < 2) get a dummy finite row: no NaN,
    # weight 0 below; masking after the GEMM also keeps garbage (NaN) hidden states at padding out.
    all_vote = bool(row_votes.all())
    all_keys = all_vote or bool(key_valid.all())
    acc = out.view(G, T)
    acc.zero_()
    scale = 1.0 / math.sqrt(D)
    rows = min(T, _TORCH_CHUNK_ROWS)
    seqs = max(1, min(G, _TORCH_CHUNK_ELEMS // (rows * T)))
    for g0 in range(0, G, seqs):
        g1 = min(G, g0 + seqs)
        hk = h[g0:g1].to(torch.float32)
        hk = hk / (hk.std(dim=-1, keepdim=True) + SALIENCY_STD_EPS)  # [g, T, D], as the reference
        hk_t = hk.transpose(-1, -2)
        for q0 in range(0, T, rows):
            q1 = min(T, q0 + rows)
            s = torch.bmm(hk[:, q0:q1] * scale, hk_t)  # [g, c, T]; the scale on the c × D side
            if not all_keys:
                s.masked_fill_(key_invalid[g0:g1], float("-inf"))  # [g, c, T]
            s.diagonal(offset=q0, dim1=1, dim2=2).fill_(float("-inf"))  # i == j
            if not all_vote:
                s.masked_fill_(~row_votes[g0:g1, q0:q1, None], 0.0)
            p = torch.softmax(s, dim=-1)  # [g, c, T]
            if all_vote:
                acc[g0:g1] += p.sum(1)
            else:
                acc[g0:g1] += torch.bmm(row_weight[g0:g1, :, q0:q1], p).squeeze(1)  # Σ over voting rows
    acc /= n.clamp_min(1)[:, None].to(torch.float32)
    acc.masked_fill_((n == 1)[:, None] & key_valid, 1.0)
    acc.masked_fill_(~key_valid, 0.0)


# ----------------------------------------------------------------------------------------- custom op
@torch.library.custom_op("mta_kernels::token_saliency", mutates_args=())
def _token_saliency_op(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    valid_count: torch.Tensor | None = None,
    valid_span: torch.Tensor | None = None,
) -> torch.Tensor:
    """``valid_count`` / ``valid_span``: the mask's :class:`MaskStats` (both or neither), else computed here."""
    out = torch.empty(hidden.shape[:-1], device=hidden.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    hidden4 = hidden if hidden.dim() == 4 else hidden.unsqueeze(0)  # [L, B, T, D]
    valid = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0  # [B, T]
    out4 = out.view(hidden4.shape[:-1])
    if use_triton(hidden):
        stats = None if valid_count is None or valid_span is None else (valid_count, valid_span)
        _saliency_triton(hidden4, valid, out4, stats)
    else:
        _saliency_torch(hidden4, valid, out4)
    return out


@_token_saliency_op.register_fake
def _token_saliency_fake(hidden, attention_mask, valid_count=None, valid_span=None):  # the op's arguments
    return hidden.new_empty(hidden.shape[:-1], dtype=torch.float32)


def _token_saliency_backward(ctx, grad_out: torch.Tensor):
    raise RuntimeError(
        "token_saliency has no gradient (docs/method.md#token-saliency): its output is a constant weight; "
        "use mta_kernels.token_saliency, which returns a tensor that does not require grad"
    )


_token_saliency_op.register_autograd(_token_saliency_backward)


# ------------------------------------------------------------------------------------------ public API
def _check_inputs(hidden: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if not isinstance(hidden, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
        raise TypeError("token_saliency takes tensors (hidden, attention_mask)")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if attention_mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"attention_mask must be bool or an integer (0/1) tensor, got {attention_mask.dtype}")
    if hidden.dim() not in (3, 4):
        raise ValueError(f"hidden must be [B, T, D] or [L, B, T, D], got shape {tuple(hidden.shape)}")
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(hidden.shape[-3:-1]):
        raise ValueError(
            f"attention_mask must be [B, T] = {tuple(hidden.shape[-3:-1])} to match hidden "
            f"{tuple(hidden.shape)}, got {tuple(attention_mask.shape)}"
        )
    if hidden.shape[-1] < 2:
        raise ValueError(
            f"hidden needs D >= 2 features (the unbiased std is undefined for D = 1), got D = {hidden.shape[-1]}"
        )
    if hidden.device != attention_mask.device:
        raise ValueError(f"hidden is on {hidden.device} but attention_mask is on {attention_mask.device}")


def token_saliency(
    hidden: torch.Tensor, attention_mask: torch.Tensor, *, stats: MaskStats | None = None
) -> torch.Tensor:
    """Mean attention each token receives under a parameter-free self-attention (docs/method.md#token-saliency).

    Flash-style: the T×T score matrix is never stored. Extra memory: O(L·B·T) on the Triton path; on
    the torch path an fp32 normalised copy of ``hidden`` plus score chunks of at most
    max(2**19, 256·T) elements.

    Args:
        hidden: ``[B, T, D]`` or stacked layers ``[L, B, T, D]``; float32/bfloat16/float16 (float64 is
            computed in float32); any strides; ``D >= 2``.
        attention_mask: ``[B, T]``, bool or 0/1 integers (non-zero = valid), on hidden's device.
        stats: ``mask_stats(attention_mask)``, from a caller that runs several saliencies over one mask
            (computed once instead of once per call).
    Returns:
        float32 ``[B, T]`` or ``[L, B, T]``: 0 at padding, 1 for the lone token of an n == 1 sequence,
        all 0 for a fully padded sequence. No gradient: the result does not require grad, whatever
        ``hidden`` does, and calling ``backward`` through it is an error.
    Raises:
        TypeError: hidden not floating point, or attention_mask not bool/integer.
        ValueError: wrong dimensions, mask shape not ``hidden.shape[-3:-1]``, D < 2, or devices differ.
    """
    _check_inputs(hidden, attention_mask)
    if stats is None:
        return torch.ops.mta_kernels.token_saliency(hidden.detach(), attention_mask)
    if tuple(stats.valid.shape) != tuple(attention_mask.shape):
        raise ValueError(
            f"stats are of a mask {tuple(stats.valid.shape)}, not of attention_mask {tuple(attention_mask.shape)}"
        )
    return torch.ops.mta_kernels.token_saliency(hidden.detach(), stats.valid, stats.count, stats.span)
