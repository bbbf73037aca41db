"""The published cross-tokenizer MTA term (``voluyen/mta_dskd_v2``), next to this package's own.

:class:`CrossTokenizerMTALoss` computes, for layer pairs ``k = 1..K`` (docs/method.md#the-objective):

```
a^S, a^T = token_saliency(H^S_k), token_saliency(H^T_k)          (docs/method.md#token-saliency)
h^S_u = Σ_{i in u} a^S_i H^S_i / Σ_{i in u} a^S_i                 (same for the teacher, own tokens)
W_u   = Σ_{i in u} a^T_i                                          (raw saliency sum, no renormalisation)
L_k   = DSA(normalize(P_k h^S_u), normalize(h^T_u); W)            (docs/method.md#dsa-loss)
L     = (1/K) Σ_k L_k                                              (no HRA term)
```

``P_k`` is a learned linear projection from the student's width to the teacher's (one per pair). With
``teacher_confidence`` (the ``--entropy_weight`` scripts), ``W_u`` is instead the mean over the unit's
teacher tokens of ``1 − H(p_T)/log V`` (:func:`teacher_confidence`).

How it differs from :class:`mta_kernels.losses.MTALoss` with two tokenizers: DSA on the projected
student units instead of the unprojected ones, unit weights from raw saliency sums instead of
saliency renormalised over covered tokens, and no HRA term
(docs/method.md#deviations-from-the-published-code). It is built only on the public ops
(:func:`mta_kernels.ops.token_saliency`, :func:`~mta_kernels.ops.span_pool`,
:func:`~mta_kernels.ops.structural_loss`), so the numerical choices of those ops apply (saliency
averaged over valid query rows, exact denominators, eps 1e-8). The published logit KD of that recipe
(DSKD v2, forward KL at temperature 2.0 on dual-space aligned logits) is not part of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mta_kernels.constants import GRANULARITIES
from mta_kernels.layout import UnitBatch
from mta_kernels.ops import span_pool, structural_loss, token_saliency
from mta_kernels.ops.glue import unit_weight_sums

__all__ = ["CrossTokenizerMTALoss", "CrossTokenizerMTAOutput", "teacher_confidence"]


def teacher_confidence(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Normalised teacher confidence ``1 − H(p_T)/log V`` per token (a constant for autograd): the
    ``teacher_confidence`` of :class:`CrossTokenizerMTALoss` and of :class:`mta_kernels.losses.MTALoss`
    (docs/method.md#entropy-weighting). V = 1 is refused: there is no entropy to normalise by.

    Args:
        teacher_logits: ``[B, T, V]``, V ≥ 2.
    Returns:
        float32 ``[B, T]`` in [0, 1]: 1 for a one-hot prediction, 0 for the uniform one.
    """
    if teacher_logits.dim() != 3 or teacher_logits.shape[-1] < 2:
        raise ValueError(f"teacher_logits must be [B, T, V] with V >= 2, got {tuple(teacher_logits.shape)}")
    log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (1.0 - entropy / math.log(teacher_logits.shape[-1])).clamp(0.0, 1.0)


@dataclass
class CrossTokenizerMTAOutput:
    """``loss``: float32 scalar; ``dsa``: ``[K]`` the per-pair DSA terms (detached); ``hra``: always
    ``None`` (no HRA term; the field keeps the output interchangeable with ``MTALossOutput``)."""

    loss: torch.Tensor
    dsa: torch.Tensor
    hra: None = None


class CrossTokenizerMTALoss(nn.Module):
    """The published cross-tokenizer MTA term (module docstring).

    Args:
        pairs: ``(student layer, teacher layer, granularity)`` per pair, layers as ``hidden_states``
            indices; granularity one of :data:`mta_kernels.constants.GRANULARITIES`.
        student_dim, teacher_dim: hidden widths; ``P_k`` is ``nn.Linear(student_dim, teacher_dim)``.
        weighted: unit weights ``W_u`` (True, published) or all 1.
    """

    def __init__(
        self, pairs: Sequence[tuple[int, int, str]], student_dim: int, teacher_dim: int, weighted: bool = True
    ) -> None:
        super().__init__()
        pairs = [tuple(p) for p in pairs]
        if not pairs:
            raise ValueError("pairs must name at least one (student layer, teacher layer, granularity)")
        for p in pairs:
            if (
                len(p) != 3
                or not all(isinstance(x, int) and x >= 0 for x in p[:2])
                or p[2] not in GRANULARITIES
            ):
                raise ValueError(
                    f"pair {p!r} is not (student layer >= 0, teacher layer >= 0, one of {GRANULARITIES})"
                )
        for name, d in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if not isinstance(d, int) or d < 1:
                raise ValueError(f"{name} must be a positive int, got {d!r}")
        self.pairs = pairs
        self.weighted = bool(weighted)
        self.projectors = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in pairs)

    def forward(
        self,
        student_hidden_states: Sequence[torch.Tensor],
        teacher_hidden_states: Sequence[torch.Tensor],
        units: dict[str, UnitBatch],
        student_mask: torch.Tensor,
        teacher_mask: torch.Tensor,
        teacher_confidence: torch.Tensor | None = None,
    ) -> CrossTokenizerMTAOutput:
        """The loss of one batch.

        Args:
            student_hidden_states: per layer ``[B, Ts, Ds]`` (a model's ``hidden_states``).
            teacher_hidden_states: per layer ``[B, Tt, Dt]``.
            units: granularity -> :class:`UnitBatch` (ranges into the flat ``B*Ts`` / ``B*Tt`` tokens).
            student_mask: ``[B, Ts]``; teacher_mask: ``[B, Tt]`` (bool or 0/1).
            teacher_confidence: optional ``[B, Tt]`` per-token weights (:func:`teacher_confidence`):
                unit weights become their mean over the unit's teacher tokens.
        Returns:
            :class:`CrossTokenizerMTAOutput`.
        """
        if teacher_confidence is not None:
            if not isinstance(teacher_confidence, torch.Tensor) or not teacher_confidence.is_floating_point():
                raise TypeError("teacher_confidence must be a floating-point torch.Tensor [B, Tt]")
            ht0 = teacher_hidden_states[self.pairs[0][1]]
            if tuple(teacher_confidence.shape) != tuple(ht0.shape[:2]):
                raise ValueError(
                    f"teacher_confidence must be [B, Tt] = {list(ht0.shape[:2])}, "
                    f"got {list(teacher_confidence.shape)}"
                )
            if not self.weighted:
                raise ValueError("teacher_confidence replaces the unit weights: it needs weighted=True")
        terms = []
        for (s, t, g), proj in zip(self.pairs, self.projectors):
            if g not in units:
                raise ValueError(f"no units of granularity {g!r} given (pair {s}:{t}:{g})")
            ub = units[g]
            hs, ht = student_hidden_states[s], teacher_hidden_states[t]
            if hs.dim() != 3 or ht.dim() != 3 or hs.shape[0] != ht.shape[0]:
                raise ValueError(
                    f"pair {s}:{t}:{g}: hidden states must be [B, T, D] with one B, got "
                    f"{tuple(hs.shape)} and {tuple(ht.shape)}"
                )
            if ub.num_units == 0:
                terms.append(hs.sum() * 0.0)  # no unit: 0, still part of the graph
                continue
            a_s = token_saliency(hs, student_mask)  # [B, Ts] float32, constant
            a_t = token_saliency(ht, teacher_mask)
            hs_flat, ht_flat = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
            plan = ub.live_plan()  # handed to the ops: nothing data-dependent is read back from the device
            s_plan, t_plan = (None, None) if plan is None else (plan.student, plan.teacher)
            student_units = span_pool(hs_flat, ub.student_ranges, a_s.reshape(-1).to(hs.dtype), plan=s_plan)
            teacher_units = span_pool(ht_flat, ub.teacher_ranges, a_t.reshape(-1).to(ht.dtype), plan=t_plan)
            weights = None
            if self.weighted:
                weights = (
                    _range_sums(a_t, ub.teacher_ranges)
                    if teacher_confidence is None
                    else _range_means(teacher_confidence, ub.teacher_ranges)
                ).to(teacher_units.dtype)
            projected = proj(student_units.to(proj.weight.dtype))
            terms.append(structural_loss(projected, teacher_units, ub.cu_units, weights, plan=plan))
        dsa = torch.stack([x.float() if x.dtype != torch.float64 else x for x in terms])
        return CrossTokenizerMTAOutput(loss=dsa.mean(), dsa=dsa.detach())


def _range_sums(values: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """``Σ values[start:end]`` per unit, ``[B, T]``, flat ``[U, 2]`` -> float64 ``[U]`` (the loss's
    per-sequence prefix sums)."""
    return unit_weight_sums(values.detach().double().unsqueeze(0), ranges)[0]


def _range_means(values: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    r = ranges.long()
    return _range_sums(values, ranges) / (r[:, 1] - r[:, 0]).double()
