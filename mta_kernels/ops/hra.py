"""HRA term fused: projector, cosine and weighting of L stacked layer pairs in one op, chunk by chunk.

For layer l, rows i (the covered tokens, or the units), projector ``(W_l, b_l)``::

    P_i = W_l x_i + b_l
    cos_i = Σ_d (P_i / max(‖P_i‖, eps))_d (y_i / max(‖y_i‖, eps))_d      (torch's cosine_similarity)
    L_l = Σ_i w_i (1 − cos_i) / Σ_i w_i                                      (0 when Σ w = 0)

The term is the end of the graph, so its gradient is computed in the forward, chunk by chunk of rows
(the pattern of fused linear losses such as Liger-Kernel's): a chunk's projected rows ``P`` exist only
while the chunk is processed, never for all rows at once, and the backward only scales the gradients by
``grad_output / den`` (one kernel). Per chunk: one gather of the student rows, one batched GEMM for
``P``, one row kernel (Triton, or the same math in torch) for the cosine terms and ``∂L/∂P``, and the
GEMMs of ``∂L/∂x``, ``∂L/∂W``, ``∂L/∂b``; after the chunks, one launch reduces the terms and the
weights to the loss.

The GEMMs run in ``mm_dtype``: the 16-bit dtype of autocast or of a 16-bit projector (tensor cores,
fp32 accumulation), else the accumulation dtype (float32; float64 for float64 inputs). bf16 hidden
states with an fp32 projector keep the fp32 GEMMs: rounding the projector's weights to bf16 puts the
loss ~10² × outside the tolerance rule on LLM-like activations (the eager reference keeps them fp32). The cosine and
the weighting are computed in the accumulation dtype.

Gradient of the cosine, as torch's autograd computes it through ``cosine_similarity`` (the norm floor
is applied without a gradient): with ``n_p = max(‖P‖, eps)``, ``n_y = max(‖y‖, eps)``,
``∂cos/∂P = y / (n_p n_y) − (P·y) / (n_p² n_y) · P / ‖P‖`` (the last factor 0 at ``P = 0``).
"""

from __future__ import annotations

import torch

from mta_kernels._dtypes import accumulation_dtype
from mta_kernels.constants import COSINE_EPS
from mta_kernels.ops._common import (
    bf16_rtne_by_hand,
    check_gradient_in_forward,
    pow2_block,
    tl_acc,
    to_output,
)
from mta_kernels.ops._dispatch import use_triton
from mta_kernels.ops._triton import tl, triton

__all__ = ["fused_hra"]

# Rows per chunk: at most this many elements of P (and of its gradient) at a time.
_CHUNK_ELEMS = 1 << 22
_ROWS_NUM_WARPS = 4
_FINISH_BLK, _FINISH_NUM_WARPS = 1024, 4  # the finishing reduction: one program per layer
_SCALE_BLK, _SCALE_NUM_WARPS = 1024, 4  # the backward's scaling: elements per program


def _row_blocks(Dt: int) -> tuple[int, int]:
    """``(BR, BD)`` of the row kernel: 16 rows per program, Dt in chunks of at most 64 (at 128 the fp32
    and fp64 gradient cases spill registers)."""
    return 16, pow2_block(Dt, 16, 64)


@triton.jit
def _hra_rows_kernel(
    P,  # [L, R, Dt] projected rows of the chunk, any float dtype
    Y,  # [L, N, Dt] teacher rows (read through ROWS), any strides
    WGT,  # [L, N] row weights (read through ROWS); unused without weights
    ROWS,  # int32 [R] teacher/weight row of each chunk row; unused without HAS_ROWS
    TERM,  # [L, R] ACC (out): w (1 - cos); row stride stride_terml (a slice of all the chunks' terms)
    DP,  # [L, R, Dt] ACC (out): ∂(Σ w (1 - cos))/∂P; may alias P when P is ACC
    R,
    Dt,
    stride_pl,
    stride_pr,
    stride_pd,
    stride_yl,
    stride_yn,
    stride_yd,
    stride_wl,
    stride_wn,
    stride_terml,
    eps,
    HAS_ROWS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    # One program: BR rows of one layer; two passes over Dt (dot products, then the gradient).
    pid = tl.program_id(0).to(tl.int64)
    i_l = tl.program_id(1).to(tl.int64)
    o_r = pid * BR + tl.arange(0, BR).to(tl.int64)  # [BR]
    m_r = o_r < R
    if HAS_ROWS:
        b_tok = tl.load(ROWS + o_r, mask=m_r, other=0).to(tl.int64)  # [BR]
    else:
        b_tok = o_r
    p_p = P + i_l * stride_pl + o_r[:, None] * stride_pr  # [BR, 1]
    p_y = Y + i_l * stride_yl + b_tok[:, None] * stride_yn  # [BR, 1]
    b_pp = tl.zeros([BR], dtype=ACC)
    b_yy = tl.zeros([BR], dtype=ACC)
    b_py = tl.zeros([BR], dtype=ACC)
    for d in range(0, Dt, BD):
        o_d = d + tl.arange(0, BD).to(tl.int64)
        m = m_r[:, None] & (o_d < Dt)[None, :]
        b_p = tl.load(p_p + o_d[None, :] * stride_pd, mask=m, other=0.0).to(ACC)  # [BR, BD]
        b_y = tl.load(p_y + o_d[None, :] * stride_yd, mask=m, other=0.0).to(ACC)
        b_pp += tl.sum(b_p * b_p, axis=1)
        b_yy += tl.sum(b_y * b_y, axis=1)
        b_py += tl.sum(b_p * b_y, axis=1)
    # Correctly rounded square roots and divisions (fp32 defaults to the approximate forms on the GPU),
    # as torch computes the cosine; fp64 has only the exact forms.
    if ACC == tl.float64:
        b_np = tl.sqrt(b_pp)
        b_cp = tl.maximum(b_np, eps)
        b_cy = tl.maximum(tl.sqrt(b_yy), eps)
        b_cos = b_py / (b_cp * b_cy)
    else:
        b_np = tl.sqrt_rn(b_pp)
        b_cp = tl.maximum(b_np, eps)
        b_cy = tl.maximum(tl.sqrt_rn(b_yy), eps)
        b_cos = tl.div_rn(b_py, b_cp * b_cy)
    if HAS_WEIGHTS:
        b_w = tl.load(WGT + i_l * stride_wl + b_tok * stride_wn, mask=m_r, other=0.0).to(ACC)
    else:
        b_w = m_r.to(ACC)
    m_w = b_w > 0  # a row of weight 0 never leaks a non-finite value
    tl.store(TERM + i_l * stride_terml + o_r, tl.where(m_w, b_w * (1.0 - b_cos), 0.0), mask=m_r)
    if COMPUTE_GRAD:
        # ∂/∂P of w (1 − cos) = −w ∂cos/∂P = a y + c P
        b_safe_np = tl.where(b_np > 0, b_np, 1.0)
        if ACC == tl.float64:
            b_a = tl.where(m_w, -b_w / (b_cp * b_cy), 0.0)
            b_inv_np = tl.where(b_np > 0, 1.0 / b_safe_np, 0.0)
            b_c = tl.where(m_w, b_w * b_py / (b_cp * b_cp * b_cy) * b_inv_np, 0.0)
        else:
            b_a = tl.where(m_w, -tl.div_rn(b_w, b_cp * b_cy), 0.0)
            b_inv_np = tl.where(b_np > 0, tl.div_rn(tl.full([BR], 1.0, ACC), b_safe_np), 0.0)
            b_c = tl.where(m_w, tl.div_rn(b_w * b_py, b_cp * b_cp * b_cy) * b_inv_np, 0.0)
        p_dp = DP + (i_l * R + o_r[:, None]) * Dt  # [BR, 1], contiguous
        for d in range(0, Dt, BD):
            o_d = d + tl.arange(0, BD).to(tl.int64)
            m = m_r[:, None] & (o_d < Dt)[None, :]
            b_p = tl.load(p_p + o_d[None, :] * stride_pd, mask=m, other=0.0).to(ACC)
            b_y = tl.load(p_y + o_d[None, :] * stride_yd, mask=m, other=0.0).to(ACC)
            tl.store(p_dp + o_d[None, :], b_a[:, None] * b_y + b_c[:, None] * b_p, mask=m)


@triton.jit
def _hra_finish_kernel(
    TERM,  # [L, R] ACC: w (1 - cos) of every used row, contiguous
    WGT,  # [L, N] row weights, any float dtype and strides; unused without HAS_WEIGHTS
    LOSS,  # [L] ACC out: Σ term / den
    DEN,  # [L] ACC out: den = max(Σ_n w_n, tiny) (max(R, 1) without weights)
    R,
    N,
    stride_wl,
    stride_wn,
    HAS_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,
    IS_FP64: tl.constexpr,
    TINY: tl.constexpr,  # the smallest normal number of ACC (a float argument would be fp32: 0 for fp64's)
    BLK: tl.constexpr,
):
    # One program per layer, fixed summation order (deterministic): one launch instead of the sums of
    # the terms and of the weights, the clamp and the division.
    i_l = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLK).to(tl.int64)
    b_num = tl.zeros([BLK], dtype=ACC)
    for r0 in range(0, R, BLK):
        b_num += tl.load(TERM + (i_l * R + r0 + o), mask=r0 + o < R, other=0.0)
    num = tl.sum(b_num, axis=0)
    if HAS_WEIGHTS:
        # Σ w over all N rows: the callers' weights are 0 off the used rows; Σ w = 0 means every term is 0,
        # and 0 / tiny = 0, never 0 / 0
        b_den = tl.zeros([BLK], dtype=ACC)
        for n0 in range(0, N, BLK):
            b_den += tl.load(WGT + i_l * stride_wl + (n0 + o) * stride_wn, mask=n0 + o < N, other=0.0).to(ACC)
        den = tl.maximum(tl.sum(b_den, axis=0), tl.full([], TINY, ACC))
    else:
        den = tl.maximum(R, 1).to(ACC)
    if IS_FP64:
        loss = num / den
    else:  # correctly rounded, as torch's division
        loss = tl.div_rn(num, den)
    tl.store(LOSS + i_l, loss)
    tl.store(DEN + i_l, den)


def _rows_triton(P, teacher, weights, rows, compute_grad, acc, term):
    L, R, Dt = P.shape
    dp = P if P.dtype == acc and P.is_contiguous() else torch.empty(L, R, Dt, dtype=acc, device=P.device)
    if R == 0 or L == 0:
        return term, dp
    BR, BD = _row_blocks(Dt)
    _hra_rows_kernel[(triton.cdiv(R, BR), L)](
        P,
        teacher,
        teacher if weights is None else weights,
        teacher if rows is None else rows,
        term,
        dp,
        R,
        Dt,
        *P.stride(),
        *teacher.stride(),
        *((0, 0) if weights is None else weights.stride()),
        term.stride(0),
        COSINE_EPS,
        HAS_ROWS=rows is not None,
        HAS_WEIGHTS=weights is not None,
        COMPUTE_GRAD=compute_grad,
        ACC=tl_acc(acc),
        BR=BR,
        BD=BD,
        num_warps=_ROWS_NUM_WARPS,
    )
    return term, dp


def _rows_torch(P, teacher, weights, rows, compute_grad, acc, _terms=None):
    """The row kernel's math in torch: ``P [L, R, Dt]`` -> ``term [L, R]``, ``dP [L, R, Dt]`` (ACC); it
    returns its terms (``_terms``, the Triton path's output buffer, is not used)."""
    p = P.to(acc)
    y = (teacher if rows is None else teacher[:, rows.long()]).to(acc)  # [L, R, Dt]
    w = torch.ones(p.shape[:2], dtype=acc, device=p.device) if weights is None else weights.to(acc)
    if rows is not None and weights is not None:
        w = w[:, rows.long()]
    n_p = torch.linalg.vector_norm(p, dim=-1)
    c_p = n_p.clamp_min(COSINE_EPS)
    c_y = torch.linalg.vector_norm(y, dim=-1).clamp_min(COSINE_EPS)
    py = (p * y).sum(-1)
    cos = py / (c_p * c_y)
    pos = w > 0
    zero = torch.zeros_like(cos)
    term = torch.where(pos, w * (1.0 - cos), zero)
    if not compute_grad:
        return term, p
    a = torch.where(pos, -w / (c_p * c_y), zero)
    inv_np = torch.where(n_p > 0, 1.0 / torch.where(n_p > 0, n_p, torch.ones_like(n_p)), zero)
    c = torch.where(pos, w * py / (c_p * c_p * c_y) * inv_np, zero)
    return term, a[..., None] * y + c[..., None] * p


def _hra_impl(student, teacher, weights, rows, weight, bias, mm_dtype, compute_grad):
    L, N, Ds = student.shape
    Dt = teacher.shape[-1]
    acc = accumulation_dtype(student, teacher, weights)
    R = N if rows is None else rows.shape[0]
    device = student.device

    def empty() -> torch.Tensor:  # a fresh one each time: a custom op's outputs may not alias
        return student.new_empty(0, dtype=acc)

    if R == 0 or L == 0:
        zeros = (lambda *s: student.new_zeros(s, dtype=acc)) if compute_grad else (lambda *s: empty())
        den = student.new_ones(L, dtype=acc)
        return student.new_zeros(L, dtype=acc), den, zeros(L, N, Ds), zeros(L, Dt, Ds), zeros(L, Dt)
    w_mm = weight.to(mm_dtype)  # [L, Dt, Ds]
    b_mm = bias.to(mm_dtype)[:, None, :]  # [L, 1, Dt]
    triton_path = use_triton(student)
    row_fn = _rows_triton if triton_path else _rows_torch
    chunk = max(1, _CHUNK_ELEMS // max(1, L * max(Dt, Ds)))
    # the Triton path writes every chunk's terms into one buffer, reduced by one finishing launch
    terms = torch.empty(L, R, dtype=acc, device=device) if triton_path else None
    num = d_weight = d_bias = None
    d_student = None
    if compute_grad:
        d_student = (
            torch.empty(L, N, Ds, dtype=acc, device=device)
            if rows is None
            else torch.zeros(L, N, Ds, dtype=acc, device=device)  # rows off the used set get 0
        )
    with torch.autocast(device_type=device.type, enabled=False):  # the dtypes are chosen here
        for r0 in range(0, R, chunk):
            r1 = min(R, r0 + chunk)
            if rows is None:
                x, y_rows = student[:, r0:r1], None
                y, w = teacher[:, r0:r1], None if weights is None else weights[:, r0:r1]
            else:
                y_rows = rows[r0:r1] if R > chunk else rows
                x, y, w = student.index_select(1, y_rows), teacher, weights
            x = x.to(mm_dtype)  # [L, r, Ds]
            p = torch.baddbmm(b_mm, x, w_mm.transpose(1, 2))  # [L, r, Dt]
            term, dp = row_fn(p, y, w, y_rows, compute_grad, acc, None if terms is None else terms[:, r0:r1])
            if not triton_path:
                num = term.sum(-1) if num is None else num + term.sum(-1)
            if not compute_grad:
                continue
            dp_mm = dp.to(mm_dtype)
            dx = torch.bmm(dp_mm, w_mm)  # [L, r, Ds]
            if rows is None:
                d_student[:, r0:r1] = dx
            else:
                d_student.index_copy_(1, y_rows.long(), dx.to(acc))
            dw = torch.bmm(dp_mm.transpose(1, 2), x).to(acc)  # [L, Dt, Ds]
            db = dp.sum(1)  # [L, Dt]
            d_weight = dw if d_weight is None else d_weight + dw
            d_bias = db if d_bias is None else d_bias + db
    loss, den = _finish(terms, num, weights, R, acc)
    if not compute_grad:
        return loss, den, empty(), empty(), empty()
    return loss, den, d_student, d_weight, d_bias


def _finish(terms, num, weights, R, acc):
    """``(loss [L], den [L])``: ``loss = Σ_i w_i (1 − cos_i) / den``, ``den = Σ w`` over all N rows (the
    callers' weights are 0 off the used rows), floored at the smallest normal number (Σ w = 0 means every
    term is 0: 0 / tiny = 0, never 0 / 0); ``den = max(R, 1)`` without weights."""
    tiny = torch.finfo(acc).tiny
    if terms is not None:  # Triton: one launch for both sums, the floor and the division
        L = terms.shape[0]
        loss, den = (
            torch.empty(L, dtype=acc, device=terms.device),
            torch.empty(L, dtype=acc, device=terms.device),
        )
        _hra_finish_kernel[(L,)](
            terms,
            terms if weights is None else weights,
            loss,
            den,
            R,
            0 if weights is None else weights.shape[1],
            *(
                (0, 0)
                if weights is None
                else (weights.stride(0) if weights.shape[0] > 1 else 0, weights.stride(1))
            ),
            HAS_WEIGHTS=weights is not None,
            ACC=tl_acc(acc),
            IS_FP64=acc == torch.float64,
            TINY=tiny,
            BLK=_FINISH_BLK,
            num_warps=_FINISH_NUM_WARPS,
        )
        return loss, den
    if weights is None:
        den = torch.full_like(num, float(max(R, 1)))
    else:
        den = weights.sum(-1, dtype=acc).clamp_min(tiny)  # [L]
    return num / den, den


@torch.library.custom_op("mta_kernels::fused_hra", mutates_args=())
def _fused_hra_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor | None,
    rows: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mm_dtype: torch.dtype,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss [L], den [L], ∂/∂student [L, N, Ds], ∂/∂weight, ∂/∂bias)``: the loss
    ``Σ_i w_i (1 − cos_i) / den`` and its denominator (see :func:`_finish`), the gradients of the
    numerator (empty without ``compute_grad``), all in the accumulation dtype."""
    return _hra_impl(student, teacher, weights, rows, weight, bias, mm_dtype, compute_grad)


@_fused_hra_op.register_fake
def _(student, teacher, weights, rows, weight, bias, mm_dtype, compute_grad):
    L, N, Ds = student.shape
    Dt = teacher.shape[-1]
    acc = accumulation_dtype(student, teacher, weights)
    grad = (
        (lambda *s: student.new_empty(s, dtype=acc))
        if compute_grad
        else (lambda *s: student.new_empty(0, dtype=acc))
    )
    loss, den = student.new_empty(L, dtype=acc), student.new_empty(L, dtype=acc)
    return loss, den, grad(L, N, Ds), grad(L, Dt, Ds), grad(L, Dt)


@triton.jit
def _hra_scale_grads_kernel(
    GL,  # [L] gradient of the loss, any float dtype (stride_gl: 0 when expanded)
    DEN,  # [L] ACC, the loss's denominator
    DS,  # [L, n_s] ACC saved gradients of the numerator (student, weight, bias), contiguous
    DW,  # [L, n_w]
    DB,  # [L, n_b]
    OS,  # [L, n_s] out, the student's dtype
    OW,  # [L, n_w] out, the weight's dtype
    OB,  # [L, n_b] out, the bias's dtype
    stride_gl,
    n_s,
    n_w,
    n_b,
    nb_s,
    nb_w,
    IS_FP64: tl.constexpr,
    RTNE_S: tl.constexpr,
    RTNE_W: tl.constexpr,
    RTNE_B: tl.constexpr,
    BLK: tl.constexpr,
):
    # The three gradients scaled by grad_output / den and cast, one launch: programs [0, nb_s) take the
    # student's, then nb_w the weight's, the rest the bias's (axis 1: the layer).
    pid = tl.program_id(0).to(tl.int64)
    i_l = tl.program_id(1).to(tl.int64)
    b_den = tl.load(DEN + i_l)
    b_g = tl.load(GL + i_l * stride_gl).to(b_den.dtype)
    if IS_FP64:
        b_scale = b_g / b_den
    else:  # correctly rounded, as torch's division
        b_scale = tl.div_rn(b_g, b_den)
    o = tl.arange(0, BLK).to(tl.int64)
    if pid < nb_s:
        off = pid * BLK + o
        m = off < n_s
        b_x = tl.load(DS + i_l * n_s + off, mask=m, other=0.0)
        tl.store(OS + i_l * n_s + off, to_output(b_x * b_scale, OS.dtype.element_ty, RTNE_S), mask=m)
    elif pid < nb_s + nb_w:
        off = (pid - nb_s) * BLK + o
        m = off < n_w
        b_x = tl.load(DW + i_l * n_w + off, mask=m, other=0.0)
        tl.store(OW + i_l * n_w + off, to_output(b_x * b_scale, OW.dtype.element_ty, RTNE_W), mask=m)
    else:
        off = (pid - nb_s - nb_w) * BLK + o
        m = off < n_b
        b_x = tl.load(DB + i_l * n_b + off, mask=m, other=0.0)
        tl.store(OB + i_l * n_b + off, to_output(b_x * b_scale, OB.dtype.element_ty, RTNE_B), mask=m)


@torch.library.custom_op("mta_kernels::fused_hra_scale_grads", mutates_args=())
def _scale_grads_op(
    grad_loss: torch.Tensor,
    den: torch.Tensor,
    d_student: torch.Tensor,
    d_weight: torch.Tensor,
    d_bias: torch.Tensor,
    student_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    bias_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`fused_hra`: the saved gradients of the numerator (``[L, N, Ds]``,
    ``[L, Dt, Ds]``, ``[L, Dt]``, contiguous, accumulation dtype) times ``grad_loss / den`` ``[L]``, in
    the parameters' dtypes. One Triton launch, or the torch composition."""
    if not use_triton(d_student):
        g = (grad_loss / den)[:, None, None]
        return (
            (d_student * g).to(student_dtype),
            (d_weight * g).to(weight_dtype),
            (d_bias * g[:, :, 0]).to(bias_dtype),
        )
    d_student, d_weight, d_bias = d_student.contiguous(), d_weight.contiguous(), d_bias.contiguous()
    out_s = torch.empty_like(d_student, dtype=student_dtype)
    out_w = torch.empty_like(d_weight, dtype=weight_dtype)
    out_b = torch.empty_like(d_bias, dtype=bias_dtype)
    L = den.shape[0]
    n_s, n_w, n_b = (t[0].numel() if L else 0 for t in (d_student, d_weight, d_bias))
    nb_s, nb_w, nb_b = (triton.cdiv(n, _SCALE_BLK) for n in (n_s, n_w, n_b))
    if L > 0 and nb_s + nb_w + nb_b > 0:
        _hra_scale_grads_kernel[(nb_s + nb_w + nb_b, L)](
            grad_loss,
            den,
            d_student,
            d_weight,
            d_bias,
            out_s,
            out_w,
            out_b,
            grad_loss.stride(0),
            n_s,
            n_w,
            n_b,
            nb_s,
            nb_w,
            IS_FP64=den.dtype == torch.float64,
            RTNE_S=bf16_rtne_by_hand(student_dtype),
            RTNE_W=bf16_rtne_by_hand(weight_dtype),
            RTNE_B=bf16_rtne_by_hand(bias_dtype),
            BLK=_SCALE_BLK,
            num_warps=_SCALE_NUM_WARPS,
        )
    return out_s, out_w, out_b


@_scale_grads_op.register_fake
def _(grad_loss, den, d_student, d_weight, d_bias, student_dtype, weight_dtype, bias_dtype):
    return (
        torch.empty_like(d_student, dtype=student_dtype),
        torch.empty_like(d_weight, dtype=weight_dtype),
        torch.empty_like(d_bias, dtype=bias_dtype),
    )


def _setup_context(ctx, inputs, output):
    student, _, _, _, weight, bias, _, compute_grad = inputs
    ctx.compute_grad = compute_grad
    ctx.dtypes = (student.dtype, weight.dtype, bias.dtype)  # the outputs: (loss, den, gradients of Σ)
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero tensors for the non-differentiable outputs


def _backward(ctx, grad_loss, *_):
    check_gradient_in_forward("fused_hra", ctx.compute_grad)
    if grad_loss is None:  # grads are not materialised: the term did not reach the output
        return (None,) * 8
    den, d_student, d_weight, d_bias = ctx.saved_tensors
    g_s, g_w, g_b = _scale_grads_op(grad_loss, den, d_student, d_weight, d_bias, *ctx.dtypes)
    return g_s, None, None, None, g_w, g_b, None, None


_fused_hra_op.register_autograd(_backward, setup_context=_setup_context)


def fused_hra(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor | None,
    rows: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """HRA of L stacked layer pairs: ``Σ_i w_i (1 − cos(W_l x_i + b_l, y_i)) / Σ_i w_i`` per layer.

    Args:
        student: ``[L, N, Ds]`` rows (token rows ``B*T``, or units); the gradient flows here.
        teacher: ``[L, N, Dt]`` (constant).
        weights: ``[L, N]`` non-negative row weights (constant), 0 off the used rows, or None (every
            used row weighs 1).
        rows: int32 ``[R]`` the rows used (the covered tokens, ascending), or None for all N rows.
        weight: ``[L, Dt, Ds]`` stacked projector weights; bias: ``[L, Dt]``.
    Returns:
        ``[L]`` in the accumulation dtype (float32; float64 for float64 inputs); 0 for a layer whose
        weights sum to 0. Differentiable w.r.t. ``student``, ``weight`` and ``bias`` (no double backward).
    """
    device = student.device
    if torch.is_autocast_enabled(device.type):
        mm_dtype = torch.get_autocast_dtype(device.type)
    elif weight.dtype in (torch.bfloat16, torch.float16):  # a 16-bit projector, as nn.Linear would run
        mm_dtype = weight.dtype
    else:
        mm_dtype = accumulation_dtype(student, teacher, weights, weight)
    compute_grad = torch.is_grad_enabled() and (
        student.requires_grad or weight.requires_grad or bias.requires_grad
    )
    w = None if weights is None else weights.detach()
    loss, *_ = _fused_hra_op(student, teacher.detach(), w, rows, weight, bias, mm_dtype, compute_grad)
    return loss
