"""The training objective (docs/method.md#the-objective): cross-entropy and logit KD over response
tokens, and :class:`Objective`, the one place the terms are combined into the loss.

``ce_sum`` and ``kd_sum`` return a SUM over the selected tokens (not a mean): the training loop divides
by the number of target tokens of the whole global batch, so that gradient accumulation and DDP give the
same gradient as one process with the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F


def acc(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the accumulation dtype: float32, or float64 kept (the float64 oracle of the tests)."""
    return x if x.dtype == torch.float64 else x.float()


def shift_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and their mask.

    Args:
        labels: int ``[B, T]``, -100 where no loss is taken (prompt, padding).
    Returns:
        targets ``[B, T-1]`` (labels[:, 1:], -100 replaced by 0) and mask bool ``[B, T-1]``.
    """
    targets = labels[:, 1:]
    mask = targets != -100
    return targets.masked_fill(~mask, 0), mask


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens.

    Args:
        logits: ``[B, T, V]``; labels: int ``[B, T]`` (-100 = ignored).
    Returns:
        float32 scalar sum and the number of target tokens.
    """
    targets, mask = shift_targets(labels)
    sel = logits[:, :-1][mask].float()  # [M, V]
    return F.cross_entropy(sel, targets[mask], reduction="sum"), int(mask.sum())


KD_CONVENTIONS: dict[str, str] = {
    "forward": "T^2 * KL(p_T^tau || p_S^tau)",
    "reverse": "T^2 * KL(p_S^tau || p_T^tau)",
    "skew": "KL(p_T || a p_T + (1-a) p_S): a true KL, 0 when p_S = p_T; DistiLLM's skewed_forward_kl "
    "logs the cross-entropy -sum p_T log(a p_T + (1-a) p_S), larger by the teacher entropy H(p_T) "
    "(same gradient)",
    "srkl": "KL(p_S || a p_S + (1-a) p_T), DistiLLM's skewed_reverse_kl (same value and gradient)",
}
"""What the logged ``kd`` of each ``kind`` is (``a`` = ``skew_alpha``; skew kinds ignore the temperature)."""


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log(α·a + (1 − α)·b)`` from log-probabilities, without forming probabilities that underflow."""
    if alpha == 0:
        return log_b
    return torch.logaddexp(log_a + math.log(alpha), log_b + math.log1p(-alpha))


def kd_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "forward",
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Summed logit divergence over the response tokens (positions predicting a target).

    ``forward``: T² · KL(p_T^τ ‖ p_S^τ); ``reverse``: T² · KL(p_S^τ ‖ p_T^τ); ``skew`` (DistiLLM's skew
    forward KL): KL(p_T ‖ α p_T + (1 − α) p_S); ``srkl`` (DistiLLM's skew reverse KL):
    KL(p_S ‖ α p_S + (1 − α) p_T). The skew kinds ignore the temperature. Vocabulary entries where
    either logit is ±inf add nothing (:func:`masked_log_softmax`, as DistiLLM masks them). ``skew`` is
    the KL itself; DistiLLM's ``skewed_forward_kl`` reports the cross-entropy, which is larger by the
    teacher entropy H(p_T) (a constant: same gradient), see :data:`KD_CONVENTIONS` and
    :func:`teacher_entropy_sum`. Both logits must be over the same vocabulary (same last dim).

    Args:
        student_logits: ``[B, T, V]`` (gradient flows here); teacher_logits: ``[B, T, V]`` (constant).
        labels: int ``[B, T]`` of the shared tokenization (-100 = no target).
    Returns:
        float32 scalar: the sum over target positions.
    """
    if kind not in KD_CONVENTIONS:
        raise ValueError(f"unknown KD kind {kind!r} (one of {tuple(KD_CONVENTIONS)})")
    if kind in ("skew", "srkl") and not 0.0 <= skew_alpha < 1.0:
        raise ValueError(f"skew_alpha must lie in [0, 1), got {skew_alpha}")
    _, mask = shift_targets(labels)
    s = student_logits[:, :-1][mask].float()  # [M, V]
    t = teacher_logits[:, :-1][mask].float()  # [M, V]
    return kd_rows_sum(s, t, kind, temperature, skew_alpha)


def kd_rows_sum(
    s: torch.Tensor, t: torch.Tensor, kind: str, temperature: float = 1.0, skew_alpha: float = 0.1
) -> torch.Tensor:
    """:func:`kd_sum` of already selected rows (the math of every kind, shared with the chunked path).

    Args:
        s: student logits ``[M, V]`` (gradient flows here); t: teacher logits ``[M, V]`` (constant).
    Returns:
        scalar, the sum over the rows: float32 (float64 for float64 inputs).
    """
    s = acc(s)
    t = acc(t.detach())
    tau = 1.0 if kind in ("skew", "srkl") else temperature
    if tau != 1.0:  # x / 1.0 is x: no [M, V] copies at the default temperature
        s, t = s / tau, t / tau
    log_ps, log_pt, inf = masked_log_softmax(s, t)
    if kind == "skew":
        terms = log_pt.exp() * (log_pt - _log_mix(log_pt, log_ps, skew_alpha))
    elif kind == "srkl":
        terms = log_ps.exp() * (log_ps - _log_mix(log_ps, log_pt, skew_alpha))
    elif kind == "forward":
        terms = log_pt.exp() * (log_pt - log_ps)
    else:
        terms = log_ps.exp() * (log_ps - log_pt)
    return terms.masked_fill(inf, 0.0).sum() * tau**2


def masked_log_softmax(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmaxes of student and teacher logits with the vocabulary entries where either is ±inf
    set to 0, and that mask (DistiLLM's ``inf_mask``: such entries add nothing to a divergence).

    A ``-inf`` logit (a masked or padded vocabulary entry) has probability 0; its ``0 · log 0`` terms
    would be NaN, in the value and in the gradient. Zeroing the log-probabilities before they meet
    (and the terms after) keeps both finite; entries without an infinite logit are unchanged.

    Args:
        s, t: ``[M, V]`` logits. Returns ``log p_S``, ``log p_T`` (``[M, V]``) and the bool mask.
    """
    inf = torch.isinf(s) | torch.isinf(t)
    return F.log_softmax(s, dim=-1).masked_fill(inf, 0.0), F.log_softmax(t, dim=-1).masked_fill(inf, 0.0), inf


def teacher_entropy_sum(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed teacher entropy H(p_T) over the target positions (no temperature).

    ``kd_sum(kind="skew") + teacher_entropy_sum`` is the value DistiLLM's ``skewed_forward_kl`` reports.

    Args:
        teacher_logits: ``[B, T, V]``; labels: int ``[B, T]`` (-100 = no target).
    Returns:
        float32 scalar.
    """
    _, mask = shift_targets(labels)
    t = teacher_logits[:, :-1][mask].detach().float()
    return teacher_entropy_rows_sum(t)


def teacher_entropy_rows_sum(t: torch.Tensor) -> torch.Tensor:
    """``Σ_rows H(softmax(t))`` of teacher logits ``[M, V]`` (``-inf`` entries add 0), float32."""
    log_pt = F.log_softmax(acc(t.detach()), dim=-1).masked_fill(torch.isinf(t), 0.0)
    return -(log_pt.exp() * log_pt).sum()  # exp(0) · 0 = 0 where log_pt was masked


Term = TypeVar("Term", torch.Tensor, float)


@dataclass(frozen=True)
class Objective:
    """``L = (1 − λ) CE + λ (KD + β MTA)`` for distillation, ``L = CE`` for teacher training.

    Used for the loss that is backpropagated (tensors) and for the logged loss (floats), so the two
    cannot disagree.
    """

    lam: float
    beta: float
    distil: bool = True

    def __call__(self, ce: Term, kd: Term | None, mta: Term | None) -> Term:
        """Combine the terms; a missing one (``None``) counts as 0. Scalars: tensors or floats."""
        if not self.distil:
            return ce
        distil = 0.0
        if kd is not None:
            distil = distil + kd
        if mta is not None:
            distil = distil + self.beta * mta
        return (1.0 - self.lam) * ce + self.lam * distil
