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


def kd_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "forward",
    temperature: float = 1.0,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Summed logit divergence over the response tokens (positions predicting a target).

    ``forward``: T² · KL(p_T^τ ‖ p_S^τ); ``reverse``: T² · KL(p_S^τ ‖ p_T^τ); ``skew`` (DistiLLM):
    KL(p_T ‖ α p_T + (1 − α) p_S). Both logits must be over the same vocabulary (same last dim).

    Args:
        student_logits: ``[B, T, V]`` (gradient flows here); teacher_logits: ``[B, T, V]`` (constant).
        labels: int ``[B, T]`` of the shared tokenization (-100 = no target).
    Returns:
        float32 scalar: the sum over target positions.
    """
    _, mask = shift_targets(labels)
    s = student_logits[:, :-1][mask].float()  # [M, V]
    t = teacher_logits[:, :-1][mask].detach().float()  # [M, V]
    if kind == "skew":
        log_pt = F.log_softmax(t, dim=-1)
        log_ps = F.log_softmax(s, dim=-1)
        log_mix = (
            torch.logsumexp(
                torch.stack([log_pt + math.log(skew_alpha), log_ps + math.log1p(-skew_alpha)]), dim=0
            )
            if skew_alpha > 0
            else log_ps
        )
        return (log_pt.exp() * (log_pt - log_mix)).sum()
    log_pt = F.log_softmax(t / temperature, dim=-1)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    if kind == "forward":
        kl = log_pt.exp() * (log_pt - log_ps)
    elif kind == "reverse":
        kl = log_ps.exp() * (log_ps - log_pt)
    else:
        raise ValueError(f"unknown KD kind {kind!r}")
    return kl.sum() * temperature**2


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
