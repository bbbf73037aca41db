"""CPU throughput of the semantic-unit pipeline (docs/method.md#semantic-units): spaCy extraction,
alignment to two tokenizations (the C++ extension op vs the pure-Python loop over tokens), units per
token.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_units.py --benchmark-only -s``. The batch is
64 texts of ~200 words assembled from a bank of hand-written English sentences (news, science,
narrative, dialogue, instructions); the tokenizers (GPT-2-style byte-level BPE, BERT-style WordPiece)
are trained here on the bank, offline. The numbers go to ``benchmarks/NOTES.md`` ("Semantic units").
"""

from __future__ import annotations

import random
import time
from unittest import mock

import pytest
import torch

from mta_kernels import layout
from mta_kernels.distill.collate import UnitCollator
from mta_kernels.reference import char_spans_to_token_ranges_reference
from mta_kernels.units import UnitExtractor, align_units

spacy = pytest.importorskip("spacy")
transformers = pytest.importorskip("transformers")

BATCH = 64
WORDS_PER_TEXT = 200

SENTENCE_BANK = [
    "The city council voted on Tuesday to extend the night bus service until the end of next year.",
    "Officials said the decision would cost about four million dollars, most of it paid by the state.",
    "Residents who work late shifts had been asking for the change since the old routes were cut.",
    "Critics argued that the money should have been spent on repairing the bridges instead.",
    "The mayor, who has rarely commented on transport, defended the plan in a short statement.",
    "Researchers have discovered a new species of frog in the cloud forests of northern Peru.",
    "The tiny amphibian, barely the size of a thumbnail, was hiding under wet leaves near a stream.",
    "Its bright orange skin probably warns predators that it is poisonous.",
    "Scientists are now studying whether the toxin could be useful in medicine.",
    "Climate change is slowly shrinking the forests where these frogs live.",
    "When Maria opened the door, the kitchen was already full of smoke.",
    "She had forgotten the bread in the oven while she was talking on the phone.",
    "Her brother laughed, opened every window, and quietly threw the burnt loaf into the garden.",
    "By the time their parents came home, the house smelled only faintly of toast.",
    "Nobody mentioned the incident at dinner, but everyone was smiling.",
    '"Are you sure this is the right road?" asked Tom, staring at the map.',
    '"I have driven here a hundred times," his father replied, without slowing down.',
    "Twenty minutes later they were parked in front of a closed gas station in the middle of nowhere.",
    "The engine had been making a strange noise for hours, and now it simply stopped.",
    "They waited in the dark, listening to the wind and the distant barking of a dog.",
    "To replace a bicycle tire, first release the brake and remove the wheel from the frame.",
    "Push the valve into the tire and carefully lever one side of the tire off the rim.",
    "Check the inside of the tire for glass or thorns before you fit the new tube.",
    "Inflate the tube slightly so that it keeps its shape while you work.",
    "Finally, pump the tire to the pressure printed on its side and reinstall the wheel.",
    "The company reported a sharp rise in profits during the third quarter.",
    "Sales of its electric scooters grew by forty percent compared with the same period last year.",
    "Analysts had expected weaker results because of rising prices for batteries and steel.",
    "The chief executive said the firm would open two new factories in Poland and Mexico.",
    "Shares jumped nearly nine percent in early trading on Wednesday.",
    "Ancient Roman engineers built aqueducts that carried water across valleys and mountains.",
    "Some of these structures are still standing after almost two thousand years.",
    "They were designed with a very gentle slope, so that gravity alone kept the water moving.",
    "Historians believe that thousands of workers, many of them slaves, were needed for each project.",
    "Modern engineers continue to admire the precision of their measurements.",
    "My grandmother grew tomatoes, beans and sunflowers in a small garden behind her house.",
    "Every summer she gave away more vegetables than she could possibly eat.",
    "The neighbours' children often helped her water the plants in the evening.",
    "In return, she taught them the names of birds and showed them how to save seeds.",
    "I still remember the smell of the warm soil after a sudden rain.",
    "The new library will have a reading room, a small cinema and a workshop for young programmers.",
    "Construction is expected to begin in the spring, if the weather allows.",
    "Architects have tried to keep the old stone facade while adding a modern glass roof.",
    "Local schools have already asked whether classes can be held there.",
    "The project was funded partly by donations from former students.",
    "Sleep plays an important role in how the brain stores new memories.",
    "During deep sleep, patterns of activity learned during the day are replayed and strengthened.",
    "People who are deprived of sleep often struggle to concentrate and make more mistakes.",
    "Doctors recommend that adults sleep between seven and nine hours every night.",
    "Yet many of us are constantly checking our phones until late at night.",
    "The train was delayed again, so the passengers had been waiting on the platform for an hour.",
    "A conductor eventually announced that a tree had fallen across the tracks near the tunnel.",
    "Some travellers decided to take a taxi, while others went to the cafe across the street.",
    "When the train finally arrived, it was crowded, hot and surprisingly quiet.",
    "I managed to find a seat next to an old man who was reading a novel in Italian.",
    "Volcanoes form where molten rock from deep inside the Earth reaches the surface.",
    "Some erupt violently, throwing ash high into the atmosphere, while others release slow rivers of lava.",
    "The ash can disrupt air travel for days and damage crops over a wide area.",
    "Scientists monitor small earthquakes and gas emissions to predict eruptions.",
    "Even so, the exact timing of an eruption remains very difficult to forecast.",
    "Please remember to submit your reports before Friday afternoon.",
    "If you have any questions about the new format, contact the office or reply to this message.",
    "We will review every submission carefully and send feedback within two weeks.",
    "Late reports may not be considered for this year's awards.",
    "Thank you for your patience while we update the system.",
    "The orchestra has been rehearsing the symphony for months, and the concert was finally sold out.",
    "Violins rose softly over the deep voices of the cellos as the hall fell silent.",
    "At the end, the audience stood up and applauded for almost ten minutes.",
    "The young conductor, visibly moved, bowed again and again.",
    "Critics later described the performance as one of the best of the season.",
]


def make_texts(batch: int = BATCH, words: int = WORDS_PER_TEXT, seed: int = 0) -> list[str]:
    """``batch`` texts of ~``words`` words: random runs of consecutive bank sentences (so topics stay
    coherent), joined by spaces and the odd paragraph break."""
    rng = random.Random(seed)
    texts = []
    for _ in range(batch):
        parts: list[str] = []
        count = 0
        i = rng.randrange(len(SENTENCE_BANK))
        while count < words:
            sentence = SENTENCE_BANK[i % len(SENTENCE_BANK)]
            parts.append(sentence + ("\n\n" if rng.random() < 0.15 else " "))
            count += len(sentence.split())
            i = i + 1 if rng.random() < 0.8 else rng.randrange(len(SENTENCE_BANK))
        texts.append("".join(parts).rstrip())
    return texts


def make_bpe_tokenizer(vocab_size: int = 2000) -> transformers.PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (no prefix space, offsets keep the leading space: trim_offsets=False)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCE_BANK, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_wordpiece_tokenizer(vocab_size: int = 1200) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(
        SENTENCE_BANK, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _encode(tokenizer, texts):
    return tokenizer(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")


@pytest.fixture(scope="module")
def setup():
    texts = make_texts()
    extractor = UnitExtractor()
    extractor.load()
    units = extractor(texts)
    bpe, wordpiece = make_bpe_tokenizer(), make_wordpiece_tokenizer()
    return {
        "texts": texts,
        "extractor": extractor,
        "units": units,
        "bpe": bpe,
        "wordpiece": wordpiece,
        "enc_bpe": _encode(bpe, texts),
        "enc_wp": _encode(wordpiece, texts),
    }


def _python_loop(texts, offsets, spans, packed=None):
    """The layout op align_units calls, served by the pure-Python reference loop over tokens."""
    return char_spans_to_token_ranges_reference(texts, offsets, spans)


def _best_time(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _record(benchmark, **info) -> None:
    benchmark.extra_info.update(info)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))


def test_extraction_throughput(benchmark, setup):
    """spaCy parse + phrases + words, cache off: what the first epoch costs."""
    texts, shared = setup["texts"], setup["extractor"]
    fresh = UnitExtractor(cache_size=0)
    fresh._nlp, fresh._matcher = shared._nlp, shared._matcher  # time the parse, not the model load
    result = benchmark.pedantic(fresh, args=(texts,), rounds=3, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.min
    n_words = sum(len(u.words) for u in result)
    n_phrases = sum(len(u.phrases) for u in result)
    n_ws_words = sum(len(t.split()) for t in texts)
    _record(
        benchmark,
        texts_per_s=len(texts) / seconds,
        input_words_per_s=n_ws_words / seconds,
        units_per_s=(n_words + n_phrases) / seconds,
        words_per_text=n_words / len(texts),
        phrases_per_text=n_phrases / len(texts),
    )


def test_extraction_cached(benchmark, setup):
    """Later epochs: every text is a cache hit."""
    texts, extractor = setup["texts"], setup["extractor"]
    benchmark(extractor, texts)
    _record(benchmark, texts_per_s=len(texts) / benchmark.stats.stats.min)


def _units_count(units, granularity):
    return sum(len(u.spans(granularity)) for u in units)


@pytest.mark.parametrize("granularity", ["word", "phrase"])
def test_alignment_extension(benchmark, setup, granularity):
    """align_units for two tokenizations through the C++ op (what the collator runs)."""
    if getattr(layout, "char_spans_to_token_ranges", None) is None:
        pytest.skip("mta_kernels.layout.char_spans_to_token_ranges is not built")
    args = (setup["units"], setup["texts"], setup["enc_bpe"], setup["enc_wp"], granularity)
    ub = benchmark(align_units, *args)
    seconds = benchmark.stats.stats.min
    _record(benchmark, texts_per_s=BATCH / seconds, units_per_s=ub.num_units / seconds)


@pytest.mark.parametrize("granularity", ["word", "phrase"])
def test_alignment_python_loop(benchmark, setup, granularity):
    """The same align_units with the pure-Python loop over tokens in place of the op."""
    args = (setup["units"], setup["texts"], setup["enc_bpe"], setup["enc_wp"], granularity)
    with mock.patch.object(layout, "char_spans_to_token_ranges", _python_loop):
        ub = benchmark.pedantic(align_units, args=args, rounds=5, iterations=1)
    seconds = benchmark.stats.stats.min
    _record(benchmark, texts_per_s=BATCH / seconds, units_per_s=ub.num_units / seconds)


def test_alignment_speedup(benchmark, setup):
    """The op alone (>= 10x) and align_units end to end, plan included (>= 5x), vs the pure-Python loop."""
    op = getattr(layout, "char_spans_to_token_ranges", None)
    if op is None:
        pytest.skip("mta_kernels.layout.char_spans_to_token_ranges is not built")
    texts, units, enc_bpe, enc_wp = setup["texts"], setup["units"], setup["enc_bpe"], setup["enc_wp"]
    spans = [u.words for u in units]
    offsets = enc_bpe["offset_mapping"].to(torch.int64)
    expected = char_spans_to_token_ranges_reference(texts, offsets, spans)
    assert torch.equal(op(texts, offsets, spans), expected)
    benchmark(op, texts, offsets, spans)
    t_op = benchmark.stats.stats.min
    t_ref = _best_time(lambda: char_spans_to_token_ranges_reference(texts, offsets, spans))
    t_align = _best_time(lambda: align_units(units, texts, enc_bpe, enc_wp, "word"), repeat=20)
    with mock.patch.object(layout, "char_spans_to_token_ranges", _python_loop):
        t_align_ref = _best_time(lambda: align_units(units, texts, enc_bpe, enc_wp, "word"))
    # align_units also plans the batch's layout (validation, maps, work lists: the work moved out of the
    # loss), the same cost on both sides: timed alone, so the mapping's own speed-up is visible.
    ub = align_units(units, texts, enc_bpe, enc_wp, "word")
    args = (ub.student_ranges, ub.teacher_ranges, ub.cu_units, ub.seq_len_student, ub.seq_len_teacher)
    t_plan = _best_time(lambda: layout.UnitBatch(*args), repeat=20)
    _record(
        benchmark,
        op_ms=1e3 * t_op,
        python_loop_ms=1e3 * t_ref,
        op_speedup=t_ref / t_op,
        align_units_ms=1e3 * t_align,
        align_units_python_ms=1e3 * t_align_ref,
        align_units_speedup=t_align_ref / t_align,
        plan_ms=1e3 * t_plan,
    )
    assert t_ref / t_op >= 10, f"op only {t_ref / t_op:.1f}x faster than the Python loop"
    assert t_align_ref / t_align >= 5, f"align_units only {t_align_ref / t_align:.1f}x faster end to end"


def test_units_per_token_and_collator(benchmark, setup):
    """Words/token and phrases/token for the byte-level BPE on this text (unit counts per sequence for
    the loss benchmarks), and the whole collator (tokenize twice + cached units + align) per batch."""
    texts, units, enc = setup["texts"], setup["units"], setup["enc_bpe"]
    tokens = int(enc["attention_mask"].sum())
    all_words = UnitExtractor(words="all")
    all_words._nlp, all_words._matcher = setup["extractor"]._nlp, setup["extractor"]._matcher
    n_all_words = _units_count(all_words(texts), "word")
    collate = UnitCollator(setup["bpe"], setup["wordpiece"], setup["extractor"], max_length=512)
    examples = [{"text": t} for t in texts]
    batch = benchmark(collate, examples)
    seconds = benchmark.stats.stats.min
    _record(
        benchmark,
        bpe_tokens_per_text=tokens / len(texts),
        bpe_tokens_per_ws_word=tokens / sum(len(t.split()) for t in texts),
        words_per_token=_units_count(units, "word") / tokens,
        words_all_per_token=n_all_words / tokens,
        phrases_per_token=_units_count(units, "phrase") / tokens,
        collator_texts_per_s=len(texts) / seconds,
        collator_word_units=batch["units"]["word"].num_units,
        collator_phrase_units=batch["units"]["phrase"].num_units,
    )
