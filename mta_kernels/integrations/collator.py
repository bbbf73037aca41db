"""Batches for trainers: tokenization, response-only labels and packed units (``UnitBatch``).

:class:`MTADataCollator` builds what :class:`~mta_kernels.integrations.MTATrainer` reads from a list of
examples; :func:`units_from_token_ids` builds units for sequences that exist only as token ids (the
completions a student generates on-policy), by decoding them with character offsets. Both rest on the
public unit API: :class:`mta_kernels.units.UnitExtractor` and :func:`mta_kernels.units.align_units`.
This module imports neither ``transformers`` nor ``trl``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mta_kernels.constants import GRANULARITIES
from mta_kernels.distill.collate import UnitCollator
from mta_kernels.layout import UnitBatch
from mta_kernels.units import UnitExtractor, align_units

__all__ = ["MTADataCollator", "units_from_token_ids"]

# (text field, prompt field) pairs accepted besides a plain text field: TRL's prompt-completion format
# and the Dolly-style instruction format of mta_kernels/data/*.jsonl.
PROMPT_PAIRS = (("prompt", "completion"), ("prompt", "output"))


class MTADataCollator(UnitCollator):
    """``data_collator`` for :class:`~mta_kernels.integrations.MTATrainer` (and any ``DataLoader``).

    The loop's :class:`~mta_kernels.distill.collate.UnitCollator` (its label, truncation and unit rules,
    one home for them) with the example formats and the errors a ``Trainer`` user meets.

    Args:
        student_tokenizer: the student's fast tokenizer (with a pad token); its ``padding_side`` is used.
        teacher_tokenizer: the teacher's fast tokenizer; ``None`` when the teacher reads the student's
            tokens (one shared tokenizer: the ``teacher_*`` keys are the student's tensors and the unit
            ranges of both sides are one tensor).
        granularities: the :class:`UnitBatch` es to build (a subset of ``("word", "phrase")``; the ones
            the MTA layer pairs use). Empty: no units, spaCy is never loaded.
        extractor: a :class:`~mta_kernels.units.UnitExtractor` (default ``UnitExtractor()``).
        max_length: length of both tokenizations after truncation, in tokens (the prompt is cut from
            the left first, so the response is kept).
        text_field: the text of an example; ``prompt_length_field``: optional int, the first that many
            characters of the text are the prompt (no loss on their tokens).

    An example is a dict with ``text_field`` (and optionally ``prompt_length_field``), or with
    ``prompt`` + ``completion`` (TRL's prompt-completion format) or ``prompt`` + ``output``: the text is
    the concatenation and the prompt gets no labels. Units are extracted on the whole text.

    Returns the dict of :class:`~mta_kernels.distill.collate.UnitCollator`: ``input_ids``,
    ``attention_mask``, ``labels`` (int64 ``[B, Ts]``; -100 at padding and prompt tokens),
    ``teacher_input_ids``, ``teacher_attention_mask`` (``[B, Tt]``), ``stats`` and, unless
    ``granularities`` is empty, ``units`` (``{granularity: UnitBatch}``, CPU tensors).
    """

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any = None,
        granularities: Sequence[str] = GRANULARITIES,
        extractor: UnitExtractor | None = None,
        max_length: int = 512,
        text_field: str = "text",
        prompt_length_field: str = "prompt_length_chars",
    ) -> None:
        if isinstance(granularities, str):
            granularities = (granularities,)
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if extractor is not None and not isinstance(extractor, UnitExtractor):
            raise TypeError(f"extractor must be a UnitExtractor, got {type(extractor).__name__}")
        super().__init__(
            student_tokenizer,
            teacher_tokenizer,
            extractor=extractor,
            max_length=max_length,
            granularities=granularities,
            text_key=text_field,
            prompt_length_key=prompt_length_field,
        )
        self.text_field = text_field
        self.prompt_length_field = prompt_length_field

    @property
    def tokenizer(self) -> Any:
        """The student's tokenizer (``Trainer`` saves ``data_collator.tokenizer`` with a checkpoint)."""
        return self.student_tokenizer

    @property
    def input_columns(self) -> tuple[str, ...]:
        """Every example field this collator may read (what ``remove_unused_columns`` must keep)."""
        fields = [self.text_field, self.prompt_length_field]
        for pair in PROMPT_PAIRS:
            fields += [f for f in pair if f not in fields]
        return tuple(fields)

    def text_fields_present(self, columns: Sequence[str]) -> bool:
        """Whether examples with these fields carry a text this collator can read."""
        cols = set(columns)
        return self.text_field in cols or any(set(pair) <= cols for pair in PROMPT_PAIRS)

    def _read_examples(self, examples: Sequence[Any]) -> tuple[list[str], list[int | None]]:
        texts, prompt_lengths = [], []
        for i, ex in enumerate(examples):
            if not isinstance(ex, Mapping):
                raise TypeError(f"example {i} is {type(ex).__name__}, expected a dict ({self.text_field!r})")
            if self.text_field in ex:
                text, plen = ex[self.text_field], ex.get(self.prompt_length_field) or 0
            else:
                pair = next((p for p in PROMPT_PAIRS if set(p) <= ex.keys()), None)
                if pair is None:
                    raise ValueError(
                        f"example {i} has no {self.text_field!r} field, nor 'prompt' + 'completion' / "
                        f"'output' (keys: {sorted(ex)}). If the data set has the field, a Trainer with "
                        "remove_unused_columns=True dropped it: use MTATrainer (it keeps the collator's "
                        "input_columns) or set TrainingArguments(remove_unused_columns=False)."
                    )
                prompt, rest = ex[pair[0]], ex[pair[1]]
                if not isinstance(prompt, str) or not isinstance(rest, str):
                    raise TypeError(f"example {i}: {pair[0]!r} and {pair[1]!r} must be strings")
                text, plen = prompt + rest, len(prompt)
            if not isinstance(text, str):
                raise TypeError(f"example {i}: {self.text_field!r} is {type(text).__name__}, expected str")
            is_int = isinstance(plen, (int, np.integer)) and not isinstance(plen, bool)
            if not is_int or not 0 <= plen <= len(text):
                raise ValueError(
                    f"example {i}: {self.prompt_length_field}={plen!r} must be an int in [0, {len(text)}]"
                )
            texts.append(text)
            prompt_lengths.append(int(plen))
        return texts, prompt_lengths


def _decoded_offsets(tokenizer: Any, ids: Sequence[int], special: set[int]) -> tuple[str, np.ndarray]:
    """Text and character offsets ``[T, 2]`` of token ids, decoded incrementally.

    A token that completes no character on its own (part of a multi-byte character) gets the range of
    the characters its group completes, like a fast tokenizer's ``offset_mapping``; special tokens get
    an empty range (they belong to no unit).
    """
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)
    backend = tokenizer.backend_tokenizer
    offsets = np.zeros((len(ids), 2), dtype=np.int64)
    pieces: list[str] = []
    pos = 0
    pending: list[int] = []
    for t, tid in enumerate(ids):
        if tid in special:
            offsets[t] = (pos, pos)
            continue
        chunk = stream.step(backend, int(tid))
        pending.append(t)
        if chunk is None:
            continue
        for p in pending:
            offsets[p] = (pos, pos + len(chunk))
        pending.clear()
        pieces.append(chunk)
        pos += len(chunk)
    for p in pending:  # an unfinished character at the end: no text
        offsets[p] = (pos, pos)
    return "".join(pieces), offsets


def units_from_token_ids(
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    extractor: UnitExtractor,
    granularities: Sequence[str],
) -> tuple[list[str], dict[str, UnitBatch]]:
    """Units of sequences given as token ids (one tokenizer shared by student and teacher).

    Args:
        tokenizer: the fast tokenizer of ``input_ids``.
        input_ids: int ``[B, T]``; attention_mask: ``[B, T]`` (0 = padding, anywhere in the row).
        extractor: the :class:`UnitExtractor`; granularities: subset of ``("word", "phrase")``.
    Returns:
        the B decoded texts and ``{granularity: UnitBatch}`` (CPU; ``teacher_ranges`` is
        ``student_ranges``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"units of token ids need a fast tokenizer (its Rust decoder gives character offsets), got "
            f"{type(tokenizer).__name__}"
        )
    if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"input_ids and attention_mask must both be [B, T], got {list(input_ids.shape)} and "
            f"{list(attention_mask.shape)}"
        )
    ids = input_ids.detach().cpu().numpy()
    mask = attention_mask.detach().cpu().numpy() != 0
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts, offsets = [], np.zeros((*ids.shape, 2), dtype=np.int64)
    for b in range(ids.shape[0]):
        cols = np.flatnonzero(mask[b])
        text, off = _decoded_offsets(tokenizer, ids[b, cols].tolist(), special)
        texts.append(text)
        offsets[b, cols] = off
    encoding = {"offset_mapping": offsets, "attention_mask": mask.astype(np.int64)}
    text_units = extractor(texts)
    return texts, {g: align_units(text_units, texts, encoding, None, g) for g in granularities}
