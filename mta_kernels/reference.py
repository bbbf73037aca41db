"""Eager PyTorch reference of the method: the oracle for tests and the baseline for benchmarks.

The math is in docs/method.md (token saliency, span pooling, DSA, HRA, the objective). Readable rather
than fast: it materialises the T×T saliency scores and the per-sequence N×N cosine matrices. Every
function accepts float64 inputs and then computes in float64 (the oracle); otherwise it computes in
float32, whatever the input dtype (docs/method.md#numerical-tolerance-rule). The op functions have the
signatures of the fused ops of ``mta_kernels``; :func:`mta_loss` is the whole MTA loss, the oracle of
``mta_kernels.MTALoss``; :func:`char_spans_to_token_ranges_reference` is the oracle of the extension's
token-assignment op.

This module imports only ``mta_kernels._dtypes`` (the accumulation rule) and ``mta_kernels.constants``:
it is the bottom of the stack.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mta_kernels._dtypes import accumulation_dtype
from mta_kernels.constants import COSINE_EPS, DSA_NORM_FLOOR, GRANULARITIES, HRA_LEVELS, POOLINGS

__all__ = [
    "token_saliency",
    "span_pool",
    "structural_loss",
    "structural_loss_stacked",
    "hra_loss",
    "covered_token_weights",
    "unit_weight_sums",
    "mta_loss",
    "MTATerms",
    "char_spans_to_token_ranges_reference",
]

SALIENCY_STD_EPS = 1e-5


# ----------------------------------------------------------------------------------- token saliency
def token_saliency(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives under a parameter-free self-attention.

    docs/method.md#token-saliency.

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


# ------------------------------------------------------------------------------------- span pooling
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
    """Weighted mean of each unit's token vectors (docs/method.md#span-pooling).

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
    """Attention weights normalised over the covered tokens of each sequence (docs/method.md#span-pooling).

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


# ----------------------------------------------------------------------------------------- DSA loss
def _check_pair(student: torch.Tensor, teacher: torch.Tensor, cu_units: torch.Tensor) -> None:
    if student.dim() != teacher.dim() or student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same units"
        )
    if int(cu_units[-1]) != student.shape[-2]:
        raise ValueError(f"cu_units ends at {int(cu_units[-1])} but there are {student.shape[-2]} units")


def _per_layer(
    loss_fn: Any,
    student: torch.Tensor,
    teacher: torch.Tensor,
    cu_units: torch.Tensor,
    unit_weights: torch.Tensor | None,
) -> torch.Tensor:
    """``[L]``: a DSA formulation applied to each of L stacked layer pairs (``[U]`` weights are shared)."""
    if unit_weights is not None and unit_weights.dim() == 1:
        unit_weights = unit_weights.expand(student.shape[0], -1)
    return torch.stack(
        [
            loss_fn(s, t, cu_units, None if unit_weights is None else unit_weights[i])
            for i, (s, t) in enumerate(zip(student, teacher))
        ]
    )


def structural_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    cu_units: torch.Tensor,
    unit_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """DSA loss, block-diagonal: pairwise cosine geometry of units within each sequence.

    docs/method.md#dsa-loss.

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
        return _per_layer(structural_loss, student, teacher, cu_units, unit_weights)
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
        return _per_layer(structural_loss_stacked, student, teacher, cu_units, unit_weights)
    dtype = accumulation_dtype(student, teacher, unit_weights)
    U = student.shape[0]
    seq = torch.repeat_interleave(
        torch.arange(len(cu_units) - 1, device=student.device), (cu_units[1:] - cu_units[:-1]).long()
    )
    s_hat = F.normalize(student.to(dtype), dim=-1, eps=DSA_NORM_FLOOR)
    t_hat = F.normalize(teacher.detach().to(dtype), dim=-1, eps=DSA_NORM_FLOOR)
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


# ----------------------------------------------------------------------------------------- HRA loss
def hra_loss(
    projected_student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted cosine distance between projected student and teacher vectors (docs/method.md#hra-loss).

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
    cos = F.cosine_similarity(projected_student.to(dtype), teacher.detach().to(dtype), dim=-1, eps=COSINE_EPS)
    w = torch.ones_like(cos) if weights is None else weights.detach().to(dtype).expand_as(cos)
    den = w.sum(-1)
    return (w * (1 - cos)).sum(-1) / torch.where(den > 0, den, torch.ones_like(den))


# ------------------------------------------------------------------------------------ the objective
def unit_weight_sums(token_weights: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """Unit importance ``W_u = Σ_{i in u} w_i`` (docs/method.md#span-pooling).

    Args:
        token_weights: ``[N]`` flat token weights (N = B*T), e.g. the teacher's normalised saliency.
        ranges: int32 ``[U, 2]`` flat token ranges of the units.
    Returns:
        ``[U]`` in token_weights' dtype (0 for a unit whose weights are all 0).
    """
    token, unit = _unit_token_index(ranges)
    out = torch.zeros(ranges.shape[0], dtype=token_weights.dtype, device=token_weights.device)
    return out.index_add(0, unit, token_weights.detach()[token])


class MTATerms(NamedTuple):
    """What :func:`mta_loss` returns (the fields of ``mta_kernels.losses.MTALossOutput``).

    Attributes:
        loss: scalar ``(1/K) Σ_k (dsa_k + γ · hra_k)`` (``(1/K) Σ_k dsa_k`` without HRA), with grad.
        dsa: ``[K]`` DSA term of each layer pair, in the order of ``pairs``.
        hra: ``[K]`` HRA term of each layer pair, or ``None`` when ``hra=None``.
    """

    loss: torch.Tensor
    dsa: torch.Tensor
    hra: torch.Tensor | None


def _project(projector: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = getattr(projector, "weight", None)
    return projector(x if weight is None else x.to(weight.dtype))


def mta_loss(
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor],
    units: Mapping[str, Any],
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    *,
    pairs: Sequence[tuple[int, int, str]],
    projectors: Sequence[nn.Module] | None = None,
    pooling: str = "attention",
    weighted: bool = True,
    hra: str | None = "unit",
    gamma: float = 0.1,
    stacked: bool = False,
    teacher_confidence: torch.Tensor | None = None,
) -> MTATerms:
    """The whole MTA loss, composed from the functions above one layer pair at a time.

    The oracle of ``mta_kernels.MTALoss`` (same arguments, same meaning; docs/method.md#the-objective).
    For pair k = (student layer ls, teacher layer lt, granularity g), with the units ``units[g]``:

    - ŵ^T, ŵ^S: token saliency of each side normalised over the covered tokens of each sequence;
    - unit vectors: span pooling of each side, weighted by ŵ (``pooling="attention"``) or plain means;
    - unit importance ``W_u = Σ_{i in u} ŵ^T_i`` when ``weighted``, else 1; with ``teacher_confidence``
      c, ``W_u = Σ_{i in u} ĉ_i`` where ĉ is c normalised over the covered tokens of each sequence
      like ŵ^T (the published ``--entropy_weight``), and ĉ_i replaces ŵ^T_i as token-HRA weight;
    - DSA on the unit vectors with W (the published (ΣU)×(ΣU) form when ``stacked``);
    - HRA: ``"unit"`` compares ``P_k h^S_u`` with ``h^T_u`` weighted by W; ``"token"`` compares
      ``P_k H^S_i`` with ``H^T_i`` over the covered tokens, weighted by ŵ^T_i (1 when not ``weighted``).

    Args:
        student_hidden_states: sequence of ``[B, Ts, Ds]`` (Hugging Face ``hidden_states``); gradients
            flow to the layers the pairs use.
        teacher_hidden_states: sequence of ``[B, Tt, Dt]`` (constants).
        units: granularity -> packed units with ``student_ranges`` / ``teacher_ranges`` (int32 ``[U, 2]``,
            flat into ``B*Ts`` / ``B*Tt``) and ``cu_units`` (int32 ``[B+1]``), e.g. a ``UnitBatch``.
        student_mask, teacher_mask: ``[B, Ts]`` / ``[B, Tt]`` attention masks (bool or 0/1).
        pairs: K triples ``(student_layer, teacher_layer, granularity)``.
        projectors: K modules mapping ``[M, Ds]`` -> ``[M, Dt]`` (the HRA projectors ``P_k``); required
            unless ``hra`` is None. Rows are cast to a projector's weight dtype first.
        pooling: ``"attention"`` or ``"mean"``; weighted: weight units and tokens by the teacher's
            saliency; hra: ``"token"`` (the two sides share one tokenization), ``"unit"`` or ``None``;
        gamma: weight γ of the HRA term; stacked: compute DSA with :func:`structural_loss_stacked`.
        teacher_confidence: ``[B, Tt]`` per-token teacher confidence ``1 − H(p_T)/log V`` (a constant),
            or None; needs ``weighted``.
    Returns:
        :class:`MTATerms` ``(loss, dsa [K], hra [K] or None)``, float32 (float64 for float64 inputs).
    """
    _check_mta_args(pairs, projectors, pooling, weighted, hra, teacher_confidence)
    dsa_terms, hra_terms = [], []
    for k, pair in enumerate(pairs):
        dsa_k, hra_k = _pair_terms(
            k,
            pair,
            student_hidden_states,
            teacher_hidden_states,
            units,
            (student_mask, teacher_mask),
            None if hra is None else projectors[k],
            pooling=pooling,
            weighted=weighted,
            hra=hra,
            dsa_fn=structural_loss_stacked if stacked else structural_loss,
            teacher_confidence=teacher_confidence,
        )
        dsa_terms.append(dsa_k)
        hra_terms.append(hra_k)
    dsa = torch.stack(dsa_terms)
    if hra is None:
        return MTATerms(dsa.mean(), dsa, None)
    hra_vec = torch.stack(hra_terms)
    return MTATerms((dsa + gamma * hra_vec).mean(), dsa, hra_vec)


def _check_mta_args(
    pairs: Sequence[tuple[int, int, str]],
    projectors: Sequence[nn.Module] | None,
    pooling: str,
    weighted: bool,
    hra: str | None,
    teacher_confidence: torch.Tensor | None,
) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if hra not in HRA_LEVELS:
        raise ValueError(f"hra must be one of {HRA_LEVELS}, got {hra!r}")
    if not pairs:
        raise ValueError("pairs must name at least one (student_layer, teacher_layer, granularity)")
    if hra is not None and (projectors is None or len(projectors) != len(pairs)):
        raise ValueError(f"hra={hra!r} needs one projector per pair ({len(pairs)})")
    if teacher_confidence is not None and not weighted:
        raise ValueError("teacher_confidence replaces the unit and token weights: it needs weighted=True")


def _pair_terms(
    k: int,
    pair: tuple[int, int, str],
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor],
    units: Mapping[str, Any],
    masks: tuple[torch.Tensor, torch.Tensor],
    projector: nn.Module | None,
    *,
    pooling: str,
    weighted: bool,
    hra: str | None,
    dsa_fn: Any,
    teacher_confidence: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DSA and HRA (None when ``hra`` is None) of pair ``k`` (see :func:`mta_loss`)."""
    ls, lt, granularity = pair
    student_mask, teacher_mask = masks
    if granularity not in GRANULARITIES:
        raise ValueError(f"pair {k}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity not in units:
        raise ValueError(f"pair {k}: needs units[{granularity!r}] but units has {sorted(units)}")
    ub = units[granularity]
    hs, ht = student_hidden_states[ls], teacher_hidden_states[lt].detach()
    B, Ts, Ds = hs.shape
    Tt, Dt = ht.shape[1:]
    hs_flat, ht_flat = hs.reshape(B * Ts, Ds), ht.reshape(B * Tt, Dt)

    # Saliency carries no gradient (token_saliency runs under no_grad).
    w_t = covered_token_weights(token_saliency(ht, teacher_mask), ub.teacher_ranges, ub.cu_units, Tt)
    if pooling == "attention":
        w_s = covered_token_weights(token_saliency(hs, student_mask), ub.student_ranges, ub.cu_units, Ts)
        units_s = span_pool(hs_flat, ub.student_ranges, w_s)
        units_t = span_pool(ht_flat, ub.teacher_ranges, w_t)
    else:
        units_s = span_pool(hs_flat, ub.student_ranges)
        units_t = span_pool(ht_flat, ub.teacher_ranges)
    if teacher_confidence is not None:  # the importances come from the confidence, the pooling not
        if tuple(teacher_confidence.shape) != (B, Tt):
            raise ValueError(
                f"teacher_confidence must be [B, Tt] = {[B, Tt]}, got {list(teacher_confidence.shape)}"
            )
        dtype = torch.float64 if ht.dtype == torch.float64 else torch.float32
        conf = teacher_confidence.detach().to(dtype)
        w_t = covered_token_weights(conf, ub.teacher_ranges, ub.cu_units, Tt)
    unit_w = unit_weight_sums(w_t, ub.teacher_ranges) if weighted else None

    dsa = dsa_fn(units_s, units_t, ub.cu_units, unit_w)
    if hra == "unit":
        return dsa, hra_loss(_project(projector, units_s), units_t, unit_w)
    if hra != "token":
        return dsa, None
    if Ts != Tt or not torch.equal(ub.student_ranges, ub.teacher_ranges):
        raise ValueError(
            f"pair {k}: hra='token' needs one tokenization shared by student and teacher "
            "(equal ranges and sequence lengths); use hra='unit'"
        )
    covered, _ = _unit_token_index(ub.student_ranges)  # the covered tokens, in order
    return dsa, hra_loss(
        _project(projector, hs_flat[covered]), ht_flat[covered], w_t[covered] if weighted else None
    )


# ----------------------------------------------------------------------------- units -> tokens
def char_spans_to_token_ranges_reference(
    texts: Sequence[str], offsets: torch.Tensor, spans: Sequence[Sequence[tuple[int, int]]]
) -> torch.Tensor:
    """Pure-Python token-assignment rule: the oracle of ``layout.char_spans_to_token_ranges``.

    docs/method.md#mapping-units-to-tokens. A token belongs to the span containing its first
    non-whitespace character (``str.isspace``).

    Args:
        texts: B strings.
        offsets: int64 ``[B, T, 2]`` character range ``[ts, te)`` of each token; an empty range
            (padding, special tokens) belongs to no unit.
        spans: per sequence, sorted non-overlapping character spans ``(start, end)``.

    Returns:
        int64 ``[K, 2]``, K = total number of spans, in order: ``[first token, last token + 1)`` in
        local token positions of the span's sequence, or ``[-1, -1]`` when no token belongs to it.
    """
    rows: list[list[int]] = []
    for b, text in enumerate(texts):
        seq_spans = list(spans[b])
        starts = [s for s, _ in seq_spans]
        ranges = [[-1, -1] for _ in seq_spans]
        for t, (ts, te) in enumerate(offsets[b].tolist()):
            while ts < te and text[ts].isspace():
                ts += 1
            if ts >= te:
                continue  # empty or whitespace-only token
            u = bisect.bisect_right(starts, ts) - 1
            if u < 0 or ts >= seq_spans[u][1]:
                continue  # starts outside every unit
            if ranges[u][0] < 0:
                ranges[u][0] = t
            ranges[u][1] = t + 1
        rows.extend(ranges)
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
