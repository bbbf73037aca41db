"""Training and evaluation data: instruction JSONL or plain text lines, and the batch order.

JSONL: one object a line, either ``prompt`` + ``output`` (the prompt already written out) or Dolly's raw
``instruction`` + ``context`` (or ``input``, may be empty or absent) + ``response`` (or ``output``),
whose prompt is :func:`format_prompt` (DistiLLM's template, the one home of it); the text the models see
is ``prompt + output`` and the LM/KD losses are taken on the response tokens only (the tokens that start
at or after the end of the prompt get labels, the others -100). Evaluation files
(:func:`load_eval_records`) read the same records and also take a list of references in ``output`` (as
the Self-Instruct and Super-NaturalInstructions exports have); a training file needs one string.
Plain text: one example a non-empty
line, every token a target. The format is ``--format jsonl|text``, or by default (``auto``) read from
the content: JSONL when the first non-blank line is a JSON object (whatever the file's suffix), else
JSONL for a ``.jsonl``/``.json`` file (whose errors are then reported by line) and text otherwise.

The collator is :class:`mta_kernels.distill.collate.UnitCollator` (the one home of the tokenization,
truncation and label rules): with units (docs/method.md#semantic-units, extracted from the whole text
inside the DataLoader workers) for MTA runs, with ``granularities=()`` (no units, no spaCy) otherwise.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mta_kernels.distill.config import DATA_FORMATS, DistillError
from mta_kernels.distill.files import read_text, starts_with_bom, text_lines


@dataclass(frozen=True)
class Example:
    """One training example: the model reads ``prompt + output`` and learns ``output``."""

    prompt: str
    output: str

    @property
    def text(self) -> str:
        return self.prompt + self.output

    def as_dict(self) -> dict:
        return {"text": self.text, "prompt_length_chars": len(self.prompt)}


def _is_json_object(line: str) -> bool:
    text = line.strip()
    if not text.startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def detect_format(path: str, lines: Sequence[str]) -> tuple[str, str]:
    """``("jsonl" | "text", why)`` for a file's lines (see the module docstring); ``why`` says what
    was found in the first lines. A JSON array (a first line that opens with ``[``) is an error."""
    lineno, first = next(((i, ln.strip()) for i, ln in enumerate(lines, 1) if ln.strip()), (0, ""))
    if first.startswith("["):
        raise DistillError(
            f"{path}: line {lineno} opens a JSON array ('['): the data must be JSON Lines, one object a "
            "line (convert it, e.g. jq -c '.[]' FILE > FILE.jsonl), or plain text (--format text)"
        )
    if _is_json_object(first):
        return "jsonl", f"line {lineno} is a JSON object"
    if path.endswith((".jsonl", ".json")):
        return "jsonl", f"the file name ends in {os.path.splitext(path)[1]}"
    return "text", f"line {lineno} is not a JSON object"


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 data file; unreadable, binary or another encoding is a :class:`DistillError`."""
    return text_lines(read_text(path, "data file"))


def load_examples(path: str, data_format: str = "auto", notes: list[str] | None = None) -> list[Example]:
    """Read a data file; any problem is a :class:`DistillError` naming the file and line.

    ``notes``: receives one line saying how the file was read (the format and why).
    """
    if data_format not in DATA_FORMATS:
        raise DistillError(f"--format must be one of {DATA_FORMATS}, got {data_format!r}")
    lines = read_lines(path)
    if data_format == "auto":
        found, why = detect_format(path, lines)
    else:
        found, why = data_format, f"--format {data_format}"
    jsonl = found == "jsonl"
    if not jsonl and data_format == "auto":
        mixed = next((i for i, ln in enumerate(lines, 1) if _is_json_object(ln)), None)
        if mixed is not None:
            raise DistillError(
                f"{path}: read as plain text ({why}), but line {mixed} is a JSON object: the lines "
                "disagree. Make every line a JSON record (JSON Lines) or pass --format text to read every "
                "line as text"
            )
    examples: list[Example] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            examples.append(Example("", _valid_text(line.rstrip("\n"), f"{path}, line {lineno}")))
            continue
        hint = (
            f"; the file is read as JSON Lines ({why}): fix the line, or pass --format text to read the "
            "file as plain text"
        )
        prompt, references = _json_record(path, lineno, line, hint)
        if len(references) != 1:
            raise DistillError(
                f"{path}, line {lineno}: a training record needs one response, this one has a list of "
                f"{len(references)} (lists of references are for mta-distill evaluate)"
            )
        if not references[0].strip():
            raise DistillError(f"{path}, line {lineno}: the response is empty, there is nothing to learn")
        examples.append(Example(prompt, references[0]))
    if not examples:
        raise DistillError(f"data file {path!r} holds no example (it is empty or only blank lines)")
    if notes is not None:
        kind = "JSON Lines" if jsonl else "plain text"
        bom = ", a UTF-8 byte-order mark skipped" if starts_with_bom(path) else ""
        notes.append(f"{path}: {len(examples)} examples read as {kind} ({why}{bom})")
    return examples


def _valid_text(text: str, where: str) -> str:
    """``text`` if it is valid Unicode (JSON's ``\\ud800`` escapes can make unpaired surrogates,
    which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DistillError(
            f"{where}: the text holds an unpaired surrogate ({text[exc.start]!r} at character "
            f"{exc.start}): not valid Unicode"
        ) from None
    return text


# DistiLLM's Dolly prompt (tools/process_data_dolly.py), without and with the record's input/context.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(instruction: str, context: str = "") -> str:
    """The prompt of a raw Dolly record: DistiLLM's template (with the input part when ``context``)."""
    if context:
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=context)
    return PROMPT_TEMPLATE.format(instruction=instruction)


def record_fields(obj: object, where: str) -> tuple[str, list[str]]:
    """``(prompt, references)`` of one JSONL record (module docstring); :class:`DistillError` otherwise.

    ``prompt`` + ``output``: the prompt as written; ``instruction`` [+ ``context``/``input``] +
    ``response``/``output``: :func:`format_prompt`. The references are the response, or the list
    ``output``/``response`` holds (non-empty, strings).
    """
    if not isinstance(obj, dict):
        raise DistillError(
            f"{where}: expected a JSON object with 'prompt' and 'output' (or Dolly's 'instruction' and "
            "'response')"
        )
    if "prompt" in obj:
        prompt, answer_key = _string(obj, "prompt", where), "output"
    elif "instruction" in obj:
        context_key = "context" if "context" in obj else "input"
        context = _string(obj, context_key, where) if obj.get(context_key) is not None else ""
        prompt = format_prompt(_string(obj, "instruction", where), context)
        answer_key = "output" if "output" in obj and "response" not in obj else "response"
    else:
        raise DistillError(
            f"{where}: a record needs 'prompt' and 'output', or Dolly's 'instruction' and 'response' "
            f"(keys present: {sorted(obj)})"
        )
    answer = obj.get(answer_key)
    if isinstance(answer, str):
        return prompt, [_valid_text(answer, where)]
    if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
        return prompt, [_valid_text(a, where) for a in answer]
    found = "missing" if answer_key not in obj else f"of type {type(answer).__name__}"
    if isinstance(answer, list):
        found = "an empty list" if not answer else "a list holding non-strings"
    raise DistillError(
        f"{where}: field {answer_key!r} must be a string (or a non-empty list of strings) but is {found} "
        f"(keys present: {sorted(obj)}); "
        + (
            "Dolly records have 'instruction', 'context' and 'response'"
            if "prompt" not in obj
            else "the Dolly format has 'prompt' and 'output'"
        )
    )


def _json_record(path: str, lineno: int, line: str, hint: str = "") -> tuple[str, list[str]]:
    """The prompt and references of one JSON Lines record (:func:`record_fields`); a line that is not
    JSON is a :class:`DistillError` naming the file, line and column, followed by ``hint``."""
    record = line.rstrip("\r\n")  # the newline would move a parse error to "line 2, column 1"
    try:
        obj = json.loads(record)
    except json.JSONDecodeError as exc:
        raise DistillError(
            f"{path}, line {lineno}: not valid JSON ({exc.msg} at column {exc.colno} of {len(record)}){hint}"
        ) from None
    return record_fields(obj, f"{path}, line {lineno}")


def _string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        found = "missing" if key not in obj else f"of type {type(value).__name__}"
        raise DistillError(f"{where}: field {key!r} must be a string but is {found} (keys: {sorted(obj)})")
    return _valid_text(value, where)


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation example: the prompt the model continues and the references it is scored on."""

    id: int
    prompt: str
    references: list[str]


def load_eval_records(path: str, limit: int | None = None) -> list[EvalRecord]:
    """The JSONL records of an evaluation file (the first ``limit``), ids numbered from 0 in file order.

    Records as :func:`record_fields` reads them; ``<n>`` in a prompt is a newline (DistiLLM's exports).
    """
    lines = read_lines(path)
    records: list[EvalRecord] = []
    for lineno, line in enumerate(lines, start=1):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue
        prompt, references = _json_record(path, lineno, line)
        # DistiLLM's evaluation reads its exports' "<n>" line marks as newlines (PromptDataset).
        records.append(EvalRecord(len(records), prompt.replace("<n>", "\n"), references))
    if not records:
        raise DistillError(f"data file {path!r} holds no record (it is empty or only blank lines)")
    return records


def split_examples(
    train: list[Example],
    eval_path: str | None,
    eval_fraction: float,
    seed: int,
    data_format: str = "auto",
    notes: list[str] | None = None,
) -> tuple[list[Example], list[Example]]:
    """Held-out set: ``eval_path`` when given, else a seeded random ``eval_fraction`` of ``train``."""
    if eval_path:
        return train, load_examples(eval_path, data_format, notes)
    if eval_fraction <= 0 or len(train) < 2:
        return train, []
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(eval_fraction * len(train))))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


class TextDataset(torch.utils.data.Dataset):
    """Examples as the dicts the collator takes (``text``, ``prompt_length_chars``)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.items = [e.as_dict() for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def epoch_batches(
    n_items: int, batch_size: int, epoch: int, seed: int, rank: int, world: int
) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation, dealt round-robin, full batches only.

    Rank r of W takes ``perm[r::W]`` (as ``DistributedSampler``), so W processes with batch b see the
    same examples per step as one process with batch W·b.
    """
    sampler = torch.utils.data.DistributedSampler(
        range(n_items), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    n_full = len(order) // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_full)]
