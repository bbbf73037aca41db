"""Set-up of a run: processes and devices, seeds, data, tokenizers, models, the MTA loss, the optimizer.

Everything here runs before the first step and writes nothing: bad user input is a
:class:`~mta_kernels.distill.config.DistillError` raised from :func:`build`.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mta_kernels.constants import GRANULARITIES
from mta_kernels.distill import checks
from mta_kernels.distill import models as M
from mta_kernels.distill.collate import UnitCollator
from mta_kernels.distill.config import RESUME_KEYS, DistillError, TrainConfig, idle_options, parse_pairs
from mta_kernels.distill.data import TextDataset, load_examples, split_examples


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


def check_accelerate_env(cfg: TrainConfig) -> None:
    """Under ``accelerate launch``: DDP only (the launcher sets torchrun's ``RANK``/``WORLD_SIZE``);
    FSDP and DeepSpeed configurations are refused, ``--mixed_precision bf16`` turns on ``--bf16``."""
    env = os.environ
    for var, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if env.get(var, "false").lower() in ("1", "true"):
            raise DistillError(
                f"accelerate launched this run with {what}: the reference loop shards by DDP only (every "
                f"rank holds the whole student and teacher). Launch without {what} (plain --multi_gpu), "
                "or use mta_kernels.integrations.MTATrainer, whose Trainer applies accelerate's "
                "FSDP/DeepSpeed configuration (docs/scaling.md)"
            )
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16":
        raise DistillError(
            "accelerate --mixed_precision fp16 is not supported by the reference loop: use bf16 or no"
        )
    if precision == "bf16" and cfg.bf16 is None:
        cfg.bf16 = True


def setup_dist(cfg: TrainConfig) -> DistEnv:
    """Join the process group when launched by torchrun or ``accelerate launch`` (DDP); pick the device."""
    check_accelerate_env(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = checks.requested_device(cfg.device)
    if want == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device(want)
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise DistillError(
                f"--device {want}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------- optimisation
def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# DistiLLM's no-decay names (utils.get_optimizer_params): biases and GPT-2's layer norms; every other
# student weight decays, and so does every projector parameter (their group takes AdamW's default decay).
NO_DECAY = ("bias", "ln_f.weight", "ln_1.weight", "ln_2.weight", "ln_cross_attn")


def decays(name: str) -> bool:
    """Whether the :class:`~mta_kernels.distill.step.Trainable` parameter ``name`` gets weight decay."""
    return name.startswith("mta.") or not any(nd in name for nd in NO_DECAY)


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter (student + projectors), weight decay as :func:`decays`.

    With ``projector_lr`` the MTA projectors (parameters under ``module.mta``) get their own learning
    rate (two more groups); :func:`make_scheduler` decays every group to the same absolute floor.
    """
    groups: list[dict] = []
    split = cfg.projector_lr is not None
    for is_projector, lr in ((False, cfg.lr), (True, cfg.projector_lr)) if split else ((None, cfg.lr),):
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad or (is_projector is not None and name.startswith("mta.") != is_projector):
                continue
            (decay if decays(name) else no_decay).append(p)
        groups += [
            {"params": decay, "weight_decay": cfg.weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))


def resolve_schedule(cfg: TrainConfig, n_train: int, world: int) -> list[str]:
    """Turn ``epochs`` into ``steps`` and ``-1`` (once an epoch) into ``eval_every``/``save_every``.

    An epoch is ``n_train // (batch_size × world × grad_accum)`` optimizer steps (at least 1), the
    count DistiLLM's loop uses. Returns notes to print.
    """
    per_epoch = max(1, n_train // (cfg.batch_size * world * cfg.grad_accum))
    notes = []
    if cfg.epochs is not None:
        cfg.steps = per_epoch * cfg.epochs
        notes.append(f"{cfg.epochs} epochs of {per_epoch} steps: {cfg.steps} optimizer steps")
    for name in ("eval_every", "save_every"):
        if getattr(cfg, name) == -1:
            setattr(cfg, name, per_epoch)
    return notes


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up and cosine decay of every group to the absolute floor ``lr × min_lr_ratio``.

    The published runs decay every group (projectors at their own rate included) to one ``--lr-min``
    (``CosineAnnealingLR(eta_min=1e-7)``): a group of base rate ``L`` floors at ``lr × min_lr_ratio / L``
    of it.
    """
    floor = cfg.lr * cfg.min_lr_ratio

    def schedule(base: float):
        ratio = floor / base if base > 0 else 0.0
        return lambda st: lr_lambda(st, cfg.warmup_steps, cfg.steps, ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(g["lr"]) for g in optimizer.param_groups])


# -------------------------------------------------------------------------------------------- build
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
    collator: UnitCollator
    notes: list[str]
    warnings: list[str]
    granularities: tuple[str, ...]
    data_checks: dict


def _resolve_mta(
    cfg: TrainConfig, student: nn.Module, teacher: nn.Module, shared: bool
) -> tuple[nn.Module, list]:
    """The MTA loss module and its layer pairs (``--mta-variant`` picks the module)."""
    mta, pairs = _resolve_mta_loss(cfg, student, teacher, shared)
    if cfg.mta_variant == "published-xtok":
        from mta_kernels.variants import CrossTokenizerMTALoss

        ds, dt = M.hidden_size(student), M.hidden_size(teacher)
        mta = CrossTokenizerMTALoss(pairs, ds, dt, weighted=cfg.weighted)
    return mta, pairs


def _resolve_mta_loss(
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
    warnings: list[str] = []
    M.quiet_loading()
    examples = load_examples(cfg.data, cfg.data_format, notes)
    train_ex, eval_ex = split_examples(
        examples, cfg.eval_data, cfg.eval_fraction, cfg.seed, cfg.data_format, notes
    )
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
    checks.check_model(student, student_tok, cfg, "student")
    if cfg.lora:
        from mta_kernels.distill.lora import apply_lora

        student = apply_lora(student, cfg)
    if teacher is not None:
        checks.check_model(teacher, teacher_tok, cfg, "teacher")

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
    extractor, granularities = None, ()
    if mta is not None:
        from mta_kernels.units import UnitExtractor

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
    train_set = TextDataset(train_ex)
    lm = UnitCollator(student_tok, None, max_length=cfg.max_length, granularities=())
    data_checks = {
        "truncation": checks.scan_targets(train_set, lm, cfg.max_length, cfg.progress and env.main)
    }
    note = checks.truncation_note(data_checks["truncation"], cfg.max_length)
    if note:
        notes.append(note)
    if extractor is not None:
        sample = [train_set[i] for i in range(min(len(train_set), 64))]
        warning = checks.language_warning(
            [e["text"] for e in train_set.items[:2000]], extractor.load().lang, cfg.spacy_pipeline
        )
        if warning:
            warnings.append(warning)
        # The first examples' units (cached by the extractor, so training reuses them).
        cov = checks.coverage(collator(sample)["stats"], granularities)
        data_checks["unit_coverage_first_examples"] = cov
        warning = checks.coverage_warning(cov, f"the first {len(sample)} training examples")
        if warning:
            warnings.append(warning)
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
        train_set,
        TextDataset(eval_ex),
        collator,
        notes,
        warnings,
        granularities,
        data_checks,
    )


def fingerprint(cfg: TrainConfig, s: Setup) -> dict:
    """What a checkpoint must share with the run that resumes it (see :data:`RESUME_KEYS`)."""
    idle = idle_options(cfg)  # e.g. the LoRA rank of a run without LoRA: not part of what it trains
    fp = {k: getattr(cfg, k) for k in RESUME_KEYS if k not in idle}
    fp["pairs"] = None if s.pairs is None else [list(p) for p in s.pairs]
    fp["world_size"] = s.env.world
    fp["data_digest"] = data_digest(s.train_set, s.eval_set)
    if cfg.student_gen:  # the adaptive schedule moves at each evaluation
        fp["eval_every"] = cfg.eval_every
    return fp


def data_digest(*datasets: TextDataset) -> str:
    """SHA-256 of the examples (texts and prompt lengths, in order): a resumed run must train on the
    same data, not only on a file of the same name."""
    h = hashlib.sha256()
    for dataset in datasets:
        h.update(f"{len(dataset)}\n".encode())
        for item in dataset.items:
            text = item["text"].encode("utf-8")
            h.update(f"{item.get('prompt_length_chars')}:{len(text)}:".encode())
            h.update(text)
    return h.hexdigest()
