"""Eager PyTorch reference of SPEC §3–§6: the oracle for tests and the baseline for benchmarks.

Readable rather than fast: it materialises the T×T saliency scores and the per-sequence N×N cosine
matrices. Every function accepts float64 inputs and then computes in float64 (the oracle); otherwise it
computes in float32, whatever the input dtype. Same signatures as the fused ops of ``mta_kernels``.

This module imports only `mta_kernels._dtypes` (the SPEC §8 accumulation rule): it is the bottom of the
stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mta_kernels._dtypes import accumulation_dtype
from mta_kernels.constants import DSA_NORM_FLOOR

__all__ = [
    "token_saliency",
    "span_pool",
    "structural_loss",
    "structural_loss_stacked",
    "hra_loss",
    "covered_token_weights",
]

SALIENCY_STD_EPS = 1e-5
NORMALIZE_EPS = 1e-8


# --------------------------------------------------------------------------------------- §3 saliency
def token_saliency(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives under a parameter-free self-attention (SPEC §3).

    Args:
        hidden: ``[B, T, D]`` or stacked layers ``[L, B, T, D]``.
        attention_mask: ``[B, T]``, bool or 0/1 integers; 1 marks a valid token.
    Returns:
        float32 (float64 for float64 input) ``[B, T]`` or ``[L, B, T]``; 0 at padding. No gradient.
    """
    if hidden.dim() == 4:
        return torch.stack([token_saliency(h, attention_mask) for h in hidden])
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D] or [L, B, T, D], got shape {tuple(hidden.shape)}")
    dtype = accumulation_dtype(hidden)
    with torch.no_grad():
        h = hidden.to(dtype)
        valid = attention_mask.to(torch.bool)  # [B, T]
        B, T, D = h.shape
        hn = h / (h.std(dim=-1, keepdim=True) + SALIENCY_STD_EPS)
        scores = hn @ hn.transpose(-1, -2) / D**0.5  # [B, T(query j), T(key i)]
        keep = valid[:, None, :] & ~torch.eye(T, dtype=torch.bool, device=h.device)[None]
        scores = scores.masked_fill(~keep, float("-inf"))
        # A query row whose keys are all masked (n == 1, or a padding row) has no softmax.
        has_key = keep.any(dim=-1, keepdim=True)
        probs = torch.softmax(torch.where(has_key, scores, torch.zeros_like(scores)), dim=-1)
        probs = torch.where(has_key & keep, probs, torch.zeros_like(probs))
        probs = probs * valid[:, :, None]  # only valid query rows vote
        n = valid.sum(dim=-1, keepdim=True).to(dtype)  # [B, 1]
        a = probs.sum(dim=1) / n.clamp_min(1)
        single = (n == 1) & valid  # the lone valid token of an n == 1 sequence gets 1
        a = torch.where(single, torch.ones_like(a), a)
        return a * valid


# ---------------------------------------------------------------------------------------- §4 pooling
def _unit_token_index(ranges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices covered by the units and, for each, its unit id."""
    ranges = ranges.long()
    lengths = ranges[:, 1] - ranges[:, 0]
    unit_id = torch.repeat_interleave(torch.arange(len(ranges), device=ranges.device), lengths)
    offset_in_unit = torch.arange(len(unit_id), device=ranges.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths
    )
    return ranges[unit_id, 0] + offset_in_unit, unit_id


def span_pool(
    hidden: torch.Tensor, ranges: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted mean of each unit's token vectors (SPEC §4).

    Args:
        hidden: ``[N, D]`` or ``[L, N, D]``, N = B*T flat tokens.
        ranges: int32 ``[U, 2]``, ``[start, end)`` flat token indices of each unit.
        weights: ``None`` (plain mean) or ``[N]`` / ``[L, N]`` non-negative token weights (constants).
    Returns:
        ``[U, D]`` or ``[L, U, D]`` in hidden's dtype; a unit whose weights sum to 0 pools to 0.
    """
    if hidden.dim() == 3:
        if weights is not None and weights.dim() == 1:
            weights = weights.expand(hidden.shape[0], -1)
        return torch.stack(
            [span_pool(h, ranges, None if weights is None else weights[i]) for i, h in enumerate(hidden)]
        )
    dtype = accumulation_dtype(hidden, weights)
    token, unit = _unit_token_index(ranges)
    U, D = ranges.shape[0], hidden.shape[-1]
    w = (
        torch.ones(len(token), dtype=dtype, device=hidden.device)
        if weights is None
        else weights.detach()[token].to(dtype)
    )
    num = torch.zeros(U, D, dtype=dtype, device=hidden.device).index_add(
        0, unit, hidden[token].to(dtype) * w[:, None]
    )
    den = torch.zeros(U, dtype=dtype, device=hidden.device).index_add(0, unit, w)
    out = num / torch.where(den > 0, den, torch.ones_like(den))[:, None]
    return out.to(hidden.dtype)


def covered_token_weights(
    saliency: torch.Tensor, ranges: torch.Tensor, cu_units: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """Attention weights normalised over the covered tokens of each sequence (SPEC §4).

    ``w_i = a_i / Σ_{k covered, same sequence} a_k`` for covered tokens, 0 elsewhere.

    Args:
        saliency: ``[B, T]`` or ``[L, B, T]`` token saliency.
        ranges: int32 ``[U, 2]`` flat token ranges; cu_units: int32 ``[B+1]``; seq_len: T.
    Returns:
        ``[N]`` or ``[L, N]`` float weights, N = B*T.
    """
    lead = saliency.shape[:-2]
    B, T = saliency.shape[-2:]
    a = saliency.reshape(*lead, B * T)
    covered = torch.zeros(B * T, dtype=torch.bool, device=a.device)
    token, _ = _unit_token_index(ranges)
    covered[token] = True
    a = a * covered
    per_seq = a.reshape(*lead, B, T).sum(-1, keepdim=True)
    per_seq = torch.where(per_seq > 0, per_seq, torch.ones_like(per_seq))
    return (a.reshape(*lead, B, T) / per_seq).reshape(*lead, B * T)


# ------------------------------------------------------------------------------------------ §5 DSA
def _check_pair(student: torch.Tensor, teacher: torch.Tensor, cu_units: torch.Tensor) -> None:
    if student.dim() != teacher.dim() or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same units"
        )
    if int(cu_units[-1]) != student.shape[-2]:
        raise ValueError(f"cu_units ends at {int(cu_units[-1])} but there are {student.shape[-2]} units")


def structural_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    cu_units: torch.Tensor,
    unit_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """DSA loss, block-diagonal: pairwise cosine geometry of units within each sequence (SPEC §5).

    Args:
        student: ``[U, Ds]`` or ``[L, U, Ds]`` unit vectors (gradient flows here).
        teacher: ``[U, Dt]`` or ``[L, U, Dt]`` (treated as constant).
        cu_units: int32 ``[B+1]`` CSR offsets of the units of each sequence.
        unit_weights: ``None`` (all 1) or ``[U]`` / ``[L, U]`` unit importances (constants).
    Returns:
        float32 (float64 for float64 input) scalar, or ``[L]``.
    """
    _check_pair(student, teacher, cu_units)
    if student.dim() == 3:
        if unit_weights is not None and unit_weights.dim() == 1:
            unit_weights = unit_weights.expand(student.shape[0], -1)
        return torch.stack(
            [
                structural_loss(s, t, cu_units, None if unit_weights is None else unit_weights[i])
                for i, (s, t) in enumerate(zip(student, teacher))
            ]
        )
    dtype = accumulation_dtype(student, teacher, unit_weights)
    # the DSA norm floor bounds the gradient of a (near-)zero unit (mta_kernels.constants.DSA_NORM_FLOOR)
    s_hat = F.normalize(student.to(dtype), dim=-1, eps=DSA_NORM_FLOOR)
    t_hat = F.normalize(teacher.detach().to(dtype), dim=-1, eps=DSA_NORM_FLOOR)
    W = (
        torch.ones(student.shape[0], dtype=dtype, device=student.device)
        if unit_weights is None
        else unit_weights.detach().to(dtype)
    )
    num = s_hat.sum() * 0  # connected to the student: a batch without pairs still has a (zero) gradient
    den = s_hat.new_zeros(())
    bounds = cu_units.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo < 2:
            continue
        cs = s_hat[lo:hi] @ s_hat[lo:hi].T
        ct = t_hat[lo:hi] @ t_hat[lo:hi].T
        ww = W[lo:hi, None] * W[None, lo:hi]
        off = ~torch.eye(hi - lo, dtype=torch.bool, device=student.device)
        num = num + (ww * (cs - ct) ** 2)[off].sum()
        den = den + ww[off].sum()
    # No sequence with two units: the loss is 0 with a zero gradient, never 0/0.
    return num / torch.where(den > 0, den, torch.ones_like(den))


def structural_loss_stacked(
    student: torch.Tensor,
    teacher: torch.Tensor,
    cu_units: torch.Tensor,
    unit_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The published formulation: one (ΣU)×(ΣU) matrix per side, cross-sequence pairs masked out.

    Same numbers as :func:`structural_loss`, O((ΣU)²) memory; the baseline for the benchmarks.
    """
    _check_pair(student, teacher, cu_units)
    if student.dim() == 3:
        if unit_weights is not None and unit_weights.dim() == 1:
            unit_weights = unit_weights.expand(student.shape[0], -1)
        return torch.stack(
            [
                structural_loss_stacked(s, t, cu_units, None if unit_weights is None else unit_weights[i])
                for i, (s, t) in enumerate(zip(student, teacher))
            ]
        )
    dtype = accumulation_dtype(student, teacher, unit_weights)
    U = student.shape[0]
    seq = torch.repeat_interleave(
        torch.arange(len(cu_units) - 1, device=student.device), (cu_units[1:] - cu_units[:-1]).long()
    )
    s_hat = F.normalize(student.to(dtype), dim=-1, eps=NORMALIZE_EPS)
    t_hat = F.normalize(teacher.detach().to(dtype), dim=-1, eps=NORMALIZE_EPS)
    cs = s_hat @ s_hat.T
    ct = t_hat @ t_hat.T
    W = (
        torch.ones(U, dtype=dtype, device=student.device)
        if unit_weights is None
        else unit_weights.detach().to(dtype)
    )
    pair_mask = (seq[:, None] == seq[None, :]) & ~torch.eye(U, dtype=torch.bool, device=student.device)
    ww = (W[:, None] * W[None, :]).masked_select(pair_mask)
    diff = (cs.masked_select(pair_mask) - ct.masked_select(pair_mask)) ** 2
    den = ww.sum()
    return (ww * diff).sum() / torch.where(den > 0, den, torch.ones_like(den))


# ------------------------------------------------------------------------------------------ §6 HRA
def hra_loss(
    projected_student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted cosine distance between projected student and teacher vectors (SPEC §6).

    ``L = Σ_i w_i (1 − cos(P h^S_i, h^T_i)) / Σ_i w_i`` over rows i (covered tokens or units).

    Args:
        projected_student: ``[M, Dt]`` or ``[L, M, Dt]``, the student rows after the projector.
        teacher: same shape (constant).
        weights: ``None`` (all 1) or ``[M]`` / ``[L, M]`` (constants).
    Returns:
        float32 (float64 for float64 input) scalar or ``[L]``; 0 when the weights sum to 0.
    """
    if projected_student.shape != teacher.shape:
        raise ValueError(
            f"projected student {tuple(projected_student.shape)} and teacher {tuple(teacher.shape)} differ"
        )
    dtype = accumulation_dtype(projected_student, teacher, weights)
    cos = F.cosine_similarity(
        projected_student.to(dtype), teacher.detach().to(dtype), dim=-1, eps=NORMALIZE_EPS
    )
    w = torch.ones_like(cos) if weights is None else weights.detach().to(dtype).expand_as(cos)
    den = w.sum(-1)
    return (w * (1 - cos)).sum(-1) / torch.where(den > 0, den, torch.ones_like(den))
