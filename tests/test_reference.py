"""The eager reference (the oracle) against cases small enough to compute by hand (docs/method.md)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mta_kernels import reference

F64 = torch.float64
SQRT_HALF = math.sqrt(0.5)


def _cu(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# ---------------------------------------------------------------------------------------- DSA loss
# Three units with known cosines. Student: (1,0), (0,1), (1,1) -> C01 = 0, C02 = C12 = 1/sqrt(2).
# Teacher: (1,0,0), (2,0,0), (0,0,3)  -> C01 = 1, C02 = C12 = 0.
STUDENT3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
TEACHER3 = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]], dtype=F64)


@pytest.mark.parametrize("fn", [reference.structural_loss, reference.structural_loss_stacked])
def test_structural_three_units_by_hand(fn):
    # Unweighted: ordered pairs u != v: (0,1),(1,0): (0-1)^2 = 1; the four others: (1/sqrt2 - 0)^2 = 1/2.
    # num = 2*1 + 4*0.5 = 4, den = 6.
    loss = fn(STUDENT3, TEACHER3, _cu(3))
    assert loss.dtype == F64
    torch.testing.assert_close(loss, torch.tensor(4 / 6, dtype=F64))
    # Weighted W = (1, 2, 3): W_u W_v = 2 for (0,1), 3 for (0,2), 6 for (1,2), each twice.
    # num = 2*(2*1 + 3*0.5 + 6*0.5) = 13, den = 2*(2 + 3 + 6) = 22.
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    torch.testing.assert_close(fn(STUDENT3, TEACHER3, _cu(3), w), torch.tensor(13 / 22, dtype=F64))


def test_structural_pairs_stay_inside_a_sequence():
    # The same three units split 2 | 1: only the pair (0, 1) remains: num = 2 * (0 - 1)^2, den = 2.
    loss = reference.structural_loss(STUDENT3, TEACHER3, _cu(2, 1))
    torch.testing.assert_close(loss, torch.tensor(1.0, dtype=F64))
    # Two sequences side by side: the denominator is global over the batch. Sequence A = the 3 units
    # above (num 4, den 6); sequence B = units 0, 1 again (num 2, den 2) -> 6 / 8.
    s = torch.cat([STUDENT3, STUDENT3[:2]])
    t = torch.cat([TEACHER3, TEACHER3[:2]])
    for fn in (reference.structural_loss, reference.structural_loss_stacked):
        torch.testing.assert_close(fn(s, t, _cu(3, 2)), torch.tensor(6 / 8, dtype=F64))


@pytest.mark.parametrize("fn", [reference.structural_loss, reference.structural_loss_stacked])
@pytest.mark.parametrize("lengths", [(1,), (1, 1, 0), (0,), (0, 0)], ids=str)
def test_structural_no_pairs_is_zero_with_zero_gradient(fn, lengths):
    # A sequence with one unit, or a batch with no units at all: loss 0, gradient 0, never 0/0.
    U = sum(lengths)
    s = torch.randn(U, 4, dtype=F64, requires_grad=True)
    t = torch.randn(U, 5, dtype=F64)
    loss = fn(s, t, _cu(*lengths))
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and (s.grad == 0).all()


def test_structural_gradient_by_hand_and_gradcheck():
    # Two units, unweighted: L = (c - c_T)^2 with c = cos(s0, s1) (both ordered pairs, den 2).
    # s0 = (1, 0), s1 = (cos a, sin a) -> c = cos a; teacher cosine 0. dL/ds1 = 2c * dc/ds1, and
    # dc/ds1 = (s0 - c s1) / |s1| = (1 - cos^2 a, -cos a sin a).
    a = 0.3
    s = torch.tensor([[1.0, 0.0], [math.cos(a), math.sin(a)]], dtype=F64, requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    loss = reference.structural_loss(s, t, _cu(2))
    torch.testing.assert_close(loss, torch.tensor(math.cos(a) ** 2, dtype=F64))
    loss.backward()
    c = math.cos(a)
    expected = torch.tensor([2 * c * (1 - c * c), -2 * c * c * math.sin(a)], dtype=F64)
    torch.testing.assert_close(s.grad[1], expected)
    s2 = torch.randn(7, 5, dtype=F64, requires_grad=True)
    t2 = torch.randn(7, 3, dtype=F64)
    w2 = torch.rand(7, dtype=F64) + 0.1
    assert torch.autograd.gradcheck(lambda x: reference.structural_loss(x, t2, _cu(3, 0, 4), w2), (s2,))
    assert torch.autograd.gradcheck(
        lambda x: reference.structural_loss_stacked(x, t2, _cu(3, 0, 4), w2), (s2,)
    )


def test_structural_teacher_gets_no_gradient():
    s = STUDENT3.clone().requires_grad_(True)
    t = TEACHER3.clone().requires_grad_(True)
    reference.structural_loss(s, t, _cu(3)).backward()
    assert t.grad is None


# ------------------------------------------------------------------------------------ span pooling
def test_span_pool_by_hand():
    hidden = torch.arange(12, dtype=F64).reshape(6, 2)  # row i = (2i, 2i+1)
    ranges = torch.tensor([[0, 2], [3, 6]], dtype=torch.int32)
    # Means: rows 0-1 -> (1, 2); rows 3-5 -> (8, 9).
    torch.testing.assert_close(
        reference.span_pool(hidden, ranges), torch.tensor([[1.0, 2.0], [8.0, 9.0]], dtype=F64)
    )
    # Weighted: unit 0 weights (1, 3) -> (0*1 + 2*3)/4 = 1.5; unit 1 weights (0, 0, 2) -> row 5 = (10, 11).
    w = torch.tensor([1.0, 3.0, 7.0, 0.0, 0.0, 2.0], dtype=F64)
    torch.testing.assert_close(
        reference.span_pool(hidden, ranges, w), torch.tensor([[1.5, 2.5], [10.0, 11.0]], dtype=F64)
    )
    # A unit whose weights sum to 0 pools to 0 (not NaN).
    w0 = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)
    out = reference.span_pool(hidden, ranges, w0)
    assert (out[0] == 0).all() and torch.isfinite(out).all()


def test_span_pool_gradcheck():
    h = torch.randn(2, 9, 3, dtype=F64, requires_grad=True)
    ranges = torch.tensor([[0, 1], [2, 5], [7, 9]], dtype=torch.int32)
    w = torch.rand(2, 9, dtype=F64)
    assert torch.autograd.gradcheck(lambda x: reference.span_pool(x, ranges, w), (h,))


def test_covered_token_weights_by_hand():
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.25, 0.0]], dtype=F64)  # [B=2, T=4]
    ranges = torch.tensor([[1, 3], [4, 6]], dtype=torch.int32)  # tokens 1, 2 of seq 0; 0, 1 of seq 1
    w = reference.covered_token_weights(a, ranges, _cu(1, 1), 4)
    expected = torch.tensor([0.0, 0.4, 0.6, 0.0, 0.5 / 0.75, 0.25 / 0.75, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(w, expected)


# ---------------------------------------------------------------------------------- token saliency
def test_saliency_by_hand():
    # D = 2 rows ±(1, -1): unbiased std sqrt(2), so S = ±c with c = 2 / ((sqrt2 + 1e-5)^2 sqrt2).
    h = torch.tensor([[[1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]]], dtype=F64)
    c = 2 / ((math.sqrt(2) + 1e-5) ** 2 * math.sqrt(2))
    sig = lambda x: 1 / (1 + math.exp(-x))
    # Rows 0 and 1 give sigma(2c) to each other and sigma(-2c) to row 2; row 2 gives 1/2 to each.
    expected = torch.tensor(
        [[(sig(2 * c) + 0.5) / 3, (sig(2 * c) + 0.5) / 3, 2 * sig(-2 * c) / 3]], dtype=F64
    )
    out = reference.token_saliency(h, torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(), torch.tensor(1.0, dtype=F64))


def test_saliency_special_cases_by_hand():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 5, 6, generator=g, dtype=F64)
    mask = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # n = 2: each token's only key is the other -> 1/2 each
            [0, 0, 1, 0, 0],  # n = 1: the lone token gets 1
            [0, 0, 0, 0, 0],  # fully padded: all 0
            [1, 1, 1, 1, 1],  # identical rows below: uniform -> 1/5 each
        ]
    )
    h[3] = h[3, :1].expand(5, 6)
    out = reference.token_saliency(h, mask)
    expected = torch.tensor([[0.5, 0.5, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0.2] * 5], dtype=F64)
    torch.testing.assert_close(out, expected)
    stacked = reference.token_saliency(torch.stack([h, h]), mask)
    assert stacked.shape == (2, 4, 5)
    torch.testing.assert_close(stacked[1], expected)


# ---------------------------------------------------------------------------------------- HRA loss
def test_hra_by_hand():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=F64)
    t = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=F64)
    # cosines 1, 1/sqrt2, 0 -> distances 0, 1 - 1/sqrt2, 1.
    torch.testing.assert_close(
        reference.hra_loss(p, t), torch.tensor((0 + (1 - SQRT_HALF) + 1) / 3, dtype=F64)
    )
    w = torch.tensor([3.0, 0.0, 1.0], dtype=F64)
    torch.testing.assert_close(reference.hra_loss(p, t, w), torch.tensor(1 / 4, dtype=F64))
    # weights summing to 0: 0, not NaN
    assert reference.hra_loss(p, t, torch.zeros(3, dtype=F64)).item() == 0.0


# ---------------------------------------------------------------------------------- the whole loss
def _hand_case():
    """One sequence, 3 tokens, units [0, 1) and [1, 3); student units (1,0), (0,1) -> C_S01 = 0;
    teacher units (1,0,0), (2,0,0) -> C_T01 = 1. Projector: Ds = 2 -> Dt = 3, the identity on the
    first two coordinates, no bias."""
    student = (torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]], dtype=F64, requires_grad=True),)
    teacher = (torch.tensor([[[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0]]], dtype=F64),)
    ranges = torch.tensor([[0, 1], [1, 3]], dtype=torch.int32)
    units = SimpleNamespace(student_ranges=ranges, teacher_ranges=ranges, cu_units=_cu(2))
    mask = torch.ones(1, 3, dtype=torch.bool)
    proj = torch.nn.Linear(2, 3, dtype=F64)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        proj.bias.zero_()
    return student, teacher, units, mask, proj


@pytest.mark.parametrize("hra, expected_hra", [("unit", 0.5), ("token", 2 / 3), (None, None)])
def test_mta_loss_by_hand(hra, expected_hra):
    # DSA: the two ordered pairs each contribute (0 − 1)² with weight 1 -> 2 / 2 = 1 for both pairs.
    # HRA unit: cos = 1 and 0 -> mean(1 − cos) = 1/2. HRA token: covered tokens 0, 1, 2 project to
    # (1,0,0), (0,1,0), (0,1,0) against (1,0,0), (2,0,0), (2,0,0): 1 − cos = 0, 1, 1 -> 2/3.
    student, teacher, units, mask, proj = _hand_case()
    pairs = [(0, 0, "word"), (0, 0, "phrase")]
    out = reference.mta_loss(
        student,
        teacher,
        {"word": units, "phrase": units},
        mask,
        mask,
        pairs=pairs,
        projectors=[proj, proj] if hra else None,
        pooling="mean",
        weighted=False,
        hra=hra,
        gamma=0.3,
    )
    torch.testing.assert_close(out.dsa, torch.ones(2, dtype=F64))
    if hra is None:
        assert out.hra is None
        torch.testing.assert_close(out.loss, torch.tensor(1.0, dtype=F64))
    else:
        torch.testing.assert_close(out.hra, torch.full((2,), expected_hra, dtype=F64))
        torch.testing.assert_close(out.loss, torch.tensor(1.0 + 0.3 * expected_hra, dtype=F64))
    out.loss.backward()
    assert student[0].grad is not None and student[0].grad.abs().sum() > 0


def test_mta_loss_stacked_matches_block_diagonal():
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 6, 5, generator=gen, dtype=F64),)
    teacher = (torch.randn(2, 6, 7, generator=gen, dtype=F64),)
    ranges = torch.tensor([[0, 2], [2, 3], [4, 6], [6, 7], [8, 11]], dtype=torch.int32)
    units = {"word": SimpleNamespace(student_ranges=ranges, teacher_ranges=ranges, cu_units=_cu(3, 2))}
    mask = torch.ones(2, 6, dtype=torch.bool)
    proj = [torch.nn.Linear(5, 7, dtype=F64)]
    kw = dict(pairs=[(0, 0, "word")], projectors=proj, hra="unit")
    block = reference.mta_loss(student, teacher, units, mask, mask, **kw)
    stacked = reference.mta_loss(student, teacher, units, mask, mask, stacked=True, **kw)
    torch.testing.assert_close(block.loss, stacked.loss)
    assert block.loss > 0


def test_mta_loss_bad_arguments():
    student, teacher, units, mask, proj = _hand_case()
    other = SimpleNamespace(
        student_ranges=units.student_ranges,
        teacher_ranges=torch.tensor([[0, 2], [2, 3]], dtype=torch.int32),
        cu_units=units.cu_units,
    )
    call = dict(pairs=[(0, 0, "word")], projectors=[proj])
    with pytest.raises(ValueError, match="one tokenization"):
        reference.mta_loss(student, teacher, {"word": other}, mask, mask, hra="token", **call)
    with pytest.raises(ValueError, match="pooling"):
        reference.mta_loss(student, teacher, {"word": units}, mask, mask, pooling="max", **call)
    with pytest.raises(ValueError, match="hra"):
        reference.mta_loss(student, teacher, {"word": units}, mask, mask, hra="layer", **call)
    with pytest.raises(ValueError, match="projector"):
        reference.mta_loss(student, teacher, {"word": units}, mask, mask, pairs=[(0, 0, "word")])
    with pytest.raises(ValueError, match="phrase"):
        reference.mta_loss(student, teacher, {"word": units}, mask, mask, pairs=[(0, 0, "phrase")], hra=None)
