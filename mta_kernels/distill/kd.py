"""The logit KD term of one micro-batch (docs/method.md#the-objective), in one place for the reference
loop (:mod:`mta_kernels.distill.step`) and :class:`~mta_kernels.integrations.MTATrainer`: the
vocabulary check, the shared-vocabulary slice, the divergence (:func:`objective.kd_sum`) and, for the
``skew`` kind, the teacher entropy that DistiLLM's logged value adds (:func:`objective.teacher_entropy_sum`).
The chunked path (``--kd-chunk``, :mod:`mta_kernels.distill.kd_chunked`) computes the same sums without
the ``[B, T, V]`` logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mta_kernels.distill import objective as O


@dataclass(frozen=True)
class KDTerm:
    """Summed logit divergence over the target tokens, over the first ``vocab`` logits of both models.

    Attributes:
        kind: a key of :data:`objective.KD_CONVENTIONS`; temperature, skew_alpha: of the divergence.
        vocab: the shared tokenizer's size; the output layers may be wider (padding rows), never narrower.
    """

    kind: str
    temperature: float
    skew_alpha: float
    vocab: int

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        with_teacher_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(kd_sum, teacher entropy sum)`` over the target positions of ``labels`` ``[B, T]``.

        Args:
            student_logits, teacher_logits: ``[B, T, V_s]`` / ``[B, T, V_t]``, both ``>= vocab`` wide
                (ValueError otherwise: the tokenizer is not these models').
            with_teacher_entropy: also the summed teacher entropy, for ``kind="skew"`` (else None).
        """
        v = self.vocab
        if min(student_logits.shape[-1], teacher_logits.shape[-1]) < v:
            raise ValueError(
                f"the tokenizer has {v} tokens but the student/teacher output layers have "
                f"{student_logits.shape[-1]}/{teacher_logits.shape[-1]}"
            )
        s, t = student_logits[..., :v], teacher_logits[..., :v]
        kd = O.kd_sum(s, t, labels, self.kind, self.temperature, self.skew_alpha)
        entropy = None
        if with_teacher_entropy and self.kind == "skew":  # DistiLLM's skewed_forward_kl logs KL + H(p_T)
            entropy = O.teacher_entropy_sum(t, labels)
        return kd, entropy
