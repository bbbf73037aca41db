"""span_pool (docs/method.md#span-pooling): Triton and torch paths against the float64 oracle, grads, errors.

On a CPU-only machine the Triton kernels run under TRITON_INTERPRET=1 (set by conftest); shapes are
tiny on purpose. On a CUDA machine the same tests run the real kernels.
"""

from __future__ import annotations

import pytest
import torch

from mta_kernels import reference, use_backend
from mta_kernels.ops.span_pool import span_pool
from tests.helpers import DEVICE, DTYPES, assert_within_rule, watch_allocations

BACKENDS = ["triton", "torch"]


def _random_ranges(num_tokens: int, max_len: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted, non-overlapping, non-empty ``[start, end)`` ranges with random gaps (uncovered tokens)."""
    out, pos = [], 0
    while True:
        pos += int(torch.randint(0, 3, (), generator=gen))
        length = int(torch.randint(1, max_len + 1, (), generator=gen))
        if pos + length > num_tokens:
            break
        out.append((pos, pos + length))
        pos += length
    return torch.tensor(out, dtype=torch.int32).reshape(-1, 2)


def _make_case(name: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden float64 on DEVICE, possibly a non-contiguous view; ranges int32 on DEVICE)."""
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    if name == "U0":
        hidden, ranges = rand(17, 17), torch.zeros(0, 2, dtype=torch.int32)
    elif name == "U1":
        hidden, ranges = rand(63, 60), torch.tensor([[5, 9]], dtype=torch.int32)
    elif name == "U2_span300":  # a 1-token unit and a 300-token unit
        hidden, ranges = rand(331, 17), torch.tensor([[0, 1], [7, 307]], dtype=torch.int32)
    elif name == "words_N257_D60":  # many 1–3 token spans
        hidden, ranges = rand(257, 60), _random_ranges(257, 3, gen)
    elif name == "phrases_D129":
        hidden, ranges = rand(63, 129), _random_ranges(63, 7, gen)
    elif name == "wide_D8191":  # hidden sizes up to 8192 are tiled over D (a partial last block)
        hidden, ranges = rand(20, 8191), _random_ranges(20, 4, gen)
    elif name == "stacked_L3":
        hidden, ranges = rand(3, 63, 17), _random_ranges(63, 3, gen)
    elif name == "view_slice":  # [B, T, D'] hidden state, feature slice, flattened: stride_n = 70
        hidden, ranges = rand(3, 21, 70)[:, :, 5:65].flatten(0, 1), _random_ranges(63, 4, gen)
    elif name == "view_transposed":  # stride_d = N != 1
        hidden, ranges = rand(17, 63).t(), _random_ranges(63, 3, gen)
    elif name == "stacked_view":  # [L, B, T, D'] sliced and flattened to [L, N, D]
        hidden, ranges = rand(2, 3, 21, 40)[..., 3:20].flatten(1, 2), _random_ranges(63, 5, gen)
    else:
        raise AssertionError(name)
    return hidden.to(DEVICE), ranges.to(DEVICE)


CASES = [
    "U0",
    "U1",
    "U2_span300",
    "words_N257_D60",
    "phrases_D129",
    "wide_D8191",
    "stacked_L3",
    "view_slice",
    "view_transposed",
    "stacked_view",
]
# Per-layer [L, N] weights only for the stacked cases.
CASE_WEIGHTS = [
    (c, m) for c in CASES for m in ("none", "shared", "layered") if m != "layered" or "stacked" in c
]


def _make_weights(mode: str, hidden: torch.Tensor, ranges: torch.Tensor, gen: torch.Generator):
    """None, shared ``[N]`` or per-layer ``[L, N]`` (a non-contiguous view) float32 weights, with
    zeros: the first unit's tokens all weigh 0 (it must pool to 0), and a few scattered zeros."""
    if mode == "none":
        return None
    lead = hidden.shape[:-2] if mode == "layered" else ()
    N = hidden.shape[-2]
    w = torch.rand(*lead, N, generator=gen, dtype=torch.float64)
    w = torch.where(torch.rand(w.shape, generator=gen, dtype=torch.float64) < 0.1, 0.0, w)
    if ranges.shape[0] >= 2:
        s, e = ranges[0].tolist()
        w[..., s:e] = 0
    if mode == "layered":
        w = w.t().contiguous().t() if w.dim() == 2 else w  # [L, N] with strides (1, L)
    return w.to(torch.float32).to(DEVICE)


def _pool_and_grad(fn, hidden, ranges, weights, grad_out_fn):
    h = hidden.detach().requires_grad_(True)
    out = fn(h, ranges, weights)
    grad_out = grad_out_fn(out)
    (grad,) = torch.autograd.grad(out, h, grad_out)
    return out.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case, weight_mode", CASE_WEIGHTS)
def test_matches_reference(case: str, weight_mode: str, dtype: torch.dtype, backend: str) -> None:
    gen = torch.Generator().manual_seed(100 * CASES.index(case) + len(weight_mode))
    hidden64, ranges = _make_case(case, gen)
    weights = _make_weights(weight_mode, hidden64, ranges, gen)
    # Same low-precision input values for all three; a non-contiguous layout is kept as a view.
    hidden = torch.empty_strided(hidden64.shape, hidden64.stride(), dtype=dtype, device=DEVICE)
    hidden.copy_(hidden64)
    g64 = torch.randn(
        *hidden.shape[:-2], ranges.shape[0], hidden.shape[-1], generator=gen, dtype=torch.float64
    )
    g64 = g64.to(DEVICE)
    grad_low = lambda out: g64.to(out.dtype)

    with use_backend(backend):
        out, grad = _pool_and_grad(span_pool, hidden, ranges, weights, grad_low)
    eager, eager_grad = _pool_and_grad(reference.span_pool, hidden, ranges, weights, grad_low)
    w64 = None if weights is None else weights.double()
    oracle, oracle_grad = _pool_and_grad(reference.span_pool, hidden.double(), ranges, w64, grad_low)

    assert out.dtype == dtype and grad.dtype == dtype
    assert_within_rule(out, eager, oracle, what=f"{case} forward")
    assert_within_rule(grad, eager_grad, oracle_grad, what=f"{case} grad")
    if weights is not None and ranges.shape[0] >= 2:
        assert (out[..., 0, :] == 0).all(), "a unit whose weights sum to 0 must pool to 0"
    # Tokens in no unit get exactly 0 gradient.
    covered = torch.zeros(hidden.shape[-2], dtype=torch.bool, device=DEVICE)
    for s, e in ranges.tolist():
        covered[s:e] = True
    assert (grad[..., ~covered, :] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend: str) -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    ranges = torch.tensor([[0, 1], [2, 5], [5, 6], [7, 9]], dtype=torch.int32, device=DEVICE)
    weights = torch.rand(2, 9, generator=gen, dtype=torch.float64).to(DEVICE)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda h: span_pool(h, ranges, weights), (hidden,))
        assert torch.autograd.gradcheck(lambda h: span_pool(h[0], ranges), (hidden,))


def test_deterministic() -> None:
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 257, 60, generator=gen).to(DEVICE)
    ranges = _random_ranges(257, 3, gen).to(DEVICE)
    weights = torch.rand(257, generator=gen).to(DEVICE)
    grad_out = torch.randn(2, ranges.shape[0], 60, generator=gen).to(DEVICE)
    runs = []
    with use_backend("triton"):
        for _ in range(2):
            runs.append(_pool_and_grad(span_pool, hidden, ranges, weights, lambda out: grad_out))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_triton_forward_does_not_copy_hidden() -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(3, 21, 70, generator=gen, dtype=torch.bfloat16).to(DEVICE)
    hidden = base[:, :, 5:65].flatten(0, 1)  # non-contiguous [63, 60] view
    ranges = _random_ranges(63, 3, gen).to(DEVICE)
    with use_backend("triton"), torch.no_grad(), watch_allocations() as watch:
        out = span_pool(hidden, ranges)
    assert watch.largest <= out.numel(), f"largest allocation {watch.largest} ({watch.largest_op})"


def test_compile_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 40, 17, generator=gen).to(DEVICE).requires_grad_(True)
    ranges = torch.tensor([[0, 1], [2, 5], [5, 6], [10, 30], [31, 32]], dtype=torch.int32, device=DEVICE)
    weights = torch.rand(40, generator=gen).to(DEVICE)

    def loss(h: torch.Tensor) -> torch.Tensor:
        return (span_pool(h, ranges, weights) ** 2).sum() + span_pool(h[1], ranges).sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(hidden)
    (got_grad,) = torch.autograd.grad(got, hidden)
    want = loss(hidden)
    (want_grad,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_opcheck() -> None:
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(9, 6, generator=gen).to(DEVICE).requires_grad_(True)
    ranges = torch.tensor([[0, 2], [3, 4], [4, 8]], dtype=torch.int32, device=DEVICE)
    weights = torch.rand(9, generator=gen).to(DEVICE)
    for w in (None, weights):
        torch.library.opcheck(torch.ops.mta_kernels.span_pool.default, (hidden, ranges, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_uses_input_dtype(backend: str) -> None:
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(20, 17, generator=gen).to(DEVICE)
    ranges = torch.tensor([[0, 3], [5, 6], [9, 20]], dtype=torch.int32, device=DEVICE)
    with use_backend(backend):
        plain = span_pool(hidden, ranges)
        with torch.autocast(device_type=hidden.device.type, dtype=torch.bfloat16):
            under_autocast = span_pool(hidden, ranges)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, plain)


# ------------------------------------------------------------------------------------------- errors
def _valid_inputs():
    hidden = torch.randn(2, 10, 4, device=DEVICE)
    ranges = torch.tensor([[0, 2], [3, 5], [7, 10]], dtype=torch.int32, device=DEVICE)
    return hidden, ranges


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda h, r: (h.to(torch.int32), r, None), TypeError, "hidden must be a floating"),
        (lambda h, r: (h[0, 0], r, None), ValueError, r"hidden must be \[N, D\]"),
        (lambda h, r: (h, r.long(), None), TypeError, "ranges must be an int32"),
        (lambda h, r: (h, r.float(), None), TypeError, "ranges must be an int32"),
        (lambda h, r: (h, r[:, :1], None), ValueError, r"ranges must have shape \[U, 2\]"),
        (lambda h, r: (h, r.flatten(), None), ValueError, r"ranges must have shape \[U, 2\]"),
        (lambda h, r: (h, r, torch.ones(11, device=DEVICE)), ValueError, "weights must have shape"),
        (lambda h, r: (h, r, torch.ones(3, 10, device=DEVICE)), ValueError, "weights must have shape"),
        (lambda h, r: (h[0], r, torch.ones(2, 10, device=DEVICE)), ValueError, "weights must have shape"),
        (lambda h, r: (h, r, torch.ones(10, dtype=torch.int64, device=DEVICE)), TypeError, "weights must be"),
        (lambda h, r: (h, r.to("meta"), None), ValueError, "ranges is on"),
        (lambda h, r: (h, r, torch.ones(10, device="meta")), ValueError, "weights is on"),
    ],
)
def test_metadata_errors(mutate, error, match) -> None:
    hidden, ranges, weights = mutate(*_valid_inputs())
    with pytest.raises(error, match=match):
        span_pool(hidden, ranges, weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "bad_ranges, unit",
    [
        ([[0, 2], [3, 11]], 1),  # past N
        ([[-1, 2], [3, 5]], 0),  # negative start
        ([[0, 2], [3, 3]], 1),  # empty
        ([[0, 2], [5, 3]], 1),  # reversed
        ([[0, 4], [3, 5]], 1),  # overlapping
        ([[3, 5], [0, 2]], 1),  # unsorted
    ],
)
def test_range_errors_name_the_unit(bad_ranges, unit: int, backend: str) -> None:
    hidden, _ = _valid_inputs()
    ranges = torch.tensor(bad_ranges, dtype=torch.int32, device=DEVICE)
    with use_backend(backend), pytest.raises(ValueError, match=f"unit {unit} "):
        span_pool(hidden, ranges)


# --------------------------------------------------------------------------- planned ranges, value checks
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_negative_weights_are_rejected(backend: str) -> None:
    device = DEVICE if backend == "triton" else "cpu"
    h = torch.randn(2, 6, 4, device=device)
    ranges = torch.tensor([[0, 2], [3, 6]], dtype=torch.int32, device=device)
    w = torch.rand(2, 6, device=device)
    w[1, 4] = -0.5
    if device != "cpu":
        pytest.skip("on CUDA the check is a device-side assert, which ends the CUDA context")
    # The torch path on the CPU reads the values (ValueError naming the entry); the Triton path adds a
    # device-side assert instead of a host sync (RuntimeError, at the call under the interpreter).
    error = ValueError if backend == "torch" else RuntimeError
    with use_backend(backend), pytest.raises(error, match="span_pool: weights must be finite and >= 0"):
        span_pool(h, ranges, w)
    w[1, 4] = float("inf")
    with use_backend(backend), pytest.raises(error, match="span_pool: weights must be finite and >= 0"):
        span_pool(h, ranges, w)
    w[1, 4] = 0.0
    with use_backend(backend):  # zero weights are legal (a unit of weight 0 pools to 0)
        span_pool(h, ranges, w)


def test_planned_ranges_reject_a_batch_read_as_layers() -> None:
    from mta_kernels.layout import UnitBatch

    B, T, D = 3, 5, 4
    ranges = torch.tensor([[0, 2], [6, 9], [11, 12]], dtype=torch.int32)
    units = UnitBatch(ranges, ranges, torch.tensor([0, 1, 2, 3], dtype=torch.int32), T, T)
    h = torch.randn(B, T, D)
    plan = units.plan.student
    with pytest.raises(ValueError, match=r"\[B, T, D\] tensor passed as \[L, N, D\]"):
        span_pool(h, units.student_ranges, plan=plan)
    out = span_pool(h.reshape(B * T, D), units.student_ranges, plan=plan)  # the flat view is what it expects
    assert_within_rule(out, out, reference.span_pool(h.reshape(B * T, D).double(), ranges), floor=1e-6)
    with pytest.raises(ValueError, match="plan of other ranges"):
        span_pool(h.reshape(B * T, D), ranges.clone(), plan=plan)


def test_a_plan_edited_in_place_is_not_used() -> None:
    """Ranges modified after planning are checked by the op itself (the plan no longer describes them)."""
    from mta_kernels.layout import UnitBatch

    ranges = torch.tensor([[0, 2], [6, 9]], dtype=torch.int32)
    units = UnitBatch(ranges, ranges, torch.tensor([0, 1, 2], dtype=torch.int32), 5, 5)
    units.student_ranges[1, 1] = 11  # past N = 10: the op's own check names the unit
    with pytest.raises(ValueError, match="unit 1 "):
        span_pool(torch.randn(10, 4), units.student_ranges, plan=units.plan.student)


def test_unplanned_batch_read_as_layers_names_the_bound() -> None:
    h = torch.randn(3, 5, 4)  # [B, T, D] passed as [L, N, D]: ranges index B*T = 15 tokens
    ranges = torch.tensor([[0, 2], [6, 9]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"inside \[0, 5\)"):
        span_pool(h, ranges)
