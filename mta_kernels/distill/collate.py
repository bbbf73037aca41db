"""Batch collation of the distillation loop: tokenization, labels (the prompt rule), truncation, units.

:class:`UnitCollator` is the ``collate_fn`` of the loop's DataLoaders. With granularities it also
extracts the semantic units (docs/method.md#semantic-units) and aligns them to the token ranges of
both tokenizations (:mod:`mta_kernels.units`, imported only then: a run without MTA needs neither
that module nor spaCy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mta_kernels.constants import GRANULARITIES

if TYPE_CHECKING:
    from mta_kernels.units import UnitExtractor


@dataclass
class Window:
    """Which content tokens of one example a tokenization keeps (see :class:`UnitCollator`).

    ``start``: content tokens dropped on the left (the prompt's start); ``cut``: whether content tokens
    were dropped on the right (the end of the response, or of a text without prompt).
    """

    start: int
    cut: bool


def choose_window(n_content: int, budget: int, response_start: int | None) -> Window:
    """The kept range ``[start, start + budget)`` of ``n_content`` content tokens.

    Args:
        n_content: content (non-special) tokens of the full text.
        budget: how many content tokens fit (``max_length`` minus the special tokens).
        response_start: index of the first response token among the content tokens (``None``: no
            prompt, the whole text is the response; ``n_content``: no response token).

    The prompt is shortened from the left first, keeping one prompt token before the response (the
    context that predicts the response's first token); only a response longer than the budget is cut,
    on the right. Without a prompt the text is cut on the right.
    """
    if n_content <= budget:
        return Window(0, False)
    if response_start is None:
        return Window(0, True)
    start = max(0, min(n_content - budget, response_start - 1))
    return Window(start, start + budget < n_content)


def check_tokenizer(tok: Any, name: str) -> None:
    """A collator's tokenizer must be fast (character offsets) and have a pad token; raise otherwise."""
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"{name} is not a fast tokenizer ({type(tok).__name__}): character offsets need a "
            "PreTrainedTokenizerFast (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    if tok.pad_token_id is None:
        raise ValueError(
            f"{name} has no pad token: set one before building the collator, "
            "e.g. tokenizer.pad_token = tokenizer.eos_token"
        )


class UnitCollator:
    """``collate_fn`` of the distillation loop: tokenizes with both tokenizers, applies the label and
    truncation rules, and (with granularities) extracts units once (cached) and aligns them.

    Args:
        student_tokenizer: a ``PreTrainedTokenizerFast`` with a pad token; its ``padding_side`` is used.
        teacher_tokenizer: the teacher's (``None``: the teacher shares the student's tokenization).
        extractor: a :class:`~mta_kernels.units.UnitExtractor` (default: ``UnitExtractor()``; none when
            ``granularities`` is empty).
        max_length: length of both tokenizations after truncation (tokens, special tokens included).
        granularities: which ``UnitBatch`` es to build, a subset of ``("word", "phrase")``. Empty: no
            units at all (runs without MTA: teacher training, ``--no-mta``, held-out CE): the extractor
            is never called, neither :mod:`mta_kernels.units` nor spaCy is loaded, and the returned dict
            has no ``units`` key (so a loop that needs units fails loudly instead of reading an empty
            mapping).
        text_key: the text field of a dict example.
        prompt_length_key: optional int field: the first that many characters of the text are the
            prompt; their tokens get ``labels = -100`` (response-only loss).
        pad_to_multiple_of: padded length rounded up to a multiple of this.

    Examples are dicts ``{"text": str, "prompt_length_chars": int (optional)}``, instruction dicts
    ``{"prompt": str, "output": str}`` (text = prompt + output, the prompt masked), or plain strings.
    Units are extracted on the whole text (prompt included, docs/method.md#semantic-units); only
    ``labels`` see the prompt.

    Labels are -100 at padding and, when ``prompt_length_chars > 0``, at every position before the
    first real token that starts at or after it (the one home of this rule: the loop uses this
    collator everywhere, with ``granularities=()`` when it needs no units).

    Truncation keeps the response: a text longer than ``max_length`` loses prompt tokens from the left
    first (one prompt token is kept before the response), and only a response that alone does not fit
    is cut on the right (:func:`choose_window`); a text without prompt is cut on the right. Special
    tokens the tokenizer adds (e.g. ``[CLS]``/``[SEP]``) stay. Each tokenization is windowed on its
    own; a unit left without tokens on either side is dropped from both (``align_units``).

    Returns a dict: ``input_ids``, ``attention_mask``, ``labels`` (int64 ``[B, T]``),
    ``teacher_input_ids``, ``teacher_attention_mask`` (``[B, T_t]``; the same tensors when the
    tokenization is shared), ``stats`` (plain ints: ``examples``, ``prompt_cut`` and ``response_cut``
    counts of the student tokenization, ``tokens`` = real non-special student tokens, and per
    granularity ``units_<g>_examples`` / ``units_<g>_tokens``: examples with at least one unit and
    student tokens inside a unit) and, unless ``granularities`` is empty, ``units``
    (``{granularity: UnitBatch}``). Picklable: usable in DataLoader workers.
    """

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any = None,
        extractor: UnitExtractor | None = None,
        max_length: int = 512,
        granularities: Sequence[str] = GRANULARITIES,
        text_key: str = "text",
        prompt_length_key: str = "prompt_length_chars",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        check_tokenizer(student_tokenizer, "student_tokenizer")
        if teacher_tokenizer is not None:
            check_tokenizer(teacher_tokenizer, "teacher_tokenizer")
        granularities = tuple(granularities)
        if any(g not in GRANULARITIES for g in granularities):
            raise ValueError(
                f"granularities must be a subset of {GRANULARITIES} (empty: no units), got {granularities}"
            )
        if int(max_length) < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        if extractor is None and granularities:
            from mta_kernels.units import UnitExtractor

            extractor = UnitExtractor()
        self.extractor = extractor
        self.max_length = int(max_length)
        self.granularities = granularities
        self.text_key = text_key
        self.prompt_length_key = prompt_length_key
        self.pad_to_multiple_of = pad_to_multiple_of

    def _encode(self, tokenizer: Any, texts: list[str], prompt_lengths: list[int | None]) -> dict:
        """Padded NumPy encoding of ``texts`` after the truncation rule, and per-example cut flags."""
        # No truncation by the tokenizer: the window is chosen here, from the full tokenization.
        full = tokenizer(
            texts,
            padding=False,
            truncation=False,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            verbose=False,
        )
        rows, prompt_cut, response_cut = [], [], []
        for b, prompt_length in enumerate(prompt_lengths):
            ids = full["input_ids"][b]
            offsets = full["offset_mapping"][b]
            special = full["special_tokens_mask"][b]
            if len(ids) <= self.max_length:  # fits: nothing to choose (the common case)
                rows.append((ids, offsets, special))
                prompt_cut.append(False)
                response_cut.append(False)
                continue
            content = [t for t in range(len(ids)) if not special[t]]
            budget = max(0, self.max_length - (len(ids) - len(content)))
            response = None
            if prompt_length:
                response = next(
                    (
                        k
                        for k, t in enumerate(content)
                        if offsets[t][1] > offsets[t][0] and offsets[t][0] >= prompt_length
                    ),
                    len(content),
                )
            window = choose_window(len(content), budget, response)
            kept = set(content[window.start : window.start + budget])
            keep = [t for t in range(len(ids)) if special[t] or t in kept][: self.max_length]
            rows.append(([ids[t] for t in keep], [offsets[t] for t in keep], [special[t] for t in keep]))
            prompt_cut.append(window.start > 0)
            response_cut.append(window.cut)
        length = max(len(r[0]) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(texts)
        input_ids = np.full((batch, length), tokenizer.pad_token_id, dtype=np.int64)
        attention = np.zeros((batch, length), dtype=np.int64)
        offset_mapping = np.zeros((batch, length, 2), dtype=np.int64)
        special_mask = np.ones((batch, length), dtype=np.int64)
        left = tokenizer.padding_side == "left"
        for b, (ids, offs, spec) in enumerate(rows):
            n = len(ids)
            sl = slice(length - n, length) if left else slice(0, n)
            input_ids[b, sl] = ids
            attention[b, sl] = 1
            if n:
                offset_mapping[b, sl] = offs
                special_mask[b, sl] = spec
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "offset_mapping": offset_mapping,
            "special_tokens_mask": special_mask,
            "prompt_cut": prompt_cut,
            "response_cut": response_cut,
        }

    def _read_examples(self, examples: Sequence[Any]) -> tuple[list[str], list[int | None]]:
        texts: list[str] = []
        prompt_lengths: list[int | None] = []
        for i, example in enumerate(examples):
            if isinstance(example, str):
                text, prompt_length = example, None
            elif (
                isinstance(example, Mapping)
                and self.text_key not in example
                and {"prompt", "output"} <= example.keys()
            ):
                # instruction data (e.g. mta_kernels/data/*.jsonl): the text is prompt + output
                text, prompt_length = example["prompt"] + example["output"], len(example["prompt"])
            elif isinstance(example, Mapping):
                if self.text_key not in example:
                    raise ValueError(f"example {i} has no {self.text_key!r} field (keys: {list(example)})")
                text, prompt_length = example[self.text_key], example.get(self.prompt_length_key)
            else:
                raise TypeError(
                    f"example {i} is {type(example).__name__}: expected a str or a dict "
                    f"with {self.text_key!r}"
                )
            if not isinstance(text, str):
                raise TypeError(f"example {i}: {self.text_key!r} is {type(text).__name__}, expected str")
            if prompt_length is not None and not (0 <= int(prompt_length) <= len(text)):
                raise ValueError(
                    f"example {i}: {self.prompt_length_key}={prompt_length} outside [0, {len(text)}]"
                )
            texts.append(text)
            prompt_lengths.append(None if prompt_length is None else int(prompt_length))
        return texts, prompt_lengths

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("UnitCollator got an empty batch")
        texts, prompt_lengths = self._read_examples(examples)
        text_units = self.extractor(texts) if self.granularities else None
        student = self._encode(self.student_tokenizer, texts, prompt_lengths)
        teacher = None
        if self.teacher_tokenizer is not None:
            teacher = self._encode(self.teacher_tokenizer, texts, prompt_lengths)
        units = {}
        if self.granularities:
            from mta_kernels.units import align_units

            units = {g: align_units(text_units, texts, student, teacher, g) for g in self.granularities}

        input_ids, attention_mask = student["input_ids"], student["attention_mask"]
        labels = np.where(attention_mask == 0, -100, input_ids)
        if any(p is not None for p in prompt_lengths):
            offsets = student["offset_mapping"]
            real = (offsets[..., 1] > offsets[..., 0]) & (attention_mask != 0)
            for b, prompt_length in enumerate(prompt_lengths):
                if not prompt_length:  # None or 0: the whole text is the response
                    continue
                # The response starts at the first real token that starts at or after the prompt's end;
                # every position before it (prompt, leading specials, left padding) has no label.
                response = np.flatnonzero(real[b] & (offsets[b, :, 0] >= prompt_length))
                labels[b, : response[0] if response.size else labels.shape[1]] = -100
        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        batch = {
            "input_ids": as_long(input_ids),
            "attention_mask": as_long(attention_mask),
            "labels": as_long(labels),
        }
        if teacher is not None:
            batch["teacher_input_ids"] = as_long(teacher["input_ids"])
            batch["teacher_attention_mask"] = as_long(teacher["attention_mask"])
        else:
            batch["teacher_input_ids"] = batch["input_ids"]
            batch["teacher_attention_mask"] = batch["attention_mask"]
        batch["stats"] = self._stats(student, units)
        if self.granularities:
            batch["units"] = units
        return batch

    @staticmethod
    def _stats(student: dict, units: dict) -> dict[str, int]:
        content = (student["attention_mask"] != 0) & (student["special_tokens_mask"] == 0)
        stats = {
            "examples": len(student["prompt_cut"]),
            "prompt_cut": sum(student["prompt_cut"]),
            "response_cut": sum(student["response_cut"]),
            "tokens": int(content.sum()),
        }
        for g, ub in units.items():
            counts = np.diff(ub.cu_units.numpy())
            ranges = ub.student_ranges.numpy().astype(np.int64)
            stats[f"units_{g}_examples"] = int((counts > 0).sum())
            stats[f"units_{g}_tokens"] = int((ranges[:, 1] - ranges[:, 0]).sum())
        return stats
