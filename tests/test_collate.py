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

from tests.test_units import _encode, _texts  # noqa: E402


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


def _expected_encoding(tokenizer, texts, prompts, max_length, padding_side="right") -> dict:
    """The truncation rule, stated directly on each text's full encoding: a text that fits is whole;
    without a prompt the first tokens are kept; with one, the response and one prompt token before it
    when they fit (the prompt's start is dropped), else one prompt token and the response's start."""
    import numpy as np

    rows = []
    for text, prompt in zip(texts, prompts):
        enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids, offs, spec = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
        content = [t for t in range(len(ids)) if not spec[t]]
        budget = max_length - (len(ids) - len(content))
        if len(content) <= budget:
            kept = content
        elif not prompt:
            kept = content[:budget]
        else:
            r = next(k for k, t in enumerate(content) if offs[t][1] > offs[t][0] and offs[t][0] >= prompt)
            if len(content) - r + 1 <= budget:
                kept = content[len(content) - budget :]
            else:
                kept = content[r - 1 : r - 1 + budget]
        keep = [t for t in range(len(ids)) if spec[t] or t in kept]
        rows.append(([ids[t] for t in keep], [offs[t] for t in keep], [spec[t] for t in keep]))
    length = max(len(r[0]) for r in rows)
    out = {
        "input_ids": np.full((len(rows), length), tokenizer.pad_token_id),
        "attention_mask": np.zeros((len(rows), length), dtype=np.int64),
        "offset_mapping": np.zeros((len(rows), length, 2), dtype=np.int64),
        "special_tokens_mask": np.ones((len(rows), length), dtype=np.int64),
    }
    for b, (ids, offs, spec) in enumerate(rows):
        sl = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        out["input_ids"][b, sl], out["attention_mask"][b, sl] = ids, 1
        out["offset_mapping"][b, sl], out["special_tokens_mask"][b, sl] = offs, spec
    return {k: torch.from_numpy(v) for k, v in out.items()}


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
    prompts = [None, None, None, len(texts[3]) // 2, len(texts[4]) // 2, None]
    enc = _expected_encoding(bpe, texts, prompts, 40)
    # Rows without a prompt are cut on the right, exactly as the tokenizer's own truncation.
    hf = _encode(bpe, texts, max_length=40)
    for b in (0, 1, 2, 5):
        assert torch.equal(ids[b][mask[b] == 1], hf["input_ids"][b][hf["attention_mask"][b] == 1])
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
    for b in (3, 4):  # response-only loss: no label before the first token starting at the response
        starts = enc["offset_mapping"][b, :, 0]
        response = [t for t in range(ids.shape[1]) if mask[b, t] and starts[t] >= len(texts[b]) // 2]
        first = response[0] if response else ids.shape[1]
        assert (labels[b, :first] == -100).all() and torch.equal(
            labels[b, first:][mask[b, first:] == 1], ids[b, first:][mask[b, first:] == 1]
        )
        assert first > 0
    units = extractor(texts)
    teacher_enc = _expected_encoding(wordpiece, texts, prompts, 40)
    assert torch.equal(batch["teacher_input_ids"], teacher_enc["input_ids"])
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
        if key == "stats":
            assert value == {k: v for k, v in batch["stats"].items() if not k.startswith("units_")}
            continue
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
        "stats",
        "teacher_attention_mask",
        "teacher_input_ids",
    ]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prompts = [len(t) // 3 for t in texts[:3]] + [0, None]
    enc = _expected_encoding(bpe, texts, prompts, 33, padding_side="left")
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
    teacher = _expected_encoding(wordpiece, texts, prompts, 33, padding_side="left")
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


# --------------------------------------------------------------------------------------------------
# Truncation keeps the response
# --------------------------------------------------------------------------------------------------


def test_choose_window_hand_cases():
    from mta_kernels.distill.collate import choose_window

    assert choose_window(10, 10, 4) == choose_window(3, 10, None) == Window(0, False)
    assert choose_window(10, 6, None) == Window(0, True)  # no prompt: cut on the right
    assert choose_window(10, 6, 7) == Window(4, False)  # 3 response tokens + 3 prompt tokens
    assert choose_window(10, 4, 7) == Window(6, False)  # 3 response tokens + 1 prompt token
    assert choose_window(10, 3, 7) == Window(6, True)  # 1 prompt token + 2 of 3 response tokens
    assert choose_window(10, 4, 0) == Window(0, True)  # the whole text is response


from mta_kernels.distill.collate import Window  # noqa: E402


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_long_prompt_is_cut_from_the_left(bpe, wordpiece, padding_side):
    """A prompt longer than max_length used to take the whole window (every label -100)."""
    bpe.padding_side = wordpiece.padding_side = padding_side
    prompt = "### Instruction:\n" + " ".join(_texts(4, seed=5)) + "\n\n### Response:\n"
    output = "The sky is blue today."
    long_output = " ".join(_texts(3, seed=6))
    examples = [
        {"prompt": prompt, "output": output},
        {"prompt": prompt, "output": long_output},
        {"text": "A short text.", "prompt_length_chars": 2},
    ]
    for tok in (bpe, wordpiece):
        collate = UnitCollator(tok, None, max_length=24, granularities=())
        batch = collate(examples)
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape[1] == 24
        assert batch["stats"]["prompt_cut"] == 2 and batch["stats"]["response_cut"] == 1
        squash = lambda t: t.lower().replace(" ", "")  # noqa: E731 - WordPiece lower-cases
        # 1: the whole response is labelled (one prompt token is kept before it, to predict its first).
        labelled = ids[0][labels[0] != -100].tolist()
        assert squash(tok.decode(labelled, skip_special_tokens=True)) == squash(output)
        # 2: the response does not fit: its start is kept after one prompt token (and a leading [CLS]).
        lead = 1 if tok is wordpiece else 0
        assert int((labels[1][mask[1] == 1] == -100).sum()) == lead + 1
        text = tok.decode(ids[1][labels[1] != -100].tolist(), skip_special_tokens=True)
        assert squash(long_output).startswith(squash(text)) and len(squash(text)) > 20
    bpe.padding_side = wordpiece.padding_side = "right"
