"""LLM-like activations: a few channels of magnitude 1e3–1e4 on some tokens, as real decoder hidden states
have. Saliency, span pooling and the structural loss against the float64 oracle under the tolerance rule
(docs/method.md#numerical-tolerance-rule), in bfloat16 and float32, on both backends.

Outlier channels give every token a large common direction: scores far from 0 (the saliency's row max is
~1e3–1e4 in base 2, where the two passes must round identically), pooled units dominated by a few
features, and cosines close to 1 whose small differences are the whole structural loss.
"""

from __future__ import annotations

import pytest
import torch

from mta_kernels import reference, use_backend
from mta_kernels.ops.saliency import token_saliency
from mta_kernels.ops.span_pool import span_pool
from mta_kernels.ops.structural import structural_loss
from tests.helpers import DEVICE, assert_within_rule, llm_like_hidden

BACKENDS = ["triton", "torch"]
LOW = [torch.float32, torch.bfloat16]


def test_generator_has_outlier_channels() -> None:
    h = llm_like_hidden(2, 40, 64, seed=3)
    big = h.abs() >= 1e3  # [B, T, D]
    cols = big.any(dim=(0, 1)).nonzero().flatten()
    assert 1 <= len(cols) <= 3, "a few outlier channels"
    assert big[:, 0, cols].all(), "the first token carries them"
    assert 0 < big[..., cols].float().mean() < 1, "only some tokens carry them"
    assert h.abs().max() <= 1e4 and h[~big].abs().max() < 10
    assert torch.equal(h, llm_like_hidden(2, 40, 64, seed=3)), "deterministic per seed"


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_saliency(backend: str, dtype: torch.dtype) -> None:
    T = 40
    h = llm_like_hidden(3, T, 64, dtype=dtype, seed=1)
    mask = torch.ones(3, T, dtype=torch.bool, device=DEVICE)
    mask[1, 29:] = False  # right padding
    mask[2, :9] = False  # left padding
    with use_backend(backend):
        out = token_saliency(h, mask)
    oracle = reference.token_saliency(h.double(), mask)
    eager = reference.token_saliency(h, mask)
    assert_within_rule(out, eager, oracle, floor=1e-6, what=f"saliency {backend}/{dtype}")
    # each valid row's attention sums to 1: the column sums over a sequence add up to 1
    torch.testing.assert_close(out.sum(-1).double(), torch.ones(3, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_span_pool(backend: str, dtype: torch.dtype) -> None:
    h = llm_like_hidden(2, 48, 64, dtype=dtype, seed=2).flatten(0, 1)  # [N, D] flat tokens
    spans = [[0, 1], [1, 4], [6, 13], [20, 22], [48, 49], [50, 62], [90, 96]]
    ranges = torch.tensor(spans, dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(h.shape[0], generator=g).to(DEVICE)  # saliency-like non-negative weights
    grad_out = torch.randn(len(ranges), h.shape[-1], generator=g, dtype=torch.float64).to(DEVICE)

    def run(fn, x, w):
        x = x.detach().clone().requires_grad_(True)
        out = fn(x, ranges, w)
        (out.double() * grad_out).sum().backward()
        return out.detach(), x.grad

    oracle, oracle_g = run(reference.span_pool, h.double(), weights.double())
    eager, eager_g = run(reference.span_pool, h, weights)
    with use_backend(backend):
        out, out_g = run(span_pool, h, weights)
    assert out.dtype == dtype
    assert_within_rule(out, eager, oracle, what=f"span_pool {backend}/{dtype}")
    assert_within_rule(out_g, eager_g, oracle_g, what=f"span_pool grad {backend}/{dtype}")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_structural_loss(backend: str, dtype: torch.dtype) -> None:
    # units pooled from LLM-like hidden states of a student (D 48) and a teacher (D 80)
    cu = torch.tensor([0, 7, 8, 20, 23], dtype=torch.int32, device=DEVICE)
    U = 23
    s = llm_like_hidden(U, 48, dtype=dtype, seed=4, token_fraction=0.5)
    t = llm_like_hidden(U, 80, dtype=dtype, seed=5, token_fraction=0.5)
    w = torch.rand(U, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.1
    g_out = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)

    def run(fn, x, y, ww):
        x = x.detach().clone().requires_grad_(True)
        loss = fn(x, y, cu, ww)
        (loss.double() * g_out).backward()
        return loss.detach(), x.grad

    oracle, oracle_g = run(reference.structural_loss, s.double(), t.double(), w.double())
    eager, eager_g = run(reference.structural_loss, s, t, w)
    with use_backend(backend):
        out, out_g = run(structural_loss, s, t, w)
    assert oracle.item() > 1e-3, "the outliers leave a non-trivial loss"
    assert_within_rule(out, eager, oracle, what=f"structural {backend}/{dtype}")
    assert_within_rule(out_g, eager_g, oracle_g, what=f"structural grad {backend}/{dtype}")
