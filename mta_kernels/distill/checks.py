"""Start-up checks of a run: everything knowable before step 1, one clear line each.

Errors are :class:`~mta_kernels.distill.config.DistillError` (the CLI prints them and exits 2, nothing
written); warnings are returned as strings for the loop to print and keep in the summary.
"""

from __future__ import annotations

import glob
import json
import os
import unicodedata
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mta_kernels.distill import faults
from mta_kernels.distill.config import PATH_FIELDS, DistillError, TrainConfig, flag

RUN_MARKER = ".mta-distill-run"
"""File that marks a directory as a run directory of this tool (written before anything else)."""

COVERAGE_WARN = 0.5
"""Warn when fewer than this fraction of the examples has at least one unit of a granularity."""

LANGUAGE_WARN = 0.5
"""Warn when fewer than this fraction of the letters and symbols is in the pipeline's scripts."""

# Files whose presence makes a directory a model or tokenizer directory (never written into).
_MODEL_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "tf_model.h5",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


# ----------------------------------------------------------------------------------- output directory
def _is_model_dir(path: str) -> str | None:
    """The file that shows ``path`` holds a model or tokenizer, or ``None``."""
    for pattern in _MODEL_FILES:
        found = sorted(glob.glob(os.path.join(glob.escape(path), pattern)))
        if found:
            return os.path.basename(found[0])
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                content = json.load(f)
        except (OSError, ValueError):
            return None
        if isinstance(content, dict) and ("model_type" in content or "architectures" in content):
            return "config.json"
    return None


def is_run_dir(path: str) -> bool:
    """Whether a run of this tool created ``path`` (its marker, or the run config of an older version)."""
    if os.path.isfile(os.path.join(path, RUN_MARKER)):
        return True
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "pairs_resolved" in content and "mode" in content


def check_out_dir(cfg: TrainConfig, extra_inputs: dict[str, str] | None = None) -> None:
    """``--out`` is empty, new, or ours; a non-empty foreign one needs ``--overwrite``; a model never;
    nor a folder that holds, is inside or is above what the run reads; and it must be writable."""
    out = cfg.out
    # train-teacher names its model --model and --tokenizer
    names = {"student": "--model", "student_tokenizer": "--tokenizer"} if cfg.mode == "teacher" else {}
    inputs = {names.get(k, flag(k)): getattr(cfg, k) for k in INPUT_FIELDS if getattr(cfg, k)}
    check_out_against_inputs(out, {**inputs, **(extra_inputs or {})})
    check_writable(out)
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise DistillError(f"--out {out!r} is a file, not a directory")
    if not os.listdir(out) or is_run_dir(out):
        return
    model_file = _is_model_dir(out)
    if model_file is not None:
        raise DistillError(
            f"--out {out!r} holds a model or tokenizer ({model_file}): a run never writes into one "
            "(it would overwrite config.json). Pass a new directory, e.g. --out runs/NAME"
        )
    if not cfg.overwrite:
        raise DistillError(
            f"--out {out!r} is not empty and was not created by mta-distill: pass an empty or new "
            "directory, or --overwrite to write into it anyway (its files are kept unless a run's file "
            "has the same name)"
        )


# The TrainConfig fields that name something a run reads (files, model and tokenizer directories).
INPUT_FIELDS = tuple(f for f in PATH_FIELDS if f != "out")


FILE_OPTIONS = ("--data", "--eval-data", "--config", "--recipe")
"""Options that name a file (a directory given there is the loader's error, not an output conflict)."""


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved: symlinks, ``..``)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_against_inputs(out: str, inputs: dict[str, str], what: str = "--out") -> None:
    """Refuse an output folder that is, holds or lies inside anything the command reads.

    ``inputs``: option -> path (values that are not existing paths, e.g. ``builtin:...`` models or
    spaCy package names, are skipped). Refused even with ``--overwrite``: writing there could replace
    a model, a tokenizer or a data file the command itself reads (e.g. ``--out`` the teacher's run
    folder, whose ``model/`` is the teacher).
    """
    target = os.path.realpath(out)
    for option, path in inputs.items():
        if not path or not os.path.exists(path):
            continue
        if option.startswith(FILE_OPTIONS) and os.path.isdir(path):
            continue  # a data file that is a directory: the data loader names that mistake
        source = os.path.realpath(path)
        kind = "directory" if os.path.isdir(path) else "file"
        if _inside(source, target):
            relation = "is" if source == target else "holds"
            raise DistillError(
                f"{what} {out!r} {relation} the {kind} of {option} ({path!r}): the command would write "
                f"where it reads. Pass an output folder outside it (refused even with --overwrite)"
            )
        if kind == "directory" and _inside(target, source):
            raise DistillError(
                f"{what} {out!r} lies inside the directory of {option} ({path!r}): the command would "
                f"write into what it reads. Pass an output folder outside it (refused even with --overwrite)"
            )


def check_writable(out: str, what: str = "--out") -> None:
    """The output folder (or, when it does not exist yet, its nearest existing parent) is a writable
    directory: a clear error before any work instead of a traceback at the first write."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        if probe != os.path.abspath(out):
            raise DistillError(f"{what} {out!r} cannot be created: {probe!r} is a file, not a directory")
        return  # --out itself is a file: reported by the caller
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == os.path.abspath(out) else f" (its nearest existing parent {probe!r})"
        raise DistillError(
            f"{what} {out!r}{where} is not writable (permission denied or a read-only file system): "
            "pass a folder you can write to"
        )


def mark_out_dir(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, RUN_MARKER)
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("mta-distill run directory\n")


# --------------------------------------------------------------------------------- models, backends
def requested_device(device: str | None) -> str:
    """``--device``, else ``cuda`` when available, else ``cpu``; CUDA asked for without it is an error."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise DistillError(f"--device {want} asked for but CUDA is not available on this machine")
    return want


def check_extension() -> None:
    """``MTA_KERNELS_EXT`` (an unknown value, or a forced implementation that cannot run) as an error
    paragraph before any work, not a traceback at the first layout op."""
    from mta_kernels import layout

    try:
        layout.check_extension_choice()
    except RuntimeError as exc:
        raise DistillError(f"{exc} (`python -m mta_kernels.info` shows what is installed)") from None


def max_positions(model: nn.Module) -> int | None:
    """Longest sequence the model's position embeddings allow, ``None`` when the config does not say."""
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model(model: nn.Module, tokenizer: Any, cfg: TrainConfig, role: str) -> None:
    """``--max-length`` within the model's positions; every token id within its embedding."""
    positions = max_positions(model)
    if positions is not None and cfg.max_length > positions:
        raise DistillError(
            f"--max-length {cfg.max_length} is longer than the {role}'s {positions} positions: "
            f"pass --max-length {positions} or less"
        )
    check_embedding(model, tokenizer, f"{role} ", "ids past the embedding would fail at some step")


def check_embedding(model: nn.Module, tokenizer: Any, role: str, hint: str) -> None:
    """Every id of ``tokenizer`` is a row of the model's input embedding (``role``: ``"student "``, ...)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise DistillError(
            f"the {role}tokenizer has {len(tokenizer)} tokens but the {role}model's embedding has {rows} "
            f"rows: it is not this model's tokenizer ({hint})"
        )


def check_backend(cfg: TrainConfig, device_type: str) -> None:
    """``--backend triton`` needs Triton and a CUDA device (or Triton's CPU interpreter)."""
    if cfg.backend != "triton":
        return
    from mta_kernels.ops import triton_installed, triton_runs_on

    if not triton_installed():
        raise DistillError(
            "--backend triton needs the triton package (pip install triton); or --backend torch"
        )
    if not triton_runs_on(device_type):
        raise DistillError(
            f"--backend triton runs Triton kernels, which need a CUDA device (the device is {device_type}): "
            "use --backend auto or torch on the CPU (or set TRITON_INTERPRET=1 for Triton's slow CPU "
            "interpreter)"
        )


# ---------------------------------------------------------------------------------------- the data
def scan_targets(dataset: Sequence[dict], collator: Any, max_length: int, progress: bool) -> dict:
    """Collate the whole training set without units: truncation counts and target tokens.

    Raises :class:`DistillError` when no example keeps a target token.
    """
    from tqdm.auto import tqdm

    counts = {"examples": 0, "prompt_cut": 0, "response_cut": 0, "no_target": 0, "targets": 0}
    chunk = 256
    starts = range(0, len(dataset), chunk)
    bar = tqdm(
        starts, desc="checking the data", disable=not progress or len(dataset) < 4 * chunk, leave=False
    )
    for i in bar:
        faults.at("data")  # test hook: a signal while the data is checked
        batch = collator([dataset[j] for j in range(i, min(i + chunk, len(dataset)))])
        per_example = (batch["labels"][:, 1:] != -100).sum(dim=1)
        for key in ("examples", "prompt_cut", "response_cut"):
            counts[key] += batch["stats"][key]
        counts["no_target"] += int((per_example == 0).sum())
        counts["targets"] += int(per_example.sum())
    if counts["targets"] == 0:
        raise DistillError(
            f"no training example keeps a target token at --max-length {max_length}: every response is "
            "empty after tokenization or is a single token (the first token of a text is never predicted)"
        )
    return counts


def truncation_note(counts: dict, max_length: int) -> str | None:
    if not (counts["prompt_cut"] or counts["response_cut"] or counts["no_target"]):
        return None
    n = counts["examples"]
    return (
        f"--max-length {max_length}: {counts['prompt_cut']} of {n} training examples had their prompt "
        f"shortened from the left, {counts['response_cut']} had their response cut on the right, "
        f"{counts['no_target']} have no target token"
    )


def coverage(stats: dict, granularities: Sequence[str]) -> dict[str, dict[str, float]]:
    """Fractions of examples and tokens with units, per granularity, from summed collator ``stats``."""
    return {
        g: {
            "examples": stats[f"units_{g}_examples"] / max(stats["examples"], 1),
            "tokens": stats[f"units_{g}_tokens"] / max(stats["tokens"], 1),
        }
        for g in granularities
    }


def coverage_warning(cov: dict[str, dict[str, float]], where: str) -> str | None:
    low = {g: c for g, c in cov.items() if c["examples"] < COVERAGE_WARN}
    if not low:
        return None
    parts = ", ".join(
        f"{g}: {100 * c['examples']:.0f}% of examples, {100 * c['tokens']:.0f}% of tokens"
        for g, c in low.items()
    )
    return (
        f"few semantic units in {where} ({parts}; warning below {100 * COVERAGE_WARN:.0f}% of examples): "
        "the MTA term is 0 on an example without units. Is the text mostly numbers, code or symbols, "
        "or in another language than the --spacy-model pipeline?"
    )


# ------------------------------------------------------------------------------------------ language
# Unicode scripts (the first word of a character's name) that each spaCy language code is written in.
_LATIN = (
    "af ca cs da de en es et eu fi fr ga hr hu id is it lb lt lv ms nb nl pl pt ro sk sl sq sv sw tl tr vi yo"
)
_SCRIPTS: dict[str, tuple[str, ...]] = {lang: ("LATIN",) for lang in _LATIN.split()}
_SCRIPTS.update(
    {
        "zh": ("CJK",),
        "ja": ("CJK", "HIRAGANA", "KATAKANA"),
        "ko": ("HANGUL", "CJK"),
        "ru": ("CYRILLIC",),
        "uk": ("CYRILLIC",),
        "bg": ("CYRILLIC",),
        "mk": ("CYRILLIC",),
        "sr": ("CYRILLIC", "LATIN"),
        "el": ("GREEK",),
        "ar": ("ARABIC",),
        "fa": ("ARABIC",),
        "ur": ("ARABIC",),
        "he": ("HEBREW",),
        "hi": ("DEVANAGARI",),
        "mr": ("DEVANAGARI",),
        "ne": ("DEVANAGARI",),
        "th": ("THAI",),
        "bn": ("BENGALI",),
        "ta": ("TAMIL",),
        "te": ("TELUGU",),
    }
)


def script_share(texts: Sequence[str], lang: str, max_chars: int = 200_000) -> float | None:
    """Fraction of the letters and symbols of ``texts`` written in the scripts of language ``lang``.

    The heuristic: every character that is a letter (``str.isalpha``) or a symbol (Unicode category
    ``So``: emoji, pictographs) counts; it is in the language's script when the first word of its
    Unicode name is one of the language's scripts (``LATIN`` for English, ``CJK`` for Chinese, ...).
    Digits, punctuation and spaces do not count. ``None``: unknown language code, or nothing counted.
    """
    scripts = _SCRIPTS.get(lang)
    if scripts is None:
        return None
    inside = total = 0
    seen = 0
    for text in texts:
        for ch in text:
            if not (ch.isalpha() or unicodedata.category(ch) == "So"):
                continue
            total += 1
            inside += unicodedata.name(ch, "").split(" ", 1)[0] in scripts
        seen += len(text)
        if seen >= max_chars:
            break
    return inside / total if total else None


def language_warning(texts: Sequence[str], lang: str, pipeline: str) -> str | None:
    share = script_share(texts, lang)
    if share is None or share >= LANGUAGE_WARN:
        return None
    return (
        f"the spaCy pipeline {pipeline!r} is for language {lang!r}, but only {100 * share:.0f}% of the "
        f"letters and symbols of the data are in its script ({'/'.join(_SCRIPTS[lang])}): its words and "
        "phrases will be wrong. Pass --spacy-model with a pipeline for the data's language"
    )
