"""Chunked CE + logit KD (``--kd-chunk``) equals the eager path: values and gradients, every divergence,
float64 to rounding and float32 within the tolerance rule (docs/method.md#numerical-tolerance-rule)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_within_rule
from test_distill import _distill_args, _metrics, make_assets  # tests/ is on sys.path

from mta_kernels.distill import objective as O
from mta_kernels.distill.__main__ import main
from mta_kernels.distill.config import DistillError
from mta_kernels.distill.kd_chunked import (
    AUTO_ELEMENTS,
    chunked_ce_kd_sum,
    resolve_kd_chunk,
    unsupported_reason,
)

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, DS, DT, VS, VT, KV = 3, 9, 8, 12, 53, 51, 50  # student head wider than the shared KD vocabulary
KINDS = list(O.KD_CONVENTIONS)


def _inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    labels = torch.randint(0, KV, (B, T), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[2, 6:] = -100  # padding
    return {
        "h_s": r(B, T, DS), "w_s": r(VS, DS, scale=0.7), "b_s": r(VS, scale=0.1),
        "h_t": r(B, T, DT), "w_t": r(VT, DT, scale=0.9), "b_t": r(VT, scale=0.1), "labels": labels,
    }  # fmt: skip


def _eager(x, kind, temperature, alpha, a=0.3, b=0.7):
    """CE and KD of the full logits, their gradients for a·CE + b·KD: the eager path of the loop
    (objective.ce_sum / kd_sum, float32) or, for float64 inputs, the same math kept in float64 (the
    oracle)."""
    leaves = [x[k].detach().clone().requires_grad_() for k in ("h_s", "w_s", "b_s")]
    s = F.linear(leaves[0], leaves[1], leaves[2])
    t = F.linear(x["h_t"], x["w_t"], x["b_t"])
    if s.dtype == torch.float64:
        targets, mask = O.shift_targets(x["labels"])
        ce = F.cross_entropy(s[:, :-1][mask], targets[mask], reduction="sum")
        kd = O.kd_rows_sum(s[:, :-1][mask][:, :KV], t[:, :-1][mask][:, :KV], kind, temperature, alpha)
    else:
        ce, _ = O.ce_sum(s, x["labels"])
        kd = O.kd_sum(s[..., :KV], t[..., :KV], x["labels"], kind, temperature, alpha)
    (a * ce + b * kd).backward()
    return ce.detach(), kd.detach(), [leaf.grad for leaf in leaves]


def _chunked(x, kind, temperature, alpha, chunk, a=0.3, b=0.7):
    leaves = [x[k].detach().clone().requires_grad_() for k in ("h_s", "w_s", "b_s")]
    ce, n, kd, ent = chunked_ce_kd_sum(
        leaves[0], (leaves[1], leaves[2]), x["h_t"], (x["w_t"], x["b_t"]), x["labels"],
        kind, temperature, alpha, KV, chunk,
    )  # fmt: skip
    assert n == int((x["labels"][:, 1:] != -100).sum())
    (a * ce + b * kd).backward()
    return ce.detach(), kd.detach(), [leaf.grad for leaf in leaves], ent


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_float64_equal_to_eager(kind, chunk):
    x = _inputs(torch.float64)
    want = _eager(x, kind, 2.0, 0.1)
    got = _chunked(x, kind, 2.0, 0.1, chunk)
    for w, g in zip((want[0], want[1], *want[2]), (got[0], got[1], *got[2])):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    if kind == "skew":
        _, mask = O.shift_targets(x["labels"])
        log_pt = F.log_softmax(F.linear(x["h_t"], x["w_t"], x["b_t"])[:, :-1][mask][:, :KV], dim=-1)
        torch.testing.assert_close(got[3], -(log_pt.exp() * log_pt).sum(), rtol=1e-10, atol=1e-12)
    else:
        assert got[3] is None


@pytest.mark.parametrize("kind", KINDS)
def test_float32_within_the_tolerance_rule(kind):
    x64 = _inputs(torch.float64, seed=1)
    x32 = {k: (v.float() if v.is_floating_point() else v) for k, v in x64.items()}
    oracle = _eager(x64, kind, 1.5, 0.2)
    eager = _eager(x32, kind, 1.5, 0.2)
    got = _chunked(x32, kind, 1.5, 0.2, 4)
    names = ("ce", "kd", "grad h", "grad W", "grad b")
    for name, o, e, g in zip(names, (oracle[0], oracle[1], *oracle[2]), (eager[0], eager[1], *eager[2]),
                             (got[0], got[1], *got[2])):  # fmt: skip
        assert g.dtype == torch.float32
        assert_within_rule(g, e, o, floor=1e-6 * (1 + o.abs().max().item()), what=f"{kind} {name}")


def test_no_target_rows_gives_zeros():
    x = _inputs(torch.float32)
    x["labels"][:] = -100
    ce, kd, grads, _ = _chunked(x, "forward", 1.0, 0.1, 4)
    assert ce.item() == 0 and kd.item() == 0 and all(float(g.abs().max()) == 0 for g in grads)


def test_bad_arguments():
    x = _inputs(torch.float32)
    head = (x["w_s"], x["b_s"])
    with pytest.raises(ValueError, match="unknown KD kind"):
        chunked_ce_kd_sum(x["h_s"], head, x["h_t"], (x["w_t"], None), x["labels"], "js", 1.0, 0.1, KV, 4)
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        chunked_ce_kd_sum(x["h_s"], head, x["h_t"], (x["w_t"], None), x["labels"], "forward", 1, 0.1, KV, 0)


def test_resolve_and_unsupported_models():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg)
    assert unsupported_reason(model) is None
    cpu = torch.device("cpu")
    assert resolve_kd_chunk("auto", cpu, model, model, 40) == (None, None)  # eager on CPU
    assert resolve_kd_chunk("off", torch.device("cuda"), model, model, 40) == (None, None)
    assert resolve_kd_chunk("64", cpu, model, model, 40) == (64, None)
    assert resolve_kd_chunk("64", cpu, model, model, None) == (None, None)  # no KD term: nothing to chunk
    rows, note = resolve_kd_chunk("auto", torch.device("cuda"), model, model, 40)
    # a power of two, the largest with at most AUTO_ELEMENTS logits a chunk
    assert rows & (rows - 1) == 0 and rows * 40 <= AUTO_ELEMENTS < 2 * rows * 40 and "chunked" in note
    model.config.final_logit_softcapping = 30.0
    assert "scales its logits" in unsupported_reason(model)
    with pytest.raises(DistillError, match="--kd-chunk off"):
        resolve_kd_chunk("64", cpu, model, model, 40)
    rows, note = resolve_kd_chunk("auto", torch.device("cuda"), model, model, 40)
    assert rows is None and "eager" in note
    model.config.final_logit_softcapping = None
    with pytest.raises(DistillError, match="entropy-weight"):
        resolve_kd_chunk("64", cpu, model, model, 40, entropy_weight=True)


# ------------------------------------------------------------------------------------ in the loop
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("transformers")
    return make_assets(tmp_path_factory.mktemp("kd_chunked"))


@pytest.mark.parametrize("kd,mta", [("forward", False), ("skew", False), ("srkl", True)])
def test_loop_chunked_equals_eager(assets, tmp_path, kd, mta):
    """The same run with --kd-chunk 16 (forced on the CPU) and --kd-chunk off: the same numbers (with an
    MTA term too: the hidden states it reads are the same with the logits of the last position only)."""
    if mta:
        pytest.importorskip("spacy")
    runs = {}
    for chunk in ("off", "16"):
        out = tmp_path / chunk
        extra = ["--pairs", "1:1:word,2:2:phrase"] if mta else ["--no-mta"]
        extra += ["--kd", kd, "--kd-chunk", chunk]
        assert main(_distill_args(assets, out, *extra, student_tok="bpe", batch=8, steps=3)) == 0
        runs[chunk] = [r for r in _metrics(out) if r["kind"] == "train"]
        assert json.loads((out / "config.json").read_text())["kd_chunk"] == chunk
    for a, b in zip(runs["off"], runs["16"], strict=True):
        keys = ["loss", "ce", "kd", "grad_norm"] + (["kd_teacher_entropy"] if kd == "skew" else [])
        for key in keys + (["mta"] if mta else []):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"])


def test_bf16_autocast_within_the_tolerance_rule():
    """Under bf16 autocast (as a GPU step runs) the chunk logits are bf16 matmuls as the eager logits
    are; the backward recomputes them under the forward's autocast state. Against the float64 oracle,
    within twice the eager bf16 error (the chunked head gradient, summed over chunks in fp32, is
    usually the closer one)."""
    x64 = _inputs(torch.float64, seed=2)
    x32 = {k: (v.float() if v.is_floating_point() else v) for k, v in x64.items()}
    oracle = _eager(x64, "srkl", 1.0, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = _eager(x32, "srkl", 1.0, 0.1)
        got = _chunked(x32, "srkl", 1.0, 0.1, 4)
    names = ("ce", "kd", "grad h", "grad W", "grad b")
    for name, o, e, g in zip(names, (oracle[0], oracle[1], *oracle[2]), (eager[0], eager[1], *eager[2]),
                             (got[0], got[1], *got[2])):  # fmt: skip
        assert g.dtype == e.dtype == torch.float32, name
        assert_within_rule(g, e, o, floor=1e-6 * (1 + o.abs().max().item()), what=f"bf16 {name}")


def test_head_check_refuses_logits_that_are_not_the_head_of_the_hidden_state():
    from mta_kernels.distill.kd_chunked import _check_head

    x = _inputs(torch.float32)
    logits = F.linear(x["h_s"], x["w_s"], x["b_s"])
    _check_head("student", x["h_s"], (x["w_s"], x["b_s"]), logits)  # its own logits: accepted
    with pytest.raises(DistillError, match="not its output layer applied to its last hidden state"):
        _check_head("student", x["h_s"], (x["w_s"], x["b_s"]), 30 * torch.tanh(logits / 30) * 1.5)
