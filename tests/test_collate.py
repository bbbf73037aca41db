"""The distillation loop's collator (mta_kernels.distill.collate.UnitCollator): tokenization with two
tokenizers, the label (prompt) rule, truncation, and the units it packs.

The tokenizers, texts and the spaCy extractor are those of ``tests/test_units.py``.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from mta_kernels.distill.collate import UnitCollator
from mta_kernels.units import UnitExtractor, align_units

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.test_units import _encode, _texts, make_bpe_tokenizer, make_wordpiece_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def extractor() -> UnitExtractor:
    pytest.importorskip("spacy")
    ex = UnitExtractor()
    ex.load()
    return ex


@pytest.fixture(scope="module")
def bpe():
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def wordpiece():
    return make_wordpiece_tokenizer()


def test_collator_bad_arguments(bpe, wordpiece):
    from tokenizers import Tokenizer, models

    no_pad = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    )
    with pytest.raises(ValueError, match="no pad token.*pad_token = tokenizer.eos_token"):
        UnitCollator(no_pad, extractor=UnitExtractor())

    class Slow:
        is_fast = False
        pad_token_id = 0

    with pytest.raises(ValueError, match="teacher_tokenizer is not a fast tokenizer"):
        UnitCollator(bpe, Slow(), extractor=UnitExtractor())
    with pytest.raises(ValueError, match="granularities"):
        UnitCollator(bpe, wordpiece, extractor=UnitExtractor(), granularities=("token",))


def test_collator(extractor, bpe, wordpiece):
    bpe.padding_side = wordpiece.padding_side = "right"
    texts = _texts(6, seed=21)
    examples = [{"text": t} for t in texts[:3]] + [
        {"text": t, "prompt_length_chars": len(t) // 2} for t in texts[3:5]
    ]
    examples.append(texts[5])
    collate = UnitCollator(bpe, wordpiece, extractor, max_length=40)
    batch = collate(examples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape[1] <= 40 and batch["teacher_input_ids"].shape[1] <= 40
    assert torch.equal(labels[mask == 0], torch.full_like(labels[mask == 0], -100))
    assert torch.equal(labels[:3][mask[:3] == 1], ids[:3][mask[:3] == 1])
    enc = _encode(bpe, texts, max_length=40)
    for b in (3, 4):  # response-only loss: no label before the first token starting at the response
        starts = enc["offset_mapping"][b, :, 0]
        response = [t for t in range(ids.shape[1]) if mask[b, t] and starts[t] >= len(texts[b]) // 2]
        first = response[0] if response else ids.shape[1]
        assert (labels[b, :first] == -100).all() and torch.equal(
            labels[b, first:][mask[b, first:] == 1], ids[b, first:][mask[b, first:] == 1]
        )
        assert first > 0
    units = extractor(texts)
    teacher_enc = _encode(wordpiece, texts, max_length=40)
    for g in ("word", "phrase"):
        expected = align_units(units, texts, enc, teacher_enc, g)
        got = batch["units"][g]
        assert torch.equal(got.student_ranges, expected.student_ranges)
        assert torch.equal(got.teacher_ranges, expected.teacher_ranges)
        assert torch.equal(got.cu_units, expected.cu_units)
    shared = UnitCollator(bpe, None, extractor, max_length=40, granularities=("phrase",))(examples)
    assert shared["teacher_input_ids"] is shared["input_ids"] and list(shared["units"]) == ["phrase"]
    # Without units (the distillation loop's --no-mta / held-out collator): the same tensors, no "units".
    plain = UnitCollator(bpe, wordpiece, max_length=40, granularities=())(examples)
    assert sorted(plain) == sorted(k for k in batch if k != "units")
    for key, value in plain.items():
        assert value.dtype == torch.int64 and torch.equal(value, batch[key]), key


def test_collator_without_units(bpe, wordpiece):
    """granularities=(): no extractor is built or called (no spaCy), no "units" key, the same label rule."""
    bpe.padding_side = wordpiece.padding_side = "left"
    texts = _texts(5, seed=41)
    examples = [{"text": t, "prompt_length_chars": len(t) // 3} for t in texts[:3]]
    examples += [{"text": texts[3], "prompt_length_chars": 0}, texts[4]]
    assert UnitCollator(bpe, wordpiece, granularities=()).extractor is None

    class NoExtraction(UnitExtractor):
        def __call__(self, texts):
            raise AssertionError("the extractor was called by a collator without units")

    batch = UnitCollator(bpe, wordpiece, NoExtraction(), max_length=33, granularities=())(examples)
    assert sorted(batch) == [
        "attention_mask",
        "input_ids",
        "labels",
        "teacher_attention_mask",
        "teacher_input_ids",
    ]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    enc = _encode(bpe, texts, padding_side="left", max_length=33)
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
    teacher = _encode(wordpiece, texts, padding_side="left", max_length=33)
    assert torch.equal(batch["teacher_input_ids"], teacher["input_ids"])
    for b in range(len(texts)):
        prompt = len(texts[b]) // 3 if b < 3 else 0
        starts, ends = enc["offset_mapping"][b, :, 0], enc["offset_mapping"][b, :, 1]
        response = [
            t for t in range(ids.shape[1]) if mask[b, t] and ends[t] > starts[t] and starts[t] >= prompt
        ]
        # no prompt: every real token is a target; else nothing before the first response token
        first = 0 if not prompt else (response[0] if response else ids.shape[1])
        expected = torch.where(mask[b] == 1, ids[b], torch.full_like(ids[b], -100))
        expected[:first] = -100
        assert torch.equal(labels[b], expected), b
        assert first > 0 or b >= 3  # left padding plus a prompt: something is masked
    shared = UnitCollator(bpe, None, max_length=33, granularities=())(examples)
    assert shared["teacher_input_ids"] is shared["input_ids"] and "units" not in shared
    bpe.padding_side = wordpiece.padding_side = "right"


def test_collator_in_dataloader_workers(extractor, bpe, wordpiece):
    bpe.padding_side = wordpiece.padding_side = "left"
    texts = _texts(12, seed=31)
    collate = UnitCollator(bpe, wordpiece, extractor, max_length=64)
    clone = pickle.loads(pickle.dumps(collate))  # what a spawned worker receives
    assert clone.extractor._nlp is None
    direct = collate([{"text": t} for t in texts[:4]])
    loader = torch.utils.data.DataLoader(
        [{"text": t} for t in texts], batch_size=4, num_workers=2, collate_fn=collate
    )
    batches = list(loader)
    assert len(batches) == 3
    assert torch.equal(batches[0]["input_ids"], direct["input_ids"])
    for g in ("word", "phrase"):
        assert torch.equal(batches[0]["units"][g].teacher_ranges, direct["units"][g].teacher_ranges)
    bpe.padding_side = wordpiece.padding_side = "right"


def test_collator_prompt_output_examples(extractor, bpe):
    bpe.padding_side = "right"
    prompt, output = "### Instruction:\nName a colour.\n\n### Response:\n", "The sky is blue today."
    collate = UnitCollator(bpe, None, extractor, max_length=64)
    from_pair = collate([{"prompt": prompt, "output": output}])
    from_text = collate([{"text": prompt + output, "prompt_length_chars": len(prompt)}])
    assert torch.equal(from_pair["labels"], from_text["labels"])
    labelled = from_pair["input_ids"][from_pair["labels"] != -100]
    assert bpe.decode(labelled.tolist()) == output  # exactly the response carries labels
    # prompt_length_chars = 0 means no prompt: the same labels as without the field
    zero = collate([{"text": output, "prompt_length_chars": 0}, {"text": prompt}])
    none = collate([{"text": output}, {"text": prompt}])
    assert torch.equal(zero["labels"], none["labels"])
    assert torch.equal(
        none["labels"][none["attention_mask"] == 1], none["input_ids"][none["attention_mask"] == 1]
    )
