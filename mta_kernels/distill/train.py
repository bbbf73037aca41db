"""The training loop: plain LM training of a teacher, or KD + MTA distillation of a student
(docs/method.md#the-objective).

One code path for one CPU process, one GPU, or several processes under ``torchrun`` or
``accelerate launch --multi_gpu`` (DDP: gloo on CPU, nccl on GPU, detected from ``RANK``/``WORLD_SIZE``,
which both launchers set; FSDP and DeepSpeed launches are refused, see docs/scaling.md). The pieces:
:mod:`~mta_kernels.distill.prepare` (set-up), :mod:`~mta_kernels.distill.checkpoint` and
:mod:`~mta_kernels.distill.metrics` (I/O), :mod:`~mta_kernels.distill.step` (one optimizer step); this
module runs them in order.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mta_kernels import info as mta_info
from mta_kernels.distill import checks, faults, reporting
from mta_kernels.distill import objective as O
from mta_kernels.distill.checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_bytes,
    check_resume_compatible,
    load_checkpoint,
    make_state,
    remove_earlier_run,
    remove_stale_temporaries,
    replace_dir,
    restore_state,
    save_checkpoint,
    write_failure,
)
from mta_kernels.distill.collate import UnitCollator
from mta_kernels.distill.config import DistillError, TrainConfig
from mta_kernels.distill.data import TextDataset, epoch_batches
from mta_kernels.distill.kd_chunked import head_params, resolve_kd_chunk
from mta_kernels.distill.lora import save_model
from mta_kernels.distill.metrics import (
    METRICS_NAME,
    append_records,
    best_rouge,
    read_metrics,
    summarise,
    trim_metrics,
)
from mta_kernels.distill.prepare import (
    DistEnv,
    Setup,
    build,
    fingerprint,
    make_optimizer,
    make_scheduler,
    resolve_schedule,
    seed_everything,
    setup_dist,
)
from mta_kernels.distill.step import Stepper, Trainable, to_device
from mta_kernels.distill.student_gen import OffPolicy, check_prompts

__all__ = ["evaluate", "read_metrics", "train"]


# ------------------------------------------------------------------------------------------- data
def _loader(dataset: TextDataset, batches: Any, collator: Any, cfg: TrainConfig):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collator,
        num_workers=cfg.num_workers,
        persistent_workers=False,
        worker_init_fn=faults.ignore_signals_in_worker if cfg.num_workers else None,
    )


class ResumableBatches(torch.utils.data.Sampler):
    """Endless batch sampler of this rank's batches, epochs chained, from micro-batch ``start`` on.

    One sampler for the whole run, so DataLoader workers (and the spaCy pipeline they hold) live for
    the whole run instead of being re-created every epoch.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int, world: int, start: int) -> None:
        self.args = (n_items, batch_size)
        self.seed, self.rank, self.world, self.start = seed, rank, world, start

    def _epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(*self.args, epoch, self.seed, self.rank, self.world)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start, len(self._epoch(0)))
        while True:
            yield from self._epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0


class WithExamples:
    """A collator that also hands over the examples themselves (``batch["examples"]``)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        return {**self.collator(examples), "examples": list(examples)}


def micro_batches(s: Setup, cfg: TrainConfig, start: int) -> Iterator[dict]:
    """Endless micro-batches of this rank from micro-batch index ``start`` on (epochs chained).

    With ``--student-gen`` each batch also carries its ``examples`` (the prompts to sample from).
    """
    sampler = ResumableBatches(len(s.train_set), cfg.batch_size, cfg.seed, s.env.rank, s.env.world, start)
    collator = WithExamples(s.collator) if cfg.student_gen else s.collator
    # The iterator draws its base seed from the global RNG: forked, so that a resumed run (which starts
    # its iterator after loading the RNG state) makes the same draws as an uninterrupted one (dropout).
    with torch.random.fork_rng(devices=[]):
        return iter(_loader(s.train_set, sampler, collator, cfg))


@torch.no_grad()
def evaluate(s: Setup, cfg: TrainConfig, autocast: Any) -> dict | None:
    """Held-out CE over response tokens and its perplexity (all ranks share the work)."""
    if len(s.eval_set) == 0:
        return None
    module = s.student
    was_training = module.training
    module.eval()
    idx = list(range(s.env.rank, len(s.eval_set), s.env.world))
    batches = [idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
    lm = UnitCollator(s.student_tokenizer, None, max_length=cfg.max_length, granularities=())
    total, count = 0.0, 0.0
    for batch in _loader(s.eval_set, batches, lm, cfg):
        batch = to_device(batch, s.env.device)
        with autocast():
            logits = module(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
        ce, n = O.ce_sum(logits, batch["labels"])
        total, count = total + float(ce), count + n
    total, count = s.env.all_reduce([total, count])
    module.train(was_training)
    if count == 0:  # every held-out response was truncated away: no number rather than a fake 0
        return None
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}


# ------------------------------------------------------------------------------------------- loop
def train(cfg: TrainConfig, inputs: dict[str, str] | None = None, warnings: list[str] | None = None) -> dict:
    """Run a whole training (or resume one). Returns the final summary (also in ``<out>/summary.json``).

    ``inputs``: other files the command read (option -> path, e.g. a ``--config`` file): like the
    models and the data, ``--out`` may not hold them. ``warnings``: printed (and kept in the summary)
    with the run's own once every check passed.
    """
    cfg.validate()
    reporting.check_available(cfg.report_to)
    checks.check_extension()
    checks.check_out_dir(cfg, inputs)
    faults.on_disk.start(cfg.out, os.path.join(cfg.out, CHECKPOINT_NAME))
    env = setup_dist(cfg)
    if env.main:  # versions and what runs the ops, in one line (all of it in <out>/config.json)
        print(mta_info.summary(), flush=True)
    try:
        checks.check_backend(cfg, env.device.type)
        if cfg.backend != "auto":
            from mta_kernels import use_backend

            ctx = use_backend(cfg.backend)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            return _train(cfg, env, warnings or [])
    except OSError as exc:  # a full disk, a quota, a folder made read-only or removed under the run
        raise DistillError(
            f"the run stopped on an operating-system error ({write_failure(exc)}"
            f"{f'; file {exc.filename!r}' if exc.filename else ''}); {faults.on_disk.describe()}"
        ) from None
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _load_resume_state(cfg: TrainConfig, fp: dict, notes: list[str]) -> dict | None:
    """The checkpoint to resume (``--resume``), ``None`` for a fresh run; refuses to clobber one."""
    ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)
    if not os.path.exists(ckpt_path):
        if cfg.resume:
            raise DistillError(
                f"--resume: {cfg.out!r} holds no checkpoint ({CHECKPOINT_NAME}) to continue: run without "
                "--resume to start, or give the --out of the run to continue"
            )
        return None
    if cfg.resume:
        state = load_checkpoint(ckpt_path)
        notes.extend(check_resume_compatible(state, fp, ckpt_path))
        return state
    if not cfg.overwrite:
        raise DistillError(
            f"{cfg.out!r} already holds a checkpoint: pass --resume to continue it, --overwrite to start "
            "again there, or another --out"
        )
    return None


def _prepare_student(s: Setup, cfg: TrainConfig) -> None:
    s.student.to(s.env.device).train()
    if cfg.grad_checkpointing:
        # transformers >= 5 renamed it (the old name warns); non-reentrant checkpointing works under DDP.
        no_reentrant = {"use_reentrant": False}
        if hasattr(s.student, "activation_checkpointing_enable"):
            s.student.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
        else:
            s.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
    if s.teacher is not None:
        s.teacher.to(s.env.device)


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    if use_bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _write_run_start(cfg: TrainConfig, s: Setup, fp: dict, step: int, state: dict | None) -> int:
    """Mark the run folder, trim the metrics to the checkpoint, write config.json, print the notes.

    Returns the number of metrics records the file holds now.
    """
    faults.on_disk.started(step if state is not None else None)
    if state is None and checks.is_run_dir(cfg.out):  # a fresh start (--overwrite) over an earlier run
        s.notes.extend(remove_earlier_run(cfg.out))
    checks.mark_out_dir(cfg.out)
    remove_stale_temporaries(cfg.out)
    metrics_path = os.path.join(cfg.out, METRICS_NAME)
    notes, warnings, records = trim_metrics(
        metrics_path, step, None if state is None else state.get("metrics_records")
    )
    s.notes.extend(notes)
    s.warnings.extend(warnings)
    _write_json(
        os.path.join(cfg.out, "config.json"),
        {
            **cfg.to_dict(),
            "pairs_resolved": fp["pairs"],
            "world_size": s.env.world,
            "mta_kernels": mta_info.info(),
        },
    )
    for note in s.notes:
        print(f"note: {note}")
    for warning in s.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return records


def _write_json(path: str, obj: dict) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _stat_keys(s: Setup) -> list[str]:
    keys = ["examples", "tokens", "units_failed"]
    for g in s.granularities:
        keys += [f"units_{g}_examples", f"units_{g}_tokens"]
    return keys


def _train(cfg: TrainConfig, env: DistEnv, warnings: list[str]) -> dict:
    faults.at("setup")  # test hook: a signal before anything loads
    seed_everything(cfg.seed)
    s = build(cfg, env)
    s.warnings[:0] = warnings
    s.notes.extend(resolve_schedule(cfg, len(s.train_set), env.world))
    off = _off_policy(cfg, s)
    fp = fingerprint(cfg, s)
    state = _load_resume_state(cfg, fp, s.notes)
    device = env.device
    _prepare_student(s, cfg)
    module = Trainable(
        s.student, s.mta, cfg.kd, cfg.temperature, cfg.skew_alpha, s.kd_vocab, cfg.entropy_weight
    ).to(device)
    module.kd_chunk, note = resolve_kd_chunk(
        cfg.kd_chunk, device, s.student, s.teacher, s.kd_vocab, cfg.entropy_weight
    )
    if module.kd_chunk is not None:
        module.teacher_head = head_params(s.teacher)
    if note:
        s.notes.append(note)
    optimizer = make_optimizer(module, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    run = _Run(cfg, s, fp, optimizer, scheduler, _autocast(cfg, device), off)
    step = 0 if state is None else restore_state(state, run.ckpt_path, s.student, s.mta, optimizer, scheduler)
    if off is not None:
        if state is not None:
            off.load_state_dict(state.get("student_gen"))
        else:  # the reference loss of the adaptive schedule: the student before the first step
            off.schedule.update(evaluate(s, cfg, run.autocast)["eval_loss"])
    ddp = module
    if env.world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.eval_gen:
        run.gen = GenerationEval(cfg, s)
    objective = O.Objective(cfg.lam, cfg.beta, distil=cfg.mode == "distill")
    stepper = Stepper(
        env, module, ddp, s.teacher, optimizer, scheduler, objective, run.autocast, cfg.clip, cfg.accum_mean
    )
    if state is not None and step >= min(cfg.steps, cfg.stop_at or cfg.steps):
        s.notes.append(f"the checkpoint is at step {step}: no step left to train (--steps {cfg.steps}"
                       f"{f', --stop-at {cfg.stop_at}' if cfg.stop_at else ''})")  # fmt: skip
    if env.main:
        run.records = _write_run_start(cfg, s, fp, step, state)
        if run.gen is not None:  # the best held-out ROUGE-L so far (the metrics are trimmed to `step`)
            run.gen.best = best_rouge(run.metrics_path)
        if cfg.report_to != "none":
            run.reporter = reporting.Reporter(cfg, fp["pairs"], step)
    try:
        step, last_eval = _loop(run, stepper, step)
    finally:
        if run.reporter is not None:
            run.reporter.close()
    return _finish(cfg, s, step, last_eval, run.metrics_path)


def _off_policy(cfg: TrainConfig, s: Setup) -> OffPolicy | None:
    """The student-generation state of a ``--student-gen`` run (checked here: prompts, held-out set)."""
    if not cfg.student_gen:
        return None
    if s.env.world > 1:
        raise DistillError(
            "--student-gen runs in one process only: its replay buffer is per process and the checkpoint "
            "holds one (run without torchrun)"
        )
    check_prompts(s.train_set.items)
    if len(s.eval_set) == 0:
        raise DistillError(
            "--student-gen adapts to the held-out loss: give --eval-data or an --eval-fraction above 0"
        )
    return OffPolicy(cfg, s.student_tokenizer, s.env.device)


@dataclass
class _Run:
    """What the loop reads and writes besides the step itself: files, optimizer state, evaluation."""

    cfg: TrainConfig
    s: Setup
    fp: dict
    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast: Any
    off: OffPolicy | None = None
    reporter: reporting.Reporter | None = None  # --report-to (rank 0)
    gen: GenerationEval | None = None  # --eval-gen
    records: int = 0  # metrics records in the file (rank 0), kept in each checkpoint

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.cfg.out, CHECKPOINT_NAME)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.cfg.out, METRICS_NAME)

    def save(self, step: int) -> None:
        """Checkpoint of the end of ``step`` (rank 0 writes; every rank waits for it)."""
        env = self.s.env
        if env.main:
            state = make_state(
                step=step,
                config=self.cfg.to_dict(),
                fingerprint=self.fp,
                student=self.s.student,
                mta=self.s.mta,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                device=env.device,
                student_gen=None if self.off is None else self.off.state_dict(),
                metrics_records=self.records,
            )
            save_checkpoint(self.ckpt_path, state)
        if env.world > 1:
            dist.barrier()


def _loop(run: _Run, stepper: Stepper, step: int) -> tuple[int, dict | None]:
    """Steps from ``step`` to the end (or ``--stop-at``); raises :class:`faults.Preempted` on a signal.

    Returns the last step and the last held-out evaluation.
    """
    from tqdm.auto import tqdm

    cfg, s, env = run.cfg, run.s, run.s.env
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not (env.main and cfg.progress),
        desc=_desc(cfg, s),
        dynamic_ncols=True,
    )
    stream = micro_batches(s, cfg, step * cfg.grad_accum)
    last_eval = None
    stop = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    stat_keys = _stat_keys(s) if s.granularities else []
    with faults.catch_signals() as signal_flag:
        while step < stop:
            micro = [_micro_batch(run, next(stream), step + 1) for _ in range(cfg.grad_accum)]
            local = [sum(mb["stats"][k] for mb in micro) for k in stat_keys]
            # The stop request rides on the step's all-reduce: every rank stops after the same step.
            rec, reduced = stepper.step(
                micro, step + 1, lambda local=local: [*local, float(signal_flag.requested)]
            )
            if run.off is not None:
                rec["student_gen"] = run.off.take_counts()
            if stat_keys:
                stats = dict(zip(stat_keys, reduced))
                rec["unit_coverage"] = checks.coverage(stats, s.granularities)
                if stats["units_failed"]:  # texts spaCy could not parse: trained without units
                    rec["units_failed"] = int(stats["units_failed"])
            preempted = reduced[-1] > 0
            step += 1
            do_eval = step % cfg.eval_every == 0 or step == cfg.steps
            if do_eval:
                last_eval = evaluate(s, cfg, run.autocast)
                if run.gen is not None:
                    gen = run.gen(step, run.autocast)
                    if last_eval is not None and gen is not None:
                        last_eval.update(gen)
                if run.off is not None and last_eval is not None:
                    run.off.schedule.update(last_eval["eval_loss"])
            if env.main:
                records = [rec] if (step % cfg.log_every == 0 or step == cfg.steps or preempted) else []
                if do_eval and last_eval is not None:
                    records.append({"kind": "eval", "step": step, **last_eval})
                append_records(run.metrics_path, records)
                run.records += len(records)
                if run.reporter is not None:
                    run.reporter.log(records)
                post = {"loss": f"{rec['loss']:.3f}"}
                if last_eval is not None:
                    post["eval_ppl"] = f"{last_eval['eval_ppl']:.1f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            # One process has no rank to agree with: a signal that came after the step's all-reduce
            # (during the evaluation or the metrics) stops the run now, and so does one during the save.
            preempted = preempted or (env.world == 1 and signal_flag.requested)
            if preempted or step % cfg.save_every == 0 or step == stop:
                run.save(step)
                preempted = preempted or (env.world == 1 and signal_flag.requested)
            if preempted:
                bar.close()
                raise faults.Preempted(signal_flag.signame or "SIGTERM", step, run.ckpt_path)
    bar.close()
    return step, last_eval


def _micro_batch(run: _Run, batch: dict, step: int) -> dict:
    """A data micro-batch on the device, or, with ``--student-gen``, what the schedule picks instead."""
    if run.off is not None:
        examples = batch.pop("examples")
        source, chosen = run.off.examples_for(run.s.student, examples, step, run.cfg.steps)
        if source != "data":
            batch = run.s.collator(chosen)
    return to_device(batch, run.s.env.device)


def _finish(cfg: TrainConfig, s: Setup, step: int, last_eval: dict | None, metrics_path: str) -> dict:
    """Summary, the saved model and the plot (rank 0); the summary for every rank."""
    summary = {"out": cfg.out, "step": step, "final_eval": last_eval}
    if not s.env.main:
        return summary
    summary.update(summarise(metrics_path))
    summary["data_checks"] = s.data_checks
    warnings = list(s.warnings)
    if summary.get("units_failed"):
        warning = (
            f"spaCy could not parse {summary['units_failed']} training text(s) in the logged steps: they "
            "trained without units (the steps' units_failed in metrics.jsonl)"
        )
        print(f"warning: {warning}", file=sys.stderr)
        warnings.append(warning)
    if summary.get("unit_coverage"):
        warning = checks.coverage_warning(summary["unit_coverage"], "the training batches")
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
            warnings.append(warning)
    summary["warnings"] = warnings
    faults.at("finish")  # test hook: a signal while the final model is written
    if cfg.save_model:
        replace_dir(os.path.join(cfg.out, "model"), lambda d: save_model(s.student, s.student_tokenizer, d))
    _write_json(os.path.join(cfg.out, "summary.json"), summary)
    if cfg.plot:
        from mta_kernels.distill.plot import plot_runs

        summary["plot"] = plot_runs(
            {os.path.basename(os.path.normpath(cfg.out)): metrics_path},
            os.path.join(cfg.out, "curves.png"),
        )
    return summary


class GenerationEval:
    """``--eval-gen``: held-out ROUGE-L of sampled answers at each evaluation, the best model in ``best/``.

    The first ``--eval-gen-limit`` held-out examples (their prompts and responses), one pass with seed
    ``--seed`` (RNG forked: training draws are untouched) under the protocol of DistiLLM's in-training
    evaluation: :class:`~mta_kernels.distill.evaluation.Protocol` with the run's ``--max-length`` and
    ``--max-prompt-length`` and no n-gram blocking. Each rank answers every ``world``-th example and
    the scores are summed over the ranks; rank 0 keeps the best.
    ``<out>/best`` is rewritten (merged when LoRA) whenever the score beats the best so far.
    """

    def __init__(self, cfg: TrainConfig, s: Setup) -> None:
        from mta_kernels.distill.data import EvalRecord
        from mta_kernels.distill.evaluation import Protocol

        items = s.eval_set.items[: cfg.eval_gen_limit]
        if not items:
            raise DistillError(
                "--eval-gen scores held-out answers: give --eval-data or an --eval-fraction above 0"
            )
        if any(not ex.get("prompt_length_chars") for ex in items):
            raise DistillError(
                "--eval-gen answers held-out prompts, but some held-out examples have none: use JSONL with "
                "non-empty prompts"
            )
        self.records = [
            EvalRecord(i, ex["text"][: ex["prompt_length_chars"]], [ex["text"][ex["prompt_length_chars"] :]])
            for i, ex in enumerate(items)
        ]
        self.protocol = Protocol(
            max_length=cfg.max_length,
            max_prompt_length=cfg.generation_prompt_length,
            no_repeat_ngram_size=0,
        )
        self.cfg, self.s = cfg, s
        self.best: float | None = None

    def __call__(self, step: int, autocast: Any) -> dict | None:
        """Score the student now; on rank 0 ``{"eval_rougeL": r, "eval_rougeL_best": b}``."""
        from mta_kernels.distill.evaluation import score_records

        env, student = self.s.env, self.s.student
        # Every rank answers its share of the prompts (DistiLLM evaluates on every rank too): no rank
        # waits in a collective, past the process group's timeout, while another generates them all.
        mine = self.records[env.rank :: env.world]
        total, count = 0.0, 0.0
        if mine:
            was_training = student.training
            with autocast():
                rows, _ = score_records(
                    student, self.s.student_tokenizer, mine, self.protocol, [self.cfg.seed],
                    batch_size=self.cfg.batch_size, progress=False,
                )  # fmt: skip
            student.train(was_training)
            total, count = sum(r["rougeL"] for r in rows), float(len(rows))
        total, count = env.all_reduce([total, count])
        value = total / count
        result = None
        if env.main:
            if self.best is None or value > self.best:
                self.best = value
                info = {"step": step, "eval_rougeL": value}

                def write(d: str) -> None:
                    save_model(student, self.s.student_tokenizer, d)
                    _write_json(os.path.join(d, "best.json"), info)

                replace_dir(os.path.join(self.cfg.out, "best"), write)
            result = {"eval_rougeL": value, "eval_rougeL_best": self.best}
        if env.world > 1:
            dist.barrier()
        return result


def _desc(cfg: TrainConfig, s: Setup) -> str:
    if cfg.mode == "teacher":
        return "teacher"
    return "distill+MTA" if s.mta is not None else "distill"
