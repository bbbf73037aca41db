"""Command line: ``python -m mta_kernels.distill {train-teacher,distill,evaluate,recipes,demo} ...``
(``mta-distill``).

Exit status: 0 done; 2 an ``error: ...`` paragraph (bad input, found before any work: nothing written;
or a failure during a run, such as a full disk: the paragraph says what is on disk); 75 pre-empted
(SIGTERM or Ctrl-C during training: the current step finished and its checkpoint was written;
``--resume`` continues); 130 / 143 stopped at once by SIGINT / SIGTERM (outside the training steps, or a
second signal: the message says what is on disk). Every option is checked against
:data:`~mta_kernels.distill.config.FIELD_RULES` before models, spaCy or data load.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import textwrap
from typing import Any, NoReturn

from mta_kernels.constants import BACKENDS, POOLINGS, WORD_MODES
from mta_kernels.distill import faults
from mta_kernels.distill.config import (
    ACCUM_MEANS,
    DATA_FORMATS,
    DEPENDENT_OPTIONS,
    FIELD_RULES,
    KD_KINDS,
    MAX_SEED,
    MTA_VARIANTS,
    REPORT_TO,
    DistillError,
    TrainConfig,
    check_field,
    flag,
    idle_options,
)
from mta_kernels.distill.faults import PREEMPTED_EXIT_CODE, Preempted
from mta_kernels.distill.recipe import (
    is_recipe_path,
    load_config_file,
    load_recipe,
    merge_layers,
    recipe_names,
)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as :class:`DistillError` (one ``error:`` paragraph, exit 2) that
    also say what the option accepts, and without abbreviated options (``--over`` is not
    ``--overwrite``: a typo is an error, not another option)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        found = re.match(r"argument (\S+?)(?:/\S+)?: ", message)
        if found:
            action = next((a for a in self._actions if found.group(1) in a.option_strings), None)
            rule = FIELD_RULES.get(getattr(action, "dest", ""))
            if rule is not None and "must be" not in message:  # the type's own message may say it
                message += f" ({found.group(1)} must be {rule.describe()})"
        if found and message.endswith("expected one argument"):
            message += f" (a value that starts with '-' is written {found.group(1)}=VALUE)"
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [o for parser in self._all_parsers() for a in parser._actions for o in a.option_strings]
            for word in unknown.group(1).split():
                close = (
                    difflib.get_close_matches(word.split("=")[0], options, n=1)
                    if word.startswith("-")
                    else []
                )
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        raise DistillError(f"{self.prog}: {message} (see {self.prog} --help)")

    def _all_parsers(self) -> list[argparse.ArgumentParser]:
        """This parser and its sub-commands' (argparse reports unknown options at the top level)."""
        found: list[argparse.ArgumentParser] = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += list(action.choices.values())
        return found


def _device(text: str) -> str:
    """argparse type of ``--device`` (the rule of TrainConfig.device)."""
    check_field("device", text)
    return text


def _common(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Options of both training commands; ``required=False`` where a ``--config`` file may give them."""
    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", required=required, help="JSONL with 'prompt'/'output' (Dolly) or text, one example a line"
    )
    g.add_argument(
        "--format",
        dest="data_format",
        choices=DATA_FORMATS,
        default=d.data_format,
        help="data format (default: read from the content: JSONL when the first line is a JSON object)",
    )
    g.add_argument("--eval-data", default=None, help="held-out file (default: --eval-fraction of --data)")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per sequence (truncation)")
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--out",
        required=required,
        help="run directory (new, empty, or an earlier run's): checkpoint.pt, metrics.jsonl, model/",
    )
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch and process"
    )
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument(
        "--grad-accum-mean",
        dest="accum_mean",
        choices=ACCUM_MEANS,
        default=d.accum_mean,
        help="tokens: CE/KD over the target tokens of the whole global batch (one process holding it); "
        "micro-batches: the mean of per-micro-batch token means, as DeepSpeed and the published runs",
    )
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    g.add_argument(
        "--epochs",
        type=int,
        default=d.epochs,
        help="train this many epochs (steps = epochs x examples // global batch; replaces --steps)",
    )
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--adam-beta1", type=float, default=d.adam_beta1, help="AdamW β1")
    g.add_argument("--adam-beta2", type=float, default=d.adam_beta2, help="AdamW β2")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument(
        "--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine floor, fraction of --lr"
    )
    g.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clipping (0: off)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--bf16", dest="bf16", action="store_true", default=None, help="bf16 autocast (default on GPU)"
    )
    g.add_argument("--no-bf16", dest="bf16", action="store_false")
    g.add_argument("--grad-checkpointing", action="store_true")
    g.add_argument(
        "--device", type=_device, default=None, help="cpu, cuda, cuda:N (default: cuda when available)"
    )
    g = p.add_argument_group("LoRA (peft; the MTA projectors train in full, the saved model is merged)")
    g.add_argument("--lora", action="store_true", default=d.lora, help="train LoRA adapters of the student")
    g.add_argument("--no-lora", dest="lora", action="store_false", help="train all the student's weights")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="adapter rank")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="adapter scale numerator (α/r)")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    g.add_argument(
        "--lora-targets",
        default=d.lora_targets,
        metavar="NAME,...",
        help="module names to adapt (default: peft's choice for the architecture, e.g. q_proj,v_proj)",
    )
    g = p.add_argument_group("book-keeping")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps (-1: once an epoch)")
    g.add_argument(
        "--eval-gen",
        action="store_true",
        default=d.eval_gen,
        help="also score held-out ROUGE-L of sampled answers at each evaluation (one seed) and keep the "
        "best model in <out>/best (the published selection)",
    )
    g.add_argument(
        "--eval-gen-limit",
        type=int,
        default=d.eval_gen_limit,
        help="held-out examples --eval-gen answers (the first N)",
    )
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps (-1: once an epoch)")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument(
        "--num-workers", type=int, default=d.num_workers, help="DataLoader workers (units extracted there)"
    )
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    g.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this step with a checkpoint (time-sliced jobs); --resume continues",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an --out that holds a checkpoint, or write into a non-empty directory that "
        "mta-distill did not create (never into a model or tokenizer directory)",
    )
    g.add_argument(
        "--report-to",
        choices=REPORT_TO,
        default=d.report_to,
        help="also send every logged term to TensorBoard (<out>/tensorboard) or Weights & Biases "
        "(metrics.jsonl and the PNG are always written)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--no-plot", dest="plot", action="store_false")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mta-distill",
        description="Train a teacher LM, distil it into a student with KD + MTA, or run the CPU demo.",
        epilog="exit status: 0 done; 2 an error paragraph (bad input: nothing written; or a failure during a "
        "run, e.g. a full disk: it says what is on disk); 75 pre-empted by SIGTERM or Ctrl-C during training "
        "(the step finished and was checkpointed: rerun with --resume); 130 / 143 stopped at once by "
        "SIGINT / SIGTERM (the message says what is on disk)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = TrainConfig()

    p = sub.add_parser("train-teacher", help="plain LM training (cross-entropy on response tokens)")
    p.add_argument("--model", required=True, help="local HF directory or builtin:gpt2|llama:LAYERS:DIM")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or tokenizer.json")
    _common(p)

    p = sub.add_parser("distill", help="distil a frozen teacher into a student: (1-λ)CE + λ(KD + β·MTA)")
    p.add_argument(
        "--recipe",
        default=None,
        help="start from a published setting (see `mta-distill recipes`; or a recipe .json path); "
        "--config and the flags given here override its values",
    )
    p.add_argument(
        "--config",
        default=None,
        help="run configuration file (.yaml/.yml/.json, the recipe schema; it may also name --data, "
        "--teacher, --student, --out): its values override --recipe's, flags given here override both",
    )
    p.add_argument("--teacher", default=None, help="local HF directory (e.g. <train-teacher --out>/model)")
    p.add_argument("--teacher-tokenizer", default=None)
    p.add_argument("--student", default=None, help="local HF directory or builtin:gpt2|llama:LAYERS:DIM")
    p.add_argument("--student-tokenizer", default=None)
    g = p.add_argument_group("objective (docs/method.md#the-objective)")
    g.add_argument("--lam", type=float, default=d.lam, help="λ: weight of the distillation terms")
    g.add_argument("--beta", type=float, default=d.beta, help="β: weight of MTA inside the distillation term")
    g.add_argument("--gamma", type=float, default=d.gamma, help="γ: weight of HRA inside MTA")
    g.add_argument(
        "--kd",
        choices=KD_KINDS,
        default=d.kd,
        help="logit KD (only when the tokenizers match)",
    )
    g.add_argument(
        "--kd-chunk",
        default=d.kd_chunk,
        metavar="auto|off|N",
        help="compute the logit KD over N-row chunks from the last hidden states, never holding the "
        "[B, T, V] logits of both models (auto: on GPU, chunks of at most 2**24 logits; off: the eager path)",
    )
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--skew-alpha", type=float, default=d.skew_alpha, help="α of the skew KLs (skew, srkl)")
    g.add_argument(
        "--no-mta", dest="mta", action="store_false", help="baseline: no MTA term, all else the same"
    )
    g.add_argument("--preset", default=None, help="published layer mapping, e.g. 'gpt2-xl->gpt2'")
    g.add_argument(
        "--pairs", default=None, help="explicit mapping 'S:T:word|phrase,...', e.g. '6:24:word,9:36:phrase'"
    )
    g.add_argument(
        "--mta-variant",
        choices=MTA_VARIANTS,
        default=d.mta_variant,
        help="mta: this package's loss (DSA + HRA); published-xtok: the published cross-tokenizer term "
        "(DSA on projected student units, raw saliency-sum weights, no HRA)",
    )
    g.add_argument(
        "--entropy-weight",
        action="store_true",
        default=d.entropy_weight,
        help="weight the MTA term by the teacher's confidence 1 - H(p_T)/log V instead of its saliency "
        "(mta: unit and token-HRA weights; published-xtok: unit weights = mean confidence)",
    )
    g.add_argument("--pooling", choices=POOLINGS, default=d.pooling)
    g.add_argument("--unweighted", dest="weighted", action="store_false", help="unit importances all 1")
    g.add_argument("--words", choices=WORD_MODES, default=d.words)
    g.add_argument(
        "--spacy-model",
        "--spacy-pipeline",
        dest="spacy_pipeline",
        default=d.spacy_pipeline,
        help="spaCy pipeline of the units (name or path; its language must be the data's; default: English)",
    )
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default=d.backend,
        help="mta_kernels ops: auto (Triton on GPU, torch on CPU), or force one",
    )
    g.add_argument(
        "--projector-lr", type=float, default=d.projector_lr, help="learning rate of the MTA projectors"
    )
    g = p.add_argument_group("student generation (DistiLLM's adaptive off-policy schedule)")
    g.add_argument(
        "--student-gen", action="store_true", default=d.student_gen, help="train on student samples too"
    )
    g.add_argument("--no-student-gen", dest="student_gen", action="store_false")
    g.add_argument("--init-threshold", type=float, default=d.init_threshold, help="initial θ")
    g.add_argument(
        "--loss-eps", type=float, default=d.loss_eps, help="held-out loss rise that raises θ by 0.1"
    )
    g.add_argument("--capacity", type=int, default=d.capacity, help="replay buffer size (examples)")
    g.add_argument("--gen-top-p", type=float, default=d.gen_top_p)
    g.add_argument("--gen-top-k", type=int, default=d.gen_top_k, help="0: off")
    g.add_argument("--gen-temperature", type=float, default=d.gen_temperature)
    g.add_argument(
        "--max-prompt-length",
        type=int,
        default=d.max_prompt_length,
        help="prompt tokens kept for sampling (--student-gen, --eval-gen); max new tokens = --max-length "
        "minus this (default: half of --max-length)",
    )
    _common(p, required=False)

    _evaluate_parser(sub)

    p = sub.add_parser("recipes", help="list the published settings usable with distill --recipe")
    p.add_argument("--show", default=None, metavar="NAME", help="print one recipe's file")

    p = sub.add_parser(
        "demo", help="teacher + two students (with / without MTA) on the bundled corpus, on CPU"
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a few steps only (a smoke test, ~1 minute)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def _seed_list(text: str) -> list[int]:
    """``"10,20,30"`` -> ``[10, 20, 30]`` (argparse type of ``--seeds``)."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one seed, each once")
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: every seed must lie in [0, {MAX_SEED}]")
    return seeds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _evaluate_parser(sub: Any) -> None:
    from mta_kernels.distill.evaluation import DEFAULT_SEEDS, Protocol
    from mta_kernels.distill.rouge import REFERENCE_RULES

    d = Protocol()
    p = sub.add_parser(
        "evaluate",
        help="generate answers and score ROUGE-L over sampling seeds (the published evaluation)",
        description="Generate an answer to each record's prompt and score it with ROUGE-L (rouge-score, "
        "stemmed, F-measure x 100), once per seed; the defaults are the published protocol "
        "(docs/method.md#evaluation).",
    )
    p.add_argument("--model", required=True, help="saved model directory (e.g. <run>/model or <run>/best)")
    p.add_argument("--data", required=True, nargs="+", help="JSONL file(s): prompt/output or Dolly records")
    p.add_argument("--out", required=True, help="results directory (one sub-folder per file when several)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument(
        "--seeds",
        type=_seed_list,
        default=list(DEFAULT_SEEDS),
        help="sampling seeds, comma-separated (default: 10,20,30,40,50)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=16, help="prompts per generate call")
    p.add_argument("--max-length", type=_positive_int, default=d.max_length, help="prompt + answer tokens")
    p.add_argument(
        "--max-prompt-length", type=_positive_int, default=d.max_prompt_length, help="prompt tokens kept"
    )
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help="answer tokens (default: --max-length minus --max-prompt-length)",
    )
    p.add_argument("--greedy", action="store_true", help="greedy decoding (one pass, the first seed)")
    p.add_argument("--limit", type=_positive_int, default=None, help="the first N records of each file")
    p.add_argument(
        "--references",
        choices=REFERENCE_RULES,
        default=d.references,
        help="several references: score the best (DistiLLM) or the first (the MTA evaluator)",
    )
    p.add_argument("--stop", default=d.stop, help="answers end before this text ('' : at EOS only)")
    p.add_argument(
        "--device", type=_device, default=None, help="cpu, cuda, cuda:N (default: cuda when available)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier evaluation")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _evaluate(args: argparse.Namespace) -> int:
    from mta_kernels.distill.evaluation import Protocol, run_evaluate

    protocol = Protocol(
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens,
        greedy=args.greedy,
        stop=args.stop,
        references=args.references,
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # generate's notes on unused sampling flags would hide the table
    except ImportError:  # pragma: no cover
        pass
    run_evaluate(
        args.model, args.data, args.out, tokenizer=args.tokenizer, seeds=args.seeds,
        batch_size=args.batch_size, protocol=protocol, limit=args.limit, device=args.device,
        overwrite=args.overwrite, progress=args.progress,
    )  # fmt: skip
    return 0


def _explicit_args(argv: list[str]) -> dict:
    """The options given on the command line (not the defaults): parsed again with no defaults."""
    parser = build_parser()
    for action in parser._subparsers._group_actions:  # the sub-command parsers
        for sub in action.choices.values():
            for a in sub._actions:
                a.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def _config(
    args: argparse.Namespace, argv: list[str] | None = None, warnings: list[str] | None = None
) -> TrainConfig:
    """The run's configuration from the flags, ``--recipe`` and ``--config``. ``warnings`` receives what
    the recipe or file does not reproduce (printed once the run starts, after every check passed)."""
    fields = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in fields}
    explicit = _explicit_args(sys.argv[1:] if argv is None else argv)  # the flags given, not defaults
    if args.command == "distill" and (args.recipe or args.config):
        # Layers, later wins: recipe < config file < the flags given on the command line.
        layers, notes = [], []
        if args.recipe:
            recipe = load_recipe(args.recipe)
            layers.append(recipe["config"])
            notes += [f"recipe {recipe['name']}: {item}" for item in recipe.get("not_reproduced", [])]
        if args.config:
            doc = load_config_file(args.config)
            layers.append(doc["config"])
            notes += [f"{args.config}: {item}" for item in doc.get("not_reproduced", [])]
        values = merge_layers([*layers, {k: v for k, v in explicit.items() if k in fields}])
        values["recipe"] = recipe.get("name") if args.recipe else None
        if warnings is not None:
            warnings.extend(notes)
    if args.command == "distill":
        for key in ("data", "teacher", "student", "out"):
            if not values.get(key):
                raise DistillError(f"no --{key} given (on the command line or as {key!r} in --config)")
    if args.command == "train-teacher":
        values.update(
            mode="teacher", student=args.model, student_tokenizer=args.tokenizer, mta=False, kd="none"
        )
    else:
        values["mode"] = "distill"
    cfg = TrainConfig(**values)
    cfg.validate()  # each value against its meaning first, then what the values mean together
    for key in sorted(idle_options(cfg) & set(explicit), key=list(DEPENDENT_OPTIONS).index):
        given, switch = flag(key), flag(DEPENDENT_OPTIONS[key])
        raise DistillError(f"{given} has no effect without {switch}: add {switch}, or drop {given}")
    return cfg


def _recipes(show: str | None) -> int:
    """``mta-distill recipes``: one line per recipe, or one recipe's file (``--show``)."""
    if show:
        print(json.dumps(load_recipe(show), indent=1, ensure_ascii=False))
        return 0
    for name in recipe_names():
        r = load_recipe(name)
        print(f"{name}\n    {r['description']}\n    source: {r['source']}")
    return 0


def _inputs(args: argparse.Namespace) -> dict[str, str]:
    """Files the command line names besides the TrainConfig fields (a --config or --recipe file)."""
    found = {}
    if getattr(args, "config", None):
        found["--config"] = args.config
    recipe = getattr(args, "recipe", None)
    if recipe and is_recipe_path(recipe):
        found["--recipe"] = recipe
    return found


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from mta_kernels.distill.checkpoint import write_failure
        from mta_kernels.distill.demo import run_demo

        try:
            run_demo(out=args.out, quick=args.quick, progress=args.progress)
        except faults.Stopped:
            faults.on_disk.note(f"the demo in {args.out!r} is incomplete: run it again (it starts over)")
            raise
        except OSError as exc:
            raise DistillError(
                f"the demo stopped on an operating-system error ({write_failure(exc)}); its folder "
                f"{args.out!r} is incomplete: run it again once the cause is fixed"
            ) from None
        return 0
    if args.command == "recipes":
        return _recipes(args.show)
    if args.command == "evaluate":
        return _evaluate(args)
    from mta_kernels.distill.train import train

    warnings: list[str] = []
    summary = train(_config(args, argv, warnings), inputs=_inputs(args), warnings=warnings)
    if "step_time_s" in summary:  # rank 0 only
        print(json.dumps(summary, indent=1))
    return 0


def _paragraph(text: str) -> str:
    return textwrap.fill(text, width=100, break_on_hyphens=False, break_long_words=False)


def main(argv: list[str] | None = None) -> int:
    faults.on_disk.reset()
    with faults.stop_on_signals():
        try:
            return _run(argv)
        except DistillError as exc:
            print(_paragraph(f"error: {exc}"), file=sys.stderr)
            return 2
        except Preempted as exc:
            print(
                f"pre-empted ({exc.signame}): step {exc.step} finished and checkpointed in {exc.checkpoint}; "
                "run the same command with --resume to continue",
                file=sys.stderr,
            )
            return PREEMPTED_EXIT_CODE
        except faults.Stopped as exc:
            print(_paragraph(f"stopped by {exc.signame}: {faults.on_disk.describe()}"), file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:  # outside the main thread no handler is installed
            print(_paragraph(f"interrupted: {faults.on_disk.describe()}"), file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
