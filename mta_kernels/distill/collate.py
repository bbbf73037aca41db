"""Batch collation of the distillation loop: tokenization, labels (the prompt rule), truncation, units.

:class:`UnitCollator` is the ``collate_fn`` of the loop's DataLoaders. With granularities it also
extracts the semantic units (docs/method.md#semantic-units) and aligns them to the token ranges of
both tokenizations (:mod:`mta_kernels.units`, imported only then: a run without MTA needs neither
that module nor spaCy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mta_kernels.constants import GRANULARITIES

if TYPE_CHECKING:
    from mta_kernels.units import UnitExtractor


class UnitCollator:
    """``collate_fn`` for MTA training: tokenizes with both tokenizers, extracts units once (cached)
    and aligns them.

    Args:
        student_tokenizer: a ``PreTrainedTokenizerFast`` with a pad token; its ``padding_side`` is used.
        teacher_tokenizer: the teacher's (``None``: the teacher shares the student's tokenization).
        extractor: a :class:`UnitExtractor` (default: ``UnitExtractor()``; none when ``granularities``
            is empty).
        max_length: truncation length of both tokenizations (tokens).
        granularities: which :class:`UnitBatch` es to build, a subset of ``("word", "phrase")``. Empty:
            no units at all (runs without MTA: teacher training, ``--no-mta``, held-out CE): the extractor
            is never called, spaCy is neither loaded nor needed, and the returned dict has no ``units``
            key (so a loop that needs units fails loudly instead of reading an empty mapping).
        text_key: the text field of a dict example.
        prompt_length_key: optional int field: the first that many characters of the text are the
            prompt; their tokens get ``labels = -100`` (response-only loss).
        pad_to_multiple_of: passed to both tokenizers.

    Examples are dicts ``{"text": str, "prompt_length_chars": int (optional)}``, instruction dicts
    ``{"prompt": str, "output": str}`` (text = prompt + output, the prompt masked), or plain strings.
    Units are extracted on the whole text (prompt included, docs/method.md#semantic-units); only
    ``labels`` see the prompt.
    Labels are -100 at padding and, when ``prompt_length_chars > 0``, at every position before the
    first real token that starts at or after it (the one home of this rule: the distillation loop uses
    this collator, with ``granularities=()`` when it needs no units).
    Returns a dict: ``input_ids``, ``attention_mask``, ``labels`` (``input_ids`` with padding, and the
    prompt when given, set to -100), ``teacher_input_ids``, ``teacher_attention_mask`` (the same
    tensors when the tokenization is shared) and, unless ``granularities`` is empty, ``units``
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
        for name, tok in (("student_tokenizer", student_tokenizer), ("teacher_tokenizer", teacher_tokenizer)):
            if tok is None and name == "teacher_tokenizer":
                continue
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

    def _encode(self, tokenizer: Any, texts: list[str]) -> Any:
        # NumPy, not torch: the host bookkeeping stays off torch's thread pool (see _token_offsets).
        return tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_tensors="np",
        )

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
        student = self._encode(self.student_tokenizer, texts)
        teacher = self._encode(self.teacher_tokenizer, texts) if self.teacher_tokenizer is not None else None
        units = {}
        if self.granularities:
            from mta_kernels.units import align_units

            units = {
                g: align_units(text_units, texts, student, teacher, granularity=g) for g in self.granularities
            }

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
        if self.granularities:
            batch["units"] = units
        return batch
