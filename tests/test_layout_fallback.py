"""The pure-torch layout ops (``mta_kernels._layout_fallback``) against the compiled extension.

Both run on the same random layouts, valid and corrupted, and on bad metadata: the results must be equal
(values, dtype, shape) and the failures the same exception type with the same message. Then every test
of tests/test_layout.py runs again with the fallback in place of the extension.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mta_kernels import _extension, layout
from mta_kernels import _layout_fallback as fallback
from tests import test_layout as base


@pytest.fixture(scope="module")
def compiled():
    """The compiled ops (mta_kernels_C), loaded as the package would load them."""
    state = _extension.load()
    if state.kind == "torch":
        pytest.skip(f"no compiled extension to compare with ({'; '.join(state.notes)})")
    return _extension._compiled_ops()


def outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except (TypeError, ValueError, RuntimeError) as exc:
        return type(exc), str(exc)


def assert_same(compiled, name: str, *args) -> str:
    """The compiled op and the fallback agree on ``args``; returns "ok" or the error message."""
    want = outcome(getattr(compiled, name), *args)
    got = outcome(getattr(fallback, name), *args)
    if want[0] == "ok":
        assert got[0] == "ok", f"{name}: the extension returned, the fallback raised {got}"
        if want[1] is None:
            assert got[1] is None
            return "ok"
        assert got[1].dtype == want[1].dtype and got[1].shape == want[1].shape, (name, got[1], want[1])
        assert torch.equal(got[1], want[1]), (name, got[1], want[1])
        return "ok"
    assert got == want, f"{name}{tuple(a.tolist() if torch.is_tensor(a) else a for a in args)}"
    return want[1]


# ------------------------------------------------------------------------------------ validate_layout
def test_validate_layout_same_verdict_on_random_corruptions(compiled):
    rng = random.Random(21)
    errors = set()
    for ranges, cu, num_seqs, seq_len in base.layouts(seed=22, repeats=8):
        assert assert_same(compiled, "validate_layout", ranges, cu, num_seqs * seq_len, seq_len) == "ok"
        for _ in range(6):
            bad_ranges, bad_cu = base.corrupt(rng, ranges.tolist(), cu.tolist(), seq_len)
            r = torch.tensor(bad_ranges, dtype=torch.int32).reshape(-1, 2)
            c = torch.tensor(bad_cu, dtype=torch.int32)
            message = assert_same(compiled, "validate_layout", r, c, num_seqs * seq_len, seq_len)
            errors.add(message.split(")")[-1][:30] if message != "ok" else "ok")
    assert len(errors) >= 6, errors  # valid layouts and every kind of error were seen


def test_validate_layout_same_metadata_errors(compiled):
    ranges = torch.tensor([[0, 2], [3, 5]], dtype=torch.int32)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    cases = [
        (ranges, cu, 11, 10),
        (ranges, cu, -10, -10),
        (ranges.reshape(-1), cu, 10, 10),
        (ranges.reshape(1, 4), cu, 10, 10),
        (ranges, torch.zeros(0, dtype=torch.int32), 0, 10),
        (ranges, cu.reshape(1, 2), 10, 10),
        (ranges, torch.tensor([0, 2, 2], dtype=torch.int32)[:, None], 20, 10),
        (torch.zeros(0, 2, dtype=torch.int32), torch.zeros(2**20 + 1, dtype=torch.int32), 2**31, 2**11),
        (torch.zeros(0, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 0, 7),
    ]
    for dtype in [torch.int64, torch.int16, torch.uint8, torch.float32, torch.bfloat16, torch.bool]:
        cases += [(ranges.to(dtype), cu, 10, 10), (ranges, cu.to(dtype), 10, 10)]
    for args in cases:
        assert_same(compiled, "validate_layout", *args)


# --------------------------------------------------------------------------- token_to_unit, unit_to_seq
def test_token_to_unit_same(compiled):
    for ranges, _cu, num_seqs, seq_len in base.layouts(seed=23):
        assert assert_same(compiled, "token_to_unit", ranges, num_seqs * seq_len) == "ok"
    overlapping = torch.tensor([[0, 5], [2, 4], [3, 9], [7, 8]], dtype=torch.int32)  # invalid: last wins
    reversed_units = torch.tensor([[4, 2], [5, 6]], dtype=torch.int32)
    for args in [
        (overlapping, 10),
        (reversed_units, 8),
        (torch.tensor([[0, 2], [3, 9]], dtype=torch.int32), 8),
        (torch.tensor([[-1, 2]], dtype=torch.int32), 8),
        (torch.tensor([[0, 2]], dtype=torch.int64), 8),
        (torch.tensor([0, 2], dtype=torch.int32), 8),
        (torch.zeros(0, 2, dtype=torch.int32), 0),
        (torch.zeros(0, 2, dtype=torch.int32), -1),
        (torch.zeros(0, 2, dtype=torch.int32), 2**31),
    ]:
        assert_same(compiled, "token_to_unit", *args)


def test_unit_to_seq_same(compiled):
    for ranges, cu, _num_seqs, _seq_len in base.layouts(seed=24):
        assert assert_same(compiled, "unit_to_seq", cu, None) == "ok"
        assert assert_same(compiled, "unit_to_seq", cu, ranges.shape[0]) == "ok"
        assert assert_same(compiled, "unit_to_seq", cu, ranges.shape[0] + 1) != "ok"
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    for args in [
        (i32([0, 3, 2]), None),
        (i32([0, 3, 5, 4, 1]), 1),
        (i32([1, 3]), None),
        (i32([0, 2, 5]).long(), None),
        (i32([0, 2, 5]).reshape(1, 3), None),
        (i32([]), None),
        (i32([0]), None),
        (i32([0]), 0),
    ]:
        assert_same(compiled, "unit_to_seq", *args)


# ------------------------------------------------------------------------------ offsets_from_lengths
def test_offsets_from_lengths_same(compiled):
    gen = torch.Generator().manual_seed(25)
    for num_seqs in [0, 1, 2, 17, 1000]:
        lengths = torch.randint(-1, 9, (num_seqs,), generator=gen)
        for dtype in [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]:
            assert_same(compiled, "offsets_from_lengths", lengths.to(dtype))
            assert_same(compiled, "offsets_from_lengths", lengths.clamp(min=0).to(dtype))
    for bad in [
        torch.tensor([3, 0, -1, 4, -5]),
        torch.tensor([2**30, 2**30]),
        torch.tensor([2**62, 2**62, 2**62]),
        torch.tensor([2**31 - 2, 1]),
        torch.tensor([1.0, 2.0]),
        torch.tensor([True, False]),
        torch.ones(2, 2, dtype=torch.long),
        torch.tensor(3),
    ]:
        assert_same(compiled, "offsets_from_lengths", bad)


# ---------------------------------------------------------------------------- block_diagonal_work_list
def test_work_list_same(compiled):
    for _ranges, cu, _num_seqs, _seq_len in base.layouts(seed=26):
        for block_m in [1, 2, 3, 16, 17, 64]:
            assert assert_same(compiled, "block_diagonal_work_list", cu, block_m) == "ok"
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    for args in [
        (i32([0, 2, 4]), 0),
        (i32([0, 4, 2]), 4),
        (i32([2, 4]), 4),
        (i32([0, 2, 4]).long(), 4),
        (i32([]), 4),
        (i32([0]), 4),
        (i32([0, 3, 3, 4, 6, 15, 17]), 8),
    ]:
        assert_same(compiled, "block_diagonal_work_list", *args)


# -------------------------------------------------------------------------- char_spans_to_token_ranges
def op_inputs(texts, offsets, spans):
    """The tensors layout.char_spans_to_token_ranges gives the op."""
    encoded = "".join(texts).encode("utf-32-le", "surrogatepass")
    codepoints = torch.from_numpy(np.frombuffer(encoded, dtype=np.int32).copy())
    cu_chars = torch.from_numpy(np.cumsum([0, *map(len, texts)], dtype=np.int64))
    cu_spans = torch.from_numpy(np.cumsum([0, *map(len, spans)], dtype=np.int64))
    flat = torch.tensor([x for s in spans for pair in s for x in pair], dtype=torch.int64).reshape(-1, 2)
    return [codepoints, cu_chars, offsets.to(torch.int64), flat, cu_spans]


def test_char_spans_same_on_random_texts(compiled):
    rng = random.Random(27)
    errors = set()
    for seq_len in [1, 17, 63]:
        for num_seqs in [1, 2, 5]:
            for _ in range(6):
                batch = [base.random_text_and_tokens(rng, seq_len) for _ in range(num_seqs)]
                texts = [t for t, _, _ in batch]
                offsets = torch.tensor([tok for _, tok, _ in batch], dtype=torch.int64).reshape(
                    num_seqs, seq_len, 2
                )
                args = op_inputs(texts, offsets, [s for _, _, s in batch])
                assert assert_same(compiled, "char_spans_to_token_ranges", *args) == "ok"
                # One corruption of the token offsets, the spans or a CSR array.
                bad = [a.clone() for a in args]
                which = rng.randrange(5)
                if which == 0 and bad[2].numel():
                    bad[2].view(-1)[rng.randrange(bad[2].numel())] += rng.choice([-3, 5, 50])
                elif which == 1 and bad[3].numel():
                    bad[3].view(-1)[rng.randrange(bad[3].numel())] += rng.choice([-4, -1, 2, 40])
                elif which == 2:
                    bad[1][rng.randrange(bad[1].numel())] += rng.choice([-1, 1])
                elif which == 3:
                    bad[4][rng.randrange(bad[4].numel())] += rng.choice([-1, 1])
                else:
                    bad[3] = bad[3].flip(0)
                message = assert_same(compiled, "char_spans_to_token_ranges", *bad)
                errors.add(message.split(":")[1][:25] if message != "ok" else "ok")
    assert len(errors) >= 5, errors


def test_char_spans_same_on_every_code_point(compiled):
    text = "".join(map(chr, range(0x110000)))
    n = len(text)
    offsets = torch.arange(n, dtype=torch.int64).repeat_interleave(2).view(1, n, 2)
    offsets[0, :, 1] += 1
    args = op_inputs([text], offsets, [[(i, i + 1) for i in range(0, n, 7)]])
    assert assert_same(compiled, "char_spans_to_token_ranges", *args) == "ok"


def test_char_spans_same_metadata_errors(compiled):
    cp = torch.tensor([104, 105], dtype=torch.int32)
    cu2 = torch.tensor([0, 2])
    off = torch.tensor([[[0, 1], [1, 2]]])
    sp = torch.tensor([[0, 2]])
    cs = torch.tensor([0, 1])
    cases = [
        (cp.long(), cu2, off, sp, cs),
        (cp, cu2.int(), off, sp, cs),
        (cp, cu2, off.int(), sp, cs),
        (cp, cu2, off, sp.int(), cs),
        (cp, cu2, off, sp, cs.int()),
        (cp[None], cu2, off, sp, cs),
        (cp, cu2, off[0], sp, cs),
        (cp, cu2, off.reshape(1, 1, 4), sp, cs),
        (cp, torch.tensor([0, 1, 2]), off, sp, cs),
        (cp, cu2, off, sp, torch.tensor([0, 1, 1])),
        (cp, cu2, off, sp.reshape(-1), cs),
        (cp, torch.tensor([1, 2]), off, sp, cs),
        (cp, torch.tensor([0, 3]), off, sp, cs),
        (cp, cu2, off, sp, torch.tensor([0, 2])),
        (cp, cu2, off, torch.tensor([[1, 0]]), cs),
        (cp, cu2, torch.tensor([[[0, 1], [1, 3]]]), sp, cs),
        (cp, cu2, torch.tensor([[[0, 0], [-2, 1]]]), sp, cs),
        (cp, cu2, torch.zeros(1, 0, 2, dtype=torch.int64), sp, cs),
        (cp, cu2, off, torch.zeros(0, 2, dtype=torch.int64), torch.tensor([0, 0])),
    ]
    for args in cases:
        assert_same(compiled, "char_spans_to_token_ranges", *args)


# ---------------------------------------------------------------------------------- the CUDA semantics
def test_the_cuda_paths_give_the_cpu_results_on_valid_layouts():
    """The fallback's CUDA variants (no checks, no host sync: as csrc/cuda/segments.cu), run on CPU."""
    for ranges, cu, num_seqs, seq_len in base.layouts(seed=28):
        n = num_seqs * seq_len
        assert torch.equal(
            fallback._token_to_unit_clamped(ranges.long(), n), fallback.token_to_unit(ranges, n)
        )
        for num_units in (None, ranges.shape[0]):
            assert torch.equal(
                fallback._unit_to_seq_unchecked(cu.long(), num_units), fallback.unit_to_seq(cu)
            )
    # As the CUDA kernels: ranges clamped to [0, N), units past cu_units[-1] get -1.
    assert fallback._token_to_unit_clamped(torch.tensor([[-2, 2], [3, 9]]), 5).tolist() == [0, 0, -1, 1, 1]
    assert fallback._unit_to_seq_unchecked(torch.tensor([0, 2, 3]), 5).tolist() == [0, 0, 1, -1, -1]


@base.needs_cuda
def test_cuda_fallback_matches_the_cuda_kernels(compiled):
    if not _extension.load().cuda_kernels:
        pytest.skip("the extension was built without CUDA kernels")
    rng = random.Random(29)
    for ranges, cu, num_seqs, seq_len in base.layouts(seed=30):
        r, c, n = ranges.cuda(), cu.cuda(), num_seqs * seq_len
        assert_same(compiled, "token_to_unit", r, n)
        assert_same(compiled, "unit_to_seq", c, None)
        assert_same(compiled, "unit_to_seq", c, ranges.shape[0])
        assert_same(compiled, "block_diagonal_work_list", c, 16)
        assert_same(compiled, "offsets_from_lengths", (c[1:] - c[:-1]).long())
        bad_ranges, bad_cu = base.corrupt(rng, ranges.tolist(), cu.tolist(), seq_len)
        bad = torch.tensor(bad_ranges, dtype=torch.int32).reshape(-1, 2).cuda()
        assert_same(
            compiled, "validate_layout", bad, torch.tensor(bad_cu, dtype=torch.int32).cuda(), n, seq_len
        )


# -------------------------------------------------------------------- tests/test_layout on the fallback
@pytest.fixture(autouse=True)
def run_the_fallback(request):
    """Every test of this module runs the layout ops in plain torch (the comparisons call both)."""
    with _extension.use_fallback():
        assert _extension.implementation("cpu") is fallback
        yield


# The whole suite of the layout ops (its tests, and the fixtures and helpers they use), collected here
# again: with the fixture above it checks the fallback.
globals().update({k: v for k, v in vars(base).items() if not k.startswith("__") and k not in globals()})


def test_the_layout_module_routes_to_the_fallback_here():
    ranges = torch.tensor([[0, 2], [3, 9]], dtype=torch.int32)
    calls = []
    original = fallback.token_to_unit
    try:
        fallback.token_to_unit = lambda *a: calls.append(a) or original(*a)
        layout.token_to_unit(ranges, 10)
    finally:
        fallback.token_to_unit = original
    assert len(calls) == 1
