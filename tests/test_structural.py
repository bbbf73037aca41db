"""DSA structural loss (docs/method.md#dsa-loss): Triton kernels and the torch path against the float64
reference."""

from __future__ import annotations

import pytest
import torch

from mta_kernels import layout, reference, use_backend
from mta_kernels.constants import DSA_NORM_FLOOR
from mta_kernels.ops import structural as st
from mta_kernels.ops.structural import structural_loss
from tests.helpers import DEVICE, DTYPES, assert_within_rule, watch_allocations

BACKENDS = ["triton", "torch"]


def _cu(lengths: list[int]) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def _inputs(lengths, ds, dt, dtype, *, layers=None, weights=None, seed=0):
    """Student/teacher unit vectors with a shared low-rank part (realistic, non-trivial C^S − C^T)."""
    g = torch.Generator().manual_seed(seed)
    U = sum(lengths)
    lead = () if layers is None else (layers,)
    base = torch.randn(*lead, U, 8, generator=g, dtype=torch.float64)
    s = base @ torch.randn(8, ds, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        *lead, U, ds, generator=g
    )
    t = base @ torch.randn(8, dt, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        *lead, U, dt, generator=g
    )
    w = None
    if weights == "u":
        w = torch.rand(U, generator=g) + 0.1
    elif weights == "lu":
        w = torch.rand(*lead, U, generator=g) + 0.1
    to = lambda x: None if x is None else x.to(DEVICE)
    return to(s.to(dtype)), to(t.to(dtype)), _cu(lengths), to(w)


def _run(fn, s, t, cu, w, grad_out):
    """Loss and ∂(Σ grad_out · loss)/∂student of ``fn``."""
    x = s.detach().clone().requires_grad_(True)
    loss = fn(x, t, cu, w)
    (loss * grad_out).sum().backward()
    return loss.detach(), x.grad


def _check(s, t, cu, w, backend: str, what: str, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and student gradient (of ``rows``, default all) within the tolerance rule (eager = the
    reference in the same dtype). Returns the fused and the oracle gradients."""
    g_out = torch.rand(s.shape[:-2], dtype=torch.float64, device=s.device) + 0.5  # random dL/dloss
    wd = None if w is None else w.double()
    oracle, oracle_g = _run(reference.structural_loss, s.double(), t.double(), cu, wd, g_out)
    eager, eager_g = _run(reference.structural_loss, s, t, cu, w, g_out.float())
    with use_backend(backend):
        fused, fused_g = _run(structural_loss, s, t, cu, w, g_out.float())
    assert fused.dtype == torch.float32 and fused_g.dtype == s.dtype
    assert_within_rule(fused, eager, oracle, what=f"{what} loss")
    rows = slice(None) if rows is None else rows
    assert_within_rule(
        fused_g[..., rows, :], eager_g[..., rows, :], oracle_g[..., rows, :], what=f"{what} grad"
    )
    return fused_g, oracle_g


CASES = {
    # sequences with 0 and 1 units, short ones, one longer than the interpreter's block_m (16)
    "mixed": ([3, 0, 1, 36, 5, 2], 17, 29, "u"),
    # D over several chunks, Ds != Dt, unweighted; a sequence longer than the GPU block_m (64)
    "wide": ([70, 2], 60, 129, None),
    # a packed batch of many tiny sequences (several per row block)
    "tiny_packed": ([2, 3, 1, 4, 0, 2, 3, 3, 2, 4, 1, 2, 3, 2, 4, 3, 2], 17, 17, "u"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, case):
    lengths, ds, dt, weights = CASES[case]
    if case == "wide" and backend == "triton" and dtype != torch.float32 and DEVICE == "cpu":
        lengths = [20, 2]  # the interpreter is slow; fp32 covers the 70-unit sequence
    s, t, cu, w = _inputs(lengths, ds, dt, dtype, weights=weights)
    _check(s, t, cu, w, backend, f"{backend}/{dtype}/{case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_sizes_up_to_8192(backend, dtype):
    # The widest case (Mistral-7B-class teachers are 4096; 8192 must work): D is tiled, never
    # held whole. Odd widths so the last D chunk is partial on both sides.
    s, t, cu, w = _inputs([4, 3], 8191, 4097, dtype, weights="u")
    _check(s, t, cu, w, backend, f"{backend}/{dtype}/D=8191x4097")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lengths",
    [[], [0], [0, 0], [1], [1, 0, 1], [2], [1, 1], [0, 2, 1]],
    ids=lambda x: "-".join(map(str, x)) or "B0",
)
def test_awkward_sizes(backend, lengths):
    s, t, cu, w = _inputs(lengths, 17, 5, torch.float32, weights="u")
    has_pair = any(n >= 2 for n in lengths)
    with use_backend(backend):
        loss, grad = _run(structural_loss, s, t, cu, w, torch.tensor(1.0, device=DEVICE))
    assert loss.shape == () and loss.dtype == torch.float32
    if not has_pair:
        assert loss.item() == 0.0
        assert grad is not None and grad.shape == s.shape and (grad == 0).all()
    else:
        _check(s, t, cu, w, backend, f"{backend}/{lengths}")


@pytest.mark.parametrize("weights", [None, "u", "lu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_layers(backend, weights):
    s, t, cu, w = _inputs([5, 1, 19, 3], 17, 33, torch.float32, layers=3, weights=weights)
    _check(s, t, cu, w, backend, f"{backend}/stacked/{weights}")
    # non-contiguous stacked views (a layer-major stack of [U, L, D] storage)
    s_nc = s.transpose(0, 1).contiguous().transpose(0, 1)
    t_nc = t.transpose(0, 1).contiguous().transpose(0, 1)
    with use_backend(backend):
        a = structural_loss(s, t, cu, w)
        b = structural_loss(s_nc, t_nc, cu, w)
    assert a.shape == (3,)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_layers(backend):
    s, t, cu, _ = _inputs([3, 2], 17, 9, torch.float32, layers=1)
    x = s[:0].clone().requires_grad_(True)  # [0, U, Ds]
    with use_backend(backend):
        loss = structural_loss(x, t[:0], cu)
    assert loss.shape == (0,) and loss.dtype == torch.float32
    loss.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_bf16(backend):
    s, t, cu, w = _inputs([6, 18], 17, 20, torch.bfloat16, layers=2, weights="lu")
    _check(s, t, cu, w, backend, f"{backend}/stacked-bf16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_zero_units_have_bounded_gradients(backend):
    """Zero and 1e-7-norm unit vectors (student and teacher): no NaN, the same numbers as the oracle, and
    a gradient bounded by |∂L/∂Û| / DSA_NORM_FLOOR (with a 1e-8 floor a 1e-7-norm unit got ~1e6)."""
    s, t, cu, w = _inputs([6, 20, 3], 17, 9, torch.float32, weights="u")
    tiny = [4, 12]
    s[[0, 9, 27]] = 0
    s[tiny] = s[tiny] / s[tiny].norm(dim=-1, keepdim=True) * 1e-7
    t[[1, 9, 28]] = 0
    t[5] = t[5] / t[5].norm() * 1e-7
    small = [0, 9, 27, *tiny]
    assert (s[small].norm(dim=-1) < DSA_NORM_FLOOR).all()
    fused_g, oracle_g = _check(s, t, cu, w, backend, f"{backend}/near-zero-fp32")
    assert torch.isfinite(fused_g).all()
    # |∂L/∂Û_u| = 4 |Σ_v E_uv Ŝ_v| / den <= 8 W_u Σ_{v in u's sequence} W_v / den (|C^S − C^T| <= 2)
    wd = w.double()
    bounds = cu.tolist()
    seq_w = torch.cat([wd[lo:hi].sum().expand(hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])])
    den = sum(wd[lo:hi].sum() ** 2 - (wd[lo:hi] ** 2).sum() for lo, hi in zip(bounds[:-1], bounds[1:]))
    bound = 8 * wd * seq_w / den / DSA_NORM_FLOOR  # [U]
    assert (oracle_g.norm(dim=-1) <= bound).all()
    assert (fused_g.double().norm(dim=-1) <= bound * 1.001).all()
    # the floored units get a gradient (unit 9 is zero on both sides: every E_9v is 0, so has none)
    assert oracle_g[[0, 27, *tiny]].norm(dim=-1).min() > 0
    # float64: the same numbers as the oracle to rounding
    g_out = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    ref, ref_g = _run(reference.structural_loss, s.double(), t.double(), cu, wd, g_out)
    with use_backend(backend):
        out, out_g = _run(structural_loss, s.double(), t.double(), cu, wd, g_out)
    assert torch.isfinite(out_g).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_g, ref_g, rtol=1e-8, atol=1e-10)


def test_norm_floor_leaves_ordinary_units_unchanged():
    """Units with norms above the floor normalise exactly as with the published 1e-8: the floor changes
    nothing for them (bit-identical in float64)."""
    s, t, cu, w = _inputs([6, 20, 3], 17, 9, torch.float64, weights="u")
    s = s * 0.01  # norms ~0.01-0.1: small for hidden states, still far above the floor
    assert (s.norm(dim=-1) > 2 * DSA_NORM_FLOOR).all()
    floored = torch.nn.functional.normalize(s, dim=-1, eps=DSA_NORM_FLOOR)
    published = torch.nn.functional.normalize(s, dim=-1, eps=1e-8)
    assert torch.equal(floored, published)


def test_torch_feature_space_matches_pair_space():
    """The feature-space identity (chosen when a sequence has more units than dimensions)."""
    s, t, cu, w = _inputs([80, 1, 9, 70], 4, 5, torch.float32, weights="u")
    s[3] = 0  # a zero row: the diagonal term of the identity is not 0 there
    s = s.double()
    t = t.double()
    w = w.double()
    s3, t3, w2 = s[None], t[None], w[None]
    bounds = cu.tolist()
    for feature_space in (True, False, None):
        loss, g = st._torch_forward(s3, t3, cu, w2, bounds, True, torch.float64, feature_space=feature_space)
        ref, ref_g = _run(reference.structural_loss, s, t, cu, w, torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close(loss[0], ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g[0], ref_g, rtol=1e-8, atol=1e-10)
    # the cost model picks feature space for the long sequences (80·13 > 2·16+2·20+25); the 9-unit one
    # is packed with the short ones
    calls = []
    orig = st._feature_space
    try:
        st._feature_space = lambda *a: calls.append(a[0].shape[1]) or orig(*a)
        with use_backend("torch"):
            structural_loss(s, t, cu, w)
    finally:
        st._feature_space = orig
    assert calls == [80, 70]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, weighted):
    s, t, cu, w = _inputs([3, 0, 4, 1], 5, 6, torch.float64, weights="u" if weighted else None)
    s = s.requires_grad_(True)
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda x: structural_loss(x, t, cu, w), (s,), fast_mode=backend == "triton" and DEVICE == "cpu"
        )


def test_gradcheck_stacked_triton():
    s, t, cu, w = _inputs([4, 3], 5, 3, torch.float64, layers=2, weights="lu")
    s = s.requires_grad_(True)
    with use_backend("triton"):
        assert torch.autograd.gradcheck(lambda x: structural_loss(x, t, cu, w), (s,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_to_teacher_or_weights(backend):
    s, t, cu, w = _inputs([5, 4], 17, 9, torch.float32, weights="u")
    s.requires_grad_(True)
    t.requires_grad_(True)
    w.requires_grad_(True)
    with use_backend(backend):
        structural_loss(s, t, cu, w).backward()
        assert s.grad is not None and t.grad is None and w.grad is None
        # only the teacher requires grad: the loss is a constant
        assert not structural_loss(s.detach(), t, cu, w).requires_grad
        # no grad mode: nothing is saved, nothing requires grad
        with torch.no_grad():
            assert not structural_loss(s, t, cu, w).requires_grad


def test_double_backward_refused():
    """The gradient is computed in the forward: a second derivative through it would be silently 0."""
    s, t, cu, _ = _inputs([4, 3], 5, 3, torch.float32)
    s.requires_grad_(True)
    total = structural_loss(s, t, cu) + (s**2).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(total, s, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    s, t, cu, w = _inputs([3, 30, 2, 4], 40, 23, torch.float32, weights="u")
    g_out = torch.tensor(1.0, device=DEVICE)
    with use_backend(backend):
        a, ga = _run(structural_loss, s, t, cu, w, g_out)
        b, gb = _run(structural_loss, s, t, cu, w, g_out)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_torch_compile_fullgraph():
    s, t, cu, w = _inputs([5, 1, 20], 17, 9, torch.float32, weights="u")

    def f(x, y, c, ww):
        return 2.0 * structural_loss(x, y, c, ww) + 1.0

    g_out = torch.tensor(1.0, device=DEVICE)
    eager, eager_g = _run(f, s, t, cu, w, g_out)
    compiled, compiled_g = _run(torch.compile(f, fullgraph=True, backend="aot_eager"), s, t, cu, w, g_out)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_g, eager_g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(backend):
    """Under autocast the op keeps its own precision (fp32 accumulation), nothing inside is downcast."""
    s, t, cu, w = _inputs([5, 30], 17, 9, torch.float32, weights="u")
    with use_backend(backend):
        plain = structural_loss(s, t, cu, w)
        with torch.autocast(device_type=s.device.type, dtype=torch.bfloat16):
            auto = structural_loss(s, t, cu, w)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=1e-7)


def _largest_allocation(n, ds, backend, **torch_kw):
    """Largest tensor allocated by forward + backward on one sequence of n units (the watch runs the
    custom op's implementation under the mode); ``torch_kw`` calls the torch path's body directly."""
    s, t, cu, _ = _inputs([n], ds, ds, torch.float32)
    x = s.clone().requires_grad_(True)
    with watch_allocations() as watch:
        if torch_kw:
            s3, t3 = s[None], t[None]
            loss, grad = st._torch_forward(
                s3, t3, cu, None, st._checked_bounds(cu, n), True, torch.float32, **torch_kw
            )
            assert grad.shape == s3.shape
        else:
            with use_backend(backend):
                loss = structural_loss(x, t, cu)
                loss.backward()
            assert x.grad.shape == x.shape and "mta_kernels::structural_loss" in watch.custom_ops_entered
    assert torch.isfinite(loss).all()
    return watch.largest, watch.largest_op


@pytest.mark.parametrize("feature_space", [None, False])
def test_no_quadratic_allocation_torch(feature_space):
    """N = 1500 > D: the public op takes feature space; pair space (forced) holds 256 × N score rows."""
    n = 1500
    kw = {} if feature_space is None else {"feature_space": feature_space}
    largest, op = _largest_allocation(n, 16, "torch", **kw)
    assert largest < n * n // 4, f"torch path allocated {largest} elements ({op}) for N={n}"


def test_no_quadratic_allocation_triton():
    n = 160 if DEVICE == "cpu" else 1500  # the interpreter runs ~(n/16)² tiles in Python
    largest, op = _largest_allocation(n, 16, "triton")
    assert largest < n * n // 4, f"triton path allocated {largest} elements ({op}) for N={n}"


def test_work_list_covers_block_diagonal():
    """Row blocks are disjoint, cover every unit of a sequence with ≥ 2 units, and their columns cover
    the whole sequence of each row (the kernel relies on this for its atomic-free gradient)."""
    lengths = [2, 0, 1, 3, 40, 5, 17, 1, 16, 2, 2]
    cu = _cu(lengths)
    seq = layout.unit_to_seq(cu).cpu()
    assert seq.dtype == torch.int32 and seq.tolist() == [b for b, n in enumerate(lengths) for _ in range(n)]
    for block_m in (16, 64):
        work = layout.block_diagonal_work_list(cu, block_m).cpu()
        assert work.dtype == torch.int32 and work.shape[1] == 4
        owner = torch.full((sum(lengths),), -1)
        bounds = cu.tolist()
        for i, (r0, r1, c0, c1) in enumerate(work.tolist()):
            assert 0 < r1 - r0 <= block_m
            assert (owner[r0:r1] == -1).all(), "row blocks overlap"
            owner[r0:r1] = i
            for u in range(r0, r1):
                lo, hi = bounds[seq[u]], bounds[seq[u] + 1]
                if hi - lo >= 2:
                    assert c0 <= lo and hi <= c1
        for b, n in enumerate(lengths):
            if n >= 2:
                assert (owner[bounds[b] : bounds[b + 1]] >= 0).all()


def test_errors():
    s, t, cu, w = _inputs([3, 4], 17, 9, torch.float32, weights="u")
    with pytest.raises(TypeError, match="student"):
        structural_loss(s.int(), t, cu)
    with pytest.raises(TypeError, match="teacher"):
        structural_loss(s, t.long(), cu)
    with pytest.raises(TypeError, match="unit_weights"):
        structural_loss(s, t, cu, torch.ones(7, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="int32"):
        structural_loss(s, t, cu.long())
    with pytest.raises(ValueError, match="same"):
        structural_loss(s, t[:6], cu)
    with pytest.raises(ValueError, match="same"):
        structural_loss(s[None].expand(2, -1, -1), t[None].expand(3, -1, -1), cu)
    with pytest.raises(ValueError, match="same"):
        structural_loss(s[None], t, cu)
    with pytest.raises(ValueError, match=r"\[U, D\]"):
        structural_loss(s[0], t[0], cu)
    with pytest.raises(ValueError, match=r"\[U, D\]"):
        structural_loss(s[None, None], t[None, None], cu)
    with pytest.raises(ValueError, match="ends at"):
        structural_loss(s, t, _cu([3, 3]))
    with pytest.raises(ValueError, match="start at 0"):
        structural_loss(s, t, torch.tensor([1, 3, 7], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="non-decreasing"):
        structural_loss(s, t, torch.tensor([0, 5, 3, 7], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[B\+1\]"):
        structural_loss(s, t, cu[None])
    with pytest.raises(ValueError, match="unit_weights"):
        structural_loss(s, t, cu, w[:6])
    with pytest.raises(ValueError, match="unit_weights"):
        structural_loss(s, t, cu, w[None].expand(2, -1))  # [L, U] weights with 2-D inputs
    with pytest.raises(ValueError, match="unit_weights"):
        structural_loss(s[None].expand(2, -1, -1), t[None].expand(2, -1, -1), cu, w[None].expand(3, -1))
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="device"):
            structural_loss(s, t.cpu(), cu)
        with pytest.raises(ValueError, match="device"):
            structural_loss(s, t, cu.cpu())
        with pytest.raises(ValueError, match="unit_weights"):
            structural_loss(s, t, cu, w.cpu())
    else:
        with pytest.raises(ValueError, match="device"):
            structural_loss(s, t.to("meta"), cu)
        with pytest.raises(ValueError, match="device"):
            structural_loss(s, t, cu.to("meta"))
        with pytest.raises(ValueError, match="unit_weights"):
            structural_loss(s, t, cu, w.to("meta"))


def test_torch_long_sequence_row_chunks():
    """The long-sequence pair-space path over several row chunks (chunk 16 < 70 units)."""
    s, t, cu, w = _inputs([3, 70, 1, 66], 17, 9, torch.float32, weights="u")
    s, t, w = s.double(), t.double(), w.double()
    bounds = cu.tolist()
    loss, g = st._torch_forward(
        s[None], t[None], cu, w[None], bounds, True, torch.float64, row_chunk=16, feature_space=False
    )
    ref, ref_g = _run(reference.structural_loss, s, t, cu, w, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(loss[0], ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g[0], ref_g, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_slowest_layouts(backend):
    """D the slowest axis (stride_d = L·U or U): the kernels index D with int64 offsets × stride."""
    s, t, cu, w = _inputs([5, 1, 11], 33, 17, torch.float32, layers=2, weights="u")
    s_d = s.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # [L, U, Ds], strides (U, 1, L·U)
    t_d = t.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert s_d.stride(-1) == s.shape[0] * s.shape[1] and torch.equal(s_d, s)
    _check(s_d, t_d, cu, w, backend, f"{backend}/d-slowest")


def test_grid_stays_within_hardware_limits():
    """One grid axis (2³¹ − 1 programs): layer counts beyond 65535 cannot hit the axis-1 limit."""
    assert st._grid(20_000, 70_000) == (20_000 * 70_000,)
    with pytest.raises(ValueError, match="grid limit"):
        st._grid(2**20, 2**12)


def test_backward_scales_and_casts_in_one_pass():
    """The backward writes the scaled gradient straight in the student's dtype: no second accumulation-
    dtype tensor of the student's size is allocated before the cast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Outputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.append((str(func), t.dtype, t.numel()))
            return out

    s, t, cu, w = _inputs([5, 9], 17, 9, torch.bfloat16, layers=2, weights="u")
    x = s.detach().clone().requires_grad_(True)
    with use_backend("torch"):
        loss = structural_loss(x, t, cu, w).sum()
    watch = Outputs()
    with watch:
        loss.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    # aten.zeros: autograd materialises a zero gradient for the op's second output (the saved gradient,
    # non-differentiable) before the backward runs; the scale-and-cast itself must add none
    full_fp32 = [
        op for op, dtype, n in watch.seen if dtype == torch.float32 and n == x.numel() and "zeros" not in op
    ]
    assert not full_fp32, f"a full-size float32 temporary in the backward: {full_fp32}"
    assert any("mul" in op and dtype == torch.bfloat16 for op, dtype, _ in watch.seen)
