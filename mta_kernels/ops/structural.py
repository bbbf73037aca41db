"""DSA structural loss (docs/method.md#dsa-loss), block-diagonal, fused, tiled: no N×N matrix ever exists.

    Û = normalize(X, dim=-1, eps=DSA_NORM_FLOOR)   (student S, teacher T; widths Ds, Dt may differ)
    C^S_uv = Û^S_u · Û^S_v,   C^T_uv = Û^T_u · Û^T_v
    L = Σ_b Σ_{u≠v in b} W_u W_v (C^S_uv − C^T_uv)²  /  Σ_b Σ_{u≠v in b} W_u W_v

Public entry: :func:`structural_loss`. It is the custom op ``mta_kernels::structural_loss`` (so that
``torch.compile(fullgraph=True)`` traces through it) wrapped with metadata checks. The loss is the end of
the graph, so the student's gradient is computed during the forward (when it is needed) and the backward
only scales it by ``grad_output``: the N² similarity tiles are computed once, not twice.

Two implementations behind one op (``mta_kernels.ops._dispatch.use_triton``):

- Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``): a work list of row blocks that covers only the
  block diagonal (``mta_kernels.layout.block_diagonal_work_list``); one program per (row block, layer)
  loops over the column blocks of its sequence(s) and over D in chunks; the normalisation is fused (per-row
  inverse norms, computed with the zeroed gradient rows by one prologue kernel); the loss partials go to
  a ``[L, W]`` buffer that one launch reduces with the denominator into the loss and the gradient
  factor (``ops.glue.dsa_finish``), and the gradient rows are owned by exactly one program: no atomics,
  deterministic. Four launches in all (prologue, main kernel, reduction, gradient epilogue).
- torch (any device): short sequences packed into blocks of ≤ 64 units and batched; a long sequence alone,
  in row chunks (never more than ``chunk × N`` scores), or with the feature-space identity of docs/method.md#dsa-loss when
  it has more units than dimensions (cost model).

Deterministic on both paths (no atomics, no scatter-add). Design notes: ``docs/design/structural.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mta_kernels import layout
from mta_kernels._dtypes import accumulation_dtype
from mta_kernels.constants import DSA_NORM_FLOOR
from mta_kernels.ops._common import check_gradient_in_forward, grid_1d, pow2_block, same_tensor, tl_acc
from mta_kernels.ops._dispatch import triton_interpreting, use_triton
from mta_kernels.ops._triton import tl, triton
from mta_kernels.ops.glue import check_weights, dsa_denominator, dsa_finish

__all__ = ["structural_loss"]

# Norm floor of the unit vectors (docs/design/structural.md#near-zero-units): Û = x / max(‖x‖, floor).
NORMALIZE_EPS = DSA_NORM_FLOOR
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot_nt(a, b, NATIVE: tl.constexpr, F32_PREC: tl.constexpr, IS_FP64: tl.constexpr):
    """``a [M, K] · b [N, K]ᵀ -> [M, N]``, fp32 accumulation (fp64 for fp64 inputs).

    NATIVE: 16-bit operands straight to the tensor cores (products exact in fp32). Otherwise the operands
    are fp32 and F32_PREC is "ieee" (true fp32; TF32 would cost ~1e-3 relative error, far beyond the tolerance rule)
    or "tf32x3". fp64 avoids tl.dot (fp64 dot support differs across Triton releases): fp64 is the
    gradcheck/oracle dtype, not a performance target.
    """
    if IS_FP64:
        c = tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    elif NATIVE:
        c = tl.dot(a, tl.trans(b))
    else:
        c = tl.dot(a, tl.trans(b), input_precision=F32_PREC)
    return c


@triton.jit
def _dot_nn(a, b, F32_PREC: tl.constexpr, IS_FP64: tl.constexpr):
    """``a [M, K] · b [K, N] -> [M, N]`` for fp32 (fp64) operands."""
    if IS_FP64:
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        c = tl.dot(a, b, input_precision=F32_PREC)
    return c


@triton.jit
def _gram_tile(
    X_l,  # [U, D] rows of one layer (student or teacher), any float dtype, explicit strides
    o_m,  # [BM] int64 row units
    m_m,  # [BM] rows in range
    o_n,  # [BN] int64 column units
    m_n,  # [BN] columns in range
    D,
    stride_xu,
    stride_xd,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    NATIVE: tl.constexpr,
    F32_PREC: tl.constexpr,
    ACC: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """Raw (unnormalised) dot products ``X_u·X_v`` of a ``[BM, BN]`` tile, D tiled in chunks of BD (D up
    to 8192): one body for the student (Ds) and the teacher (Dt), whose widths and dtypes may differ."""
    b_c = tl.zeros([BM, BN], dtype=ACC)  # [BM, BN]
    for d in range(0, D, BD):
        # int64: o_d · stride_xd overflows int32 for D-slowest layouts
        o_d = d + tl.arange(0, BD).to(tl.int64)
        m_d = o_d < D
        p_xm = X_l + o_m[:, None] * stride_xu + o_d[None, :] * stride_xd
        p_xn = X_l + o_n[:, None] * stride_xu + o_d[None, :] * stride_xd
        b_xm = tl.load(p_xm, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        b_xn = tl.load(p_xn, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        if not NATIVE:
            b_xm = b_xm.to(ACC)
            b_xn = b_xn.to(ACC)
        b_c += _dot_nt(b_xm, b_xn, NATIVE, F32_PREC, IS_FP64)
    return b_c


# Forward and gradient, per layer l (dropped below) with E_uv = W_u W_v (C^S_uv − C^T_uv) on u≠v, same
# sequence (E_uu = 0), den = Σ_b (Σ_{u in b} W_u)² − Σ_{u in b} W_u²:
#
#   num       = Σ_uv E_uv (C^S_uv − C^T_uv)
#   ∂num/∂Ŝ_u = Σ_v 2 E_uv Ŝ_v  (u as row)  +  Σ_v 2 E_vu Ŝ_v  (u as column)  = 4 G_u,   G_u = Σ_v E_uv Ŝ_v
#               (E is symmetric: every unordered pair appears twice in the sum)
#   ∂L/∂Ŝ_u   = 4 G_u / den
#
# F.normalize is x / max(‖x‖, eps); its backward for g = ∂L/∂Ŝ_u:
#   ‖x‖ >= eps:  ∂L/∂x = (g − (g·Ŝ_u) Ŝ_u) / ‖x‖          (Jacobian (I − ŜŜᵀ)/‖x‖)
#   ‖x‖ <  eps:  ∂L/∂x = g / eps                           (clamp_min passes no gradient to ‖x‖)
# The main kernel accumulates G (the only N²·Ds part); the epilogue kernel applies 4/den and the
# normalize backward, row by row.
@triton.jit
def _structural_fwd_kernel(
    S,  # [L, U, Ds] student, any float dtype, explicit strides
    T,  # [L, U, Dt] teacher
    INV_S,  # [L, U] 1 / max(‖S_u‖, eps), ACC dtype, contiguous
    INV_T,  # [L, U]
    WGT,  # [L or 1, U] unit weights (strides; stride_wl = 0 broadcasts [U])
    SEQ,  # [U] int32 sequence id of each unit
    WORK,  # [W, 4] int32 (row_start, row_end, col_start, col_end)
    PARTIAL,  # [L, W] ACC: per-program numerator
    G,  # [L, U, Ds] ACC: G_u = Σ_v E_uv Ŝ_v (zero-initialised; rows owned by one program)
    U,
    Ds,
    Dt,
    num_work,
    stride_sl,
    stride_su,
    stride_sd,
    stride_tl,
    stride_tu,
    stride_td,
    stride_wl,
    stride_wu,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    NATIVE_S: tl.constexpr,  # dot the student in its own 16-bit dtype (tensor cores); else upcast
    NATIVE_T: tl.constexpr,
    F32_PREC: tl.constexpr,  # tl.dot input_precision of fp32 operands: "ieee" (or "tf32x3")
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    IS_FP64: tl.constexpr,
):
    # one-axis grid of num_work · L programs (axis 0 allows 2³¹ − 1, axes 1-2 only 65535)
    pid = tl.program_id(0).to(tl.int64)
    i_w = pid % num_work
    i_l = pid // num_work
    p_work = WORK + i_w * 4
    row_start = tl.load(p_work).to(tl.int64)
    row_end = tl.load(p_work + 1).to(tl.int64)
    col_start = tl.load(p_work + 2).to(tl.int64)
    col_end = tl.load(p_work + 3).to(tl.int64)

    S_l = S + i_l * stride_sl
    T_l = T + i_l * stride_tl
    o_m = row_start + tl.arange(0, BM).to(tl.int64)  # [BM] global unit index of each row
    m_m = o_m < row_end
    b_seq_m = tl.load(SEQ + o_m, mask=m_m, other=-1)  # [BM]
    b_inv_s_m = tl.load(INV_S + i_l * U + o_m, mask=m_m, other=0.0)  # [BM]
    b_inv_t_m = tl.load(INV_T + i_l * U + o_m, mask=m_m, other=0.0)  # [BM]
    if HAS_WEIGHTS:
        b_w_m = tl.load(WGT + i_l * stride_wl + o_m * stride_wu, mask=m_m, other=0.0).to(ACC)  # [BM]

    b_num = tl.zeros([BM], dtype=ACC)  # [BM] row partials of the numerator
    for col in range(col_start, col_end, BN):
        o_n = col + tl.arange(0, BN).to(tl.int64)  # [BN]
        m_n = o_n < col_end
        b_seq_n = tl.load(SEQ + o_n, mask=m_n, other=-2)  # [BN]
        b_inv_s_n = tl.load(INV_S + i_l * U + o_n, mask=m_n, other=0.0)  # [BN]
        b_inv_t_n = tl.load(INV_T + i_l * U + o_n, mask=m_n, other=0.0)  # [BN]

        # raw dot products S_u·S_v and T_u·T_v (student first, then teacher)
        b_cs = _gram_tile(
            S_l, o_m, m_m, o_n, m_n, Ds, stride_su, stride_sd, BM, BN, BD, NATIVE_S, F32_PREC, ACC, IS_FP64
        )  # [BM, BN]
        b_ct = _gram_tile(
            T_l, o_m, m_m, o_n, m_n, Dt, stride_tu, stride_td, BM, BN, BD, NATIVE_T, F32_PREC, ACC, IS_FP64
        )  # [BM, BN]

        # fused normalisation: Ŝ_u·Ŝ_v = (S_u·S_v) / (‖S_u‖ ‖S_v‖)
        b_cs = b_cs * b_inv_s_m[:, None] * b_inv_s_n[None, :]
        b_ct = b_ct * b_inv_t_m[:, None] * b_inv_t_n[None, :]
        # a pair counts when both units are in range, in the same sequence, and distinct
        m_pair = (
            (b_seq_m[:, None] == b_seq_n[None, :])
            & (o_m[:, None] != o_n[None, :])
            & m_m[:, None]
            & m_n[None, :]
        )  # [BM, BN]
        b_diff = tl.where(m_pair, b_cs - b_ct, 0.0)  # [BM, BN]
        if HAS_WEIGHTS:
            b_w_n = tl.load(WGT + i_l * stride_wl + o_n * stride_wu, mask=m_n, other=0.0).to(ACC)  # [BN]
            b_e = b_diff * b_w_m[:, None] * b_w_n[None, :]  # [BM, BN]
        else:
            b_e = b_diff
        b_num += tl.sum(b_e * b_diff, axis=1)

        if COMPUTE_GRAD:
            # G[rows] += E @ Ŝ[cols], chunk by chunk of Ds; the rows belong to this program only, so a
            # read-modify-write in global memory (L2-resident) needs no atomics. The first column block
            # skips the read (the buffer is zero there): masked-off loads issue no memory traffic.
            m_seen = (o_m * 0 + col) > col_start  # [BM] False on the first column block
            # The previous column block stored these G rows with the dot's register layout; this one
            # reloads them with the load layout, so an element may be read by another warp than the one
            # that wrote it. Triton orders no global-memory accesses between warps: this barrier (bar.sync,
            # which orders the CTA's memory accesses) makes the read-after-write explicit.
            tl.debug_barrier()
            for d in range(0, Ds, BD):
                o_d = d + tl.arange(0, BD).to(tl.int64)
                m_d = o_d < Ds
                p_sn = S_l + o_n[:, None] * stride_su + o_d[None, :] * stride_sd
                b_sn = tl.load(p_sn, mask=m_n[:, None] & m_d[None, :], other=0.0).to(ACC)  # [BN, BD]
                b_sn = b_sn * b_inv_s_n[:, None]  # Ŝ_v
                p_g = G + i_l * U * Ds + o_m[:, None] * Ds + o_d[None, :]
                m_g = m_m[:, None] & m_d[None, :]
                b_g = tl.load(p_g, mask=m_g & m_seen[:, None], other=0.0)  # [BM, BD]
                b_g += _dot_nn(b_e, b_sn, F32_PREC, IS_FP64)
                tl.store(p_g, b_g, mask=m_g)

    tl.store(PARTIAL + i_l * num_work + i_w, tl.sum(b_num, axis=0))


@triton.jit
def _structural_prep_kernel(
    S,  # [L, U, Ds] student, any float dtype, explicit strides
    T,  # [L, U, Dt] teacher
    NORM_S,  # [L, U] ACC out: ‖S_u‖
    INV_S,  # [L, U] ACC out: 1 / max(‖S_u‖, eps)
    INV_T,  # [L, U] ACC out: 1 / max(‖T_u‖, eps)
    G,  # [L, U, Ds] ACC out: zeroed (the main kernel's accumulator); unused without COMPUTE_GRAD
    U,
    Ds,
    Dt,
    stride_sl,
    stride_su,
    stride_sd,
    stride_tl,
    stride_tu,
    stride_td,
    eps,
    COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    IS_FP64: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    # BR rows of one layer per program: the row norms and inverse norms the main kernel reads, and the
    # zeroed gradient rows, in one pass over the rows (one launch instead of a norm, clamp, reciprocal
    # and fill per tensor).
    pid = tl.program_id(0).to(tl.int64)
    num_rb = tl.cdiv(U, BR)
    i_l = pid // num_rb
    o_r = (pid % num_rb) * BR + tl.arange(0, BR).to(tl.int64)  # [BR]
    m_r = o_r < U
    b_ss = tl.zeros([BR], dtype=ACC)
    for d in range(0, Ds, BD):
        o_d = d + tl.arange(0, BD).to(tl.int64)
        m = m_r[:, None] & (o_d < Ds)[None, :]
        p_s = S + i_l * stride_sl + o_r[:, None] * stride_su + o_d[None, :] * stride_sd
        b_s = tl.load(p_s, mask=m, other=0.0).to(ACC)  # [BR, BD]
        b_ss += tl.sum(b_s * b_s, axis=1)
        if COMPUTE_GRAD:
            tl.store(G + (i_l * U + o_r[:, None]) * Ds + o_d[None, :], tl.zeros([BR, BD], dtype=ACC), mask=m)
    b_tt = tl.zeros([BR], dtype=ACC)
    for d in range(0, Dt, BD):
        o_d = d + tl.arange(0, BD).to(tl.int64)
        m = m_r[:, None] & (o_d < Dt)[None, :]
        p_t = T + i_l * stride_tl + o_r[:, None] * stride_tu + o_d[None, :] * stride_td
        b_t = tl.load(p_t, mask=m, other=0.0).to(ACC)
        b_tt += tl.sum(b_t * b_t, axis=1)
    if IS_FP64:  # fp64 sqrt and division are correctly rounded by default
        b_ns = tl.sqrt(b_ss)
        b_inv_s = 1.0 / tl.maximum(b_ns, eps)
        b_inv_t = 1.0 / tl.maximum(tl.sqrt(b_tt), eps)
    else:  # as torch's norm and reciprocal: no approximate sqrt or division
        b_ns = tl.sqrt_rn(b_ss)
        b_inv_s = tl.div_rn(tl.full([BR], 1.0, tl.float32), tl.maximum(b_ns, eps))
        b_inv_t = tl.div_rn(tl.full([BR], 1.0, tl.float32), tl.maximum(tl.sqrt_rn(b_tt), eps))
    o = i_l * U + o_r
    tl.store(NORM_S + o, b_ns, mask=m_r)
    tl.store(INV_S + o, b_inv_s, mask=m_r)
    tl.store(INV_T + o, b_inv_t, mask=m_r)


@triton.jit
def _structural_grad_epilogue_kernel(
    G,  # [L, U, Ds] ACC, in: G_u; out (in place): ∂L/∂S_u
    S,  # [L, U, Ds] student
    NORM_S,  # [L, U] ACC, ‖S_u‖ (unclamped)
    SCALE,  # [L] ACC, 4 / den
    U,
    Ds,
    stride_sl,
    stride_su,
    stride_sd,
    eps,
    BD: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # one-axis grid of U · L programs
    i_u = pid % U
    i_l = pid // U
    b_norm = tl.load(NORM_S + i_l * U + i_u)
    b_scale = tl.load(SCALE + i_l)
    p_g = G + i_l * U * Ds + i_u * Ds
    p_s = S + i_l * stride_sl + i_u * stride_su
    if b_norm >= eps:
        b_inv = 1.0 / b_norm
        # (G·Ŝ) Ŝ = (G·S) S / ‖S‖²
        b_dot = tl.zeros([BD], dtype=ACC)
        for d in range(0, Ds, BD):
            o_d = d + tl.arange(0, BD).to(tl.int64)
            m_d = o_d < Ds
            b_gd = tl.load(p_g + o_d, mask=m_d, other=0.0)  # [BD]
            b_sd = tl.load(p_s + o_d * stride_sd, mask=m_d, other=0.0).to(ACC)  # [BD]
            b_dot += b_gd * b_sd
        b_proj = tl.sum(b_dot, axis=0) * b_inv * b_inv
        for d in range(0, Ds, BD):
            o_d = d + tl.arange(0, BD).to(tl.int64)
            m_d = o_d < Ds
            b_gd = tl.load(p_g + o_d, mask=m_d, other=0.0)  # [BD]
            b_sd = tl.load(p_s + o_d * stride_sd, mask=m_d, other=0.0).to(ACC)  # [BD]
            tl.store(p_g + o_d, b_scale * (b_gd - b_proj * b_sd) * b_inv, mask=m_d)
    else:
        # ‖x‖ < eps: Ŝ = x / eps, no projection
        for d in range(0, Ds, BD):
            o_d = d + tl.arange(0, BD).to(tl.int64)
            m_d = o_d < Ds
            b_gd = tl.load(p_g + o_d, mask=m_d, other=0.0)  # [BD]
            tl.store(p_g + o_d, b_gd * (b_scale / eps), mask=m_d)


# ------------------------------------------------------------------------------------ host helpers
def _checked_bounds(cu_units: torch.Tensor, num_units: int) -> list[int]:
    """The CSR offsets read to the host and validated (inside the op: data-dependent; one device sync)."""
    bounds = cu_units.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_units must start at 0, got cu_units[0] = {bounds[0]}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(
            f"cu_units must be non-decreasing, got {bounds[:16]}{' ...' if len(bounds) > 16 else ''}"
        )
    if bounds[-1] != num_units:
        raise ValueError(f"cu_units ends at {bounds[-1]} but there are {num_units} units")
    return bounds


def _block_sizes(
    device: torch.device, acc_dtype: torch.dtype, student_dtype: torch.dtype, compute_grad: bool
) -> tuple[int, int, int]:
    """(BM, BN, BD). Small blocks under the interpreter (tests exercise several blocks and D chunks) and
    for fp64 (its broadcast-and-sum product holds BM·BN·BD values). On CUDA, BD is chosen so that ptxas
    spills no registers at 8 warps for sm_90 (AOT compile of every specialisation,
    docs/design/gpu-readiness.md): BD = 64 spilled 0.5–3.7 KB per thread once the gradient was on."""
    if device.type != "cuda" or acc_dtype == torch.float64:
        return 16, 16, 16
    if compute_grad and student_dtype == torch.float32:
        return 64, 64, 16
    return 64, 64, 32


# input_precision of the kernels' fp32-operand dots (the gradient's E·Ŝ always; S·Sᵀ for fp32 inputs).
# "ieee" is exact fp32 on CUDA cores; "tf32x3" (3 TF32 tensor-core passes, ~fp32 accuracy) is the
# candidate to measure on the GPU.
F32_DOT_PRECISION = "ieee"


_PREP_NUM_WARPS = 4


def _prep_blocks(D: int) -> tuple[int, int]:
    """``(BR, BD)`` of the norm kernel: 16 rows per program, the widths in chunks of at most 64."""
    return 16, pow2_block(D, 16, 64)


def _grid(rows: int, L: int) -> tuple[int]:
    """One-axis grid of ``rows · L`` programs (the kernels split the program id themselves)."""
    return grid_1d(rows * L, f"structural_loss ({rows} × {L})")


def _triton_forward(
    student: torch.Tensor,  # [L, U, Ds]
    teacher: torch.Tensor,  # [L, U, Dt]
    cu_units: torch.Tensor,  # checked by the caller; the kernels read the device offsets
    weights: torch.Tensor | None,  # [L or 1, U]
    compute_grad: bool,
    acc_dtype: torch.dtype,
    plan: _PlanTensors,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Four launches: the row norms (and the zeroed gradient rows), the block-diagonal pairs, the
    reduction with the denominator (``glue.dsa_finish``), the gradient epilogue."""
    L, U, Ds = student.shape
    device = student.device
    BM = _block_sizes(device, acc_dtype, student.dtype, compute_grad)[0]
    work = plan.work_list  # [W, 4] int32, only the block diagonal
    if work is None:
        work = layout.block_diagonal_work_list(cu_units, BM)
    norm_s = torch.empty(L, U, dtype=acc_dtype, device=device)
    inv_s, inv_t = torch.empty_like(norm_s), torch.empty_like(norm_s)
    grad = torch.empty(L, U, Ds, dtype=acc_dtype, device=device) if compute_grad else norm_s.new_empty(0)
    partial = torch.empty(L, work.shape[0], dtype=acc_dtype, device=device)  # every slot written once
    if L > 0 and U > 0:
        _launch_prep(student, teacher, norm_s, inv_s, inv_t, grad, compute_grad)
    if work.shape[0] > 0 and L > 0:
        seq = layout.unit_to_seq(cu_units, U) if plan.unit_to_seq is None else plan.unit_to_seq  # [U] int32
        _launch_pairs(student, teacher, inv_s, inv_t, weights, seq, work, partial, grad, compute_grad)
    # denominator (from the device offsets), Σ partials in float64 (fixed order), loss and 4/den: one launch
    w = None if weights is None else weights.detach()
    loss, scale = dsa_finish(w, cu_units, partial)
    if compute_grad and U > 0 and L > 0 and Ds > 0:
        _structural_grad_epilogue_kernel[_grid(U, L)](
            grad,
            student,
            norm_s,
            scale,
            U,
            Ds,
            *student.stride(),
            NORMALIZE_EPS,
            BD=pow2_block(Ds, 1, 1024),
            ACC=tl_acc(acc_dtype),
        )
    return loss, grad


def _launch_prep(student, teacher, norm_s, inv_s, inv_t, grad, compute_grad: bool) -> None:
    """The prologue: ``‖S_u‖``, ``1 / max(‖S_u‖, eps)``, ``1 / max(‖T_u‖, eps)`` and the zeroed ``G``."""
    L, U, Ds = student.shape
    Dt = teacher.shape[-1]
    BR, BD = _prep_blocks(max(Ds, Dt))
    _structural_prep_kernel[_grid(triton.cdiv(U, BR), L)](
        student,
        teacher,
        norm_s,
        inv_s,
        inv_t,
        grad,
        U,
        Ds,
        Dt,
        *student.stride(),
        *teacher.stride(),
        NORMALIZE_EPS,
        COMPUTE_GRAD=compute_grad,
        ACC=tl_acc(norm_s.dtype),
        IS_FP64=norm_s.dtype == torch.float64,
        BR=BR,
        BD=BD,
        num_warps=_PREP_NUM_WARPS,
    )


def _launch_pairs(
    student, teacher, inv_s, inv_t, weights, seq, work, partial, grad, compute_grad: bool
) -> None:
    """The main kernel: one program per (work-list row block, layer) over its sequence's column blocks."""
    L, U, Ds = student.shape
    Dt = teacher.shape[-1]
    acc_dtype = inv_s.dtype
    BM, BN, BD = _block_sizes(student.device, acc_dtype, student.dtype, compute_grad)
    native = student.device.type == "cuda" and not triton_interpreting() and acc_dtype == torch.float32
    num_work = work.shape[0]
    _structural_fwd_kernel[_grid(num_work, L)](
        student,
        teacher,
        inv_s,
        inv_t,
        weights if weights is not None else inv_s,  # a dummy pointer when unweighted
        seq,
        work,
        partial,
        grad,
        U,
        Ds,
        Dt,
        num_work,
        *student.stride(),
        *teacher.stride(),
        weights.stride(0) if weights is not None and weights.shape[0] > 1 else 0,  # [1, U] broadcasts
        weights.stride(1) if weights is not None else 0,
        BM=BM,
        BN=BN,
        BD=BD,
        HAS_WEIGHTS=weights is not None,
        COMPUTE_GRAD=compute_grad,
        NATIVE_S=native and student.dtype in (torch.float16, torch.bfloat16),
        NATIVE_T=native and teacher.dtype in (torch.float16, torch.bfloat16),
        F32_PREC=F32_DOT_PRECISION,
        ACC=tl_acc(acc_dtype),
        IS_FP64=acc_dtype == torch.float64,
        num_warps=8,
    )


# Sequences of at most this many units are packed into blocks and batched on the torch path.
_TORCH_PACK = 64


def _torch_forward(
    student: torch.Tensor,  # [L, U, Ds]
    teacher: torch.Tensor,  # [L, U, Dt]
    cu_units: torch.Tensor,
    weights: torch.Tensor | None,  # [L or 1, U]
    bounds: list[int],  # the offsets on the host, checked
    compute_grad: bool,
    acc_dtype: torch.dtype,
    plan: _PlanTensors | None = None,
    row_chunk: int = 256,
    feature_space: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal torch path (any device), never N×N and never (ΣU)² memory.

    Short sequences (≤ 64 units) are packed several to a block, like the Triton work list, and run as
    one batched matmul per group of blocks (masked by sequence id). A longer sequence runs alone,
    ``row_chunk`` rows at a time, or, when the cost model says so (more units than dimensions), with the
    feature-space identity of docs/method.md#dsa-loss (O(N·D²) instead of O(N²·D)); ``feature_space`` True/False forces
    one formulation for the long sequences (tests).
    """
    L, U, Ds = student.shape
    Dt = teacher.shape[-1]
    device = student.device
    norm_s = torch.linalg.vector_norm(student, dim=-1, dtype=acc_dtype)  # [L, U]
    norm_t = torch.linalg.vector_norm(teacher, dim=-1, dtype=acc_dtype)
    s_hat = student.to(acc_dtype) / norm_s.clamp_min(NORMALIZE_EPS)[..., None]  # [L, U, Ds]
    t_hat = teacher.to(acc_dtype) / norm_t.clamp_min(NORMALIZE_EPS)[..., None]  # [L, U, Dt]
    w = None if weights is None else weights.to(acc_dtype).expand(L, U)
    planned = plan is not None and plan.host_cu_units is not None
    den = dsa_denominator(weights, cu_units, bounds, L, acc_dtype, offsets_checked=planned)
    num = torch.zeros(L, dtype=torch.float64, device=device)
    grad = (
        torch.zeros(L, U, Ds, dtype=acc_dtype, device=device)
        if compute_grad
        else student.new_empty(0, dtype=acc_dtype)
    )

    packs, longs = _pack_sequences(bounds, _TORCH_PACK)
    if packs:
        seq = (
            layout.unit_to_seq(cu_units, U) if plan is None or plan.unit_to_seq is None else plan.unit_to_seq
        )
        _torch_packed(s_hat, t_hat, w, seq, packs, num, grad if compute_grad else None)

    # feature space when N·(2Ds+Dt) > 2Ds²+2DsDt+Dt² (FLOPs of pair space vs feature space, with gradient)
    feature_cost = 2 * Ds * Ds + 2 * Ds * Dt + Dt * Dt
    for lo, hi in longs:
        n = hi - lo
        sh, th = s_hat[:, lo:hi], t_hat[:, lo:hi]  # [L, n, Ds], [L, n, Dt]
        ws = None if w is None else w[:, lo:hi]  # [L, n]
        use_features = n * (2 * Ds + Dt) > feature_cost if feature_space is None else feature_space
        if use_features:
            seq_num, seq_grad = _feature_space(sh, th, ws, compute_grad)
            num += seq_num
            if compute_grad:
                grad[:, lo:hi] = seq_grad
            continue
        chunk = max(16, min(row_chunk, (1 << 22) // max(1, L * n)))
        for r0 in range(0, n, chunk):
            r1 = min(r0 + chunk, n)
            cs = sh[:, r0:r1] @ sh.transpose(-1, -2)  # [L, r, n]
            ct = th[:, r0:r1] @ th.transpose(-1, -2)
            diff = cs - ct
            rows = torch.arange(r1 - r0, device=device)
            diff[:, rows, rows + r0] = 0  # the u == v terms are not pairs
            e = diff if ws is None else diff * ws[:, r0:r1, None] * ws[:, None, :]
            num += (e * diff).sum((-1, -2)).to(torch.float64)
            if compute_grad:
                grad[:, lo + r0 : lo + r1] = e @ sh  # G_u = Σ_v E_uv Ŝ_v
    safe_den = torch.where(den > 0, den, torch.ones_like(den))
    loss = (num / safe_den).to(acc_dtype)
    if compute_grad:
        # ∂L/∂S_u = 4/den · (G − (G·Ŝ)Ŝ) / ‖S_u‖ where ‖S_u‖ ≥ eps, else 4/den · G / eps
        scale = ((4.0 / safe_den) * (den > 0)).to(acc_dtype)[:, None, None]
        big = (norm_s >= NORMALIZE_EPS)[..., None]
        proj = (grad * s_hat).sum(-1, keepdim=True) * s_hat
        grad = scale * torch.where(
            big, (grad - proj) / norm_s.clamp_min(NORMALIZE_EPS)[..., None], grad / NORMALIZE_EPS
        )
    return loss, grad


def _pack_sequences(bounds: list[int], block: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Row ranges of packed short sequences (each spanning ≤ ``block`` units) and the long sequences."""
    packs: list[tuple[int, int]] = []
    longs: list[tuple[int, int]] = []
    start = end = -1
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo < 2:
            continue
        if hi - lo > block:
            longs.append((lo, hi))
        elif start >= 0 and hi - start <= block:
            end = hi
        else:
            if start >= 0:
                packs.append((start, end))
            start, end = lo, hi
    if start >= 0:
        packs.append((start, end))
    return packs, longs


def _torch_packed(
    s_hat: torch.Tensor,  # [L, U, Ds]
    t_hat: torch.Tensor,  # [L, U, Dt]
    w: torch.Tensor | None,  # [L, U]
    seq: torch.Tensor,  # [U] int32
    packs: list[tuple[int, int]],
    num: torch.Tensor,  # [L] float64, accumulated in place
    grad: torch.Tensor | None,  # [L, U, Ds], G rows written in place
) -> None:
    """Packed blocks of short sequences as batched ``[L, P, K, K]`` matmuls, K = 64 (memory O(U·K))."""
    L, _, Ds = s_hat.shape
    Dt = t_hat.shape[-1]
    K = _TORCH_PACK
    device = s_hat.device
    span = torch.tensor(packs, dtype=torch.long, device=device)  # [P, 2]
    idx = span[:, :1] + torch.arange(K, device=device)  # [P, K] unit of each slot
    valid = idx < span[:, 1:]
    idx = torch.where(valid, idx, torch.zeros_like(idx))  # padding slots read unit 0, masked below
    not_diag = ~torch.eye(K, dtype=torch.bool, device=device)
    per_step = max(1, (1 << 22) // (L * K * max(K, Ds + Dt)))
    for p0 in range(0, len(packs), per_step):
        ix, ok = idx[p0 : p0 + per_step], valid[p0 : p0 + per_step]  # [p, K]
        sb, tb = s_hat[:, ix], t_hat[:, ix]  # [L, p, K, Ds], [L, p, K, Dt]
        sq = seq[ix]
        pair = (sq[:, :, None] == sq[:, None, :]) & ok[:, :, None] & ok[:, None, :] & not_diag  # [p, K, K]
        diff = torch.where(pair, sb @ sb.transpose(-1, -2) - tb @ tb.transpose(-1, -2), 0.0)  # [L, p, K, K]
        e = diff
        if w is not None:
            wb = w[:, ix]  # [L, p, K]
            e = diff * wb[..., :, None] * wb[..., None, :]
        num += (e * diff).sum((1, 2, 3)).to(torch.float64)
        if grad is not None:
            # every unit sits in one slot of one block: a plain (deterministic) indexed write
            grad[:, ix[ok]] = (e @ sb)[:, ok]


def _feature_space(
    sh: torch.Tensor, th: torch.Tensor, ws: torch.Tensor | None, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sequence in feature space. ``sh [L, n, Ds]``, ``th [L, n, Dt]`` normalised rows, ``ws [L, n]``.

    With A = Σ_v W_v Ŝ_vᵀŜ_v [Ds, Ds], B = Σ_v W_v Ŝ_vᵀT̂_v [Ds, Dt], C = Σ_v W_v T̂_vᵀT̂_v [Dt, Dt]:
    Σ_{u,v} W_u W_v (C^S−C^T)²_uv = ‖A‖² − 2‖B‖² + ‖C‖², minus the diagonal Σ_u W_u² (‖Ŝ_u‖²−‖T̂_u‖²)²
    (0 for unit rows, 1 for a zero row against a unit one); G_u = W_u (A Ŝ_u − B T̂_u) − E_uu Ŝ_u.
    Returns the numerator ``[L]`` (float64) and G ``[L, n, Ds]``.
    """
    wcol = torch.ones_like(sh[..., :1]) if ws is None else ws[..., None]  # [L, n, 1]
    a = (sh * wcol).transpose(-1, -2) @ sh  # [L, Ds, Ds]
    b = (sh * wcol).transpose(-1, -2) @ th  # [L, Ds, Dt]
    c = (th * wcol).transpose(-1, -2) @ th  # [L, Dt, Dt]
    e_diag = wcol[..., 0] ** 2 * ((sh * sh).sum(-1) - (th * th).sum(-1))  # [L, n]
    diag = (e_diag * ((sh * sh).sum(-1) - (th * th).sum(-1))).sum(-1)
    full = a.square().sum((-1, -2)) - 2 * b.square().sum((-1, -2)) + c.square().sum((-1, -2))
    num = full.to(torch.float64) - diag.to(torch.float64)
    if not compute_grad:
        return num, None
    g = wcol * (sh @ a - th @ b.transpose(-1, -2)) - e_diag[..., None] * sh  # [L, n, Ds] (A symmetric)
    return num, g


# -------------------------------------------------------------------------------------- custom op
class _PlanTensors(NamedTuple):
    """What the op takes of a :class:`~mta_kernels.layout.LayoutPlan`: the unit -> sequence map, the work
    list of the Triton kernel's row block, and ``cu_units`` on the host (all None without a plan)."""

    unit_to_seq: torch.Tensor | None
    work_list: torch.Tensor | None
    host_cu_units: torch.Tensor | None


def _structural_loss_impl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    cu_units: torch.Tensor,
    unit_weights: torch.Tensor | None,
    compute_grad: bool,
    plan: _PlanTensors,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's body. ``student [L, U, Ds]``, ``teacher [L, U, Dt]``, ``unit_weights [L, U] | [1, U] | None``.

    Returns the loss ``[L]`` and, if ``compute_grad``, ``∂loss_l/∂student [L, U, Ds]`` (else an empty tensor),
    both in the accumulation dtype (float32, float64 for float64 inputs).
    """
    L, U, _ = student.shape
    planned = plan.host_cu_units is not None  # validated on the host when the batch was planned
    bounds = None if planned else _checked_bounds(cu_units, U)
    acc_dtype = accumulation_dtype(student, teacher, unit_weights)
    if L == 0:  # no layer pairs: an empty loss vector
        grad = student.new_zeros(student.shape if compute_grad else (0,), dtype=acc_dtype)
        return student.new_zeros(0, dtype=acc_dtype), grad
    # Inside the op nothing is autocast: the kernels and the torch path choose their own precision.
    with torch.autocast(device_type=student.device.type, enabled=False):
        if use_triton(student):
            return _triton_forward(student, teacher, cu_units, unit_weights, compute_grad, acc_dtype, plan)
        if bounds is None:
            bounds = plan.host_cu_units.tolist()  # a host tensor: no device read
        return _torch_forward(student, teacher, cu_units, unit_weights, bounds, compute_grad, acc_dtype, plan)


@torch.library.custom_op("mta_kernels::structural_loss", mutates_args=())
def _structural_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    cu_units: torch.Tensor,
    unit_weights: torch.Tensor | None,
    compute_grad: bool,
    unit_to_seq: torch.Tensor | None = None,
    work_list: torch.Tensor | None = None,
    host_cu_units: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom op around :func:`_structural_loss_impl` (opaque to torch.compile; see register_fake). The
    last three: the batch's plan (see :class:`_PlanTensors`), or None (``cu_units`` is checked here)."""
    plan = _PlanTensors(unit_to_seq, work_list, host_cu_units)
    return _structural_loss_impl(student, teacher, cu_units, unit_weights, compute_grad, plan)


@_structural_loss_op.register_fake
def _(
    student,
    teacher,
    cu_units,
    unit_weights,
    compute_grad,
    unit_to_seq=None,
    work_list=None,
    host_cu_units=None,
):
    acc_dtype = accumulation_dtype(student, teacher, unit_weights)
    loss = student.new_empty(student.shape[:1], dtype=acc_dtype)
    grad = student.new_empty(student.shape if compute_grad else (0,), dtype=acc_dtype)
    return loss, grad


def _setup_context(ctx, inputs, output):
    student, _, _, _, compute_grad, *_ = inputs
    ctx.compute_grad = compute_grad
    ctx.student_dtype = student.dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero tensors for the non-differentiable outputs


def _backward(ctx, grad_loss, _grad_grad):
    check_gradient_in_forward("structural_loss", ctx.compute_grad)
    if grad_loss is None:  # grads are not materialised: the loss did not reach the output
        return (None,) * 8
    (grad,) = ctx.saved_tensors
    # scale and cast in one pass (out= in the student's dtype): no second full-size copy in the
    # accumulation dtype before the cast
    out = torch.empty_like(grad, dtype=ctx.student_dtype)
    torch.mul(grad, grad_loss[:, None, None].to(grad.dtype), out=out)
    return (out,) + (None,) * 7


_structural_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------ public entry
def structural_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    cu_units: torch.Tensor,
    unit_weights: torch.Tensor | None = None,
    *,
    plan: layout.LayoutPlan | None = None,
    weights_nonnegative: bool = False,
) -> torch.Tensor:
    """DSA loss, block-diagonal: pairwise cosine geometry of the units within each sequence (docs/method.md#dsa-loss).

    Args:
        student: ``[U, Ds]`` or stacked layer pairs ``[L, U, Ds]``, float16/bfloat16/float32/float64.
            The gradient flows here.
        teacher: ``[U, Dt]`` or ``[L, U, Dt]`` (``Dt`` may differ from ``Ds``); treated as a constant.
        cu_units: int32 ``[B+1]`` CSR offsets: the units of sequence b are rows ``cu_units[b]:cu_units[b+1]``.
            Read and checked inside the op (one device-to-host copy) unless ``plan`` is given.
        unit_weights: ``None`` (all 1) or ``[U]`` / ``[L, U]`` finite, non-negative unit importances
            (constants). A negative or non-finite weight is a ValueError on the CPU torch path, a
            RuntimeError elsewhere (a device-side assert, no host sync: ``ops.glue.check_weights``).
        plan: the :class:`~mta_kernels.layout.LayoutPlan` of ``cu_units`` (``UnitBatch.plan``: bounds and
            work lists computed on the host): then nothing is read back from the device. A plan of
            another unit count, or whose tensors were modified in place since, is not used.
        weights_nonnegative: the caller guarantees finite ``unit_weights >= 0`` (sums of saliencies):
            the value check is skipped (it costs launches on the device).
    Returns:
        float32 (float64 for float64 inputs) scalar, or ``[L]`` for stacked inputs. 0 with a zero gradient
        when no sequence has two units.
    Raises:
        TypeError: non-float student/teacher/weights, cu_units not int32.
        ValueError: shapes, dims or devices that do not agree; cu_units values (not starting at 0,
            decreasing, not ending at U).
    """
    _check_inputs(student, teacher, cu_units, unit_weights)
    if not weights_nonnegative:
        check_weights(unit_weights, "structural_loss: unit_weights")
    stacked = student.dim() == 3
    s3 = student if stacked else student.unsqueeze(0)  # [L, U, Ds]
    t3 = teacher.detach() if stacked else teacher.detach().unsqueeze(0)  # [L, U, Dt]
    w2 = None
    if unit_weights is not None:
        w2 = unit_weights.detach()
        w2 = w2 if w2.dim() == 2 else w2.unsqueeze(0)  # [L or 1, U]
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    planned = _plan_tensors(plan, cu_units, s3, t3, w2, compute_grad)
    loss, _ = _structural_loss_op(s3, t3, cu_units, w2, compute_grad, *planned)
    return loss if stacked else loss[0]


def _plan_tensors(
    plan: layout.LayoutPlan | None,
    cu_units: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor | None,
    compute_grad: bool,
) -> _PlanTensors:
    """What the op takes of the plan (all None when there is none, or it is not usable: another unit
    count, or modified in place since planning). While torch.compile traces, the plan is trusted."""
    if plan is None:
        return _PlanTensors(None, None, None)
    if not torch.compiler.is_compiling():
        if not same_tensor(plan.cu_units, cu_units):
            raise ValueError(
                "structural_loss: plan is the plan of other cu_units (pass the batch's own plan)"
            )
        if plan.num_units != student.shape[1] or not plan.is_current():
            return _PlanTensors(None, None, None)
    acc_dtype = accumulation_dtype(student, teacher, weights)
    block_m = _block_sizes(student.device, acc_dtype, student.dtype, compute_grad)[0]
    return _PlanTensors(plan.unit_to_seq, plan.work_lists.get(block_m), plan.host_cu_units)


def _check_inputs(
    student: torch.Tensor, teacher: torch.Tensor, cu_units: torch.Tensor, unit_weights: torch.Tensor | None
) -> None:
    """Metadata checks (dtype, shape, device) before anything runs."""
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be [U, D] or [L, U, D], got shape {tuple(t.shape)}")
    if student.dim() != teacher.dim() or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same "
            "number of units (and of stacked layers); only the last dimension may differ"
        )
    if not isinstance(cu_units, torch.Tensor) or cu_units.dtype != torch.int32:
        raise TypeError(f"cu_units must be an int32 tensor, got {getattr(cu_units, 'dtype', type(cu_units))}")
    if cu_units.dim() != 1 or cu_units.shape[0] < 1:
        raise ValueError(f"cu_units must be [B+1] with B >= 0, got shape {tuple(cu_units.shape)}")
    if teacher.device != student.device or cu_units.device != student.device:
        raise ValueError(
            f"student ({student.device}), teacher ({teacher.device}) and cu_units ({cu_units.device}) "
            "must be on one device"
        )
    if unit_weights is not None:
        if not isinstance(unit_weights, torch.Tensor) or unit_weights.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"unit_weights must be a float tensor, got {getattr(unit_weights, 'dtype', None)}"
            )
        if unit_weights.device != student.device:
            raise ValueError(f"unit_weights is on {unit_weights.device}, student on {student.device}")
        U = student.shape[-2]
        ok = unit_weights.shape == (U,) or (student.dim() == 3 and unit_weights.shape == student.shape[:2])
        if not ok:
            expected = f"[{U}]" + (f" or {list(student.shape[:2])}" if student.dim() == 3 else "")
            raise ValueError(f"unit_weights must be {expected}, got shape {tuple(unit_weights.shape)}")
