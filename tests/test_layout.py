"""Layout ops of ``mta_kernels._C`` and the layout plan against plain-Python/torch equivalents.

See docs/method.md#packed-layout.

Every op runs on many random layouts (awkward sizes, U = 0, sequences with 0/1 units, B = 1,
seq_len = 63); every validation error is checked to name the offending unit; CUDA results are
compared bitwise with the CPU ones when a GPU is present.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from mta_kernels import layout

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA vs CPU comparison)"
)

# (B, seq_len, max units per sequence): awkward sizes, B = 1, seq_len = 63, tiny and large sequences.
SHAPES = [(1, 63, 5), (3, 17, 9), (5, 63, 40), (7, 1, 1), (2, 129, 129), (11, 5, 3), (1, 1, 0), (4, 200, 70)]


# ----------------------------------------------------------------------------------------------------
# Random layouts and plain-Python references
# ----------------------------------------------------------------------------------------------------


def random_layout(rng: random.Random, num_seqs: int, seq_len: int, max_units: int):
    """A valid layout: per sequence 0..max_units sorted, non-overlapping, non-empty units (some adjacent)."""
    ranges, counts = [], []
    for b in range(num_seqs):
        n = min(rng.choice([0, 1, 2, rng.randint(0, max_units), max_units]), seq_len)
        starts = sorted(rng.sample(range(seq_len), n))
        for i, s in enumerate(starts):
            limit = starts[i + 1] if i + 1 < n else seq_len
            e = rng.randint(s + 1, limit) if rng.random() < 0.7 else limit  # often adjacent to the next
            ranges.append((b * seq_len + s, b * seq_len + e))
        counts.append(n)
    cu = [0]
    for n in counts:
        cu.append(cu[-1] + n)
    return (
        torch.tensor(ranges, dtype=torch.int32).reshape(-1, 2),
        torch.tensor(cu, dtype=torch.int32),
    )


def layouts(seed: int = 0, repeats: int = 6):
    rng = random.Random(seed)
    for num_seqs, seq_len, max_units in SHAPES:
        for _ in range(repeats):
            ranges, cu = random_layout(rng, num_seqs, seq_len, max_units)
            yield ranges, cu, num_seqs, seq_len


def ref_token_to_unit(ranges: torch.Tensor, num_tokens: int) -> torch.Tensor:
    out = [-1] * num_tokens
    for u, (s, e) in enumerate(ranges.tolist()):
        for t in range(s, e):
            out[t] = u
    return torch.tensor(out, dtype=torch.int32)


def ref_unit_to_seq(cu: torch.Tensor) -> torch.Tensor:
    counts = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts)), counts).to(torch.int32)


def ref_first_error(ranges: list, cu: list, num_tokens: int, seq_len: int):
    """(what, index) of the first offending entry by the rule of validate_layout, or None."""
    num_units, num_seqs = len(ranges), len(cu) - 1
    if cu[0] != 0:
        return ("cu_first", 0)
    for i in range(1, num_seqs + 1):
        if cu[i] < cu[i - 1]:
            return ("cu_decreasing", i)
    if cu[-1] != num_units:
        return ("cu_last", num_seqs)
    for b in range(num_seqs):
        for u in range(cu[b], cu[b + 1]):
            s, e = ranges[u]
            if s >= e:
                return ("empty", u)
            if s < 0 or e > num_tokens:
                return ("bounds", u)
            if s < b * seq_len or e > (b + 1) * seq_len:
                return ("crosses", u)
            if u > cu[b] and s < ranges[u - 1][0]:
                return ("unsorted", u)
            if u > cu[b] and s < ranges[u - 1][1]:
                return ("overlaps", u)
    return None


UNIT_PHRASES = {
    "empty": "is empty or reversed",
    "bounds": "is out of bounds",
    "crosses": "is not inside its sequence",
    "unsorted": "is out of order",
    "overlaps": "overlaps unit",
}


def ref_work_list(cu: list, block_m: int) -> list:
    """The packing rule of block_diagonal_work_list, written independently in Python."""
    rows, pack = [], None  # pack = [row_start, row_end]
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e - s < 2:
            continue
        if e - s > block_m:
            if pack:
                rows.append((pack[0], pack[1], pack[0], pack[1]))
                pack = None
            rows += [(r, min(r + block_m, e), s, e) for r in range(s, e, block_m)]
        elif pack and e - pack[0] <= block_m:
            pack[1] = e
        else:
            if pack:
                rows.append((pack[0], pack[1], pack[0], pack[1]))
            pack = [s, e]
    if pack:
        rows.append((pack[0], pack[1], pack[0], pack[1]))
    return rows


# ----------------------------------------------------------------------------------------------------
# token_to_unit, unit_to_seq, offsets_from_lengths
# ----------------------------------------------------------------------------------------------------


def test_token_to_unit_matches_reference():
    for ranges, _cu, num_seqs, seq_len in layouts(seed=1):
        got = layout.token_to_unit(ranges, num_seqs * seq_len)
        assert got.dtype == torch.int32 and got.shape == (num_seqs * seq_len,)
        assert torch.equal(got, ref_token_to_unit(ranges, num_seqs * seq_len))


def test_token_to_unit_empty_and_errors():
    empty = torch.zeros(0, 2, dtype=torch.int32)
    assert torch.equal(layout.token_to_unit(empty, 7), torch.full((7,), -1, dtype=torch.int32))
    assert layout.token_to_unit(empty, 0).shape == (0,)
    with pytest.raises(ValueError, match=r"unit 1 \(tokens \[3, 9\)\) is out of bounds"):
        layout.token_to_unit(torch.tensor([[0, 2], [3, 9]], dtype=torch.int32), 8)
    with pytest.raises(TypeError, match="int32"):
        layout.token_to_unit(torch.tensor([[0, 2]], dtype=torch.int64), 8)
    with pytest.raises(ValueError, match=r"\[U, 2\]"):
        layout.token_to_unit(torch.tensor([0, 2], dtype=torch.int32), 8)


def test_unit_to_seq_matches_reference():
    for ranges, cu, _num_seqs, _seq_len in layouts(seed=2):
        expected = ref_unit_to_seq(cu)
        assert torch.equal(layout.unit_to_seq(cu), expected)
        assert torch.equal(layout.unit_to_seq(cu, num_units=ranges.shape[0]), expected)


def test_unit_to_seq_errors():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="num_units = 4 but cu_units"):
        layout.unit_to_seq(cu, num_units=4)
    with pytest.raises(ValueError, match="non-decreasing"):
        layout.unit_to_seq(torch.tensor([0, 3, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="start at 0"):
        layout.unit_to_seq(torch.tensor([1, 3], dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        layout.unit_to_seq(cu.long())
    assert layout.unit_to_seq(torch.zeros(1, dtype=torch.int32)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16])
def test_offsets_from_lengths_matches_cumsum(dtype):
    gen = torch.Generator().manual_seed(3)
    for num_seqs in [0, 1, 2, 17, 63, 1000, 2500]:
        lengths = torch.randint(0, 9, (num_seqs,), generator=gen) * (
            torch.rand(num_seqs, generator=gen) < 0.8
        )
        got = layout.offsets_from_lengths(lengths.to(dtype))
        expected = torch.cat([torch.zeros(1, dtype=torch.long), lengths.long().cumsum(0)]).to(torch.int32)
        assert got.dtype == torch.int32 and torch.equal(got, expected)


def test_offsets_from_lengths_errors():
    with pytest.raises(ValueError, match=r"lengths\[2\] = -1 is negative"):
        layout.offsets_from_lengths(torch.tensor([3, 0, -1, 4, -5]))
    with pytest.raises(ValueError, match="overflows the int32 offsets"):
        layout.offsets_from_lengths(torch.tensor([2**30, 2**30]))
    with pytest.raises(ValueError, match="overflows the int32 offsets"):
        layout.offsets_from_lengths(torch.tensor([2**62, 2**62, 2**62]))  # the int64 sum itself would wrap
    assert layout.offsets_from_lengths(torch.tensor([2**31 - 2, 1]))[-1].item() == 2**31 - 1
    with pytest.raises(TypeError, match="integer dtype"):
        layout.offsets_from_lengths(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="integer dtype"):
        layout.offsets_from_lengths(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="1-D"):
        layout.offsets_from_lengths(torch.ones(2, 2, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# block_diagonal_work_list
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_m", [1, 2, 3, 16, 17, 64])
def test_work_list_matches_rule_and_covers_every_pair_once(block_m):
    for _ranges, cu, _num_seqs, _seq_len in layouts(seed=4):
        work = layout.block_diagonal_work_list(cu, block_m)
        assert work.dtype == torch.int32 and work.dim() == 2 and work.shape[1] == 4
        rows = [tuple(r) for r in work.tolist()]
        assert rows == ref_work_list(cu.tolist(), block_m)
        # Properties the kernels rely on, checked without the rule itself.
        seq = ref_unit_to_seq(cu).tolist()
        covered = {}
        for r0, r1, c0, c1 in rows:
            assert 0 <= c0 <= r0 < r1 <= c1 and r1 - r0 <= block_m
            seqs_in_block = set(seq[c0:c1])
            if len(seqs_in_block) > 1:  # a packed block: whole sequences, within block_m
                assert (r0, r1) == (c0, c1) and c1 - c0 <= block_m
            for u in range(r0, r1):
                for v in range(c0, c1):
                    if u != v and seq[u] == seq[v]:
                        covered[(u, v)] = covered.get((u, v), 0) + 1
        cuts = cu.tolist()
        expected = {
            (u, v)
            for b in range(len(cuts) - 1)
            for u in range(cuts[b], cuts[b + 1])
            for v in range(cuts[b], cuts[b + 1])
            if u != v
        }
        assert set(covered) == expected and all(n == 1 for n in covered.values())


def test_work_list_examples():
    cu = torch.tensor([0, 3, 3, 4, 6, 15, 17], dtype=torch.int32)
    # seq 0 (3 units) and seq 3 (2 units) pack across the empty seq 1 and the 1-unit seq 2 (6 <= 8);
    # seq 4 (9 units > 8) gets two blocks of its own; seq 5 (2 units) starts a new pack.
    expected = [[0, 6, 0, 6], [6, 14, 6, 15], [14, 15, 6, 15], [15, 17, 15, 17]]
    assert layout.block_diagonal_work_list(cu, 8).tolist() == expected
    # Sequences of < 2 units contribute nothing.
    assert layout.block_diagonal_work_list(torch.tensor([0, 1, 1, 2], dtype=torch.int32), 4).shape == (0, 4)
    assert layout.block_diagonal_work_list(torch.zeros(1, dtype=torch.int32), 4).shape == (0, 4)


def test_work_list_errors():
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="block_m must be >= 1"):
        layout.block_diagonal_work_list(cu, 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        layout.block_diagonal_work_list(torch.tensor([0, 4, 2], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="start at 0"):
        layout.block_diagonal_work_list(torch.tensor([2, 4], dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="int32"):
        layout.block_diagonal_work_list(cu.long(), 4)


# ----------------------------------------------------------------------------------------------------
# validate_layout
# ----------------------------------------------------------------------------------------------------


def test_validate_accepts_valid_layouts():
    for ranges, cu, num_seqs, seq_len in layouts(seed=5):
        assert layout.validate_layout(ranges, cu, num_seqs * seq_len, seq_len) is None
    # Non-contiguous inputs are fine too.
    ranges, cu = random_layout(random.Random(0), 3, 17, 5)
    layout.validate_layout(ranges.t().contiguous().t(), cu, 51, 17)


def unit_pattern(u: int, b: int, s: int, e: int) -> str:
    return re.escape(f"unit {u} (sequence {b}, tokens [{s}, {e}))")


@pytest.mark.parametrize(
    "ranges, cu, seq_len, kind, unit",
    [
        # unsorted: unit 2 starts before unit 1 of the same sequence
        ([[0, 2], [5, 7], [3, 4]], [0, 3], 10, "unsorted", 2),
        # overlapping
        ([[0, 4], [3, 6]], [0, 2], 10, "overlaps", 1),
        # empty and reversed units
        ([[0, 2], [4, 4]], [0, 2], 10, "empty", 1),
        ([[5, 3]], [0, 1], 10, "empty", 0),
        # out of bounds (negative start; end past num_tokens)
        ([[-1, 2]], [0, 1], 10, "bounds", 0),
        ([[0, 2], [12, 21]], [0, 1, 2], 10, "bounds", 1),
        # crossing a sequence boundary (sequence 0 owns [0, 10))
        ([[8, 12]], [0, 1, 1], 10, "crosses", 0),
        # a unit of sequence 1 that lies in sequence 0's tokens
        ([[0, 2], [3, 5]], [0, 1, 2], 10, "crosses", 1),
        # the first of several errors is reported
        ([[0, 2], [1, 5], [7, 6]], [0, 3], 10, "overlaps", 1),
    ],
)
def test_validate_names_the_offending_unit(ranges, cu, seq_len, kind, unit):
    r = torch.tensor(ranges, dtype=torch.int32)
    c = torch.tensor(cu, dtype=torch.int32)
    num_seqs = len(cu) - 1
    seq = ref_unit_to_seq(c)[unit].item()
    s, e = ranges[unit]
    with pytest.raises(ValueError, match=unit_pattern(unit, seq, s, e) + " " + re.escape(UNIT_PHRASES[kind])):
        layout.validate_layout(r, c, num_seqs * seq_len, seq_len)


@pytest.mark.parametrize(
    "cu, message",
    [
        ([1, 2], r"cu_units\[0\] = 1, but cu_units must start at 0"),
        ([0, 2, 1], r"cu_units\[2\] = 1 < cu_units\[1\] = 2"),
        ([0, 1, 1], r"cu_units\[-1\] = cu_units\[2\] = 1, but ranges has U = 2 units"),
        ([0, 3, 3], r"cu_units\[-1\] = cu_units\[2\] = 3, but ranges has U = 2 units"),
    ],
)
def test_validate_cu_units_errors(cu, message):
    ranges = torch.tensor([[0, 2], [3, 5]], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        layout.validate_layout(ranges, torch.tensor(cu, dtype=torch.int32), (len(cu) - 1) * 10, 10)


def test_validate_metadata_errors():
    ranges = torch.tensor([[0, 2], [3, 5]], dtype=torch.int32)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"num_tokens = 11 must equal B \* seq_len = 1 \* 10 = 10"):
        layout.validate_layout(ranges, cu, 11, 10)
    with pytest.raises(TypeError, match="ranges must be int32, got Long"):
        layout.validate_layout(ranges.long(), cu, 10, 10)
    with pytest.raises(TypeError, match="cu_units must be int32, got Long"):
        layout.validate_layout(ranges, cu.long(), 10, 10)
    with pytest.raises(TypeError, match="ranges must be int32"):
        layout.validate_layout(ranges.float(), cu, 10, 10)
    with pytest.raises(ValueError, match=r"ranges must be \[U, 2\]"):
        layout.validate_layout(ranges.reshape(-1), cu, 10, 10)
    with pytest.raises(ValueError, match=r"cu_units must be 1-D \[B\+1\]"):
        layout.validate_layout(ranges, torch.zeros(0, dtype=torch.int32), 0, 10)
    with pytest.raises(ValueError, match="seq_len must be >= 0"):
        layout.validate_layout(ranges, cu, -10, -10)
    # U = 0, B = 0 and B sequences without units are valid.
    empty = torch.zeros(0, 2, dtype=torch.int32)
    layout.validate_layout(empty, torch.zeros(1, dtype=torch.int32), 0, 7)
    layout.validate_layout(empty, torch.zeros(4, dtype=torch.int32), 3 * 63, 63)


def corrupt(rng: random.Random, ranges: list, cu: list, seq_len: int):
    """A copy of the layout with one random corruption (ranges or cu_units)."""
    ranges, cu = [list(r) for r in ranges], list(cu)
    num_tokens = (len(cu) - 1) * seq_len
    choice = rng.randrange(8)
    if ranges and choice < 6:
        u = rng.randrange(len(ranges))
        s, e = ranges[u]
        ranges[u] = [
            [e, s],  # reversed or empty
            [s, s],  # empty
            [s - rng.randint(1, 2 * seq_len), e],  # earlier: overlap / unsorted / crosses / out of bounds
            [s, e + rng.randint(1, 2 * seq_len)],  # later end: overlap with the next / crosses / bounds
            [rng.randint(-3, num_tokens + 3), rng.randint(-3, num_tokens + 3)],  # anything
            [s, e] if u == 0 else list(ranges[u - 1]),  # a duplicate of the previous unit
        ][choice]
    else:
        i = rng.randrange(len(cu))
        cu[i] += rng.choice([-2, -1, 1, 2])
    return ranges, cu


def test_validate_first_error_matches_reference_on_random_corruptions():
    rng = random.Random(6)
    checked = 0
    for ranges, cu, num_seqs, seq_len in layouts(seed=7, repeats=10):
        for _ in range(4):
            bad_ranges, bad_cu = corrupt(rng, ranges.tolist(), cu.tolist(), seq_len)
            expected = ref_first_error(bad_ranges, bad_cu, num_seqs * seq_len, seq_len)
            r = torch.tensor(bad_ranges, dtype=torch.int32).reshape(-1, 2)
            c = torch.tensor(bad_cu, dtype=torch.int32)
            if expected is None:
                layout.validate_layout(r, c, num_seqs * seq_len, seq_len)
                continue
            kind, index = expected
            with pytest.raises(ValueError) as info:
                layout.validate_layout(r, c, num_seqs * seq_len, seq_len)
            msg = str(info.value)
            if kind.startswith("cu_"):
                assert f"cu_units[{index}]" in msg or f"cu_units[-1] = cu_units[{index}]" in msg, msg
            else:
                seq = ref_unit_to_seq(c)[index].item()
                s, e = bad_ranges[index]
                assert (
                    f"unit {index} (sequence {seq}, tokens [{s}, {e}))" in msg and UNIT_PHRASES[kind] in msg
                ), msg
            checked += 1
    assert checked > 200


# ----------------------------------------------------------------------------------------------------
# char_spans_to_token_ranges
# ----------------------------------------------------------------------------------------------------

SPACES = [" ", "  ", "\t", "\n", "\r\n", "\v", "\f", "\xa0", "\u3000", "\u2009", "\x1c", "\x85", "\u202f"]
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "猫",
    "が",
    "座った",
    "😀",
    "🇯🇵",
    "naïve",
    "x",
    ",",
    "!",
    "über",
    "é",
]


def ref_char_spans(texts, offsets, spans) -> list:
    """docs/method.md#mapping-units-to-tokens, literally."""
    out = []
    for b, (text, sp) in enumerate(zip(texts, spans)):
        res = [[-1, -1] for _ in sp]
        for t, (ts, te) in enumerate(offsets[b].tolist()):
            while ts < te and text[ts].isspace():
                ts += 1
            if ts >= te:
                continue
            for k, (s, e) in enumerate(sp):
                if s <= ts < e:
                    res[k][0] = t if res[k][0] < 0 else res[k][0]
                    res[k][1] = t + 1
                    break
        out += res
    return out


def random_text_and_tokens(rng: random.Random, seq_len: int):
    """A text of words and whitespace runs, its word spans, and BPE-like token offsets padded to seq_len."""
    pieces, spans, pos = [], [], 0
    for _ in range(rng.randint(0, 25)):
        if rng.random() < 0.6 or not pieces:
            space = rng.choice(SPACES) * rng.choice([1, 1, 2, 3])
            pieces.append(space)
            pos += len(space)
        word = rng.choice(WORDS)
        spans.append((pos, pos + len(word)))
        pieces.append(word)
        pos += len(word)
    text = "".join(pieces)
    # Tokens: random cuts of the text (leading spaces glued to words, as in byte-level BPE), some
    # pure-whitespace tokens, repeated offsets (several byte tokens of one character), special tokens.
    cuts = sorted(
        set([0, len(text)] + rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 30))))
    )
    tokens = [(0, 0)]  # BOS-like special token
    for a, z in zip(cuts, cuts[1:]):
        tokens.append((a, z))
        if rng.random() < 0.1:
            tokens.append((a, z))  # byte fallback: same character range twice
    tokens.append((0, 0))  # EOS-like special token
    tokens = tokens[:seq_len]  # truncation: later units get no token
    tokens += [(0, 0)] * (seq_len - len(tokens))  # padding
    # Units are a random subset of the words.
    spans = [s for s in spans if rng.random() < 0.8]
    return text, tokens, spans


@pytest.mark.parametrize("seq_len", [1, 17, 63])
def test_char_spans_match_reference(seq_len):
    rng = random.Random(seq_len)
    for num_seqs in [1, 2, 5, 9]:
        for _ in range(8):
            batch = [random_text_and_tokens(rng, seq_len) for _ in range(num_seqs)]
            texts = [t for t, _, _ in batch]
            offsets = torch.tensor([tok for _, tok, _ in batch], dtype=torch.int64).reshape(
                num_seqs, seq_len, 2
            )
            spans = [s for _, _, s in batch]
            got = layout.char_spans_to_token_ranges(texts, offsets, spans)
            assert got.dtype == torch.int64 and got.shape == (sum(map(len, spans)), 2)
            assert got.tolist() == ref_char_spans(texts, offsets, spans)
            # Spans given as per-text arrays (the fast path of the wrapper) give the same result.
            as_arrays = [np.array(s, dtype=np.int64).reshape(-1, 2) for s in spans]
            assert torch.equal(layout.char_spans_to_token_ranges(texts, offsets, as_arrays), got)


def test_char_spans_whitespace_set_is_python_isspace():
    # One token and one span per code point (lone surrogates included): a span receives its token
    # exactly when the character is not whitespace in Python's sense.
    text = "".join(map(chr, range(0x110000)))
    n = len(text)
    offsets = torch.arange(n, dtype=torch.int64).repeat_interleave(2).view(1, n, 2)
    offsets[0, :, 1] += 1
    spans = [[(i, i + 1) for i in range(n)]]
    got = layout.char_spans_to_token_ranges([text], offsets, spans)
    spaces = torch.tensor([c.isspace() for c in text])
    assert int(spaces.sum()) == 29  # Python's str.isspace set, see docs/design/layout.md
    assert torch.equal(got[spaces], torch.full((29, 2), -1, dtype=torch.int64))
    assert torch.equal(got[~spaces, 0], torch.arange(n)[~spaces]) and torch.equal(
        got[~spaces, 1] - 1, got[~spaces, 0]
    )


def test_char_spans_examples():
    texts = ["  Hello\u3000 world\t\n!", "猫が😀 座った", ""]
    offsets = torch.tensor(
        [
            [[0, 0], [0, 7], [7, 9], [9, 14], [14, 16], [16, 17], [0, 0]],
            [[0, 0], [0, 1], [1, 2], [2, 3], [2, 3], [3, 5], [5, 7]],  # 😀 as two byte tokens
            [[0, 0]] * 7,
        ]
    )
    spans = [[(2, 7), (9, 14), (16, 17)], [(0, 1), (2, 3), (4, 7)], []]
    got = layout.char_spans_to_token_ranges(texts, offsets, spans)
    # "  Hello" -> token 1; "\u3000 " is whitespace only; "world" token 3; "\t\n" whitespace; "!" token 5.
    # "猫" token 1; "😀" tokens 3-4; "座った" starts at 4: token 5 covers " 座" (skips the space), token 6.
    assert got.tolist() == [[1, 2], [3, 4], [5, 6], [1, 2], [3, 5], [5, 7]]
    # A unit after the truncation point gets no token.
    got = layout.char_spans_to_token_ranges(texts[:1], offsets[:1, :3], spans[:1])
    assert got.tolist() == [[1, 2], [-1, -1], [-1, -1]]


def test_char_spans_with_a_real_fast_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    corpus = [
        "The cat sat on the mat.",
        "Das Kätzchen schläft.",
        "猫が座った。",
        "emoji 😀 and\ttabs\n\nnewlines",
    ]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 5, trainer)
    texts = ["The  cat\u00a0sat on\tthe mat.", "猫が 座った 😀😀", "newlines\n\n and tabs\t\tend"]
    encodings = [tok.encode(t) for t in texts]
    seq_len = max(len(e.offsets) for e in encodings) + 2
    offsets = torch.zeros(len(texts), seq_len, 2, dtype=torch.int64)
    for b, e in enumerate(encodings):
        offsets[b, 1 : 1 + len(e.offsets)] = torch.tensor(e.offsets)  # token 0 plays a special token
    spans = [
        [(m.start(), m.end()) for m in re.finditer(r"\S+", t)] for t in texts
    ]  # whitespace-delimited words as units
    got = layout.char_spans_to_token_ranges(texts, offsets, spans)
    assert got.tolist() == ref_char_spans(texts, offsets, spans)
    assert (got[:, 0] >= 1).all()  # every word got a token here


def test_char_spans_errors():
    offsets = torch.tensor([[[0, 3], [3, 5]]])
    with pytest.raises(ValueError, match=r"token 1 of sequence 0 has offsets \[3, 9\)"):
        layout.char_spans_to_token_ranges(["hello"], torch.tensor([[[0, 3], [3, 9]]]), [[(0, 5)]])
    with pytest.raises(ValueError, match="sorted and non-overlapping"):
        layout.char_spans_to_token_ranges(["hello"], offsets, [[(2, 4), (0, 1)]])
    with pytest.raises(ValueError, match="outside its text"):
        layout.char_spans_to_token_ranges(["hello"], offsets, [[(2, 7)]])
    with pytest.raises(ValueError, match="B entries each"):
        layout.char_spans_to_token_ranges(["hello", "x"], offsets, [[(0, 5)]])
    with pytest.raises(ValueError, match=r"\[B, T, 2\]"):
        layout.char_spans_to_token_ranges(["hello"], offsets[0], [[(0, 5)]])
    with pytest.raises(TypeError, match="integer"):
        layout.char_spans_to_token_ranges(["hello"], offsets.float(), [[(0, 5)]])
    # The op itself checks dtypes and the CSR arrays.
    op = torch.ops.mta_kernels.char_spans_to_token_ranges
    cp = torch.tensor([104, 105], dtype=torch.int32)
    cu2 = torch.tensor([0, 2])
    sp = torch.tensor([[0, 2]])
    with pytest.raises(TypeError, match="codepoints must be int32"):
        op(cp.long(), cu2, offsets, sp, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="spans must be int64"):
        op(cp, cu2, offsets, sp.int(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"cu_spans\[-1\] = 2, but there are 1 spans"):
        op(cp, cu2, offsets, sp, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"cu_chars\[-1\] = 3, but there are 2 code points"):
        op(cp, torch.tensor([0, 3]), offsets, sp, torch.tensor([0, 1]))


# ----------------------------------------------------------------------------------------------------
# torch.compile (fake implementations) and opcheck
# ----------------------------------------------------------------------------------------------------


def test_ops_trace_under_torch_compile():
    ranges, cu = random_layout(random.Random(8), 3, 17, 5)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(r, c):
        return layout.token_to_unit(r, 51).long().sum() + layout.unit_to_seq(c, r.shape[0]).long().sum()

    expected = ref_token_to_unit(ranges, 51).long().sum() + ref_unit_to_seq(cu).long().sum()
    assert f(ranges, cu).item() == expected.item()


def test_validate_layout_is_not_dropped_by_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(r, c):
        layout.validate_layout(r, c, 10, 10)
        return r.sum()

    cu = torch.tensor([0, 2], dtype=torch.int32)
    assert f(torch.tensor([[0, 2], [3, 5]], dtype=torch.int32), cu).item() == 10
    with pytest.raises(ValueError, match=unit_pattern(1, 0, 1, 5) + " overlaps unit 0"):
        f(torch.tensor([[0, 2], [1, 5]], dtype=torch.int32), cu)


def test_opcheck():
    ranges, cu = random_layout(random.Random(9), 4, 63, 9)
    ops = torch.ops.mta_kernels
    torch.library.opcheck(ops.token_to_unit.default, (ranges, 4 * 63))
    torch.library.opcheck(ops.unit_to_seq.default, (cu, ranges.shape[0]))
    torch.library.opcheck(ops.offsets_from_lengths.default, (torch.tensor([3, 0, 5]),))
    torch.library.opcheck(ops.validate_layout.default, (ranges, cu, 4 * 63, 63))


# ----------------------------------------------------------------------------------------------------
# CUDA vs CPU, bitwise
# ----------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("op", ["token_to_unit", "unit_to_seq", "work_list", "validate"])
def test_cuda_matches_cpu(op):
    for ranges, cu, num_seqs, seq_len in layouts(seed=10):
        n = num_seqs * seq_len
        rc, cc = ranges.cuda(), cu.cuda()
        if op == "token_to_unit":
            assert torch.equal(layout.token_to_unit(rc, n).cpu(), layout.token_to_unit(ranges, n))
        elif op == "unit_to_seq":
            assert torch.equal(layout.unit_to_seq(cc).cpu(), layout.unit_to_seq(cu))
            assert torch.equal(layout.unit_to_seq(cc, ranges.shape[0]).cpu(), layout.unit_to_seq(cu))
        elif op == "work_list":
            for block_m in [1, 3, 16, 64]:
                got = layout.block_diagonal_work_list(cc, block_m)
                assert got.is_cuda and torch.equal(got.cpu(), layout.block_diagonal_work_list(cu, block_m))
        else:
            layout.validate_layout(rc, cc, n, seq_len)


@needs_cuda
def test_cuda_offsets_from_lengths_matches_cpu():
    gen = torch.Generator().manual_seed(11)
    for num_seqs in [0, 1, 63, 1023, 1024, 1025, 5000]:
        lengths = torch.randint(0, 50, (num_seqs,), generator=gen)
        for dtype in [torch.int32, torch.int64]:
            cpu = layout.offsets_from_lengths(lengths.to(dtype))
            assert torch.equal(layout.offsets_from_lengths(lengths.to(dtype).cuda()).cpu(), cpu)
    for bad in [[3, 0, -1, 4, -5], [2**30, 2**30], [2**62, 2**62, 2**62], [1] * 3000 + [-2]]:
        with pytest.raises(ValueError) as cpu_err:
            layout.offsets_from_lengths(torch.tensor(bad))
        with pytest.raises(ValueError) as cuda_err:
            layout.offsets_from_lengths(torch.tensor(bad).cuda())
        assert str(cuda_err.value) == str(cpu_err.value)


@needs_cuda
def test_cuda_validate_errors_match_cpu():
    rng = random.Random(12)
    for ranges, cu, num_seqs, seq_len in layouts(seed=13, repeats=6):
        for _ in range(4):
            bad_ranges, bad_cu = corrupt(rng, ranges.tolist(), cu.tolist(), seq_len)
            r = torch.tensor(bad_ranges, dtype=torch.int32).reshape(-1, 2)
            c = torch.tensor(bad_cu, dtype=torch.int32)
            messages = []
            for device in ["cpu", "cuda"]:
                try:
                    layout.validate_layout(r.to(device), c.to(device), num_seqs * seq_len, seq_len)
                    messages.append(None)
                except ValueError as exc:
                    messages.append(str(exc))
            assert messages[0] == messages[1]


@needs_cuda
def test_cuda_device_mismatch():
    ranges = torch.tensor([[0, 2]], dtype=torch.int32)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="same device"):
        layout.validate_layout(ranges.cuda(), cu, 10, 10)
    with pytest.raises(ValueError, match="same device"):
        layout.validate_layout(ranges, cu.cuda(), 10, 10)


# ------------------------------------------------------------------------------------------ the plan
def _planned_batch():
    from mta_kernels.layout import UnitBatch

    sr = torch.tensor([[0, 2], [3, 5], [12, 13], [14, 18]], dtype=torch.int32)
    tr = torch.tensor([[1, 2], [4, 6], [13, 15], [16, 17]], dtype=torch.int32)
    cu = torch.tensor([0, 2, 2, 4], dtype=torch.int32)
    return UnitBatch(sr, tr, cu, 6, 6), sr, tr, cu


def test_plan_matches_the_ops():
    units, sr, tr, cu = _planned_batch()
    plan = units.plan
    assert plan is not None and units.plan_error is None
    assert plan.bounds == (0, 2, 2, 4) and plan.num_units == 4 and not plan.same_tokenization
    for side, ranges in ((plan.student, sr), (plan.teacher, tr)):
        assert torch.equal(side.ranges, ranges) and side.num_tokens == 18 and side.seq_len == 6
        t2u = torch.ops.mta_kernels.token_to_unit(ranges, 18)
        assert torch.equal(side.token_to_unit, t2u)
        assert torch.equal(side.covered_tokens.long(), torch.nonzero(t2u >= 0).reshape(-1))
        assert side.num_covered == int((t2u >= 0).sum())
        assert side.max_span == int((ranges[:, 1] - ranges[:, 0]).max())
    assert torch.equal(plan.unit_to_seq, torch.ops.mta_kernels.unit_to_seq(cu, 4))
    for bm in layout.WORK_LIST_BLOCKS:
        assert torch.equal(plan.work_lists[bm], torch.ops.mta_kernels.block_diagonal_work_list(cu, bm))
    assert plan.is_current() and plan.student.is_current()
    # every tensor of the plan is a view of one buffer: one copy moves it
    assert all(
        t.untyped_storage().data_ptr() == plan.buffer.untyped_storage().data_ptr()
        for t in (units.student_ranges, units.teacher_ranges, units.cu_units, plan.unit_to_seq)
    )


def test_plan_shares_one_tokenization_and_survives_to_and_pickle():
    import pickle

    from mta_kernels.layout import UnitBatch

    sr = torch.tensor([[0, 2], [4, 5]], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    for teacher in (sr, sr.clone()):  # the same tensor, or equal values: shared either way
        units = UnitBatch(sr, teacher, cu, 3, 3)
        assert units.teacher_ranges is units.student_ranges and units.plan.same_tokenization
        moved = units.to("cpu")
        assert moved.teacher_ranges is moved.student_ranges and moved.live_plan() is not None
        back = pickle.loads(pickle.dumps(units))  # a DataLoader worker hands batches over by pickling
        assert back.live_plan() is back.plan and back.cu_units is back.plan.cu_units
        assert back.teacher_ranges is back.student_ranges is back.plan.student.ranges
        storage = back.plan.buffer.untyped_storage().data_ptr()  # the views share the buffer again
        assert all(t.untyped_storage().data_ptr() == storage for t in (back.cu_units, back.plan.unit_to_seq))
    assert UnitBatch(sr, sr, cu, 3, 4).plan.same_tokenization is False  # different T


def test_invalid_layout_keeps_the_error_and_in_place_edits_drop_the_plan():
    import pickle

    from mta_kernels.layout import LayoutSideError, UnitBatch

    sr = torch.tensor([[0, 2], [1, 5]], dtype=torch.int32)
    units = UnitBatch(sr, sr, torch.tensor([0, 2], dtype=torch.int32), 6, 6)
    assert units.plan is None and isinstance(units.plan_error, LayoutSideError)
    assert units.plan_error.side == "student" and "overlaps unit 0" in str(units.plan_error)
    good, *_ = _planned_batch()
    assert good.live_plan() is not None
    good.student_ranges[0, 1] = 3  # modified after planning: no longer trusted
    assert good.live_plan() is None and not good.plan.is_current() and not good.plan.teacher.is_current()
    back = pickle.loads(pickle.dumps(good))  # still not trusted once unpickled
    assert back.live_plan() is None and not back.plan.is_current()
    assert torch.equal(back.student_ranges, good.student_ranges)
