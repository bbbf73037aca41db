"""The glue between the ops: small computations that run between the kernels, each with one launch on
the Triton path where the torch composition takes many, and the torch composition elsewhere (CPU
tensors, ``use_backend("torch")``, and while torch.compile traces, so that the compiler fuses it).

- :func:`covered_mask`: which flat tokens lie in some unit (units without a plan).
- :func:`normalised_weights`: ``ŵ_i = a_i / Σ_{k covered, same sequence} a_k`` on covered tokens, 0
  elsewhere (docs/method.md#span-pooling), one program per (sequence, layer).
- :func:`unit_weight_sums`: the unit importances ``W_u = Σ_{i in u} w_i``.
- :func:`dsa_denominator`: ``Σ_b [n_b ≥ 2] ((Σ_{u in b} W_u)² − Σ_{u in b} W_u²)`` per layer, the
  denominator of the weighted DSA loss (docs/method.md#dsa-loss; ``Σ_b n_b (n_b − 1)`` unweighted), in
  float64, in one program per layer that walks the sequences in order (deterministic).
- :func:`dsa_finish`: the same launch also sums the structural kernel's numerator partials and returns
  the loss and the gradient factor ``4 / den``.
- :func:`check_weights`: the value check of a weight input (finite, >= 0), without a host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mta_kernels.ops._common import pow2_block
from mta_kernels.ops._dispatch import use_triton
from mta_kernels.ops._triton import tl, triton

__all__ = [
    "check_weights",
    "covered_mask",
    "dsa_denominator",
    "dsa_finish",
    "normalised_weights",
    "unit_weight_sums",
]

_DSA_BU, _DSA_NUM_WARPS = 64, 1  # units per step of the sequence walk; one warp per layer
_NORMALISE_NUM_WARPS = 4


def _normalise_bt(T: int) -> int:
    """Tokens per step of the normalisation kernel: next power of 2 of T, in [16, 1024]."""
    return pow2_block(T, 16, 1024)


@triton.jit
def _dsa_denominator_kernel(
    W,  # [L or 1, U] unit weights, any float dtype (stride_wl = 0 broadcasts one row); unused unweighted
    CU,  # int32 [B+1]
    OUT,  # [L] denominator, output dtype
    PARTIAL,  # [L, num_work] numerator partials of the structural kernel; unused without FINISH
    LOSS,  # [L] out: num / den (0 when den = 0); unused without FINISH
    SCALE,  # [L] out: 4 / den (0 when den = 0), the gradient epilogue's factor; unused without FINISH
    B,
    num_work,
    stride_wl,
    stride_wu,
    HAS_WEIGHTS: tl.constexpr,
    FINISH: tl.constexpr,
    BU: tl.constexpr,
):
    # One program per layer: walks the sequences in order, then (FINISH) sums the numerator partials in
    # float64 in a fixed order and divides: deterministic, one launch for the whole reduction.
    i_l = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BU).to(tl.int64)
    b_den = tl.zeros([BU], dtype=tl.float64)  # the total sits in slot 0
    for b in range(0, B):
        p_cu = CU + (i_l * 0 + b)  # an int64 offset (the loop index is int32)
        lo = tl.load(p_cu).to(tl.int64)
        hi = tl.load(p_cu + 1).to(tl.int64)
        if HAS_WEIGHTS:
            b_s1 = tl.zeros([BU], dtype=tl.float64)
            b_s2 = tl.zeros([BU], dtype=tl.float64)
            for u0 in range(lo, hi, BU):
                m = u0 + o < hi
                b_w = tl.load(W + i_l * stride_wl + (u0 + o) * stride_wu, mask=m, other=0.0).to(tl.float64)
                b_s1 += b_w
                b_s2 += b_w * b_w
            s1 = tl.sum(b_s1, axis=0)
            s2 = tl.sum(b_s2, axis=0)
            b_den += tl.where((o == 0) & (hi - lo >= 2), s1 * s1 - s2, 0.0)
        else:
            n = (hi - lo).to(tl.float64)
            b_den += tl.where(o == 0, n * (n - 1.0), 0.0)  # Σ_b n_b (n_b − 1): 0 for n_b ≤ 1
    den = tl.sum(b_den, axis=0)
    tl.store(OUT + i_l, den.to(OUT.dtype.element_ty))
    if FINISH:
        b_num = tl.zeros([BU], dtype=tl.float64)
        for w0 in range(0, num_work, BU):
            m = w0 + o < num_work
            b_num += tl.load(PARTIAL + (i_l * num_work + w0 + o), mask=m, other=0.0).to(tl.float64)
        num = tl.sum(b_num, axis=0)
        safe = tl.where(den > 0, den, 1.0)
        tl.store(LOSS + i_l, (num / safe).to(LOSS.dtype.element_ty))
        tl.store(SCALE + i_l, tl.where(den > 0, 4.0 / safe, 0.0).to(SCALE.dtype.element_ty))


def _launch_dsa_reduction(weights, cu_units, den, partial, loss, scale) -> None:
    L = den.shape[0]
    if L == 0:
        return
    finish = partial is not None
    _dsa_denominator_kernel[(L,)](
        den if weights is None else weights,
        cu_units,
        den,
        partial if finish else den,
        loss if finish else den,
        scale if finish else den,
        cu_units.shape[0] - 1,
        partial.shape[1] if finish else 0,
        weights.stride(0) if weights is not None and weights.shape[0] > 1 else 0,
        weights.stride(1) if weights is not None else 0,
        HAS_WEIGHTS=weights is not None,
        FINISH=finish,
        BU=_DSA_BU,
        num_warps=_DSA_NUM_WARPS,
    )


def dsa_denominator(
    weights: torch.Tensor | None,
    cu_units: torch.Tensor,
    bounds: list[int],
    L: int,
    dtype: torch.dtype,
    offsets_checked: bool = False,
) -> torch.Tensor:
    """``[L]`` weighted DSA denominator, float64 sums (prefix sums on the torch path: deterministic),
    cast to ``dtype``.

    Args:
        weights: ``[L, U]`` or ``[1, U]`` unit weights (read in place), or None (every unit weighs 1:
            ``Σ_b n_b (n_b − 1)``, computed on the host from ``bounds``).
        cu_units: int32 ``[B+1]`` on the weights' device; bounds: the same offsets on the host.
        offsets_checked: ``cu_units`` is known to hold ``bounds`` (a planned batch): the weighted sums
            read the device offsets (one launch on the Triton path) instead of copying ``bounds`` to
            the device.
    """
    device = cu_units.device
    if weights is None:
        total = sum((hi - lo) * (hi - lo - 1) for lo, hi in zip(bounds[:-1], bounds[1:]))
        return torch.full((L,), float(total), dtype=dtype, device=device)
    weights = weights.detach()
    if offsets_checked:
        if use_triton(weights):  # one launch instead of the composition below
            out = torch.empty(L, dtype=dtype, device=device)
            _launch_dsa_reduction(weights, cu_units, out, None, None, None)
            return out
        cu = cu_units.long()
        lo, hi = cu[:-1], cu[1:]
    else:
        lo = torch.tensor(bounds[:-1], dtype=torch.long, device=device)
        hi = torch.tensor(bounds[1:], dtype=torch.long, device=device)
    pairs = (hi - lo) >= 2  # [B]
    w = weights.to(torch.float64).expand(L, weights.shape[-1])
    zero = w.new_zeros(L, 1)
    c1 = torch.cat([zero, w.cumsum(-1)], dim=-1)  # [L, U+1]
    c2 = torch.cat([zero, (w * w).cumsum(-1)], dim=-1)
    s1 = c1[:, hi] - c1[:, lo]  # [L, B]
    s2 = c2[:, hi] - c2[:, lo]
    return ((s1 * s1 - s2) * pairs).sum(-1).to(dtype)


def dsa_finish(
    weights: torch.Tensor | None, cu_units: torch.Tensor, partial: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DSA loss ``[L]`` and the gradient factor ``4 / den`` ``[L]`` (both 0 where den = 0) from the
    structural kernel's numerator partials, with the denominator, in one launch.

    Args:
        weights: ``[L, U]`` / ``[1, U]`` unit weights or None. cu_units: int32 ``[B+1]``, valid.
        partial: ``[L, W]`` numerator partials (float32 or float64: the outputs' dtype).
    """
    L = partial.shape[0]
    den = torch.empty(L, dtype=partial.dtype, device=partial.device)
    loss, scale = torch.empty_like(den), torch.empty_like(den)
    _launch_dsa_reduction(weights, cu_units, den, partial, loss, scale)
    return loss, scale


@triton.jit
def _normalised_weights_kernel(
    A,  # [L, B, T] saliency, contiguous
    T2U,  # int32 [B*T] unit of each token, -1 = uncovered
    OUT,  # [L, B, T] contiguous
    B,
    T,
    BT: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_l = tl.program_id(1).to(tl.int64)
    base = (i_l * B + i_b) * T
    o = tl.arange(0, BT).to(tl.int64)
    b_sum = tl.zeros([BT], dtype=tl.float32)
    for t0 in range(0, T, BT):
        m = t0 + o < T
        cov = tl.load(T2U + (i_b * T + t0 + o), mask=m, other=-1) >= 0
        b_sum += tl.where(cov, tl.load(A + (base + t0 + o), mask=m, other=0.0).to(tl.float32), 0.0)
    total = tl.sum(b_sum, axis=0)
    inv = tl.where(
        total > 0, tl.div_rn(1.0, tl.where(total > 0, total, 1.0)), 0.0
    )  # all-zero sequence: weights 0
    for t0 in range(0, T, BT):
        m = t0 + o < T
        cov = tl.load(T2U + (i_b * T + t0 + o), mask=m, other=-1) >= 0
        b_a = tl.load(A + (base + t0 + o), mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + (base + t0 + o), tl.where(cov, b_a * inv, 0.0), mask=m)


def normalised_weights(saliency: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """``ŵ_i = a_i / Σ_{k covered, same sequence} a_k`` on covered tokens, 0 elsewhere.

    Args:
        saliency: ``[L, B, T]`` token weights ``a`` (non-negative).
        covered: ``[B*T]``, bool (token lies in a unit) or the int32 token -> unit map of a plan (``-1``
            for tokens in no unit).
    Returns:
        ``[L, B, T]`` in saliency's dtype (float32 from the kernel); a sequence whose covered weights
        sum to 0 gets weights 0, never 0/0. The layout is padded, so the per-sequence segment sum is a
        plain reduction over T. One launch on the Triton path (float32 saliency, a token -> unit map).
    """
    L, B, T = saliency.shape
    if (
        covered.dtype == torch.int32
        and saliency.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and use_triton(saliency)
    ):
        a = saliency.contiguous()
        out = torch.empty_like(a)
        if a.numel() > 0:
            _normalised_weights_kernel[(B, L)](
                a, covered, out, B, T, BT=_normalise_bt(T), num_warps=_NORMALISE_NUM_WARPS
            )
        return out
    if covered.dtype != torch.bool:
        covered = covered >= 0
    a = saliency * covered.view(1, B, T)
    per_seq = a.sum(-1, keepdim=True)  # [L, B, 1]
    # per_seq = 0 only when every a_i of the sequence is 0: 0 / tiny = 0, never 0 / 0
    return a / per_seq.clamp_min(torch.finfo(per_seq.dtype).tiny)


def covered_mask(ranges: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """bool ``[N]``: token lies in some unit. Difference array + cumsum: O(N + U), no host sync."""
    r = ranges.long().clamp(0, num_tokens)  # never an out-of-bounds write, even for unchecked units
    delta = torch.zeros(num_tokens + 1, dtype=torch.int32, device=ranges.device)
    ones = torch.ones(r.shape[0], dtype=torch.int32, device=ranges.device)
    delta.index_add_(0, r[:, 0], ones)
    delta.index_add_(0, r[:, 1], -ones)
    return delta.cumsum(0)[:num_tokens] > 0


def unit_weight_sums(token_weights: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """``W_u = Σ_{i in u} w_i`` for every unit, from per-sequence prefix sums (no loop, no host sync).

    token_weights ``[L, B, T]``, ranges int32 ``[U, 2]`` flat into ``B*T`` -> ``[L, U]``.
    The prefix sums run per sequence and in float64, so ``c[end] − c[start]`` loses nothing to
    cancellation; each sequence gets a leading 0, hence flat token f of sequence b sits at f + b.
    """
    L, B, T = token_weights.shape
    prefix = F.pad(token_weights.to(torch.float64).cumsum(-1), (1, 0)).reshape(L, B * (T + 1))
    start, end = ranges[:, 0].long(), ranges[:, 1].long()
    seq = torch.div(start, T, rounding_mode="floor")  # a unit never crosses a sequence
    sums = prefix[:, end + seq] - prefix[:, start + seq]  # [L, U]
    return sums.to(token_weights.dtype)


def check_weights(weights: torch.Tensor | None, name: str, *, device_assert: bool = True) -> None:
    """Refuse a weight input (any shape, floating point) holding a negative or non-finite value.

    Unit importances and token weights are sums and ratios of non-negative quantities in the method
    (docs/method.md#the-objective): a negative weight turns the loss negative, an infinite one makes it
    NaN. Reading the values back costs a host sync, so they are read only where that is free: CPU
    tensors on the eager torch path. Elsewhere (the Triton path, a GPU, ``torch.compile`` tracing) the
    check is a device-side assert (``torch._assert_async``: on CUDA the error surfaces at the next
    synchronisation; no sync is added), or nothing with ``device_assert=False`` (callers that count
    launches and whose values are checked upstream).

    Args:
        weights: the tensor to check; ``None`` (no weights) passes.
        name: how the message names it, e.g. ``"structural_loss: unit_weights"``.
        device_assert: off the eager CPU path, add the device-side assert.
    Raises:
        ValueError: on the eager torch path on the CPU, naming the first bad entry and its value.
        RuntimeError: elsewhere, from the device-side assert (CUDA reports it asynchronously; on the CPU
            under the Triton interpreter it is raised at the call).
    """
    if weights is None:
        return
    w = weights.detach()
    if w.device.type == "cpu" and not torch.compiler.is_compiling() and not use_triton(w):
        bad = ~(torch.isfinite(w) & (w >= 0))
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            where = index[0] if len(index) == 1 else index
            raise ValueError(
                f"{name} must be finite and >= 0, but entry {where} is {float(w[index])} "
                f"({int(bad.sum())} of {w.numel()} entries are negative or not finite)"
            )
        return
    if device_assert:
        torch._assert_async((torch.isfinite(w) & (w >= 0)).all(), f"{name} must be finite and >= 0")
