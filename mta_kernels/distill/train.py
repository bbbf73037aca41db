"""The training loop: plain LM training of a teacher, or KD + MTA distillation of a student (SPEC §7).

One code path for one CPU process, one GPU, or several processes under ``torchrun`` (DDP: gloo on CPU,
nccl on GPU, detected from ``RANK``/``WORLD_SIZE``). Losses over tokens are sums divided by the number
of target tokens of the whole global batch (all ranks, all micro-batches), so gradient accumulation and
DDP give the gradient of one process holding the whole batch. The MTA term is a per-micro-batch loss
(its DSA denominator is per batch, SPEC §5): it is averaged over micro-batches and ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mta_kernels.constants import GRANULARITIES
from mta_kernels.distill import models as M
from mta_kernels.distill import objective as O
from mta_kernels.distill.config import RESUME_KEYS, DistillError, TrainConfig, parse_pairs
from mta_kernels.distill.data import TextDataset, epoch_batches, load_examples, split_examples
from mta_kernels.units import UnitCollator, UnitExtractor

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "mta-distill-checkpoint/1"
METRICS_NAME = "metrics.jsonl"


# --------------------------------------------------------------------------------------- processes
@dataclass
class DistEnv:
    """Where this process sits: ``world == 1`` without torchrun."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sum of ``values`` over ranks (float64, on the process-group device)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup_dist(cfg: TrainConfig) -> DistEnv:
    """Join the process group when launched by torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"--device {want} asked for but CUDA is not available on this machine")
    if want == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device(want)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ module
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
    ) -> None:
        super().__init__()
        self.student = student
        self.mta = mta
        self.kd = kd
        self.temperature = temperature
        self.skew_alpha = skew_alpha
        self.kd_vocab = kd_vocab
        self.mta_seconds: list[Any] = []  # timers of the MTA forward (CUDA event pairs or floats)
        self.teacher_out: Any = None

    def forward(self, batch: dict) -> dict[str, Any]:
        # The teacher's output is handed over as an attribute, not an argument: DDP re-packs forward
        # arguments (moving them to the device) and would rebuild a ModelOutput from a dict's items.
        teacher_out, self.teacher_out = self.teacher_out, None
        need_hidden = self.mta is not None
        out = self.student(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=need_hidden,
            use_cache=False,
        )
        ce_sum, n_tok = O.ce_sum(out.logits, batch["labels"])
        result: dict[str, Any] = {"ce_sum": ce_sum, "n_tok": n_tok, "kd_sum": None, "mta": None}
        if teacher_out is not None and self.kd_vocab is not None:
            v = self.kd_vocab
            result["kd_sum"] = O.kd_sum(
                out.logits[..., :v],
                teacher_out.logits[..., :v],
                batch["labels"],
                self.kd,
                self.temperature,
                self.skew_alpha,
            )
        if self.mta is not None:
            timer = _Timer(batch["input_ids"].device)
            with timer:
                mta_out = self.mta(
                    out.hidden_states,
                    teacher_out.hidden_states,
                    batch["units"],
                    batch["attention_mask"],
                    batch["teacher_attention_mask"],
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


# ------------------------------------------------------------------------------------- schedule etc.
def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter (student + projectors); no decay on biases and norms."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif k == "units":
            out[k] = {g: ub.to(device, non_blocking=True) for g, ub in v.items()}
        else:
            out[k] = v
    return out


def _atomic_write_bytes(path: str, writer) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str, state: dict) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: never half-written."""
    _atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise DistillError(f"checkpoint {path!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DistillError(f"{path!r} is not a checkpoint of this tool (format {CHECKPOINT_FORMAT})")
    return state


def check_resume_compatible(state: dict, fingerprint: dict, path: str) -> None:
    """A checkpoint resumes only a run of the same configuration: name the first field that differs."""
    old = state.get("fingerprint", {})
    for key, value in fingerprint.items():
        if old.get(key) != value:
            raise DistillError(
                f"checkpoint {path!r} was written by another configuration: {key} is {old.get(key)!r} there "
                f"and {value!r} now. Resume with the same settings, or write to another --out directory "
                "(the checkpoint was left untouched)."
            )


# -------------------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    """Everything built before the first step (all user input validated, nothing written yet)."""

    env: DistEnv
    student: nn.Module
    teacher: nn.Module | None
    student_tokenizer: Any
    teacher_tokenizer: Any
    shared: bool
    mta: nn.Module | None
    pairs: list[tuple[int, int, str]] | None
    kd_vocab: int | None
    train_set: TextDataset
    eval_set: TextDataset
    collator: Any
    notes: list[str]


def _resolve_mta(
    cfg: TrainConfig, student: nn.Module, teacher: nn.Module, shared: bool
) -> tuple[nn.Module, list]:
    from mta_kernels.losses import MTALoss

    ls, lt = M.num_layers(student), M.num_layers(teacher)
    ds, dt = M.hidden_size(student), M.hidden_size(teacher)
    kwargs = dict(
        pooling=cfg.pooling, weighted=cfg.weighted, hra="token" if shared else "unit", gamma=cfg.gamma
    )
    if cfg.pairs:
        pairs = parse_pairs(cfg.pairs)
        _check_pairs(pairs, ls, lt, "--pairs")
        return MTALoss(pairs, student_dim=ds, teacher_dim=dt, **kwargs), pairs
    if cfg.preset:
        try:
            mta = MTALoss.from_preset(cfg.preset, student_dim=ds, teacher_dim=dt, **kwargs)
        except ValueError as exc:
            raise DistillError(f"--preset {cfg.preset!r}: {exc}") from None
        pairs = _pairs_of(mta)
        _check_pairs(pairs, ls, lt, f"--preset {cfg.preset!r}")
        return mta, pairs
    # The depth-proportional rule of MTALoss.auto, with fewer pairs when shallow models repeat a layer.
    for num_pairs in (3, 2, 1):
        try:
            mta = MTALoss.auto(ls, lt, ds, dt, num_pairs=num_pairs, **kwargs)
        except ValueError:
            continue
        return mta, _pairs_of(mta)
    raise DistillError(
        f"no automatic layer mapping for a {ls}-layer student and {lt}-layer teacher: pass --pairs"
    )


def _pairs_of(mta: nn.Module) -> list[tuple[int, int, str]]:
    return [(int(s), int(t), str(g)) for s, t, g in mta.pairs]


def _check_pairs(pairs: list[tuple[int, int, str]], ls: int, lt: int, where: str) -> None:
    for s, t, g in pairs:
        if not 0 <= s <= ls:
            raise DistillError(
                f"{where}: layer pair {s}:{t}:{g} names student layer {s}, but the student has {ls} layers "
                f"(hidden_states indices 0..{ls}, 0 = embeddings)"
            )
        if not 0 <= t <= lt:
            raise DistillError(
                f"{where}: layer pair {s}:{t}:{g} names teacher layer {t}, but the teacher has {lt} layers "
                f"(hidden_states indices 0..{lt}, 0 = embeddings)"
            )


def build(cfg: TrainConfig, env: DistEnv) -> Setup:
    """Load data, tokenizers and models, resolve the objective; raises :class:`DistillError` on bad input."""
    notes: list[str] = []
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars would interleave with ours
    except ImportError:  # pragma: no cover
        pass
    examples = load_examples(cfg.data)
    train_ex, eval_ex = split_examples(examples, cfg.eval_data, cfg.eval_fraction, cfg.seed)
    global_batch = cfg.batch_size * env.world
    if len(train_ex) < global_batch:
        raise DistillError(
            f"{cfg.data!r} gives {len(train_ex)} training examples, fewer than one global batch "
            f"({cfg.batch_size} x {env.world} processes)"
        )
    student_tok = M.load_tokenizer(cfg.student_tokenizer, cfg.student)
    teacher = teacher_tok = None
    shared = True
    if cfg.mode == "distill":
        teacher_tok = M.load_tokenizer(cfg.teacher_tokenizer, cfg.teacher)
        shared = M.same_tokenizer(student_tok, teacher_tok)
        teacher = M.freeze(M.build_model(cfg.teacher, teacher_tok, cfg.max_length))
    torch.manual_seed(cfg.seed)
    student = M.build_model(cfg.student, student_tok, cfg.max_length)

    kd_vocab = None
    if cfg.mode == "distill" and cfg.kd != "none":
        if shared:
            kd_vocab = len(student_tok)
            vs, vt = (
                student.get_output_embeddings().weight.shape[0],
                teacher.get_output_embeddings().weight.shape[0],
            )
            if min(vs, vt) < kd_vocab:
                raise DistillError(
                    f"tokenizer has {kd_vocab} tokens but the models' output layers have {vs} / {vt}"
                )
        else:
            notes.append(
                "teacher and student tokenizers differ: the logit KD term is off (units are aligned per text)"
            )
    mta = pairs = None
    if cfg.mode == "distill" and cfg.mta:
        mta, pairs = _resolve_mta(cfg, student, teacher, shared)
    if mta is not None:
        granularities = tuple(sorted({g for _, _, g in pairs}, key=GRANULARITIES.index))
        extractor = UnitExtractor(cfg.spacy_pipeline, words=cfg.words)
        try:  # load spaCy now: a missing or parser-less pipeline is a clear error before anything runs
            extractor.load()
        except (ImportError, ValueError) as exc:
            raise DistillError(f"MTA needs spaCy units: {exc} (or pass --no-mta)") from None
        collator = UnitCollator(
            student_tok,
            None if shared else teacher_tok,
            extractor=extractor,
            max_length=cfg.max_length,
            granularities=granularities,
        )
    else:
        collator = UnitCollator(
            student_tok, None if shared else teacher_tok, max_length=cfg.max_length, granularities=()
        )
    return Setup(
        env,
        student,
        teacher,
        student_tok,
        teacher_tok,
        shared,
        mta,
        pairs,
        kd_vocab,
        TextDataset(train_ex),
        TextDataset(eval_ex),
        collator,
        notes,
    )


def fingerprint(cfg: TrainConfig, s: Setup) -> dict:
    fp = {k: getattr(cfg, k) for k in RESUME_KEYS}
    fp["pairs"] = None if s.pairs is None else [list(p) for p in s.pairs]
    fp["world_size"] = s.env.world
    return fp


# ----------------------------------------------------------------------------------------- the loop
def _loader(dataset: TextDataset, batches: Any, collator: Any, cfg: TrainConfig):
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collator,
        num_workers=cfg.num_workers,
        persistent_workers=False,
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


def micro_batches(s: Setup, cfg: TrainConfig, start: int) -> Iterator[dict]:
    """Endless micro-batches of this rank from micro-batch index ``start`` on (epochs chained)."""
    sampler = ResumableBatches(len(s.train_set), cfg.batch_size, cfg.seed, s.env.rank, s.env.world, start)
    return iter(_loader(s.train_set, sampler, s.collator, cfg))


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


def train(cfg: TrainConfig) -> dict:
    """Run a whole training (or resume one). Returns the final summary (also in ``<out>/summary.json``)."""
    cfg.validate()
    env = setup_dist(cfg)
    try:
        if cfg.backend != "auto":
            from mta_kernels import use_backend

            ctx = use_backend(cfg.backend)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            return _train(cfg, env)
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: DistEnv) -> dict:
    seed_everything(cfg.seed)
    s = build(cfg, env)
    fp = fingerprint(cfg, s)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)
    state = None
    if os.path.exists(ckpt_path):
        if cfg.resume:
            state = load_checkpoint(ckpt_path)
            check_resume_compatible(state, fp, ckpt_path)
        elif not cfg.overwrite:
            raise DistillError(
                f"{cfg.out!r} already holds a checkpoint: pass --resume to continue it, --overwrite to start "
                "again there, or another --out"
            )
    device = env.device
    s.student.to(device).train()
    if cfg.grad_checkpointing:
        # transformers >= 5 renamed it (the old name warns); non-reentrant checkpointing works under DDP.
        no_reentrant = {"use_reentrant": False}
        if hasattr(s.student, "activation_checkpointing_enable"):
            s.student.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
        else:
            s.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
    if s.teacher is not None:
        s.teacher.to(device)
    module = Trainable(s.student, s.mta, cfg.kd, cfg.temperature, cfg.skew_alpha, s.kd_vocab).to(device)
    optimizer = make_optimizer(module, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda st: lr_lambda(st, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    )
    step = 0
    if state is not None:
        try:
            s.student.load_state_dict(state["student"])
            if s.mta is not None:
                s.mta.load_state_dict(state["mta"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise DistillError(
                f"checkpoint {ckpt_path!r} does not fit this model: {str(exc).splitlines()[0]}"
            ) from None
        step = int(state["step"])
        _set_rng(state.get("rng"))
    ddp = module
    if env.world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    )

    if env.main:
        os.makedirs(cfg.out, exist_ok=True)
        _trim_metrics(os.path.join(cfg.out, METRICS_NAME), step)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({**cfg.to_dict(), "pairs_resolved": fp["pairs"], "world_size": env.world}, f, indent=1)
        for note in s.notes:
            print(f"note: {note}")
    metrics_path = os.path.join(cfg.out, METRICS_NAME)

    from tqdm.auto import tqdm

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
    while step < stop:
        t0 = time.perf_counter()
        micro = [to_device(next(stream), device) for _ in range(cfg.grad_accum)]
        n_tok_local = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro)
        n_input_local = sum(int(mb["attention_mask"].sum()) for mb in micro)
        n_tok, n_input = env.all_reduce([n_tok_local, n_input_local])
        n_tok = max(n_tok, 1.0)
        sums = {"ce": 0.0, "kd": 0.0, "mta": 0.0}
        dsa = hra = None
        module.mta_seconds.clear()
        for i, mb in enumerate(micro):
            sync = contextlib.nullcontext() if (i == len(micro) - 1 or env.world == 1) else ddp.no_sync()
            with sync, autocast():
                teacher_out = None
                if s.teacher is not None and (s.kd_vocab is not None or s.mta is not None):
                    with torch.no_grad():
                        teacher_out = s.teacher(
                            input_ids=mb["teacher_input_ids"],
                            attention_mask=mb["teacher_attention_mask"],
                            output_hidden_states=s.mta is not None,
                            use_cache=False,
                        )
                module.teacher_out = teacher_out
                r = ddp(mb)
                scale = env.world / n_tok
                ce = r["ce_sum"] * scale
                kd = None if r["kd_sum"] is None else r["kd_sum"] * scale
                mta = None if r["mta"] is None else r["mta"] / len(micro)
                if cfg.mode == "teacher":
                    loss = ce
                else:
                    loss = O.combine(ce, kd, mta, cfg.lam, cfg.beta)
            loss.backward()
            sums["ce"] += float(r["ce_sum"].detach())
            sums["kd"] += 0.0 if kd is None else float(r["kd_sum"].detach())
            sums["mta"] += 0.0 if mta is None else float(mta.detach())
            if r["mta"] is not None:
                dsa = r["dsa"].float() / len(micro) + (0 if dsa is None else dsa)
                if r["hra"] is not None:
                    hra = r["hra"].float() / len(micro) + (0 if hra is None else hra)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip)) if cfg.clip > 0 else 0.0
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_time = time.perf_counter() - t0
        mta_time = sum(t.seconds() for t in module.mta_seconds)
        ce_sum, kd_sum, mta_sum = env.all_reduce([sums["ce"], sums["kd"], sums["mta"]])
        rec = {
            "kind": "train",
            "step": step,
            "lr": lr,
            "ce": ce_sum / n_tok,
            "kd": kd_sum / n_tok if s.kd_vocab is not None else None,
            "mta": mta_sum / env.world if s.mta is not None else None,
            "grad_norm": grad_norm,
            "tokens": int(n_input),
            "target_tokens": int(n_tok),
            "step_time_s": step_time,
            "tokens_per_s": n_input / step_time,
            "mta_time_s": mta_time if s.mta is not None else None,
            "mta_share": mta_time / step_time if s.mta is not None else None,
        }
        if cfg.mode == "teacher":
            rec["loss"] = rec["ce"]
        else:
            rec["loss"] = (1 - cfg.lam) * rec["ce"] + cfg.lam * (
                (rec["kd"] or 0.0) + cfg.beta * (rec["mta"] or 0.0)
            )
        if dsa is not None:
            if env.world > 1:
                dsa = torch.tensor(env.all_reduce(dsa.tolist())) / env.world
                hra = None if hra is None else torch.tensor(env.all_reduce(hra.tolist())) / env.world
            rec["dsa"] = dsa.tolist()
            rec["hra"] = None if hra is None else hra.tolist()
        if not math.isfinite(rec["loss"]):
            raise DistillError(
                f"the loss became {rec['loss']} at step {step} (CE {rec['ce']}, KD {rec['kd']}, "
                f"MTA {rec['mta']}): lower --lr or check the data; the last checkpoint written is intact"
            )
        do_eval = step % cfg.eval_every == 0 or step == cfg.steps
        if do_eval:
            last_eval = evaluate(s, cfg, autocast)
        if env.main:
            with open(metrics_path, "a") as f:
                if step % cfg.log_every == 0 or step == cfg.steps:
                    f.write(json.dumps(rec) + "\n")
                if do_eval and last_eval is not None:
                    f.write(json.dumps({"kind": "eval", "step": step, **last_eval}) + "\n")
            post = {"loss": f"{rec['loss']:.3f}"}
            if last_eval is not None:
                post["eval_ppl"] = f"{last_eval['eval_ppl']:.1f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if step % cfg.save_every == 0 or step == stop:
            if env.main:
                save_checkpoint(ckpt_path, _state(s, fp, cfg, step, optimizer, scheduler, env))
            if env.world > 1:
                dist.barrier()
    bar.close()
    summary = {"out": cfg.out, "step": step, "final_eval": last_eval}
    if env.main:
        summary.update(_summarise(metrics_path))
        if cfg.save_model:
            model_dir = os.path.join(cfg.out, "model")
            s.student.save_pretrained(model_dir)
            s.student_tokenizer.save_pretrained(model_dir)
        with open(os.path.join(cfg.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if cfg.plot:
            from mta_kernels.distill.plot import plot_runs

            summary["plot"] = plot_runs(
                {os.path.basename(os.path.normpath(cfg.out)): metrics_path},
                os.path.join(cfg.out, "curves.png"),
            )
    return summary


def _desc(cfg: TrainConfig, s: Setup) -> str:
    if cfg.mode == "teacher":
        return "teacher"
    return "distill+MTA" if s.mta is not None else "distill"


def _state(s: Setup, fp: dict, cfg: TrainConfig, step: int, optimizer, scheduler, env: DistEnv) -> dict:
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if env.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(env.device)
    return {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": cfg.to_dict(),
        "fingerprint": fp,
        "student": s.student.state_dict(),
        "mta": None if s.mta is None else s.mta.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
    }


def _set_rng(rng: dict | None) -> None:
    if not rng:
        return
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _trim_metrics(path: str, step: int) -> None:
    """On resume, drop the records written after the checkpoint's step (they will be written again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(keep) != len(lines):
        _atomic_write_bytes(path, lambda f: f.write("".join(keep).encode()))


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _summarise(metrics_path: str) -> dict:
    recs = read_metrics(metrics_path)
    train_recs = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    timed = train_recs[1:] or train_recs  # the first step pays for warm-up
    out = {
        "step_time_s": float(np.median([r["step_time_s"] for r in timed])) if timed else None,
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in timed])) if timed else None,
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
    }
    shares = [r["mta_share"] for r in timed if r.get("mta_share") is not None]
    out["mta_share"] = float(np.median(shares)) if shares else None
    if evals:
        out["eval_loss"], out["eval_ppl"] = evals[-1]["eval_loss"], evals[-1]["eval_ppl"]
    return out
