"""The published cross-tokenizer MTA term (mta_kernels.variants) against the published formula, written
out here in float64 from the published code's steps (dense unit-membership matrices, the published
saliency, clamped denominators), on random inputs without padding: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mta_kernels.layout import UnitBatch
from mta_kernels.variants import CrossTokenizerMTALoss, teacher_confidence

B, TS, TT, DS, DT = 2, 7, 9, 6, 10
# Per sequence, [start, end) token ranges of the same units in the two tokenizations.
UNITS = {
    "word": ([[(0, 2), (2, 3), (4, 6)], [(1, 2), (3, 5)]], [[(0, 3), (3, 4), (5, 8)], [(0, 2), (4, 7)]]),
    "phrase": ([[(0, 3), (4, 7)], [(0, 2), (2, 5), (5, 7)]], [[(0, 4), (5, 9)], [(0, 3), (3, 6), (6, 9)]]),
}
PAIRS = [(1, 2, "word"), (2, 3, "phrase"), (3, 3, "phrase")]
MS, MT = torch.ones(B, TS, dtype=torch.long), torch.ones(B, TT, dtype=torch.long)  # no padding


def _unit_batch(g: str) -> UnitBatch:
    s_seq, t_seq = UNITS[g]
    flat = lambda seqs, T: torch.tensor(  # noqa: E731
        [[b * T + a, b * T + e] for b, seq in enumerate(seqs) for a, e in seq], dtype=torch.int32
    )
    cu = torch.tensor([0, *torch.tensor([len(s) for s in s_seq]).cumsum(0).tolist()], dtype=torch.int32)
    return UnitBatch(flat(s_seq, TS), flat(t_seq, TT), cu, TS, TT)


def _membership(seqs, T) -> tuple[torch.Tensor, torch.Tensor]:
    """Published layout: A [B, Umax, T] (token in unit), valid [B, Umax]."""
    umax = max(len(s) for s in seqs)
    A = torch.zeros(B, umax, T, dtype=torch.float64)
    valid = torch.zeros(B, umax, dtype=torch.bool)
    for b, seq in enumerate(seqs):
        for u, (a, e) in enumerate(seq):
            A[b, u, a:e] = 1
            valid[b, u] = True
    return A, valid


def _published_weights(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    std = h.std(dim=-1, keepdim=True) + 1e-5
    q = h / std
    scores = q @ q.transpose(-1, -2) / h.shape[-1] ** 0.5
    m = mask[:, None, :].expand(-1, scores.shape[-2], -1)
    scores = scores.masked_fill(m == 0, float("-inf"))
    scores = scores.masked_fill(torch.eye(scores.shape[-1], dtype=torch.bool)[None], float("-inf"))
    attn = F.softmax(scores, dim=-1) * m
    attn = attn / attn.sum(-1, keepdim=True)
    return attn.mean(dim=1).detach()


def _published_layer(hs, ht, proj, g, conf=None):
    mask_s, mask_t = MS, MT
    A_s, valid = _membership(UNITS[g][0], TS)
    A_t, _ = _membership(UNITS[g][1], TT)
    w_s, w_t = _published_weights(hs, mask_s), _published_weights(ht, mask_t)
    span_s = (A_s @ (hs * w_s[..., None])) / (A_s @ w_s[..., None]).clamp(min=1e-5)
    span_t = (A_t @ (ht * w_t[..., None])) / (A_t @ w_t[..., None]).clamp(min=1e-5)
    if conf is None:
        w_sum = (A_t @ w_t[..., None]).squeeze(-1)
    else:
        w_sum = (A_t @ conf[..., None]).squeeze(-1) / A_t.sum(-1).clamp(min=1e-5)
    s = F.normalize(proj(span_s)[valid], dim=-1)
    t = F.normalize(span_t[valid], dim=-1)
    w = w_sum[valid]
    batch_ids = torch.arange(B)[:, None].expand(-1, valid.shape[1])[valid]
    keep = (batch_ids[:, None] == batch_ids[None, :]) & ~torch.eye(len(w), dtype=torch.bool)
    err = (s @ s.T - t @ t.T)[keep] ** 2
    pw = (w[:, None] * w[None, :])[keep]
    return (err * pw).sum() / pw.sum().clamp(min=1e-5)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(B, TS, DS, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(4)]
    ht = [torch.randn(B, TT, DT, generator=g, dtype=torch.float64) for _ in range(4)]
    logits = torch.randn(B, TT, 11, generator=g, dtype=torch.float64) * 3
    return hs, ht, logits


@pytest.mark.parametrize("entropy", [False, True], ids=["saliency-weights", "entropy-weights"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_published_formula(seed, entropy):
    torch.manual_seed(seed)
    loss_fn = CrossTokenizerMTALoss(PAIRS, DS, DT).double()
    hs, ht, logits = _inputs(seed)
    conf = teacher_confidence(logits).double() if entropy else None
    units = {g: _unit_batch(g) for g in UNITS}
    out = loss_fn(hs, ht, units, MS, MT, teacher_confidence=conf)
    want = sum(
        _published_layer(hs[s], ht[t], p, g, conf) for (s, t, g), p in zip(PAIRS, loss_fn.projectors)
    ) / len(PAIRS)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-7)
    params = [*hs[1:], *loss_fn.parameters()]
    got = torch.autograd.grad(out.loss, params)
    ref = torch.autograd.grad(want, params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert all(float(x.abs().sum()) > 0 for x in got)  # every pair's layer and projector is trained
    assert out.dsa.shape == (len(PAIRS),) and float(out.loss.detach()) > 0


def test_differs_from_unweighted_and_handles_no_units():
    torch.manual_seed(0)
    hs, ht, _ = _inputs(3)
    units = {g: _unit_batch(g) for g in UNITS}
    a = CrossTokenizerMTALoss(PAIRS, DS, DT).double()
    b = CrossTokenizerMTALoss(PAIRS, DS, DT, weighted=False).double()
    b.load_state_dict(a.state_dict())
    la = a(hs, ht, units, MS, MT).loss
    lb = b(hs, ht, units, MS, MT).loss
    assert abs(float(la - lb)) > 1e-6
    empty = UnitBatch(torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2, dtype=torch.int32),
                      torch.zeros(B + 1, dtype=torch.int32), TS, TT)  # fmt: skip
    out = a(hs, ht, {"word": empty, "phrase": empty}, MS, MT)
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert torch.isfinite(hs[1].grad).all()


def test_teacher_confidence_and_bad_inputs():
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    p = logits.softmax(-1)
    want = 1 - (-(p * p.log()).sum(-1)) / math.log(5)
    torch.testing.assert_close(teacher_confidence(logits).double(), want, rtol=1e-5, atol=1e-6)
    one_hot = torch.full((1, 1, 4), -1e4)
    one_hot[..., 0] = 0
    assert float(teacher_confidence(one_hot)) == pytest.approx(1.0)
    assert float(teacher_confidence(torch.zeros(1, 1, 4))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="V >= 2"):
        teacher_confidence(torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match="pair"):
        CrossTokenizerMTALoss([(1, 1, "sentence")], 4, 4)
    with pytest.raises(ValueError, match="at least one"):
        CrossTokenizerMTALoss([], 4, 4)
    loss_fn = CrossTokenizerMTALoss([(1, 1, "word")], DS, DT).double()
    hs, ht, _ = _inputs(0)
    with pytest.raises(ValueError, match="no units of granularity 'word'"):
        loss_fn(hs, ht, {}, MS, MT)
    _, _, units = _inputs(0)
    with pytest.raises(ValueError, match=r"teacher_confidence must be \[B, Tt\]"):
        loss_fn(hs, ht, units, MS, MT, teacher_confidence=torch.ones(MT.shape[0], MT.shape[1] + 1))
    with pytest.raises(TypeError, match="floating-point"):
        loss_fn(hs, ht, units, MS, MT, teacher_confidence=torch.ones(MT.shape, dtype=torch.long))
    unweighted = CrossTokenizerMTALoss([(1, 1, "word")], DS, DT, weighted=False).double()
    with pytest.raises(ValueError, match="needs weighted=True"):
        unweighted(hs, ht, units, MS, MT, teacher_confidence=torch.ones(MT.shape, dtype=torch.float64))


def test_loop_runs_the_variant_with_entropy_weights(tmp_path):
    """``mta-distill distill --mta-variant published-xtok --entropy-weight``: two tokenizers, 2 steps."""
    pytest.importorskip("transformers")
    pytest.importorskip("spacy")
    import json

    from test_distill import _distill_args, make_assets  # tests/ is on sys.path

    from mta_kernels.distill.__main__ import main

    torch.set_num_threads(1)
    assets = make_assets(tmp_path)
    out = tmp_path / "run"
    extra = ("--pairs", "1:1:word,2:2:phrase", "--mta-variant", "published-xtok", "--entropy-weight")
    assert main(_distill_args(assets, out, *extra, batch=8, steps=2)) == 0
    recs = [json.loads(ln) for ln in open(out / "metrics.jsonl") if ln.strip()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 2 and all(r["mta"] > 0 and len(r["dsa"]) == 2 and r["hra"] is None for r in train)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("projectors.") for k in state["mta"])
    # entropy weighting belongs to the variant only
    assert main(_distill_args(assets, tmp_path / "x", "--entropy-weight", "--no-mta")) == 2
