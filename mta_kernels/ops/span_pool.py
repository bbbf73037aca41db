"""Span pooling (docs/method.md#span-pooling): weighted mean of each unit's token vectors, one launch for all layers.

    h[l, u] = Σ_{i in u} w[l, i] H[l, i] / Σ_{i in u} w[l, i]        (0 when the weights sum to 0)

Forward: one program per block of ``BU`` units × ``BD`` features (× one layer); it walks the longest
span of its block ``BT`` tokens at a time, so many 1–3 token words share a program and a 300-token
span is ``300 / BT`` steps. Backward: one program per block of ``BT`` tokens × ``BD`` features; each
token *gathers* its unit's output gradient through the token -> unit map (no atomics, deterministic).
The design and its byte floor are in ``docs/design/span_pool.md``.

Public entry point: :func:`span_pool`; registered as ``torch.ops.mta_kernels.span_pool`` (forward,
returns the output and ``1 / den`` per unit) and ``torch.ops.mta_kernels.span_pool_backward``.
"""

from __future__ import annotations

import torch

from mta_kernels import layout
from mta_kernels._dtypes import accumulation_dtype
from mta_kernels.ops._common import bf16_rtne_by_hand, pow2_block, same_tensor, tl_acc, to_output
from mta_kernels.ops._dispatch import use_triton
from mta_kernels.ops._triton import tl, triton
from mta_kernels.ops.glue import check_weights

__all__ = ["span_pool"]


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _span_pool_fwd_kernel(
    h_ptr,  # [L, N, D] any strides
    w_ptr,  # [L, N] any strides (stride_wl = 0 for shared [N] weights); unused without weights
    r_ptr,  # int32 [U, 2]
    out_ptr,  # [L, U, D]
    inv_den_ptr,  # [L, U] accumulation dtype, contiguous
    U,
    D,
    stride_hl,
    stride_hn,
    stride_hd,
    stride_wl,
    stride_wn,
    stride_ru,
    stride_rc,
    stride_ol,
    stride_ou,
    stride_od,
    HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BU: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF16_RTNE_BY_HAND: tl.constexpr,
):
    # A program pools BU consecutive units over BD features of one layer. It loops over the longest
    # span of its block, BT tokens per step: a step loads a [BU, BT, BD] tile of token rows (each row
    # a contiguous BD run when stride_hd == 1); tokens past a unit's end are masked (no memory traffic).
    pid_u = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_l = tl.program_id(2).to(tl.int64)

    o_u = pid_u * BU + tl.arange(0, BU).to(tl.int64)  # [BU]
    m_u = o_u < U
    b_start = tl.load(r_ptr + o_u * stride_ru, mask=m_u, other=0).to(tl.int64)  # [BU]
    b_end = tl.load(r_ptr + o_u * stride_ru + stride_rc, mask=m_u, other=0).to(tl.int64)  # [BU]
    b_len = b_end - b_start  # [BU], 0 for units past U
    max_len = tl.max(b_len, axis=0)

    o_d = pid_d * BD + tl.arange(0, BD).to(tl.int64)  # [BD]
    m_d = o_d < D
    o_t = tl.arange(0, BT).to(tl.int64)  # [BT]

    h_ptr += pid_l * stride_hl
    w_ptr += pid_l * stride_wl
    b_acc = tl.zeros([BU, BD], dtype=ACC_DTYPE)  # Σ w_i H_i
    b_den = tl.zeros([BU], dtype=ACC_DTYPE)  # Σ w_i
    for j in range(0, max_len, BT):
        b_pos = j + o_t  # [BT] position inside the unit
        m_t = b_pos[None, :] < b_len[:, None]  # [BU, BT]
        b_tok = b_start[:, None] + b_pos[None, :]  # [BU, BT] flat token index
        if HAS_WEIGHTS:
            b_w = tl.load(w_ptr + b_tok * stride_wn, mask=m_t, other=0).to(ACC_DTYPE)  # [BU, BT]
        else:
            b_w = m_t.to(ACC_DTYPE)  # [BU, BT]
        p_h = h_ptr + b_tok[:, :, None] * stride_hn + o_d[None, None, :] * stride_hd  # [BU, BT, BD]
        m_h = m_t[:, :, None] & m_d[None, None, :]
        b_h = tl.load(p_h, mask=m_h, other=0).to(ACC_DTYPE)  # [BU, BT, BD]
        b_acc += tl.sum(b_h * b_w[:, :, None], axis=1)
        b_den += tl.sum(b_w, axis=1)

    # A unit whose weights sum to 0 pools to 0, never 0/0.
    has_mass = b_den > 0
    b_safe_den = tl.where(has_mass, b_den, 1.0)
    b_out = tl.where(has_mass[:, None], b_acc / b_safe_den[:, None], 0.0)  # [BU, BD]
    p_out = out_ptr + pid_l * stride_ol + o_u[:, None] * stride_ou + o_d[None, :] * stride_od
    tl.store(
        p_out,
        to_output(b_out, out_ptr.dtype.element_ty, BF16_RTNE_BY_HAND),
        mask=m_u[:, None] & m_d[None, :],
    )
    # 1 / den for the backward; every D block computes it, the first one stores it.
    if pid_d == 0:
        b_inv_den = tl.where(has_mass, 1.0 / b_safe_den, 0.0)  # [BU]
        tl.store(inv_den_ptr + pid_l * U + o_u, b_inv_den.to(inv_den_ptr.dtype.element_ty), mask=m_u)


# Backward. For token i of unit u (and layer l):
#     dH[l, i] = w[l, i] / den[l, u] * dh[l, u]          and dH[l, i] = 0 for tokens in no unit.
# Every token has at most one unit (units do not overlap), so dH is a gather of dh rows through the
# token -> unit map: each program writes its own rows of dH once; no atomics, bitwise deterministic.
@triton.jit
def _span_pool_bwd_kernel(
    go_ptr,  # [L, U, D] grad of the output, any strides
    t2u_ptr,  # int32 [N] unit of each token, -1 = uncovered
    w_ptr,  # [L, N] any strides (stride_wl = 0 for shared [N] weights); unused without weights
    inv_den_ptr,  # [L, U] accumulation dtype, contiguous
    gh_ptr,  # [L, N, D] grad of hidden, contiguous
    N,
    U,
    D,
    stride_gl,
    stride_gu,
    stride_gd,
    stride_wl,
    stride_wn,
    HAS_WEIGHTS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    BF16_RTNE_BY_HAND: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_l = tl.program_id(2).to(tl.int64)

    o_t = pid_t * BT + tl.arange(0, BT).to(tl.int64)  # [BT]
    m_t = o_t < N
    o_d = pid_d * BD + tl.arange(0, BD).to(tl.int64)  # [BD]
    m_d = o_d < D

    b_unit = tl.load(t2u_ptr + o_t, mask=m_t, other=-1).to(tl.int64)  # [BT]
    m_cov = b_unit >= 0
    b_scale = tl.load(inv_den_ptr + pid_l * U + b_unit, mask=m_cov, other=0).to(ACC_DTYPE)  # [BT]
    if HAS_WEIGHTS:
        b_w = tl.load(w_ptr + pid_l * stride_wl + o_t * stride_wn, mask=m_cov, other=0).to(ACC_DTYPE)
        b_scale = b_scale * b_w
    p_go = go_ptr + pid_l * stride_gl + b_unit[:, None] * stride_gu + o_d[None, :] * stride_gd  # [BT, BD]
    b_go = tl.load(p_go, mask=m_cov[:, None] & m_d[None, :], other=0).to(ACC_DTYPE)  # [BT, BD]
    b_gh = b_go * b_scale[:, None]  # [BT, BD], 0 for uncovered tokens
    p_gh = gh_ptr + (pid_l * N + o_t[:, None]) * D + o_d[None, :]
    tl.store(
        p_gh, to_output(b_gh, gh_ptr.dtype.element_ty, BF16_RTNE_BY_HAND), mask=m_t[:, None] & m_d[None, :]
    )


# ------------------------------------------------------------------------------------------ helpers
def _as_stacked(
    hidden: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Views ``[L, N, D]`` and ``[L, N]`` (a shared ``[N]`` weight vector becomes stride 0 over L)."""
    h3 = hidden if hidden.dim() == 3 else hidden.unsqueeze(0)
    if weights is None:
        return h3, None
    return h3, weights.expand(h3.shape[0], h3.shape[1]) if weights.dim() == 1 else weights


def _check_ranges(ranges: torch.Tensor, num_tokens: int) -> tuple[int, int]:
    """Data checks of ``ranges`` (one device sync): every ``[start, end)`` non-empty, inside
    ``[0, num_tokens)``, sorted and non-overlapping. Returns ``(max span length, total covered tokens)``."""
    num_units = ranges.shape[0]
    if num_units == 0:
        return 0, 0
    r = ranges.long()
    start, end = r[:, 0], r[:, 1]
    bad = (start < 0) | (end > num_tokens) | (end <= start)
    bad[1:] |= start[1:] < end[:-1]  # sorted and non-overlapping
    unit_ids = torch.arange(num_units, device=r.device)
    first_bad = torch.where(bad, unit_ids, num_units).min()
    first_bad, max_len, total = torch.stack([first_bad, (end - start).max(), (end - start).sum()]).tolist()
    if first_bad < num_units:
        s, e = r[first_bad].tolist()
        prev = f"; previous unit ends at {int(r[first_bad - 1, 1])}" if first_bad > 0 else ""
        raise ValueError(
            f"span_pool: unit {first_bad} has token range [{s}, {e}){prev}: ranges must be non-empty, "
            f"inside [0, {num_tokens}), sorted and non-overlapping"
        )
    return max_len, total


def _check_planned_tokens(hidden: torch.Tensor, side: layout.SidePlan) -> None:
    """Metadata check against the plan: ``hidden`` must have the plan's ``N = B * T`` token rows (a
    ``[B, T, D]`` tensor passed as ``[L, N, D]`` has ``T`` rows)."""
    N = hidden.shape[-2]
    if N != side.num_tokens:
        hint = (
            " (a [B, T, D] tensor passed as [L, N, D]? flatten it to [B*T, D])" if N == side.seq_len else ""
        )
        raise ValueError(
            f"span_pool: hidden {tuple(hidden.shape)} has {N} token rows but the ranges index "
            f"N = B*T = {side.num_tokens} tokens{hint}"
        )


def _fwd_blocks(mean_len: float, width: int) -> tuple[int, int, int]:
    """(BU, BT, BD): BT ≈ the mean span length (≤ 8), BU·BT = 32 token rows per step, BD ≤ 128."""
    bt = min(8, triton.next_power_of_2(max(1, round(mean_len))))
    bd = pow2_block(width, 16, 128)
    return 32 // bt, bt, bd


# ------------------------------------------------------------------------------------- torch path
def _torch_forward(
    h3: torch.Tensor, token_to_unit: torch.Tensor, num_units: int, w2: torch.Tensor | None, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised torch path: ``index_add`` of the covered tokens into their units (rows of ``h3``
    outside every unit go to a discarded extra row ``U``). Returns ``out [L, U, D]``, ``inv_den [L, U]``."""
    L, N, D = h3.shape
    U = num_units
    t2u = token_to_unit.long()  # [N]
    index = torch.where(t2u >= 0, t2u, U)  # [N], uncovered -> trash row U
    w = torch.ones(L, N, dtype=acc, device=h3.device) if w2 is None else w2.to(acc)  # [L, N]
    w = w * (t2u >= 0)
    num = torch.zeros(L, U + 1, D, dtype=acc, device=h3.device).index_add_(
        1, index, h3.to(acc) * w[..., None]
    )
    den = torch.zeros(L, U + 1, dtype=acc, device=h3.device).index_add_(1, index, w)
    num, den = num[:, :U], den[:, :U]
    has_mass = den > 0
    safe_den = torch.where(has_mass, den, torch.ones_like(den))
    out = (num / safe_den[..., None]).to(h3.dtype)
    inv_den = torch.where(has_mass, 1.0 / safe_den, torch.zeros_like(den))
    return out, inv_den


def _torch_backward(
    grad3: torch.Tensor, t2u: torch.Tensor, w2: torch.Tensor | None, inv_den: torch.Tensor
) -> torch.Tensor:
    """Gather of the torch path: ``dH[l, i] = w[l, i] · inv_den[l, u(i)] · dh[l, u(i)]``, 0 if uncovered."""
    L, U, D = grad3.shape
    N = t2u.shape[0]
    if U == 0:
        return grad3.new_zeros(L, N, D)
    t2u = t2u.long()
    covered = t2u >= 0
    unit = t2u.clamp_min(0)  # [N]
    scale = inv_den[:, unit] * covered  # [L, N]
    if w2 is not None:
        scale = scale * w2.to(inv_den.dtype)
    return (grad3[:, unit].to(inv_den.dtype) * scale[..., None]).to(grad3.dtype)


# ------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mta_kernels::span_pool", mutates_args=())
def _span_pool_op(
    hidden: torch.Tensor,
    ranges: torch.Tensor,
    weights: torch.Tensor | None,
    token_to_unit: torch.Tensor | None = None,
    covered_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [.., U, D] in hidden's dtype, inv_den [.., U] in the accumulation dtype)``.

    ``token_to_unit`` / ``covered_tokens``: those of the ranges' :class:`~mta_kernels.layout.SidePlan`
    (validated on the host when the batch was planned: no device read here), else the ranges are checked
    here (one device sync)."""
    h3, w2 = _as_stacked(hidden, weights)
    L, N, D = h3.shape
    U = ranges.shape[0]
    if covered_tokens is not None:
        total = covered_tokens.shape[0]
    else:
        _, total = _check_ranges(ranges, N)
    acc = accumulation_dtype(hidden, weights)
    if not use_triton(hidden):
        t2u = layout.token_to_unit(ranges, N) if token_to_unit is None else token_to_unit
        out, inv_den = _torch_forward(h3, t2u, U, w2, acc)
    else:
        out = torch.empty(L, U, D, dtype=hidden.dtype, device=hidden.device)
        inv_den = torch.empty(L, U, dtype=acc, device=hidden.device)
        if U > 0 and L > 0:
            BU, BT, BD = _fwd_blocks(total / U, D)
            # max(1, ·): with D == 0 the first D block still computes inv_den.
            grid = (triton.cdiv(U, BU), max(1, triton.cdiv(D, BD)), L)
            _span_pool_fwd_kernel[grid](
                h3,
                h3 if w2 is None else w2,
                ranges,
                out,
                inv_den,
                U,
                D,
                *h3.stride(),
                *((0, 0) if w2 is None else w2.stride()),
                *ranges.stride(),
                *out.stride(),
                HAS_WEIGHTS=w2 is not None,
                ACC_DTYPE=tl_acc(acc),
                BU=BU,
                BT=BT,
                BD=BD,
                BF16_RTNE_BY_HAND=bf16_rtne_by_hand(hidden.dtype),
                num_warps=4,
            )
    if hidden.dim() == 2:
        return out[0], inv_den[0]
    return out, inv_den


@_span_pool_op.register_fake
def _(
    hidden: torch.Tensor,
    ranges: torch.Tensor,
    weights: torch.Tensor | None,
    token_to_unit: torch.Tensor | None = None,
    covered_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    lead = hidden.shape[:-2]
    U = ranges.shape[0]
    out = hidden.new_empty(*lead, U, hidden.shape[-1])
    inv_den = hidden.new_empty(*lead, U, dtype=accumulation_dtype(hidden, weights))
    return out, inv_den


@torch.library.custom_op("mta_kernels::span_pool_backward", mutates_args=())
def _span_pool_backward_op(
    grad_out: torch.Tensor,
    ranges: torch.Tensor,
    weights: torch.Tensor | None,
    inv_den: torch.Tensor,
    num_tokens: int,
    token_to_unit: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad_hidden [.., N, D]`` (contiguous, grad_out's dtype) from ``grad_out [.., U, D]``."""
    g3 = grad_out if grad_out.dim() == 3 else grad_out.unsqueeze(0)
    inv3 = (inv_den if inv_den.dim() == 2 else inv_den.unsqueeze(0)).contiguous()
    L, U, D = g3.shape
    N = num_tokens
    w2 = None
    if weights is not None:
        w2 = weights.expand(L, N) if weights.dim() == 1 else weights
    t2u = layout.token_to_unit(ranges, N) if token_to_unit is None else token_to_unit  # int32 [N], -1: none
    if not use_triton(grad_out):
        grad_hidden = _torch_backward(g3, t2u, w2, inv3)
    else:
        grad_hidden = torch.empty(L, N, D, dtype=grad_out.dtype, device=grad_out.device)
        if U == 0:  # no unit: nothing to gather
            grad_hidden.zero_()
        elif grad_hidden.numel() > 0:
            BT, BD = 32, pow2_block(D, 16, 128)
            grid = (triton.cdiv(N, BT), triton.cdiv(D, BD), L)
            _span_pool_bwd_kernel[grid](
                g3,
                t2u.contiguous(),
                g3 if w2 is None else w2,
                inv3,
                grad_hidden,
                N,
                U,
                D,
                *g3.stride(),
                *((0, 0) if w2 is None else w2.stride()),
                HAS_WEIGHTS=w2 is not None,
                ACC_DTYPE=tl_acc(inv3.dtype),
                BT=BT,
                BD=BD,
                BF16_RTNE_BY_HAND=bf16_rtne_by_hand(grad_out.dtype),
                num_warps=4,
            )
    return grad_hidden if grad_out.dim() == 3 else grad_hidden[0]


@_span_pool_backward_op.register_fake
def _(
    grad_out: torch.Tensor,
    ranges: torch.Tensor,
    weights: torch.Tensor | None,
    inv_den: torch.Tensor,
    num_tokens: int,
    token_to_unit: torch.Tensor | None = None,
) -> torch.Tensor:
    return grad_out.new_empty(*grad_out.shape[:-2], num_tokens, grad_out.shape[-1])


def _setup_context(ctx, inputs, output) -> None:
    hidden, ranges, weights, token_to_unit, _ = inputs
    _, inv_den = output
    ctx.mark_non_differentiable(inv_den)
    ctx.set_materialize_grads(False)  # no zero tensors for the non-differentiable outputs
    ctx.save_for_backward(ranges, weights, inv_den, token_to_unit)
    ctx.num_tokens = hidden.shape[-2]


def _backward(ctx, grad_out: torch.Tensor, _grad_inv_den: torch.Tensor | None):
    ranges, weights, inv_den, token_to_unit = ctx.saved_tensors
    grad_hidden = None
    if ctx.needs_input_grad[0] and grad_out is not None:  # None: grads are not materialised
        grad_hidden = torch.ops.mta_kernels.span_pool_backward(
            grad_out, ranges, weights, inv_den, ctx.num_tokens, token_to_unit
        )
    return grad_hidden, None, None, None, None


_span_pool_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------- public API
def span_pool(
    hidden: torch.Tensor,
    ranges: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    plan: layout.SidePlan | None = None,
    with_mass: bool = False,
    weights_nonnegative: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of each unit's token vectors (docs/method.md#span-pooling), all stacked layers in one launch.

    Args:
        hidden: ``[N, D]`` or stacked layers ``[L, N, D]``, N = B*T flat tokens; float32, bfloat16,
            float16 (or float64, computed in float64). Any strides (e.g. a flattened slice of a
            ``[B, T, D]`` hidden state): nothing is copied.
        ranges: int32 ``[U, 2]``, ``[start, end)`` flat token range of each unit; non-empty, inside
            ``[0, N)``, sorted and non-overlapping. Checked here (one device-to-host copy; ValueError
            naming the first bad unit) unless ``plan`` is given.
        weights: ``None`` (plain mean) or finite non-negative float token weights ``[N]`` (shared by
            all layers) or ``[L, N]``; constants for autograd (no gradient flows to them). A negative or
            non-finite weight is a ValueError on the CPU torch path, a RuntimeError elsewhere (a
            device-side assert, no host sync: ``ops.glue.check_weights``).
        plan: the :class:`~mta_kernels.layout.SidePlan` of ``ranges`` (``UnitBatch.plan.student`` or
            ``.teacher``, validated on the host when the batch was built): then nothing is read back
            from the device, and ``hidden`` must have the plan's ``N = B*T`` rows (ValueError). A plan
            whose tensors were modified in place since is not used.
        with_mass: also return each unit's weight sum ``Σ_{i in u} w_i`` ``[U]`` / ``[L, U]`` (a
            constant; the token count for ``weights=None``).
        weights_nonnegative: the caller guarantees finite ``weights >= 0`` (saliencies): the value
            check is skipped (it costs launches on the device).
    Returns:
        ``[U, D]`` or ``[L, U, D]`` in hidden's dtype (accumulated in float32); a unit whose weights
        sum to 0 pools to 0. Differentiable w.r.t. ``hidden``. With ``with_mass``, ``(pooled, mass)``.

    Autocast: the op is not autocast-aware and uses its inputs in their own dtype (no cast is
    inserted): it is a memory-bound reduction that already accumulates in float32, so a cast would
    only add a copy of ``hidden``.
    """
    _check_inputs(hidden, ranges, weights)
    if weights is not None:
        weights = weights.detach()
        if not weights_nonnegative:
            check_weights(weights, "span_pool: weights")
    plan = _usable_plan(plan, ranges, hidden)
    t2u, covered = (None, None) if plan is None else (plan.token_to_unit, plan.covered_tokens)
    out, inv_den = torch.ops.mta_kernels.span_pool(hidden, ranges, weights, t2u, covered)
    if not with_mass:
        return out
    return out, inv_den.reciprocal().nan_to_num(posinf=0.0)  # 1 / den, 0 for a unit of weight 0


def _check_inputs(hidden: torch.Tensor, ranges: torch.Tensor, weights: torch.Tensor | None) -> None:
    """Metadata checks (types, shapes, devices): nothing is read from the device."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(
            f"span_pool: hidden must be a floating tensor, got {getattr(hidden, 'dtype', type(hidden))}"
        )
    if hidden.dim() not in (2, 3):
        raise ValueError(f"span_pool: hidden must be [N, D] or [L, N, D], got shape {tuple(hidden.shape)}")
    if not isinstance(ranges, torch.Tensor) or ranges.dtype != torch.int32:
        raise TypeError(
            f"span_pool: ranges must be an int32 tensor, got {getattr(ranges, 'dtype', type(ranges))}"
        )
    if ranges.dim() != 2 or ranges.shape[1] != 2:
        raise ValueError(f"span_pool: ranges must have shape [U, 2], got {tuple(ranges.shape)}")
    if ranges.device != hidden.device:
        raise ValueError(f"span_pool: ranges is on {ranges.device} but hidden is on {hidden.device}")
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(
            f"span_pool: weights must be None or a floating tensor, got {getattr(weights, 'dtype', type(weights))}"
        )
    N = hidden.shape[-2]
    allowed = [(N,)] + ([tuple(hidden.shape[:2])] if hidden.dim() == 3 else [])
    if tuple(weights.shape) not in allowed:
        raise ValueError(
            f"span_pool: weights must have shape {' or '.join(str(list(s)) for s in allowed)} "
            f"for hidden {tuple(hidden.shape)}, got {tuple(weights.shape)}"
        )
    if weights.device != hidden.device:
        raise ValueError(f"span_pool: weights is on {weights.device} but hidden is on {hidden.device}")


def _usable_plan(
    plan: layout.SidePlan | None, ranges: torch.Tensor, hidden: torch.Tensor
) -> layout.SidePlan | None:
    """The plan if it describes ``ranges`` and still holds; metadata checks against it. While
    torch.compile traces, the plan is trusted as given."""
    if plan is None or torch.compiler.is_compiling():
        return plan
    if not same_tensor(plan.ranges, ranges):
        raise ValueError("span_pool: plan is the plan of other ranges (pass the SidePlan of these ranges)")
    if not plan.is_current():  # modified in place since planning: the ranges are checked here instead
        return None
    _check_planned_tokens(hidden, plan)
    return plan
