"""One optimizer step: the student + projectors module, the forward/backward of the micro-batches, the
update, and the step's metrics record.

Losses over tokens are sums divided by the number of target tokens of the whole global batch (all
ranks, all micro-batches), so gradient accumulation and DDP give the gradient of one process holding the
whole batch. The MTA term is a per-micro-batch loss (its DSA denominator is per batch,
docs/method.md#dsa-loss): it is averaged over micro-batches and ranks. ``accum_mean="micro-batches"``
(``--grad-accum-mean``) takes the published runs' mean instead: each micro-batch's token sums divided by
its own target tokens, averaged over micro-batches and ranks. The logged CE and KD are per-token means
over the whole step in both cases.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mta_kernels.distill import faults
from mta_kernels.distill import objective as O
from mta_kernels.distill.config import DistillError
from mta_kernels.distill.kd import KDTerm
from mta_kernels.distill.prepare import DistEnv


class Trainable(nn.Module):
    """Student + MTA projectors in one module (what the optimizer and DDP see).

    ``forward(batch)`` runs the student (the teacher output is set in ``teacher_out`` just before) and
    returns the summed CE/KD over target tokens and the MTA loss.
    """

    def __init__(
        self,
        student: nn.Module,
        mta: nn.Module | None,
        kd: str,
        temperature: float,
        skew_alpha: float,
        kd_vocab: int | None,
        entropy_weight: bool = False,
    ) -> None:
        super().__init__()
        self.entropy_weight = entropy_weight
        self.student = student
        self.mta = mta
        # The logit KD term (None: no KD, e.g. the tokenizers differ or --kd none).
        self.kd_term = None if kd_vocab is None else KDTerm(kd, temperature, skew_alpha, kd_vocab)
        self.mta_seconds: list[Any] = []  # timers of the MTA forward (CUDA event pairs or floats)
        self.teacher_out: Any = None
        # --kd-chunk: rows per chunk of the chunked CE + KD (None: eager), and the teacher's LM head.
        self.kd_chunk: int | None = None
        self.teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, batch: dict) -> dict[str, Any]:
        # The teacher's output is handed over as an attribute, not an argument: DDP re-packs forward
        # arguments (moving them to the device) and would rebuild a ModelOutput from a dict's items.
        teacher_out, self.teacher_out = self.teacher_out, None
        need_hidden = self.mta is not None
        chunked = self.kd_chunk is not None and teacher_out is not None and self.kd_term is not None
        out = self.student(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=need_hidden or chunked,
            use_cache=False,
            **({"logits_to_keep": 1} if chunked else {}),  # no [B, T, V] logits: see kd_chunked.py
        )
        result: dict[str, Any] = {"kd_sum": None, "kd_entropy_sum": None, "mta": None}
        if chunked:
            from mta_kernels.distill.kd_chunked import chunked_forward

            result.update(chunked_forward(self, out, teacher_out, batch["labels"]))
        else:
            result["ce_sum"], result["n_tok"] = O.ce_sum(out.logits, batch["labels"])
        if teacher_out is not None and self.kd_term is not None and not chunked:
            # the skew kind's teacher entropy is logged so that DistiLLM's value (KL + H(p_T)) can be read off
            result["kd_sum"], result["kd_entropy_sum"] = self.kd_term(
                out.logits, teacher_out.logits, batch["labels"], True
            )
        if self.mta is not None:
            timer = _Timer(batch["input_ids"].device)
            with timer:
                extra = {}
                if (
                    self.entropy_weight
                ):  # the published --entropy_weight: weights from the teacher's confidence
                    from mta_kernels.variants import teacher_confidence

                    extra["teacher_confidence"] = teacher_confidence(teacher_out.logits)
                mta_out = self.mta(
                    out.hidden_states,
                    teacher_out.hidden_states,
                    batch["units"],
                    batch["attention_mask"],
                    batch["teacher_attention_mask"],
                    **extra,
                )
            self.mta_seconds.append(timer)
            result["mta"] = mta_out.loss
            result["dsa"] = mta_out.dsa.detach()
            result["hra"] = None if mta_out.hra is None else mta_out.hra.detach()
        return result


class _Timer:
    """Wall time of a block: CUDA events on GPU (read after a synchronize), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> _Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.seconds_ = time.perf_counter() - self.t0

    def seconds(self) -> float:
        return self.start.elapsed_time(self.end) / 1000.0 if self.cuda else self.seconds_


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch on ``device`` (tensors and the ``units`` mapping; anything else as it is)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif k == "units":
            out[k] = {g: ub.to(device, non_blocking=True) for g, ub in v.items()}
        else:
            out[k] = v
    return out


class Stepper:
    """Runs optimizer steps: forward/backward of each micro-batch, clipping, update, the metrics record.

    Args:
        module: the :class:`Trainable`; ``ddp`` the same module wrapped in DDP (or ``module`` itself).
        teacher: the frozen teacher (``None`` in teacher training).
        objective: how the terms combine (the one place, :class:`~mta_kernels.distill.objective.Objective`).
        autocast: a no-argument context factory (bf16 autocast or a null context).
        clip: gradient-norm clipping (0: off).
        accum_mean: ``"tokens"`` or ``"micro-batches"`` (module docstring).
    """

    def __init__(
        self,
        env: DistEnv,
        module: Trainable,
        ddp: nn.Module,
        teacher: nn.Module | None,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        objective: O.Objective,
        autocast: Callable[[], Any],
        clip: float,
        accum_mean: str = "tokens",
    ) -> None:
        self.accum_mean = accum_mean
        self.env, self.module, self.ddp, self.teacher = env, module, ddp, teacher
        self.optimizer, self.scheduler = optimizer, scheduler
        self.objective, self.autocast, self.clip = objective, autocast, clip
        self.has_kd = module.kd_term is not None
        self.has_mta = module.mta is not None

    def _teacher_forward(self, mb: dict) -> Any:
        if self.teacher is None or not (self.has_kd or self.has_mta):
            return None
        with torch.no_grad():
            chunked = self.module.kd_chunk is not None and self.has_kd
            return self.teacher(
                input_ids=mb["teacher_input_ids"],
                attention_mask=mb["teacher_attention_mask"],
                output_hidden_states=self.has_mta or chunked,
                use_cache=False,
                **({"logits_to_keep": 1} if chunked else {}),  # the chunked KD needs hidden states only
            )

    def _forward_backward(
        self, micro: list[dict], step: int, n_tok: float
    ) -> tuple[dict[str, float], torch.Tensor | None, torch.Tensor | None]:
        """Forward and backward of each micro-batch (gradients synchronised on the last one); returns the
        summed CE/KD/MTA terms and the per-pair DSA and HRA averaged over the micro-batches."""
        env, module = self.env, self.module
        sums = {"ce": 0.0, "kd": 0.0, "mta": 0.0, "kd_h": 0.0}
        dsa = hra = None
        for i, mb in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if (last or env.world == 1) else self.ddp.no_sync()
            with sync, self.autocast():
                module.teacher_out = self._teacher_forward(mb)
                r = self.ddp(mb)
                scale = env.world / n_tok
                if self.accum_mean == "micro-batches":  # DDP averages the ranks
                    scale = 1.0 / (max(r["n_tok"], 1) * len(micro))
                ce = r["ce_sum"] * scale
                kd = None if r["kd_sum"] is None else r["kd_sum"] * scale
                mta = None if r["mta"] is None else r["mta"] / len(micro)
                loss = self.objective(ce, kd, mta)
            if i == 0:
                faults.at_step(step)  # test hook: a signal in the middle of the step
            loss.backward()
            sums["ce"] += float(r["ce_sum"].detach())
            sums["kd"] += 0.0 if kd is None else float(r["kd_sum"].detach())
            sums["mta"] += 0.0 if mta is None else float(mta.detach())
            if r["kd_entropy_sum"] is not None:
                sums["kd_h"] += float(r["kd_entropy_sum"])
            if r["mta"] is not None:
                dsa = r["dsa"].float() / len(micro) + (0 if dsa is None else dsa)
                if r["hra"] is not None:
                    hra = r["hra"].float() / len(micro) + (0 if hra is None else hra)
        return sums, dsa, hra

    def step(
        self, micro: list[dict], step: int, extra_reduce: Callable[[], list[float]] | None = None
    ) -> tuple[dict, list[float]]:
        """One optimizer step over this rank's micro-batches (already on the device).

        ``step`` is the number of the step being taken (1-based). ``extra_reduce()`` is called after the
        update; its numbers are summed over ranks with the step's own all-reduce (no extra collective)
        and returned as the second item. Returns the ``kind: "train"`` metrics record and those sums.
        """
        env, module = self.env, self.module
        t0 = time.perf_counter()
        n_tok_local = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
        n_input_local = sum(int(mb["attention_mask"].sum()) for mb in micro)
        n_tok, n_input = env.all_reduce([n_tok_local, n_input_local])
        n_tok = max(n_tok, 1.0)
        module.mta_seconds.clear()
        sums, dsa, hra = self._forward_backward(micro, step, n_tok)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(module.parameters(), self.clip)) if self.clip > 0 else 0.0
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        step_time = time.perf_counter() - t0
        mta_time = sum(t.seconds() for t in module.mta_seconds)
        extra = [] if extra_reduce is None else extra_reduce()
        reduced = env.all_reduce([sums["ce"], sums["kd"], sums["mta"], sums["kd_h"], *extra])
        ce_sum, kd_sum, mta_sum, kd_h_sum = reduced[:4]
        rec = {
            "kind": "train",
            "step": step,
            "lr": lr,
            "ce": ce_sum / n_tok,
            "kd": kd_sum / n_tok if self.has_kd else None,
            "mta": mta_sum / env.world if self.has_mta else None,
            "grad_norm": grad_norm,
            "tokens": int(n_input),
            "target_tokens": int(n_tok),
            "step_time_s": step_time,
            "tokens_per_s": n_input / step_time,
            "mta_time_s": mta_time if self.has_mta else None,
            "mta_share": mta_time / step_time if self.has_mta else None,
        }
        rec["loss"] = self.objective(rec["ce"], rec["kd"], rec["mta"])
        if dsa is not None:
            if env.world > 1:
                dsa = torch.tensor(env.all_reduce(dsa.tolist())) / env.world
                hra = None if hra is None else torch.tensor(env.all_reduce(hra.tolist())) / env.world
            rec["dsa"] = dsa.tolist()
            rec["hra"] = None if hra is None else hra.tolist()
        if not math.isfinite(rec["loss"]):
            raise DistillError(
                f"the loss became {rec['loss']} at step {step} (CE {rec['ce']}, KD {rec['kd']}, "
                f"MTA {rec['mta']}): lower --lr or check the data; {faults.on_disk.describe()}"
            )
        if self.has_kd and module.kd_term.kind == "skew":
            # DistiLLM's skewed_forward_kl reports kd + this (the cross-entropy form, same gradient)
            rec["kd_teacher_entropy"] = kd_h_sum / n_tok
        return rec, reduced[4:]
