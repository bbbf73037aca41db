"""The KD divergences of the objective against float64 formulas written out by hand (values, gradients)."""

from __future__ import annotations

import pytest
import torch

from mta_kernels.distill import objective as O


def _inputs(seed: int = 0, b: int = 2, t: int = 5, v: int = 7):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    te = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100  # a prompt
    labels[1, -1] = -100  # padding
    return s, te, labels


def _hand(kind: str, s: torch.Tensor, te: torch.Tensor, labels: torch.Tensor, alpha: float, tau: float):
    """Sum over target positions of the divergence, from probabilities (float64, no log-space tricks)."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            if labels[b, i + 1] == -100:
                continue
            ps = torch.exp(s[b, i] / tau) / torch.exp(s[b, i] / tau).sum()
            pt = torch.exp(te[b, i] / tau) / torch.exp(te[b, i] / tau).sum()
            if kind == "forward":
                total = total + tau**2 * (pt * torch.log(pt / ps)).sum()
            elif kind == "reverse":
                total = total + tau**2 * (ps * torch.log(ps / pt)).sum()
            elif kind == "skew":  # KL(p_T || a p_T + (1-a) p_S)
                total = total + (pt * torch.log(pt / (alpha * pt + (1 - alpha) * ps))).sum()
            elif kind == "srkl":  # KL(p_S || a p_S + (1-a) p_T)
                total = total + (ps * torch.log(ps / (alpha * ps + (1 - alpha) * pt))).sum()
            elif kind == "distillm_sfkl":  # DistiLLM's skewed_forward_kl: the cross-entropy
                total = total - (pt * torch.log(alpha * pt + (1 - alpha) * ps)).sum()
            elif kind == "entropy":
                total = total - (pt * torch.log(pt)).sum()
    return total


@pytest.mark.parametrize(
    "kind,alpha,tau",
    [("forward", 0.1, 1.0), ("forward", 0.1, 2.0), ("reverse", 0.1, 1.5), ("skew", 0.1, 1.0),
     ("skew", 0.0, 1.0), ("skew", 0.5, 3.0), ("srkl", 0.1, 1.0), ("srkl", 0.0, 1.0), ("srkl", 0.7, 2.0)],
)  # fmt: skip
def test_kd_sum_matches_hand_formula(kind, alpha, tau):
    """Value and gradient of each divergence (the skew kinds ignore the temperature)."""
    s, te, labels = _inputs()
    ours = O.kd_sum(s, te, labels, kind, tau, alpha)
    assert ours.dtype == torch.float32
    hand = _hand(kind, s, te, labels, alpha, 1.0 if kind in ("skew", "srkl") else tau)
    torch.testing.assert_close(ours.double(), hand, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_hand,) = torch.autograd.grad(hand, s)
    torch.testing.assert_close(g_ours, g_hand, rtol=1e-4, atol=1e-6)
    assert g_hand.abs().sum() > 0


def test_skew_forward_conventions():
    """Ours is KL (0 at p_S = p_T); DistiLLM's value is ours + H(p_T); both have the same gradient."""
    s, te, labels = _inputs(seed=3)
    ours = O.kd_sum(s, te, labels, "skew", 1.0, 0.1)
    theirs = _hand("distillm_sfkl", s, te, labels, 0.1, 1.0)
    entropy = O.teacher_entropy_sum(te, labels)
    hand_entropy = _hand("entropy", s, te, labels, 0.1, 1.0)
    torch.testing.assert_close(entropy.double(), hand_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((ours + entropy).double(), theirs, rtol=1e-5, atol=1e-6)
    assert float(entropy) > 0.1  # the conventions differ by a visible amount
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_theirs,) = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)
    same = O.kd_sum(te.clone().requires_grad_(True), te, labels, "skew", 1.0, 0.1)
    assert abs(float(same.detach())) < 1e-5
    same = O.kd_sum(te.clone().requires_grad_(True), te, labels, "srkl", 1.0, 0.1)
    assert abs(float(same.detach())) < 1e-5


def test_skew_kinds_are_finite_for_extreme_logits():
    """Probabilities that underflow in float32 (logit gaps of 200) give finite values and gradients."""
    s, te, labels = _inputs(seed=1)
    s = (s.detach() * 100).float().requires_grad_(True)
    te = (te * 100).float()
    for kind in ("skew", "srkl"):
        out = O.kd_sum(s, te, labels, kind, 1.0, 0.1)
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(g).all()


def test_kd_sum_rejects_bad_kind_and_alpha():
    s, te, labels = _inputs()
    with pytest.raises(ValueError, match="unknown KD kind"):
        O.kd_sum(s, te, labels, "sfkl")
    with pytest.raises(ValueError, match="skew_alpha"):
        O.kd_sum(s, te, labels, "srkl", skew_alpha=1.0)
    assert set(O.KD_CONVENTIONS) == {"forward", "reverse", "skew", "srkl"}


def test_skew_run_logs_the_teacher_entropy(tmp_path):
    """A ``--kd skew`` run logs H(p_T) per target token next to ``kd`` (DistiLLM's value is their sum)."""
    pytest.importorskip("transformers")
    import json

    from test_distill import _distill_args, make_assets  # tests/ is on sys.path

    from mta_kernels.distill.__main__ import main

    assets = make_assets(tmp_path)
    for kind in ("skew", "srkl"):
        out = tmp_path / kind
        assert (
            main(_distill_args(assets, out, "--no-mta", "--kd", kind, student_tok="bpe", batch=8, steps=2))
            == 0
        )
        recs = [json.loads(ln) for ln in open(out / "metrics.jsonl") if ln.strip()]
        train = [r for r in recs if r["kind"] == "train"]
        assert len(train) == 2
        if kind == "skew":
            # a teacher over a 400-token vocabulary: entropy between 0 and log 400
            assert all(0.0 < r["kd_teacher_entropy"] < 6.0 and r["kd"] >= 0 for r in train)
        else:
            assert all("kd_teacher_entropy" not in r for r in train)


# DistiLLM's divergences (distillm/losses.py), transcribed and summed over rows instead of averaged over
# target tokens: the entries where either logit is infinite are masked out of the products.
def _distillm_forward_kl(logits, teacher_logits):
    teacher_probs = torch.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(logits)
    student_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(teacher_probs * student_logprobs, inf_mask, 0)
    return -torch.sum(prod_probs)


def _distillm_reverse_kl(logits, teacher_logits):
    student_probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    student_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    teacher_logprobs = torch.log_softmax(teacher_logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(teacher_logits) | torch.isinf(logits)
    prod_probs = torch.masked_fill(student_probs * teacher_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    return -torch.sum(prod_probs)


def _distillm_skewed_reverse_kl(logits, teacher_logits, lam=0.1):
    teacher_probs = torch.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    student_probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    mixed_probs = (1 - lam) * teacher_probs + lam * student_probs
    student_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    mixed_logprobs = torch.log(mixed_probs)
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    return -torch.sum(prod_probs)


@pytest.mark.parametrize("kind", sorted(O.KD_CONVENTIONS))
def test_kd_is_finite_with_minus_inf_logits_and_masks_them_as_distillm(kind):
    """-inf logits (masked or padded vocabulary entries) give a finite KD and gradient, not NaN."""
    torch.manual_seed(0)
    s = torch.randn(6, 12)
    t = torch.randn(6, 12)
    s[:, 3] = float("-inf")  # the student masks an entry the teacher gives mass
    t[:, 7] = float("-inf")  # the teacher masks an entry the student gives mass
    t[2, :5] = float("-inf")
    s.requires_grad_(True)
    value = O.kd_rows_sum(s, t, kind, temperature=1.0, skew_alpha=0.1)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    assert (s.grad[:, 3] == 0).all()
    log_pt = torch.log_softmax(t, -1).masked_fill(torch.isinf(s) | torch.isinf(t), 0)
    entropy = -(log_pt.exp() * log_pt).masked_fill(torch.isinf(s) | torch.isinf(t), 0).sum()
    with torch.no_grad():
        if kind == "forward":  # DistiLLM's is the cross-entropy: larger by the (masked) teacher entropy
            assert float(value) == pytest.approx(float(_distillm_forward_kl(s, t) - entropy), rel=1e-5)
        elif kind == "reverse":
            assert float(value) == pytest.approx(float(_distillm_reverse_kl(s, t)), rel=1e-5)
        elif kind == "srkl":
            assert float(value) == pytest.approx(float(_distillm_skewed_reverse_kl(s, t)), rel=1e-5)
    # no infinite entry: the same value as before the masking
    finite_s, finite_t = torch.randn(4, 12), torch.randn(4, 12)
    expected = {"forward": _distillm_forward_kl, "reverse": _distillm_reverse_kl}.get(kind)
    if expected is not None:
        got = O.kd_rows_sum(finite_s, finite_t, kind)
        h = -(torch.softmax(finite_t, -1) * torch.log_softmax(finite_t, -1)).sum()
        want = expected(finite_s, finite_t) - (h if kind == "forward" else 0)
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    # the teacher entropy logged next to the skew KL is finite too
    assert torch.isfinite(O.teacher_entropy_rows_sum(t))


def test_kd_term_slices_the_shared_vocabulary_and_checks_it():
    """The one KD term of the loop and MTATrainer: over the tokenizer's first V logits of each model (the
    output layers may be wider), the skew kind's teacher entropy on request, and a clear error when an
    output layer is narrower than the tokenizer."""
    from mta_kernels.distill.kd import KDTerm

    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 12, generator=gen), torch.randn(2, 5, 10, generator=gen)
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, 4, 5, 6]])
    for kind in ("forward", "skew"):
        kd, entropy = KDTerm(kind, 2.0, 0.1, vocab=9)(s, t, labels, with_teacher_entropy=True)
        torch.testing.assert_close(kd, O.kd_sum(s[..., :9], t[..., :9], labels, kind, 2.0, 0.1))
        if kind == "skew":
            torch.testing.assert_close(entropy, O.teacher_entropy_sum(t[..., :9], labels))
        else:
            assert entropy is None
    with pytest.raises(
        ValueError, match="tokenizer has 11 tokens but the student/teacher output layers have 12/10"
    ):
        KDTerm("forward", 1.0, 0.1, vocab=11)(s, t, labels)
