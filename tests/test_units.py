"""Semantic units: extraction with the real spaCy pipeline, alignment to two genuinely different
tokenizations (a byte-level BPE and a lower-casing WordPiece, both trained here, offline), the packed
layout, bad inputs, and the extension op against the pure-Python rule (docs/method.md#semantic-units).

Tests that need spaCy ask for the ``extractor`` fixture (skipped where spaCy is not installed, e.g. on
the GPU machine); the tokenizer-only tests run everywhere.
"""

from __future__ import annotations

import pickle
import random
import subprocess
import sys

import pytest
import torch

from mta_kernels import layout
from mta_kernels.layout import UnitBatch
from mta_kernels.reference import char_spans_to_token_ranges_reference
from mta_kernels.units import (
    TextUnits,
    UnitExtractor,
    align_units,
)

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

# --------------------------------------------------------------------------------------------------
# Corpus: templated sentences (varied syntax) plus hand-written awkward ones
# --------------------------------------------------------------------------------------------------

_DETS = ["the", "a", "every", "that", "our", "some", "this"]
_ADJS = ["tall", "quiet", "bright", "old", "curious", "broken", "silver", "tired", "young", "narrow"]
_NOUNS = [
    "cat",
    "engineer",
    "river",
    "committee",
    "window",
    "garden",
    "student",
    "machine",
    "village",
    "report",
]
_VERBS_PAST = ["opened", "watched", "built", "crossed", "painted", "explained", "followed", "repaired"]
_VERBS_ING = ["jumping", "reading", "running", "waiting", "singing", "working", "sleeping"]
_ADVS = ["quietly", "quickly", "rarely", "carefully", "suddenly", "never", "always", "slowly"]
_PREPS = ["over", "near", "behind", "under", "beside", "through", "across"]

_HAND_WRITTEN = [
    "The cat has been quietly jumping over the tall fence.",
    "Don't you think it's strange that nobody's here?",
    "She said: \"We'll meet at 5:30 p.m. on Jan. 3rd, 2024 -- don't be late!\"",
    "Prices rose 3.5% (from $10.99 to $11.37) in the U.S. last year.",
    "Well... I guess the well-known author wasn't really sleeping.",
    "Tabs\tand\nnewlines\n\nare   everywhere   here.",
    "Café owners in São Paulo serve crème brûlée with naïve enthusiasm.",
    "He wrote e\u0301te\u0301 with combining accents, and co\u0308perate too.",
    "Emoji 😀 appear 🚀 between words 👍🏽 sometimes.",
    "東京 is a city; 北京 is another, and 서울 is a third.",
    "The running dog barked at the falling leaves.",
    "  Leading and trailing spaces surround this sentence.  ",
    "email me at someone@example.com or visit https://example.org/path?q=1",
    "A\u00a0non-breaking space and an\u3000ideographic space appear\u2009here.",
    "Running quickly, the young children have never stopped laughing.",
]


def _generated_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    forms = [
        lambda: (
            f"{rng.choice(_DETS).capitalize()} {rng.choice(_ADJS)} {rng.choice(_NOUNS)} has been "
            f"{rng.choice(_ADVS)} {rng.choice(_VERBS_ING)} {rng.choice(_PREPS)} "
            f"{rng.choice(_DETS)} {rng.choice(_NOUNS)}."
        ),
        lambda: (
            f"{rng.choice(_DETS).capitalize()} {rng.choice(_NOUNS)} {rng.choice(_VERBS_PAST)} "
            f"{rng.choice(_DETS)} {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_ADVS)}."
        ),
        lambda: (
            f"Why did {rng.choice(_DETS)} {rng.choice(_NOUNS)} {rng.choice(_ADVS)} stop "
            f"{rng.choice(_VERBS_ING)}, and who {rng.choice(_VERBS_PAST)} it?"
        ),
        lambda: (
            f"{rng.choice(_ADVS).capitalize()}, {rng.choice(_DETS)} {rng.choice(_NOUNS)}s were "
            f"{rng.choice(_VERBS_ING)} {rng.choice(_PREPS)} the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}; "
            f"nobody {rng.choice(_VERBS_PAST)} them."
        ),
        lambda: (
            f"In {rng.randint(1900, 2030)}, {rng.randint(2, 99)} {rng.choice(_NOUNS)}s "
            f"{rng.choice(_VERBS_PAST)} {rng.choice(_DETS)} {rng.choice(_NOUNS)} ({rng.choice(_ADJS)})."
        ),
    ]
    return [rng.choice(forms)() for _ in range(n)]


def _texts(n: int, seed: int, sentences_per_text: tuple[int, int] = (1, 4)) -> list[str]:
    rng = random.Random(seed)
    pool = _generated_sentences(4 * n, seed) + _HAND_WRITTEN
    seps = [" ", " ", " ", "\n", "  ", "\n\n", "\t"]
    texts = []
    for _ in range(n):
        k = rng.randint(*sentences_per_text)
        parts = rng.sample(pool, k)
        texts.append("".join(p + rng.choice(seps) for p in parts[:-1]) + parts[-1])
    return texts


# --------------------------------------------------------------------------------------------------
# Tokenizers trained here (no hub): GPT-2-style byte-level BPE and BERT-style WordPiece
# --------------------------------------------------------------------------------------------------


def _train_corpus() -> list[str]:
    return _generated_sentences(400, seed=1) + _HAND_WRITTEN * 3


def make_bpe_tokenizer(trim_offsets: bool = False) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_train_corpus(), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def make_wordpiece_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        _train_corpus(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _encode(tokenizer, texts, padding_side="right", max_length=None):
    tokenizer.padding_side = padding_side
    return tokenizer(
        texts,
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        return_offsets_mapping=True,
        return_tensors="pt",
    )


# --------------------------------------------------------------------------------------------------
# Independent checks
# --------------------------------------------------------------------------------------------------


def _first_nonspace(text: str, start: int, end: int) -> int:
    while start < end and text[start].isspace():
        start += 1
    return start


def _owner_by_scan(text: str, ts: int, te: int, spans) -> int:
    """Unit owning a token, by a linear scan (independent of the bisect in the reference)."""
    if te <= ts:
        return -1
    ts = _first_nonspace(text, ts, te)
    if ts >= te:
        return -1
    for u, (s, e) in enumerate(spans):
        if s <= ts < e:
            return u
    return -1


def _check_batch(ub: UnitBatch, text_units, texts, encodings, granularity: str) -> None:
    """Every property of a UnitBatch (docs/method.md#packed-layout), checked from the raw offsets of each
    encoding."""
    batch = len(texts)
    assert ub.cu_units.dtype == torch.int32 and ub.cu_units.shape == (batch + 1,)
    assert ub.student_ranges.dtype == torch.int32 and ub.teacher_ranges.dtype == torch.int32
    assert ub.student_ranges.shape == ub.teacher_ranges.shape == (ub.num_units, 2)
    cu = ub.cu_units.tolist()
    assert cu[0] == 0 and cu[-1] == ub.num_units and all(a <= b for a, b in zip(cu, cu[1:]))

    per_side = [(ub.student_ranges, ub.seq_len_student, encodings[0])]
    per_side.append(
        (ub.teacher_ranges, ub.seq_len_teacher, encodings[1] if len(encodings) > 1 else encodings[0])
    )
    # Units that got a token in each tokenization, found by scanning the tokens.
    owners_per_side = []
    for _, seq_len, enc in per_side:
        assert enc["input_ids"].shape[1] == seq_len
        owners = []
        for b, text in enumerate(texts):
            spans = text_units[b].spans(granularity)
            offs, mask = enc["offset_mapping"][b].tolist(), enc["attention_mask"][b].tolist()
            owners.append([_owner_by_scan(text, s, e, spans) if m else -1 for (s, e), m in zip(offs, mask)])
        owners_per_side.append(owners)

    for b, text in enumerate(texts):
        spans = text_units[b].spans(granularity)
        got_token = [set(o for o in owners_per_side[k][b] if o >= 0) for k in range(2)]
        expected_kept = sorted(got_token[0] & got_token[1])  # drop-from-both rule
        assert cu[b + 1] - cu[b] == len(expected_kept), f"sequence {b}: unit count"
        for side, (ranges, seq_len, enc) in enumerate(per_side):
            local = (ranges[cu[b] : cu[b + 1]].long() - b * seq_len).tolist()
            offs, mask = enc["offset_mapping"][b].tolist(), enc["attention_mask"][b].tolist()
            owners = owners_per_side[side][b]
            prev_end = 0
            for (start, end), u in zip(local, expected_kept):
                assert 0 <= prev_end <= start < end <= seq_len, f"sequence {b}: unsorted/overlapping/outside"
                prev_end = end
                assert all(mask[start:end]), "a unit covers a padding token"
                # exactly the tokens owned by u lie in [start, end) (others in between are unowned)
                owned = [t for t, o in enumerate(owners) if o == u]
                assert owned[0] == start and owned[-1] == end - 1
                assert all(owners[t] in (u, -1) for t in range(start, end))
                # coverage: every non-space char of the unit is covered by one of its tokens, or by a
                # token that started before the unit (a token straddling a unit boundary, e.g. BPE
                # "don" for spaCy's "do" + "n't")
                s_u, e_u = spans[u]
                covered = set()
                for t in range(start, end):
                    covered.update(range(offs[t][0], offs[t][1]))
                for t in range(0, start):
                    if mask[t]:
                        covered.update(range(offs[t][0], offs[t][1]))
                missing = [c for c in range(s_u, e_u) if not text[c].isspace() and c not in covered]
                # Only characters no token covers at all may be missing: past a truncation, or deleted
                # by the tokenizer's normalizer (control characters, stripped accents).
                anywhere = set()
                for t in range(seq_len):
                    if mask[t]:
                        anywhere.update(range(offs[t][0], offs[t][1]))
                assert not [c for c in missing if c in anywhere], (
                    f"unit {text[s_u:e_u]!r} of sequence {b}: chars {missing} not covered by its tokens"
                )


def _strict_coverage_fraction(ub: UnitBatch, text_units, texts, enc, granularity) -> float:
    """Fraction of units whose own tokens cover all their non-space characters."""
    ok = total = 0
    cu = ub.cu_units.tolist()
    for b, text in enumerate(texts):
        local = (ub.student_ranges[cu[b] : cu[b + 1]].long() - b * ub.seq_len_student).tolist()
        offs = enc["offset_mapping"][b].tolist()
        kept_spans = [
            sp
            for sp in text_units[b].spans(granularity)
            if any(_owner_by_scan(text, s, e, [sp]) == 0 for s, e in offs)
        ]
        for (start, end), (s_u, e_u) in zip(local, kept_spans):
            covered = set()
            for t in range(start, end):
                covered.update(range(offs[t][0], offs[t][1]))
            total += 1
            ok += all(text[c].isspace() or c in covered for c in range(s_u, e_u))
    return ok / max(total, 1)


# --------------------------------------------------------------------------------------------------
# Import without spaCy
# --------------------------------------------------------------------------------------------------


def test_import_does_not_load_spacy():
    code = "import sys, mta_kernels, mta_kernels.units; assert 'spacy' not in sys.modules, 'spacy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------


def _phrase_texts(text: str, units: TextUnits) -> list[str]:
    return [text[s:e] for s, e in units.phrases]


def test_hand_checked_phrases(extractor):
    text = "The cat has been quietly jumping over the tall fence."
    (units,) = extractor([text])
    # AUX AUX ADV VERB: one verb phrase; two noun chunks; "over" and "." belong to no phrase
    assert _phrase_texts(text, units) == ["The cat", "has been quietly jumping", "the tall fence"]
    assert [text[s:e] for s, e in units.words] == [
        "The",
        "cat",
        "has",
        "been",
        "quietly",
        "jumping",
        "the",
        "tall",
        "fence",
    ]


def test_overlap_resolution_longest_wins(extractor):
    # "running" and "falling" are VERBs inside noun chunks: each verb phrase overlaps a longer chunk
    text = "The running dog barked at the falling leaves."
    (units,) = extractor([text])
    assert _phrase_texts(text, units) == ["The running dog", "barked", "the falling leaves"]
    text = "We have quickly finished the growing list of tasks."
    (units,) = extractor([text])
    assert _phrase_texts(text, units) == ["We", "have quickly finished", "the growing list", "tasks"]


def test_words_modes(extractor):
    text = "Dogs bark loudly, and the cats, which were sleeping, woke up."
    all_words = UnitExtractor(words="all")
    all_words._nlp, all_words._matcher = extractor._nlp, extractor._matcher  # share the loaded pipeline
    (units_all,) = all_words([text])
    (units_in,) = extractor([text])
    # "all": every token but punctuation ("," and ".")
    assert [text[s:e] for s, e in units_all.words] == [
        "Dogs",
        "bark",
        "loudly",
        "and",
        "the",
        "cats",
        "which",
        "were",
        "sleeping",
        "woke",
        "up",
    ]
    assert units_all.phrases == units_in.phrases
    assert set(units_in.words) <= set(units_all.words)
    for s, e in units_in.words:
        assert any(ps <= s and e <= pe for ps, pe in units_in.phrases)
    for s, _ in set(units_all.words) - set(units_in.words):
        assert not any(ps <= s < pe for ps, pe in units_in.phrases)
    assert "and" not in [text[s:e] for s, e in units_in.words]  # a conjunction outside any phrase


def test_units_structure_many_texts(extractor):
    texts = _texts(150, seed=3)
    for text, units in zip(texts, extractor(texts)):
        for spans in (units.words, units.phrases):
            assert all(0 <= s < e <= len(text) for s, e in spans)
            assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), "unsorted or overlapping"
            assert all(not text[s].isspace() and not text[e - 1].isspace() for s, e in spans)
        for s, e in units.words:
            assert any(ps <= s and e <= pe for ps, pe in units.phrases)
            assert not any(c.isspace() for c in text[s:e])


EDGE_TEXTS = [
    "",
    " ",
    "   \n\t  \n",
    "😀",
    "😀😀 👍🏽!",
    "東京は大きな都市です。",
    "e\u0301te\u0301",
    "\u0301\u0301",
    "a\tb\nc\r\nd",
    "...!!!???",
    "\u00a0\u3000\u2009",
    "x",
    "Hello\x00world\x1f!",
]


def test_edge_texts(extractor, bpe, wordpiece):
    units = extractor(EDGE_TEXTS)
    assert len(units) == len(EDGE_TEXTS)
    for text, u in zip(EDGE_TEXTS, units):
        for s, e in u.words + u.phrases:
            assert 0 <= s < e <= len(text) and text[s:e].strip()
        if not text.strip():
            assert u.words == [] and u.phrases == []
    assert [(0, 1)] == units[3].words == units[3].phrases  # one emoji: a word and a (noun) phrase
    for granularity in ("word", "phrase"):
        for side in ("left", "right"):
            encs = (_encode(bpe, EDGE_TEXTS, side), _encode(wordpiece, EDGE_TEXTS, side))
            ub = align_units(units, EDGE_TEXTS, encs[0], encs[1], granularity=granularity)
            _check_batch(ub, units, EDGE_TEXTS, encs, granularity)


def test_cache(extractor, monkeypatch):
    ex = UnitExtractor(cache_size=3)
    ex._nlp, ex._matcher = extractor._nlp, extractor._matcher
    texts = ["One small cat sat.", "Two dogs ran away.", "One small cat sat."]
    first = ex(texts)
    assert ex.misses == 2 and ex.hits == 0 and first[0] == first[2]

    def no_parse(texts):
        raise AssertionError(f"re-parsed {texts}")

    monkeypatch.setattr(ex, "_extract", no_parse)
    assert ex(texts) == first  # a second epoch parses nothing
    assert ex.hits == 3
    monkeypatch.undo()
    ex(["A", "B", "C"])  # LRU: evicts both earlier texts
    assert "Two dogs ran away." not in ex._cache and len(ex._cache) == 3
    assert ex(["Two dogs ran away."]) == [first[1]]


def test_extractor_pickles_with_cache(extractor):
    ex = UnitExtractor()
    ex._nlp, ex._matcher = extractor._nlp, extractor._matcher
    texts = _texts(5, seed=9)
    before = ex(texts)
    clone = pickle.loads(pickle.dumps(ex))
    assert clone._nlp is None and len(clone._cache) == len(set(texts))
    assert clone(texts) == before and clone._nlp is None  # served from the cache, pipeline not loaded
    assert clone(["A brand new sentence appears."])[0].phrases  # loads the pipeline on demand


def test_pipeline_without_parser(tmp_path):
    spacy = pytest.importorskip("spacy")
    path = tmp_path / "blank_en"
    spacy.blank("en").to_disk(path)
    with pytest.raises(ValueError, match="blank_en.*no dependency parser"):
        UnitExtractor(pipeline=str(path))(["A sentence."])
    with pytest.raises(ValueError, match="cannot load spaCy pipeline 'no_such_pipeline_xyz'"):
        UnitExtractor(pipeline="no_such_pipeline_xyz").load()


def test_extractor_bad_arguments():
    with pytest.raises(ValueError, match="words must be one of"):
        UnitExtractor(words="some")
    with pytest.raises(ValueError, match="batch_size"):
        UnitExtractor(batch_size=0)
    with pytest.raises(TypeError, match="wrap it in a list"):
        UnitExtractor()("a single string")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        UnitExtractor()(["ok", 3])


# --------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["word", "phrase"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_align_two_tokenizers_properties(extractor, bpe, wordpiece, granularity, padding_side):
    texts = _texts(96, seed=11)
    units = extractor(texts)
    strict = []
    for lo in range(0, len(texts), 17):  # batches of 17 (and a last one of 11)
        tb, ub_units = texts[lo : lo + 17], units[lo : lo + 17]
        encs = (_encode(bpe, tb, padding_side), _encode(wordpiece, tb, padding_side))
        ub = align_units(ub_units, tb, encs[0], encs[1], granularity=granularity)
        _check_batch(ub, ub_units, tb, encs, granularity)
        assert ub.seq_len_student == encs[0]["input_ids"].shape[1]
        assert ub.seq_len_teacher == encs[1]["input_ids"].shape[1]
        if hasattr(layout, "validate_layout"):
            B = len(tb)
            layout.validate_layout(ub.student_ranges, ub.cu_units, B * ub.seq_len_student, ub.seq_len_student)
            layout.validate_layout(ub.teacher_ranges, ub.cu_units, B * ub.seq_len_teacher, ub.seq_len_teacher)
        # without truncation every unit gets tokens on both sides: nothing is dropped
        assert ub.num_units == sum(len(u.spans(granularity)) for u in ub_units)
        strict.append(_strict_coverage_fraction(ub, ub_units, tb, encs[0], granularity))
    # units whose own BPE tokens cover them entirely: all but a few split contractions
    assert min(strict) > 0.9, strict


def test_left_and_right_padding_agree(extractor, bpe, wordpiece):
    texts = _texts(23, seed=5)
    units = extractor(texts)
    right = align_units(
        units, texts, _encode(bpe, texts, "right"), _encode(wordpiece, texts, "right"), "phrase"
    )
    enc_l = (_encode(bpe, texts, "left"), _encode(wordpiece, texts, "left"))
    left = align_units(units, texts, enc_l[0], enc_l[1], "phrase")
    assert torch.equal(left.cu_units, right.cu_units)
    for side, (l_r, r_r, T) in enumerate(
        [
            (left.student_ranges, right.student_ranges, left.seq_len_student),
            (left.teacher_ranges, right.teacher_ranges, left.seq_len_teacher),
        ]
    ):
        pad = (T - enc_l[side]["attention_mask"].sum(1)).tolist()  # left padding shifts sequence b by pad[b]
        seq = torch.repeat_interleave(torch.arange(len(texts)), torch.diff(left.cu_units.long()))
        shift = torch.tensor(pad)[seq].unsqueeze(1).int()
        assert torch.equal(l_r - shift, r_r)


def test_shared_tokenization(extractor, bpe):
    texts = _texts(9, seed=7)
    units = extractor(texts)
    enc = _encode(bpe, texts)
    ub = align_units(units, texts, enc, None, granularity="word")
    assert ub.teacher_ranges is ub.student_ranges
    assert ub.seq_len_teacher == ub.seq_len_student == enc["input_ids"].shape[1]
    _check_batch(ub, units, texts, (enc,), "word")


@pytest.mark.parametrize("max_length", [7, 24, 41])
def test_truncation_drops_exactly_units_past_the_cut(extractor, bpe, wordpiece, max_length):
    texts = _texts(16, seed=13, sentences_per_text=(2, 4))
    units = extractor(texts)
    full = (_encode(bpe, texts), _encode(wordpiece, texts))
    cut = (_encode(bpe, texts, max_length=max_length), _encode(wordpiece, texts, max_length=max_length))
    for granularity in ("word", "phrase"):
        ub_full = align_units(units, texts, full[0], full[1], granularity)
        ub_cut = align_units(units, texts, cut[0], cut[1], granularity)
        _check_batch(ub_cut, units, texts, cut, granularity)
        dropped = 0
        for b in range(len(texts)):
            spans = units[b].spans(granularity)
            # a unit survives a side iff its first token in the full encoding survives the cut
            # (tokens are a prefix: identify them by their offsets)
            survives = []
            for side in range(2):
                T_full, T_cut = full[side]["input_ids"].shape[1], cut[side]["input_ids"].shape[1]
                present = {
                    tuple(o)
                    for o, m in zip(cut[side]["offset_mapping"][b].tolist(), cut[side]["attention_mask"][b])
                    if m and o[1] > o[0]
                }
                ranges = ub_full.student_ranges if side == 0 else ub_full.teacher_ranges
                local = (ranges[ub_full.cu_units[b] : ub_full.cu_units[b + 1]].long() - b * T_full).tolist()
                offs = full[side]["offset_mapping"][b].tolist()
                survives.append([tuple(offs[s]) in present for s, _ in local])
                del T_cut
            kept = [i for i in range(len(spans)) if survives[0][i] and survives[1][i]]
            dropped += len(spans) - len(kept)
            n_cut = int(ub_cut.cu_units[b + 1] - ub_cut.cu_units[b])
            assert n_cut == len(kept), f"sequence {b}: {n_cut} units kept, expected {len(kept)}"
        assert dropped > 0  # the cut really dropped units


def test_bad_inputs(bpe, wordpiece):
    texts = ["A first text.", "And a second one here."]
    units = [TextUnits([(0, 1), (2, 7)], [(0, 12)]), TextUnits([(4, 5)], [(2, 22)])]
    enc = _encode(bpe, texts)
    with pytest.raises(ValueError, match="unknown granularity 'sentence'"):
        align_units(units, texts, enc, granularity="sentence")
    with pytest.raises(ValueError, match="holds 2 sequences but 1 texts"):
        align_units(units[:1], texts[:1], enc)
    with pytest.raises(ValueError, match="1 TextUnits for 2 texts"):
        align_units(units[:1], texts, enc)
    with pytest.raises(ValueError, match="teacher_encoding holds 1 sequences but 2 texts"):
        align_units(units, texts, enc, _encode(wordpiece, texts[:1]))
    no_offsets = bpe(texts, padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="no offset_mapping.*return_offsets_mapping=True"):
        align_units(units, texts, no_offsets)
    # what a slow (Python) tokenizer returns: a BatchEncoding without Rust encodings or offsets
    slow = transformers.BatchEncoding(
        {"input_ids": no_offsets["input_ids"], "attention_mask": no_offsets["attention_mask"]}
    )
    assert not slow.is_fast
    with pytest.raises(ValueError, match="fast tokenizer.*use_fast=True"):
        align_units(units, texts, slow)
    ragged = bpe(texts, return_offsets_mapping=True)  # not padded
    with pytest.raises(ValueError, match="padding=True"):
        align_units(units, texts, ragged)
    with pytest.raises(ValueError, match="not made from these texts"):
        align_units(units, ["A", "B"], enc)
    with pytest.raises(TypeError, match="wrap it in a list"):
        align_units(units, "A first text.", enc)


# --------------------------------------------------------------------------------------------------
# The token-assignment rule: hand-checked reference, then the extension op against it
# --------------------------------------------------------------------------------------------------


def test_reference_rule_hand_checked():
    text = "ab  cd.ef \tgh"
    #       0123456789012
    spans = [[(0, 2), (4, 6), (7, 9), (11, 13)]]
    offsets = torch.tensor(
        [
            [
                [0, 0],  # special token: no unit
                [0, 1],  # "a" -> unit 0
                [1, 4],  # "b  " starts in unit 0 -> unit 0 (runs past its end)
                [4, 5],  # "c" -> unit 1
                [5, 7],  # "d." starts in unit 1
                [7, 9],  # "ef" -> unit 2
                [9, 11],  # " \t": whitespace only -> no unit
                [9, 12],  # " \tg": first non-space char 11 -> unit 3
                [12, 13],  # "h" -> unit 3
                [0, 0],  # padding
            ]
        ]
    )
    got = char_spans_to_token_ranges_reference([text], offsets, spans)
    assert got.tolist() == [[1, 3], [3, 5], [5, 6], [7, 9]]
    # a unit no token starts in: [-1, -1]; a token starting in a gap belongs to nobody
    got = char_spans_to_token_ranges_reference([text], torch.tensor([[[0, 6], [6, 13]]]), spans)
    assert got.tolist() == [[0, 1], [-1, -1], [-1, -1], [-1, -1]]
    assert char_spans_to_token_ranges_reference(
        [""], torch.zeros(1, 3, 2, dtype=torch.int64), [[]]
    ).shape == (0, 2)


_WEIRD_CHARS = [
    "a",
    "b",
    "Z",
    "é",
    "\u0301",
    "😀",
    "東",
    " ",
    " ",
    "\t",
    "\n",
    "\u00a0",
    "\u3000",
    "\u2009",
    "\x1c",
    "\u200b",
    ".",
    ",",
    "'",
]


def _random_case(rng: random.Random, batch: int, seq_len: int):
    texts, offsets, spans = [], torch.zeros(batch, seq_len, 2, dtype=torch.int64), []
    for b in range(batch):
        text = "".join(rng.choice(_WEIRD_CHARS) for _ in range(rng.randint(0, 60)))
        texts.append(text)
        # random sorted non-overlapping spans (possibly starting/ending on whitespace)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 2 * rng.randint(0, 8))))
        spans.append([(s, e) for s, e in zip(cuts[0::2], cuts[1::2]) if s < e])
        # a random monotone tokenization with empty (special/padding) tokens, left or right padded
        bounds = sorted(set([0, len(text)] + rng.sample(range(len(text) + 1), k=min(len(text) + 1, 12))))
        toks = [(s, e) for s, e in zip(bounds, bounds[1:])]
        if rng.random() < 0.3:  # overlapping token ranges (byte-level pieces of one character)
            toks = [t for tok in toks for t in ([tok, tok] if rng.random() < 0.2 else [tok])]
        row = (([(0, 0)] if rng.random() < 0.5 else []) + toks)[:seq_len]
        pad = [(0, 0)] * (seq_len - len(row))
        row = pad + row if rng.random() < 0.5 else row + pad
        offsets[b] = torch.tensor(row, dtype=torch.int64).reshape(seq_len, 2)
    return texts, offsets, spans


def test_extension_op_matches_reference(bpe, wordpiece):
    op = getattr(layout, "char_spans_to_token_ranges", None)
    if op is None:
        pytest.skip("mta_kernels.layout.char_spans_to_token_ranges is not built yet")
    rng = random.Random(0)
    for trial in range(300):
        texts, offsets, spans = _random_case(rng, batch=rng.randint(1, 5), seq_len=rng.choice([1, 3, 17, 40]))
        expected = char_spans_to_token_ranges_reference(texts, offsets, spans)
        got = op(texts, offsets, spans)
        assert got.dtype == torch.int64 and torch.equal(got, expected), f"trial {trial}: {texts} {spans}"
    # real tokenizations of awkward texts, with spans from a simple whitespace split
    texts = _texts(40, seed=41) + EDGE_TEXTS
    spans = []
    for text in texts:
        words, start = [], None
        for i, c in enumerate(text + " "):
            if not c.isspace() and start is None:
                start = i
            elif c.isspace() and start is not None:
                words.append((start, i))
                start = None
        spans.append(words)
    for tok in (bpe, wordpiece, make_bpe_tokenizer(trim_offsets=True)):
        for side in ("left", "right"):
            enc = _encode(tok, texts, side, max_length=33)
            offsets = enc["offset_mapping"].clone()
            offsets[enc["attention_mask"] == 0] = 0
            assert torch.equal(
                op(texts, offsets, spans), char_spans_to_token_ranges_reference(texts, offsets, spans)
            )


def test_padding_and_special_tokens_never_join_a_unit(bpe, wordpiece):
    """Tokens with attention_mask 0 or marked special belong to no unit even if their offsets are not
    empty (some tokenizers give special tokens a character range)."""
    texts = ["Short one.", "A somewhat longer second text follows here."]
    units = [TextUnits([(0, 5), (6, 9)], [(0, 9)]), TextUnits([(0, 1), (11, 17)], [(0, 24), (25, 32)])]
    enc_b, enc_w = _encode(bpe, texts), _encode(wordpiece, texts, max_length=6)
    expected = align_units(units, texts, enc_b, enc_w, "word")
    # WordPiece keeps "[CLS] s ##h ##or ##t [SEP]" and "[CLS] a some ##w ##h [SEP]": "one" and "longer"
    # get no teacher token, so they are dropped from both sides
    assert expected.cu_units.tolist() == [0, 1, 2]
    assert expected.teacher_ranges.tolist() == [[1, 5], [6 + 1, 6 + 2]]
    messy_b = {k: v.clone() for k, v in enc_b.items()}
    messy_b["offset_mapping"][messy_b["attention_mask"] == 0] = torch.tensor([0, 3])  # padding "covers" 0..3
    special = torch.zeros_like(enc_w["input_ids"])
    special[:, 0] = 1  # [CLS] claims the first characters
    messy_w = {k: v.clone() for k, v in enc_w.items()}
    messy_w["offset_mapping"][:, 0] = torch.tensor([0, 4])
    messy_w["special_tokens_mask"] = special
    got = align_units(units, texts, messy_b, messy_w, "word")
    assert torch.equal(got.student_ranges, expected.student_ranges)
    assert torch.equal(got.teacher_ranges, expected.teacher_ranges)
    assert torch.equal(got.cu_units, expected.cu_units)
    # NumPy and nested-list offsets are accepted too
    as_lists = {
        "offset_mapping": enc_b["offset_mapping"].tolist(),
        "attention_mask": enc_b["attention_mask"].numpy(),
    }
    assert torch.equal(
        align_units(units, texts, as_lists, enc_w, "word").student_ranges, expected.student_ranges
    )
