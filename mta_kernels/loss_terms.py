"""The DSA and HRA terms of L stacked layer pairs of one granularity (docs/method.md#the-objective), from
already checked inputs: the saliency weights, the pooling of both sides, the unit importances, the DSA
loss and the HRA term, each through one op of :mod:`mta_kernels.ops` (which picks its backend). The
units' layout plan (``UnitBatch.plan``) is handed to every op that needs it; without one the ops check
the layout themselves. Design notes: ``docs/design/losses.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from mta_kernels import layout
from mta_kernels.layout import UnitBatch
from mta_kernels.loss_checks import live_plan
from mta_kernels.ops.glue import covered_mask, normalised_weights, unit_weight_sums
from mta_kernels.ops.hra import fused_hra
from mta_kernels.ops.saliency import MaskStats, mask_stats, token_saliency
from mta_kernels.ops.span_pool import span_pool
from mta_kernels.ops.structural import structural_loss


class TermOptions(NamedTuple):
    """How the terms are computed (the loss module's settings).

    Attributes:
        pooling: ``"attention"`` or ``"mean"``; weighted: unit and token weights from the teacher;
        with_dsa: compute the DSA term; hra_level: ``"token"``, ``"unit"`` or None (no HRA term).
    """

    pooling: str
    weighted: bool
    with_dsa: bool
    hra_level: str | None

    @property
    def pools_units(self) -> bool:
        """Units are pooled (DSA, unit-level HRA); token-level HRA alone pools nothing."""
        return self.with_dsa or self.hra_level == "unit"

    @property
    def attention(self) -> bool:
        """The pooling is weighted by the saliency."""
        return self.pooling == "attention" and self.pools_units

    def saliency_sides(self, has_confidence: bool) -> tuple[bool, bool]:
        """Whether the student's and the teacher's saliency are needed: the student's pools, the
        teacher's pools and weighs (unless the teacher confidence replaces it as weight)."""
        return self.attention, self.attention or (self.weighted and not has_confidence)


def stack_layers(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L, B, T, D]`` from L tensors ``[B, T, D]``: a view when L == 1, one copy otherwise."""
    if len(layers) == 1:
        return layers[0].unsqueeze(0)
    return torch.stack(list(layers))


def masks_stats(
    student_mask: torch.Tensor, teacher_mask: torch.Tensor, sides: tuple[bool, bool]
) -> tuple[MaskStats | None, MaskStats | None]:
    """The saliency's statistics of each mask whose side needs them, computed once (once for both
    sides when they share one mask)."""
    student = mask_stats(student_mask) if sides[0] else None
    if not sides[1]:
        return student, None
    if student is not None and teacher_mask is student_mask:
        return student, student
    return student, mask_stats(teacher_mask)


def saliency(hidden: torch.Tensor, stats: MaskStats) -> torch.Tensor:
    """The token saliency ``[L, B, T]`` of stacked hidden states over a mask's statistics."""
    return token_saliency(hidden, stats.valid, stats=stats)


class _TeacherSide(NamedTuple):
    flat: torch.Tensor  # [L, B*Tt, Dt]
    units: torch.Tensor | None  # [L, U, Dt] pooled units
    unit_weights: torch.Tensor | None  # [L, U] unit importances W_u (None: unweighted)
    token_weights: torch.Tensor | None  # [L, B, Tt] token-level HRA weights


def stacked_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    units: UnitBatch,
    stats: tuple[MaskStats | None, MaskStats | None],
    options: TermOptions,
    projectors: Sequence[nn.Linear],
    student_saliency: torch.Tensor | None = None,
    teacher_saliency: torch.Tensor | None = None,
    teacher_confidence: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """DSA and HRA of L stacked layer pairs of one granularity (inputs already validated).

    Args:
        student: ``[L, B, Ts, Ds]`` (gradient flows here); teacher: ``[L, B, Tt, Dt]`` (constant).
        units: the granularity's UnitBatch; stats: the student's and the teacher's :class:`MaskStats`
            (:func:`masks_stats`; None for a side whose saliency is not needed or is given).
        projectors: L Linear(Ds → Dt), used when ``options.hra_level`` is not None.
        student_saliency, teacher_saliency: ``[L, B, T]`` token saliencies when the caller computed them
            (for all its layers at once), else computed here when needed.
        teacher_confidence: ``[B, Tt]`` (checked) or None: replaces the teacher's saliency as the source
            of the unit importances and the token-level HRA weights (docs/method.md#entropy-weighting).
    Returns:
        ``(dsa [L] or None, hra [L] or None)``, float32 (float64 for float64 inputs).
    """
    L, B, Ts, Ds = student.shape
    plan = live_plan(units)
    student_flat = student.reshape(L, B * Ts, Ds)  # a view for stacked / contiguous layers
    with torch.no_grad():
        t = _teacher_side(
            teacher.detach(), units, plan, stats[1], options, teacher_saliency, teacher_confidence
        )
        student_w = None  # [L, B*Ts]
        if options.attention:
            # The student's pooling needs a_i only up to a per-sequence factor, which cancels in h_u: the
            # raw saliency (a view) pools exactly like its normalised version and saves the normalisation.
            if student_saliency is None:
                student_saliency = saliency(student.detach(), stats[0])
            student_w = student_saliency.reshape(L, B * Ts)
    student_units = None
    if options.pools_units:
        student_units = span_pool(
            student_flat,
            units.student_ranges,
            student_w,
            plan=None if plan is None else plan.student,
            weights_nonnegative=True,  # saliencies
        )  # [L, U, Ds]
    dsa = None
    if options.with_dsa:
        dsa = structural_loss(
            student_units,
            t.units,
            units.cu_units,
            t.unit_weights,
            plan=plan,
            weights_nonnegative=True,  # sums of saliencies or of the checked teacher confidence
        )
    if options.hra_level is None:
        return dsa, None
    weight, bias = _stacked_projectors(projectors)
    if options.hra_level == "unit":
        return dsa, fused_hra(student_units, t.units, t.unit_weights, None, weight, bias)
    # Token level: only the covered tokens go through the projector (the plan's host-side list: static
    # shapes, no sync); without a plan, all B*T tokens with weight 0 off the covered set.
    rows = None if plan is None else plan.student.covered_tokens
    token_w = None
    if options.weighted:
        token_w = t.token_weights.reshape(L, B * Ts).contiguous()
    elif rows is None:  # unweighted: every covered token counts 1
        token_w = covered_mask(units.student_ranges, B * Ts).to(student.dtype).expand(L, -1)
    return dsa, fused_hra(student_flat, t.flat, token_w, rows, weight, bias)


def _teacher_side(
    teacher: torch.Tensor,
    units: UnitBatch,
    plan: layout.LayoutPlan | None,
    stats: MaskStats | None,
    options: TermOptions,
    teacher_saliency: torch.Tensor | None,
    confidence: torch.Tensor | None,
) -> _TeacherSide:
    """The teacher's pooled units and weights (constants). ŵ^T, the teacher's saliency normalised over the
    covered tokens of each sequence, drives the teacher's pooling, the unit importance W and the
    token-level HRA weights; the published ``--entropy_weight`` replaces it as unit importance and token
    weight by the teacher confidence, normalised alike (ŵ^T still pools). Shared by the L layers."""
    L, B, Tt, Dt = teacher.shape
    flat = teacher.reshape(L, B * Tt, Dt)
    # the covered tokens: the plan's token -> unit map, or (without a plan) a mask computed once
    covered = None if plan is None else plan.teacher.token_to_unit
    if covered is None and (options.saliency_sides(confidence is not None)[1] or confidence is not None):
        covered = covered_mask(units.teacher_ranges, B * Tt)
    teacher_w = None  # [L, B, Tt]
    if options.saliency_sides(confidence is not None)[1]:
        if teacher_saliency is None:
            teacher_saliency = saliency(teacher, stats)
        teacher_w = normalised_weights(teacher_saliency, covered)
    token_w = teacher_w
    if options.weighted and confidence is not None:
        dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
        c = confidence.detach().to(dtype).reshape(1, B, Tt)
        token_w = normalised_weights(c, covered).expand(L, B, Tt)
    if not options.pools_units:
        return _TeacherSide(flat, None, None, token_w)
    pool_w = teacher_w.reshape(L, B * Tt) if options.attention else None
    pooled, mass = span_pool(
        flat,
        units.teacher_ranges,
        pool_w,
        plan=None if plan is None else plan.teacher,
        with_mass=True,
        weights_nonnegative=True,  # normalised saliencies
    )  # [L, U, Dt], [L, U]
    unit_w = None
    if options.weighted and confidence is not None:  # W_u = Σ_{i in u} ĉ_i, the same for every layer
        unit_w = unit_weight_sums(token_w[:1], units.teacher_ranges).expand(L, -1).contiguous()
    elif options.weighted:
        # W_u = Σ_{i in u} ŵ_i: the pooling's own weight sums when it pooled with ŵ
        attention = options.attention
        unit_w = mass.to(teacher_w.dtype) if attention else unit_weight_sums(teacher_w, units.teacher_ranges)
    return _TeacherSide(flat, pooled, unit_w, token_w)


def _stacked_projectors(projectors: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([L, Dt, Ds], [L, Dt])``: the projectors' weights and biases (views for one projector)."""
    if len(projectors) == 1:
        return projectors[0].weight.unsqueeze(0), projectors[0].bias.unsqueeze(0)
    return torch.stack([p.weight for p in projectors]), torch.stack([p.bias for p in projectors])
