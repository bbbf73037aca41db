"""Batch collation of the distillation loop: tokenization, labels (the prompt rule), truncation, units.

:class:`UnitCollator` is the ``collate_fn`` of the loop's DataLoaders. With granularities it also
extracts the semantic units (docs/method.md#semantic-units) and aligns them to the token ranges of
both tokenizations (:mod:`mta_kernels.units`, imported only then: a run without MTA needs neither
that module nor spaCy).
"""

from __future__ import annotations

import warnings
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


def token_window(
    offsets: Sequence[tuple[int, int]], special: Sequence[int], max_length: int, prompt_length: int | None
) -> tuple[list[int], int, Window]:
    """The window of one full tokenization: ``(content, budget, window)``, the indices of its content
    (non-special) tokens, how many of them fit, and which (:func:`choose_window`). The response starts at
    the first real token that starts at or after ``prompt_length`` (``None``/0: no prompt)."""
    content = [t for t in range(len(special)) if not special[t]]
    budget = max(0, max_length - (len(special) - len(content)))
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
    return content, budget, choose_window(len(content), budget, response)


PRECUT_CHARS_PER_TOKEN = 8
"""A long text is first cut to ``max_length × 8`` characters on each side of its prompt's end (4× more
each time that does not hold the window), so that tokenization and spaCy cost stays bounded."""
PRECUT_MARGIN = 16
"""Content tokens a pre-cut must leave between the window and each cut: the tokens near a cut may
differ from the whole text's (a word cut in two), those of the window do not."""


def window_chars(
    tokenizers: Sequence[Any], text: str, prompt_length: int | None, max_length: int
) -> tuple[int, int]:
    """``[c0, c1)``: a part of ``text`` that holds every token the window of each tokenizer keeps.

    The whole text when it is short; else the end of its prompt and the start of its response (the
    window keeps those, :func:`choose_window`), grown until each tokenizer's window on the part lies at
    least :data:`PRECUT_MARGIN` tokens from each cut. The collator tokenizes and spaCy parses only this
    part, whatever the record's size.
    """
    plen = prompt_length or 0
    chars = max_length * PRECUT_CHARS_PER_TOKEN
    while True:
        c0 = max(0, plen - chars)
        c1 = min(len(text), plen + chars)
        if c0 == 0 and c1 == len(text):
            return 0, len(text)
        piece = text[c0:c1]
        if all(_window_inside(t, piece, plen - c0 if plen else None, c0 > 0, c1 < len(text), max_length)
               for t in tokenizers):  # fmt: skip
            return c0, c1
        chars *= 4


def _window_inside(
    tokenizer: Any, piece: str, prompt_length: int | None, cut_left: bool, cut_right: bool, max_length: int
) -> bool:
    """Whether the window of ``piece`` keeps :data:`PRECUT_MARGIN` tokens from each of its cuts."""
    enc = tokenizer(
        piece, truncation=False, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False
    )
    content, budget, window = token_window(enc["offset_mapping"], enc["special_tokens_mask"], max_length,
                                           prompt_length)  # fmt: skip
    if len(content) <= budget:  # all of the part fits: the whole text's window is wider
        return False
    left_ok = not cut_left or window.start >= PRECUT_MARGIN
    right_ok = not cut_right or len(content) - (window.start + budget) >= PRECUT_MARGIN
    return left_ok and right_ok


def edge_token_ids(tokenizer: Any, text: str, n: int, last: bool = False) -> list[int]:
    """The first ``n`` token ids of ``text`` (``last``: the last ``n``), as the whole text's
    tokenization gives them, from a tokenization of only as much of the text as they need (a part
    :data:`PRECUT_MARGIN` tokens longer, grown 4× at a time): bounded cost for a prompt of any size."""
    chars = max(n, 1) * PRECUT_CHARS_PER_TOKEN
    while True:
        piece = text[-chars:] if last else text[:chars]
        ids = tokenizer(piece)["input_ids"]
        if len(piece) == len(text) or len(ids) >= n + PRECUT_MARGIN:
            break
        chars *= 4
    return ids[-n:] if last else ids[:n]


def prompt_token_ids(tokenizer: Any, prompt: str, n: int, last: bool = False) -> list[int]:
    """A prompt's ids to generate from: its first ``n`` tokens (``last``: its last ``n``), as
    :func:`edge_token_ids` gives them; a prompt with no token (e.g. only spaces for WordPiece) starts
    from BOS (or EOS), as ``generate`` would."""
    ids = edge_token_ids(tokenizer, prompt, n, last)
    if not ids:
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return ids


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
    is cut on the right (:func:`choose_window`); a text without prompt is cut on the right. A long text
    is first cut to the characters its windows can keep (:func:`window_chars`), so that neither the
    tokenizers nor spaCy ever see more of it: the cost of a record is bounded whatever its size. Special
    tokens the tokenizer adds (e.g. ``[CLS]``/``[SEP]``) stay. Each tokenization is windowed on its
    own; a unit left without tokens on either side is dropped from both (``align_units``).

    Returns a dict: ``input_ids``, ``attention_mask``, ``labels`` (int64 ``[B, T]``),
    ``teacher_input_ids``, ``teacher_attention_mask`` (``[B, T_t]``; the same tensors when the
    tokenization is shared), ``stats`` (plain ints: ``examples``, ``prompt_cut`` and ``response_cut``
    counts of the student tokenization, ``tokens`` = real non-special student tokens, and per
    granularity ``units_<g>_examples`` / ``units_<g>_tokens``: examples with at least one unit and
    student tokens inside a unit, and ``units_failed``: texts spaCy could not parse, which get no units
    and a warning) and, unless ``granularities`` is empty, ``units``
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
        self._warned = False

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
            content, budget, window = token_window(offsets, special, self.max_length, prompt_length)
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

    def _cut_long(
        self, texts: list[str], prompt_lengths: list[int | None]
    ) -> tuple[list[str], list[int | None]]:
        """Each text cut to the part its windows can keep (:func:`window_chars`); short texts whole."""
        tokenizers = [t for t in (self.student_tokenizer, self.teacher_tokenizer) if t is not None]
        for b, (text, plen) in enumerate(zip(texts, prompt_lengths)):
            c0, c1 = window_chars(tokenizers, text, plen, self.max_length)
            if (c0, c1) != (0, len(text)):
                texts[b] = text[c0:c1]
                prompt_lengths[b] = None if plen is None else plen - c0
        return texts, prompt_lengths

    def _units(self, texts: list[str]) -> tuple[list[Any], int]:
        """The units of each text, and how many texts spaCy could not parse (they get no units)."""
        from mta_kernels.units import TextUnits

        load = getattr(self.extractor, "load", None)
        if load is not None:
            load()  # a missing pipeline is an error, not a text spaCy cannot parse
        try:
            return self.extractor(texts), 0
        except Exception:  # noqa: BLE001 - one text spaCy rejects: find it, keep the others' units
            pass
        units, failed = [], 0
        for text in texts:
            try:
                units.append(self.extractor([text])[0])
            except Exception as exc:  # noqa: BLE001
                failed += 1
                units.append(TextUnits([], []))
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"spaCy could not parse a text of {len(text)} characters ({type(exc).__name__}: "
                        f"{str(exc)[:200]}): it gets no units (counted in the batch's stats['units_failed'])",
                        stacklevel=2,
                    )
        return units, failed

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        if len(examples) == 0:
            raise ValueError("UnitCollator got an empty batch")
        texts, prompt_lengths = self._cut_long(*self._read_examples(examples))
        text_units, failed = self._units(texts) if self.granularities else (None, 0)
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
            batch["stats"]["units_failed"] = failed
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
