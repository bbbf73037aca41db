"""Token saliency (docs/method.md#token-saliency): Triton and torch paths against the float64 reference
(docs/method.md#numerical-tolerance-rule).

On a CPU-only machine the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest), so the
shapes here are small; on a GPU the same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

from mta_kernels import reference
from mta_kernels.ops import use_backend
from mta_kernels.ops.saliency import _saliency_torch, _saliency_triton, token_saliency
from tests.helpers import DEVICE, DTYPES, assert_within_rule, watch_allocations

BACKENDS = ["triton", "torch"]
# Saliency values are ~1/n; the default floor 1e-5 would hide an off-by-one mask (error ~1/n²) at
# T ≈ 300. Measured errors of both paths are <= 2e-8 at the sizes below, so 1e-6 leaves margin.
FLOOR = 1e-6


def _mask(lengths: list[int], T: int, left: list[bool] | None = None) -> torch.Tensor:
    """Bool ``[B, T]`` with ``lengths[b]`` valid tokens, right-padded (or left-padded where ``left[b]``)."""
    m = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left is not None and left[b]:
            m[b, T - n :] = True
        else:
            m[b, :n] = True
    return m.to(DEVICE)


def _check(hidden: torch.Tensor, mask: torch.Tensor, backend: str, what: str) -> torch.Tensor:
    """Run one backend and compare with the reference under the tolerance rule; returns the result."""
    with use_backend(backend):
        out = token_saliency(hidden, mask)
    oracle = reference.token_saliency(hidden.double(), mask)
    eager = reference.token_saliency(hidden, mask)
    assert out.dtype == torch.float32
    assert out.device == hidden.device
    assert not out.requires_grad
    assert_within_rule(out, eager, oracle, floor=FLOOR, what=f"{what} [{backend}]")
    return out


def _randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_sequences(backend: str) -> None:
    # T = 1: one valid token (n == 1 -> a = 1) and a fully padded sequence (all zeros).
    h = _randn(2, 1, 60)
    out = _check(h, _mask([1, 0], 1), backend, "T=1")
    assert out.tolist() == [[1.0], [0.0]]
    # T = 2: both valid (each attends only to the other: a = 1/2), n == 1, fully padded.
    h = _randn(4, 2, 60)
    out = _check(h, _mask([2, 1, 0, 1], 2, left=[False, False, False, True]), backend, "T=2")
    assert out.tolist() == [[0.5, 0.5], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ragged_masks(backend: str, dtype: torch.dtype) -> None:
    T = 63
    h = _randn(6, T, 60, dtype=dtype)
    m = _mask([63, 40, 1, 0, 17, 2], T, left=[False, False, False, False, True, True])
    m[0, 5:9] = False  # a hole inside a sequence
    out = _check(h, m, backend, f"T=63 D=60 {dtype}")
    assert (out[~m] == 0).all()
    # Σ_i a_i = (1/n) Σ_j Σ_i A_ji = 1 for every sequence with n >= 2.
    sums = out.sum(-1).double()
    n = m.sum(-1)
    torch.testing.assert_close(sums[n >= 2], torch.ones_like(sums[n >= 2]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_mask_matches_bool(backend: str) -> None:
    h = _randn(3, 33, 60)
    m = _mask([33, 20, 1], 33, left=[False, True, False])
    with use_backend(backend):
        a = token_saliency(h, m)
        for dtype in (torch.int64, torch.int32, torch.uint8):
            assert torch.equal(token_saliency(h, m.to(dtype)), a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_rows(backend: str) -> None:
    # D = 768 at T = 257 (several key/query blocks, left and right padding), and D > 2048 (many chunks).
    h = _randn(2, 257, 768)
    _check(h, _mask([257, 200], 257, left=[False, True]), backend, "T=257 D=768")
    h = _randn(2, 40, 2100, dtype=torch.bfloat16)
    _check(h, _mask([40, 33], 40), backend, "T=40 D=2100 bf16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence(backend: str) -> None:
    # T = 1000 (16 blocks of 64 on the Triton path); D small to keep the interpreter fast.
    h = _randn(2, 1000, 60) if backend == "torch" else _randn(1, 1000, 24)
    lengths = [1000, 731] if backend == "torch" else [977]
    _check(h, _mask(lengths, 1000), backend, "T=1000")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_large_magnitudes(backend: str) -> None:
    # bf16 hidden states with |h| up to 1e4: a massive-activation column, large row means and scales.
    T, D = 63, 768
    h = torch.randn(3, T, D, device=DEVICE) * 300.0
    h[:, :, 7] = 1e4  # one huge feature on every token (as in LLM outlier dimensions)
    h[1] += 5e3  # a row mean far from 0: the two-pass variance must not cancel
    h[2, :, ::3] = -1e4 * torch.rand(T, (D + 2) // 3, device=DEVICE)
    h = h.clamp(-1e4, 1e4).to(torch.bfloat16)
    assert h.abs().max() == 1e4
    out = _check(h, _mask([63, 50, 21], T, left=[False, True, False]), backend, "bf16 |h|<=1e4")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_layers(backend: str) -> None:
    L, B, T, D = 3, 2, 45, 60
    m = _mask([45, 30], T, left=[False, True])
    # A contiguous stack (HF hidden states), and two non-contiguous ones: layers interleaved in memory
    # with padding in D (stride_d = 1), and D the slowest-moving axis of a transposed buffer.
    layers = [_randn(B, T, D) for _ in range(L)]
    stacked = torch.stack(layers)
    interleaved = _randn(B, T, L, D + 5).permute(2, 0, 1, 3)[..., :D]
    transposed = _randn(L, B, D, T).transpose(-1, -2)
    assert not interleaved.is_contiguous() and not transposed.is_contiguous()
    for name, h in [("stack", stacked), ("interleaved", interleaved), ("transposed", transposed)]:
        out = _check(h, m, backend, f"[L,B,T,D] {name}")
        assert out.shape == (L, B, T)
        with use_backend(backend):
            per_layer = torch.stack([token_saliency(h[l], m) for l in range(L)])
        if backend == "triton":  # the layer is a grid axis: each layer's programs are the same
            assert torch.equal(out, per_layer), f"{name}: a stacked launch differs from per-layer launches"
        else:  # batched BLAS may block a batch of L·B differently from a batch of B
            torch.testing.assert_close(out, per_layer, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_garbage_is_ignored(backend: str) -> None:
    # Hidden states at padding positions never reach the result, even when they are NaN or inf.
    h = _randn(2, 40, 60)
    m = _mask([40, 25], 40, left=[False, True])
    dirty = h.clone()
    dirty[1, :15] = float("nan")
    dirty[1, 3, 0] = float("inf")
    with use_backend(backend):
        assert torch.equal(token_saliency(dirty, m), token_saliency(h, m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend: str) -> None:
    h = _randn(2, 3, 130, 60, dtype=torch.bfloat16)
    m = _mask([130, 77, 5], 130, left=[False, True, False])
    with use_backend(backend):
        first = token_saliency(h, m)
        assert all(torch.equal(token_saliency(h, m), first) for _ in range(2))


def test_torch_path_never_allocates_t_squared() -> None:
    # The watch cannot see inside a custom op (its kernel runs with the mode popped), so it watches the
    # path function itself: every tensor it makes, scores chunks included, must stay below T².
    # Eight sequences: chunks stacking all of them (8 × 128 rows × T) would exceed T² as well.
    T = 1000
    h = _randn(1, 8, T, 32)
    m = _mask(
        [T, 600, 999, 1, 0, 700, 64, 500], T, left=[False, True, False, False, False, True, False, False]
    )
    out = torch.empty(1, 8, T, device=DEVICE)
    with watch_allocations() as watch:
        _saliency_torch(h, m, out)
    assert 0 < watch.largest < T * T, f"largest tensor {watch.largest} ({watch.largest_op}) >= T² = {T * T}"
    oracle = reference.token_saliency(h.double(), m)
    assert_within_rule(out, reference.token_saliency(h, m), oracle, floor=FLOOR, what="watched torch path")


def test_triton_path_never_allocates_t_squared() -> None:
    # The host launcher allocates only O(L·B·T) scratch (row scales, lse); the kernels store nothing else.
    # (Under the interpreter the watch also sees Triton's byte copy of ``h``: 38 400 elements < T².)
    T, D = 300, 16
    h = _randn(1, 2, T, D)
    m = _mask([T, 111], T)
    out = torch.empty(1, 2, T, device=DEVICE)
    with watch_allocations() as watch:
        _saliency_triton(h, m, out)
    assert 0 < watch.largest < T * T, f"largest tensor {watch.largest} ({watch.largest_op}) >= T² = {T * T}"
    oracle = reference.token_saliency(h.double(), m)
    assert_within_rule(out, reference.token_saliency(h, m), oracle, floor=FLOOR, what="watched triton path")


def test_no_gradient() -> None:
    h = _randn(2, 20, 60).requires_grad_()
    m = _mask([20, 9], 20)
    a = token_saliency(h, m)
    assert not a.requires_grad and a.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        a.sum().backward()
    # As a weight in a loss it is a constant: the gradient of Σ a_i·f(h_i) w.r.t. h is a_i·f'(h_i) only.
    (a * h.sum(-1)).sum().backward()
    torch.testing.assert_close(h.grad, a[..., None].expand_as(h), rtol=0, atol=0)
    # The raw op, bypassing the detaching wrapper, refuses a backward with a clear message.
    raw = torch.ops.mta_kernels.token_saliency(h, m)
    with pytest.raises(RuntimeError, match=r"token_saliency has no gradient"):
        raw.sum().backward()


def test_torch_compile_fullgraph() -> None:
    h = _randn(2, 2, 37, 60)
    m = _mask([37, 12], 37)

    def weights(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return token_saliency(hidden, mask) * 2.0

    compiled = torch.compile(weights, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    torch.testing.assert_close(compiled(h, m), weights(h, m), rtol=0, atol=0)


def test_empty_shapes() -> None:
    assert token_saliency(_randn(2, 0, 60), _mask([0, 0], 0)).shape == (2, 0)
    assert token_saliency(_randn(3, 0, 5, 60), _mask([], 5)).shape == (3, 0, 5)


def test_bad_inputs() -> None:
    h = _randn(2, 5, 8)
    m = _mask([5, 3], 5)
    with pytest.raises(TypeError, match="floating-point"):
        token_saliency(torch.ones(2, 5, 8, dtype=torch.int32, device=DEVICE), m)
    with pytest.raises(TypeError, match="attention_mask"):
        token_saliency(h, m.float())
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        token_saliency(h, m[:, :4])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        token_saliency(h, m[0])
    with pytest.raises(ValueError, match=r"\[L, B, T, D\]"):
        token_saliency(h[0], m)
    with pytest.raises(ValueError, match=r"\[L, B, T, D\]"):
        token_saliency(h[None, None], m)
    with pytest.raises(ValueError, match="D >= 2"):
        token_saliency(h[..., :1], m)
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        token_saliency(h, m.to("meta"))


def test_grid_stays_within_hardware_limits() -> None:
    """Blocks, sequences and layers share grid axis 0 (2³¹ − 1 programs): a batch of 100000 sequences
    (beyond axis 1's 65535) gets a valid grid; an impossible one is a clear error."""
    from mta_kernels.ops import saliency as sal

    assert sal._grid(4096, 64, 100_000, 80) == (64 * 100_000 * 80,)
    with pytest.raises(ValueError, match="grid limit"):
        sal._grid(2**20, 16, 2**16, 2**4)
