"""``MTAGKDTrainer``: TRL's on-policy ``DistillationTrainer`` plus the MTA term.

TRL's ``DistillationTrainer`` (the maintained successor of its ``GKDTrainer``) samples completions from
the student, then matches the teacher's next-token distribution on them (generalised JSD, chunked over
the vocabulary). This subclass adds ``β · L_MTA`` on the same sequences (prompt + student completion):

    L = L_TRL + β · L_MTA            (λ = 1 in docs/method.md#the-objective; L_TRL is the KD term)

The hidden states of both models are captured from the backbone calls TRL already makes (no extra
forward); the units come from the decoded sequences (:func:`units_from_token_ids`). Design notes:
``docs/design/integrations.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from trl import DistillationTrainer

from mta_kernels.distill import objective as O
from mta_kernels.integrations import _common as C
from mta_kernels.integrations.collator import units_from_token_ids
from mta_kernels.losses import MTALoss
from mta_kernels.units import UnitExtractor

__all__ = ["MTAGKDTrainer"]


class _Captured:
    hidden_states: tuple[torch.Tensor, ...] | None = None


@contextlib.contextmanager
def _capture_hidden_states(backbone: nn.Module) -> Iterator[_Captured]:
    """Make ``backbone``'s calls return every layer's hidden states, and keep the last call's."""
    box = _Captured()

    def pre(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "output_hidden_states": True}

    def post(_module: nn.Module, _args: tuple, output: Any) -> None:
        box.hidden_states = output.hidden_states

    handles = [
        backbone.register_forward_pre_hook(pre, with_kwargs=True),
        backbone.register_forward_hook(post),
    ]
    try:
        yield box
    finally:
        for h in handles:
            h.remove()


class MTAGKDTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` (on-policy: the student generates the completions) + the MTA term.

    Args:
        model: the student (an instantiated causal LM, or a path TRL loads).
        teacher_model: the teacher; it shares the student's tokenizer (TRL's requirement).
        mta: an :class:`MTALoss` or a preset name (``MTALoss.from_preset`` with the models' hidden
            sizes). Registered as ``model.mta_loss``, so its projectors are trained, wrapped and
            checkpointed with the student.
        args: a ``trl.DistillationConfig``; ``train_dataset``: a ``"prompt"`` column (TRL's format).
        mta_beta: β, the weight of L_MTA next to TRL's divergence.
        extractor: the :class:`UnitExtractor` (default ``UnitExtractor()``).
        Other keyword arguments go to ``trl.DistillationTrainer``.

    Logged next to TRL's metrics: ``mta`` and per layer pair ``dsa/...``, ``hra/...`` (as in
    :class:`~mta_kernels.integrations.MTATrainer`).
    """

    def __init__(
        self,
        model: Any,
        teacher_model: Any,
        mta: MTALoss | str,
        args: Any = None,
        train_dataset: Any = None,
        *,
        mta_beta: float = 2.0,
        extractor: UnitExtractor | None = None,
        **kwargs: Any,
    ) -> None:
        C.check_numbers(mta_beta=mta_beta)
        if mta is None:
            raise ValueError("mta is None: without the MTA term use trl.DistillationTrainer itself")
        if extractor is not None and not isinstance(extractor, UnitExtractor):
            raise TypeError(f"extractor must be a UnitExtractor, got {type(extractor).__name__}")
        super().__init__(
            model=model, teacher_model=teacher_model, args=args, train_dataset=train_dataset, **kwargs
        )
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        if teacher is None:
            raise ValueError(
                "MTAGKDTrainer needs a local teacher_model: the MTA term reads its hidden states"
            )
        # TRL compares the vocabulary sizes; a teacher saved with another tokenizer of the same size
        # would still read the student's ids.
        C.check_models_and_tokenizers(self.model, teacher, self._tokenizer, None, None, kd=True)
        self.mta = C.resolve_mta(mta, self.model, teacher)
        C.attach(self.model, self.mta)
        self.mta_beta = float(mta_beta)
        self.extractor = extractor if extractor is not None else UnitExtractor()
        self.mta_granularities = C.granularities_of(self.mta)
        self._mta_terms = C.TermLog()

    def _compute_loss(self, unwrapped_student: nn.Module, inputs: dict, num_items_in_batch: Any) -> tuple:
        """TRL's loss on (prompt + completion), plus ``β · L_MTA`` on the same tokens."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with (
            _capture_hidden_states(unwrapped_student.base_model) as student_hs,
            _capture_hidden_states(teacher.base_model) as teacher_hs,
        ):
            loss, entropy_sum, n_valid = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        if student_hs.hidden_states is None or teacher_hs.hidden_states is None:
            raise RuntimeError(
                "MTAGKDTrainer: TRL's loss did not run the models' backbones (base_model); this TRL version "
                "computes the loss differently and is not supported"
            )
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        _, units = units_from_token_ids(
            self._tokenizer, input_ids, mask, self.extractor, self.mta_granularities
        )
        device = student_hs.hidden_states[0].device
        mta_out = getattr(unwrapped_student, C.MTA_ATTR)(
            student_hs.hidden_states,
            teacher_hs.hidden_states,
            C.move_units(units, device),
            mask.to(device),
            mask.to(device),
        )
        # TRL's term is already normalised over the accumulated batch; the per-micro-batch MTA mean is
        # averaged over the accumulation steps here.
        steps = self.current_gradient_accumulation_steps if self.model.training else 1
        total = O.Objective(lam=1.0, beta=self.mta_beta)(loss.new_zeros(()), loss, mta_out.loss / steps)
        mode = "train" if self.model.training else "eval"
        terms = C.TermLog()
        # TRL's term per completion token of this micro-batch (it is normalised by the batch's share).
        kd = loss.detach() * (
            float(num_items_in_batch) / max(float(n_valid), 1.0) if num_items_in_batch is not None else 1.0
        )
        terms.add("kd", kd)
        terms.add_mta(mta_out, self.mta.pairs)
        for name, (total_wv, total_w) in terms.values.items():
            self._metrics[mode][name].append(total_wv / total_w)
        return total, entropy_sum, n_valid
