"""The fused HRA op and the glue kernels (``mta_kernels/ops/hra.py``, ``mta_kernels/ops/glue.py``) against
plain compositions of the reference, in float64 (torch path, and the Triton kernels under the
interpreter or on the GPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_within_rule

from mta_kernels import reference, use_backend
from mta_kernels.ops.glue import dsa_denominator, normalised_weights
from mta_kernels.ops.hra import fused_hra

BACKENDS = ["torch", "triton"]


def _reference_hra(student, teacher, weights, rows, weight, bias):
    """The HRA of each layer as the reference computes it: project the used rows, then ``hra_loss``."""
    terms = []
    for l in range(student.shape[0]):
        x, y = student[l], teacher[l]
        w = None if weights is None else weights[l]
        if rows is not None:
            x, y = x[rows.long()], y[rows.long()]
            w = None if w is None else w[rows.long()]
        terms.append(reference.hra_loss(x @ weight[l].T + bias[l], y, w))
    return torch.stack(terms)


def _inputs(dtype, gen, L=2, N=11, Ds=5, Dt=7, zero_row=None):
    student = torch.randn(L, N, Ds, generator=gen, dtype=torch.float64).to(dtype)
    if zero_row is not None:
        student[:, zero_row] = 0
    teacher = torch.randn(L, N, Dt, generator=gen, dtype=torch.float64).to(dtype)
    weights = torch.rand(L, N, generator=gen, dtype=torch.float64).to(dtype)
    rows = torch.tensor([0, 2, 3, 7, 10], dtype=torch.int32)
    off = torch.ones(N, dtype=torch.bool)
    off[rows.long()] = False
    weights[:, off] = 0  # the callers' weights are 0 off the used rows
    weight = torch.randn(L, Dt, Ds, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(L, Dt, generator=gen, dtype=torch.float64).to(dtype)
    return student, teacher, weights, rows, weight, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_rows", [True, False])
@pytest.mark.parametrize("use_weights", [True, False])
def test_fused_hra_matches_reference_float64(backend, use_rows, use_weights):
    gen = torch.Generator().manual_seed(3)
    student, teacher, weights, rows, weight, bias = _inputs(torch.float64, gen)
    rows = rows if use_rows else None
    weights = weights if use_weights else None
    if not use_weights and not use_rows:
        weights = None
    leaves = [t.detach().to(DEVICE).requires_grad_() for t in (student, weight, bias)]
    with use_backend(backend):
        got = fused_hra(
            leaves[0],
            teacher.to(DEVICE),
            None if weights is None else weights.to(DEVICE),
            None if rows is None else rows.to(DEVICE),
            leaves[1],
            leaves[2],
        )
    got.sum().backward()
    ref_leaves = [t.detach().clone().requires_grad_() for t in (student, weight, bias)]
    want = _reference_hra(ref_leaves[0], teacher, weights, rows, ref_leaves[1], ref_leaves[2])
    want.sum().backward()
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-12)
    for a, b, name in zip(leaves, ref_leaves, ("student", "weight", "bias")):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-9, atol=1e-12, msg=f"d/d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_hra_float32_within_rule(backend):
    gen = torch.Generator().manual_seed(4)
    inputs64 = _inputs(torch.float64, gen, N=40, Ds=24, Dt=40)
    oracle = _reference_hra(*inputs64)
    eager = _reference_hra(*(t.float() if t.is_floating_point() else t for t in inputs64))
    with use_backend(backend):
        got = fused_hra(*(t.float().to(DEVICE) if t.is_floating_point() else t.to(DEVICE) for t in inputs64))
    assert_within_rule(got.cpu(), eager, oracle, floor=1e-6, what="fused HRA float32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_student_row_has_a_bounded_gradient(backend):
    """A unit whose pooled vector is 0 projects to the bias: cosine and gradient stay bounded."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    student, teacher, weights, rows, _, _ = _inputs(torch.float32, gen, zero_row=2)
    proj = torch.nn.Linear(5, 7)  # default initialisation, bias included
    weight, bias = proj.weight[None].expand(2, -1, -1), proj.bias[None].expand(2, -1)
    student.requires_grad_()
    with use_backend(backend):
        loss = fused_hra(
            student.to(DEVICE),
            teacher.to(DEVICE),
            weights.to(DEVICE),
            rows.to(DEVICE),
            weight.to(DEVICE),
            bias.to(DEVICE),
        )
    loss.sum().backward()
    for g in (student.grad, proj.weight.grad, proj.bias.grad):
        assert torch.isfinite(g).all() and g.abs().max() < 1e3, g.abs().max()


def test_fused_hra_no_rows_or_no_mass_is_zero_with_zero_gradient():
    gen = torch.Generator().manual_seed(6)
    student, teacher, weights, rows, weight, bias = _inputs(torch.float32, gen)
    student.requires_grad_()
    out = fused_hra(student, teacher, torch.zeros_like(weights), rows, weight, bias)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2)) and torch.equal(student.grad, torch.zeros_like(student))
    student.grad = None
    out = fused_hra(student, teacher, weights, rows[:0], weight, bias)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2)) and torch.equal(student.grad, torch.zeros_like(student))


def test_fused_hra_refuses_double_backward():
    gen = torch.Generator().manual_seed(7)
    student, teacher, weights, rows, weight, bias = _inputs(torch.float32, gen)
    student.requires_grad_()
    out = fused_hra(student, teacher, weights, rows, weight, bias).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, student, create_graph=True)


# ------------------------------------------------------------------------------------------ glue
@pytest.mark.skipif(DEVICE == "cpu" and not __import__("os").environ.get("TRITON_INTERPRET"), reason="Triton")
def test_glue_kernels_match_torch():
    gen = torch.Generator().manual_seed(8)
    cu = torch.tensor([0, 3, 3, 4, 9], dtype=torch.int32)  # 3 units, none, one, five
    w = torch.rand(3, 9, generator=gen, dtype=torch.float64)
    bounds = cu.tolist()
    for weights in (w, w[:1]):
        with use_backend("torch"):  # host offsets, and the device offsets of a planned batch
            want = dsa_denominator(weights, cu, bounds, 3, torch.float64)
            torch.testing.assert_close(dsa_denominator(weights, cu, bounds, 3, torch.float64, True), want)
        with use_backend("triton"):
            got = dsa_denominator(weights.to(DEVICE), cu.to(DEVICE), bounds, 3, torch.float64, True)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=0)
    sal = torch.rand(2, 4, 6, generator=gen)
    sal[:, 1] = 0  # a sequence whose covered saliency is 0: weights 0, never 0/0
    t2u = torch.where(torch.rand(24, generator=gen) > 0.4, 0, -1).to(torch.int32)
    with use_backend("torch"):
        want = normalised_weights(sal, t2u >= 0)
        torch.testing.assert_close(normalised_weights(sal, t2u), want)  # a map or a mask: the same
    with use_backend("triton"):
        got = normalised_weights(sal.to(DEVICE), t2u.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-7)


def test_opcheck():
    gen = torch.Generator().manual_seed(9)
    student, teacher, weights, rows, weight, bias = _inputs(torch.float32, gen)
    for s_req in (True, False):
        args = (
            student.clone().requires_grad_(s_req),
            teacher,
            weights,
            rows,
            weight,
            bias,
            torch.float32,
            s_req,
        )
        torch.library.opcheck(torch.ops.mta_kernels.fused_hra.default, args)


def test_autocast_runs_the_gemms_in_bfloat16_within_rule():
    """Under autocast the projector GEMMs take bf16 operands (fp32 accumulation): the result stays within
    the tolerance rule of an eager autocast reference against the float64 oracle."""
    gen = torch.Generator().manual_seed(10)
    inputs64 = _inputs(torch.float64, gen, N=40, Ds=24, Dt=40)
    oracle = _reference_hra(*inputs64)
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = _reference_hra(*inputs32)
        got = fused_hra(*inputs32)
    assert got.dtype == torch.float32
    assert_within_rule(got, eager, oracle, floor=1e-6, what="fused HRA under bf16 autocast")
    # and the GEMMs really ran in bf16: the float32 result differs from it
    assert not torch.equal(got, fused_hra(*inputs32))
