"""``MTATrainer``: a ``transformers.Trainer`` that trains a student with the MTA objective.

    L = (1 − λ) · CE + λ · (KD + β · L_MTA)        (docs/method.md#the-objective)

CE and KD come from :mod:`mta_kernels.distill.objective` (sums over target tokens, divided by the target
tokens of the whole global batch, as the reference loop does); L_MTA from an :class:`MTALoss`. Design
notes: ``docs/design/integrations.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from mta_kernels.distill import objective as O
from mta_kernels.distill.kd import KDTerm
from mta_kernels.integrations import _common as C
from mta_kernels.integrations.collator import MTADataCollator
from mta_kernels.losses import MTALoss

__all__ = ["MTATrainer"]

KD_KINDS = tuple(O.KD_CONVENTIONS)


class MTATrainer(Trainer):
    """``transformers.Trainer`` for KD + MTA distillation of a student from a frozen teacher.

    Args:
        model: the student, an instantiated Hugging Face causal LM (trained).
        teacher: the teacher, an instantiated causal LM (frozen here: eval mode, no gradients).
        mta: an :class:`MTALoss`, a preset name (``MTALoss.from_preset`` with the models' hidden sizes)
            or ``None`` (KD and CE only). It is registered as ``model.mta_loss``: its projectors are
            parameters of the student, so the optimizer, DDP/FSDP and the checkpoints include them.
        args: ``TrainingArguments``; ``remove_unused_columns=True`` (the default) is fine: the columns
            the collator reads are kept.
        data_collator: an :class:`MTADataCollator` (built from ``processing_class`` when omitted).
        lam, beta: λ and β of the objective; ``kd``: ``"forward"``, ``"reverse"``, ``"skew"`` or
            ``None`` (no logit term; also off when student and teacher tokenize differently);
            ``temperature``, ``skew_alpha``: of the KD term.
        projector_lr: learning rate of the MTA projectors (default: the student's).
        Other keyword arguments go to ``transformers.Trainer``.

    Logged with ``self.log`` (so to every ``report_to`` backend): ``ce``, ``kd`` (per target token),
    ``mta``, and per layer pair ``dsa/pair{k}_s{student layer}_t{teacher layer}_{granularity}`` and
    ``hra/...``, averaged over the steps since the last log and over processes.
    """

    # CE and KD are divided by the target tokens of the whole accumulated global batch, and the MTA term
    # by the number of accumulation steps, here: the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        mta: MTALoss | str | None = None,
        args: Any = None,
        data_collator: MTADataCollator | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        lam: float = 0.5,
        beta: float = 2.0,
        kd: str | None = "forward",
        temperature: float = 1.0,
        skew_alpha: float = 0.1,
        projector_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be an instantiated student (e.g. AutoModelForCausalLM.from_pretrained(...)), "
                f"got {type(model).__name__}"
            )
        teacher = C.freeze(teacher)
        C.check_numbers(
            lam=lam, beta=beta, temperature=temperature, skew_alpha=skew_alpha, projector_lr=projector_lr
        )
        if kd is not None and kd not in KD_KINDS:
            raise ValueError(f"kd must be one of {KD_KINDS} or None, got {kd!r}")
        mta = C.resolve_mta(mta, model, teacher)
        data_collator = _checked_collator(
            data_collator, processing_class, C.granularities_of(mta), train_dataset, eval_dataset
        )
        shared = C.check_models_and_tokenizers(
            model, teacher, data_collator.student_tokenizer, data_collator.teacher_tokenizer,
            data_collator.max_length, kd is not None and float(lam) > 0,
        )  # fmt: skip
        if kd is not None and not shared:
            warnings.warn(
                "student and teacher tokenize differently: the logit KD term is off (MTA aligns units by "
                "text); pass kd=None to say so",
                stacklevel=2,
            )
        if mta is not None:
            C.attach(model, mta)
        self.mta = mta
        self.lam, self.beta, self.kd = float(lam), float(beta), kd
        self.temperature, self.skew_alpha = float(temperature), float(skew_alpha)
        self.projector_lr = None if projector_lr is None else float(projector_lr)
        self._terms = {"train": C.TermLog(), "eval": C.TermLog()}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.kd_vocab = len(data_collator.student_tokenizer) if shared else None
        self.kd_term = (
            None
            if kd is None or self.kd_vocab is None
            else KDTerm(kd, self.temperature, self.skew_alpha, self.kd_vocab)
        )

    # ------------------------------------------------------------------------------------ columns
    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns keeps the columns named here: the text fields the collator reads.
        if self._signature_columns is None:
            self._signature_columns = list(self.data_collator.input_columns)

    # ------------------------------------------------------------------------------ inputs, batch
    def _prepare_input(self, data: Any) -> Any:
        # The units are UnitBatch dataclasses, which Trainer's tensor/mapping walk leaves on the host.
        if isinstance(data, (torch.Tensor, Mapping, list, tuple)) or not hasattr(data, "to"):
            return super()._prepare_input(data)
        return data.to(self.args.device, non_blocking=True)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Target tokens (``labels[:, 1:] != -100``) of the accumulated batch, summed over processes."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batch_samples)
        n = torch.tensor(n, dtype=torch.long, device=device)
        if self.accelerator.num_processes > 1:
            n = self.accelerator.gather(n).sum()
        return n

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (the projectors are student parameters); ``projector_lr`` moves them to
        their own param groups."""
        optimizer = super().create_optimizer(model)
        if self.projector_lr is None or self.mta is None or getattr(self, "_projector_groups", False):
            return optimizer
        projector_ids = {id(p) for p in self.mta.parameters()}
        moved: dict[float, list[nn.Parameter]] = {}
        for group in optimizer.param_groups:
            keep = [p for p in group["params"] if id(p) not in projector_ids]
            if len(keep) != len(group["params"]):
                moved.setdefault(group.get("weight_decay", 0.0), []).extend(
                    p for p in group["params"] if id(p) in projector_ids
                )
                group["params"] = keep
        for wd, params in moved.items():
            optimizer.add_param_group({"params": params, "lr": self.projector_lr, "weight_decay": wd})
        self._projector_groups = True
        return optimizer

    # ------------------------------------------------------------------------------------- loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective for one micro-batch (see the class docstring)."""
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in inputs:
                raise ValueError(f"the batch has no {key!r} (keys: {sorted(inputs)}): use MTADataCollator")
        if self.mta is not None and "units" not in inputs:
            raise ValueError(f"the batch has no 'units' (keys: {sorted(inputs)}): use MTADataCollator")
        t_ids = inputs.get("teacher_input_ids", inputs["input_ids"])
        t_mask = inputs.get("teacher_attention_mask", inputs["attention_mask"])
        need_hidden = self.mta is not None
        use_kd = self.kd_term is not None and self.lam > 0
        teacher_out = None
        if need_hidden or use_kd:
            with torch.no_grad():
                teacher_out = self.teacher(
                    input_ids=t_ids, attention_mask=t_mask, output_hidden_states=need_hidden, use_cache=False
                )
        student = self.accelerator.unwrap_model(model)
        training = model.training and num_items_in_batch is not None

        def forward() -> dict[str, Any]:
            out = student(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                output_hidden_states=need_hidden,
                use_cache=False,
            )
            ce_sum, n_local = O.ce_sum(out.logits, inputs["labels"])
            kd_sum = None
            if use_kd:
                kd_sum, _ = self.kd_term(out.logits, teacher_out.logits, inputs["labels"])
            mta_out = None
            if self.mta is not None:
                mta_out = getattr(student, C.MTA_ATTR)(
                    out.hidden_states,
                    teacher_out.hidden_states,
                    inputs["units"],
                    inputs["attention_mask"],
                    t_mask,
                )
            # Divided by the global target tokens; DDP then averages over processes, hence the factor.
            if training:
                scale = self.accelerator.num_processes / max(float(num_items_in_batch), 1.0)
            else:
                scale = 1.0 / max(n_local, 1)
            mta_term = None
            if mta_out is not None:
                steps = self.current_gradient_accumulation_steps if training else 1
                mta_term = mta_out.loss / steps
            kd_term = None if kd_sum is None else kd_sum * scale
            loss = O.Objective(self.lam, self.beta)(ce_sum * scale, kd_term, mta_term)
            return {"loss": loss, "logits": out.logits, "ce_sum": ce_sum, "n": n_local, "kd_sum": kd_sum,
                    "mta": mta_out}  # fmt: skip

        r = C.run_in_wrapper(model, student, forward)
        n = max(r["n"], 1)
        terms = self._terms["train" if model.training else "eval"]
        terms.add("ce", r["ce_sum"].detach() / n, n)
        if r["kd_sum"] is not None:
            terms.add("kd", r["kd_sum"].detach() / n, n)
        if r["mta"] is not None:
            terms.add_mta(r["mta"], self.mta.pairs)
        loss = r["loss"]
        return (loss, {"loss": loss, "logits": r["logits"]}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the averaged loss terms (``eval_``-prefixed after an evaluation) to ``logs``."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        logs.update(self._terms[mode].pop_means(self.accelerator, "eval_" if mode == "eval" else ""))
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------ checkpoints
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Loads the student and (as its ``mta_loss`` entries) the projectors. Checked first: a checkpoint
        without the projectors of an MTA run, or with another MTALoss's (other layer pairs or widths), is
        an error, not a silent re-initialisation or a shape-mismatch traceback."""
        if self.mta is not None and any(True for _ in self.mta.parameters()):
            shapes = C.checkpoint_shapes(resume_from_checkpoint)
            if shapes is not None:
                C.check_projectors(self.mta, shapes, resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def _checked_collator(
    data_collator: MTADataCollator | None,
    processing_class: Any,
    granularities: tuple[str, ...],
    train_dataset: Any,
    eval_dataset: Any,
) -> MTADataCollator:
    """The collator (built from ``processing_class`` when omitted), checked against the MTA layer pairs'
    granularities and the data sets' columns."""
    if data_collator is None:
        if processing_class is None:
            raise ValueError(
                "pass data_collator=MTADataCollator(...) or processing_class=<the student's tokenizer>"
            )
        data_collator = MTADataCollator(processing_class, granularities=granularities)
    if not isinstance(data_collator, MTADataCollator):
        raise TypeError(
            f"data_collator must be an MTADataCollator (it builds labels and units), got "
            f"{type(data_collator).__name__}"
        )
    missing = [g for g in granularities if g not in data_collator.granularities]
    if missing:
        raise ValueError(
            f"the MTA layer pairs use {list(granularities)} units but the collator builds "
            f"{list(data_collator.granularities)}: pass "
            f"MTADataCollator(..., granularities={granularities})"
        )
    for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        cols = getattr(ds, "column_names", None)
        if isinstance(cols, list) and not data_collator.text_fields_present(cols):
            raise ValueError(
                f"{name} has columns {cols}, but the collator reads the text from "
                f"{data_collator.text_field!r} (or 'prompt' + 'completion' / 'output')"
            )
    return data_collator
