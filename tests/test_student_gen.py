"""Student generation with DistiLLM's adaptive off-policy schedule: the rule, and runs on tiny CPU models
(deterministic under a seed, resumable with the buffer in the checkpoint)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_distill import _distill_args, _metrics, make_assets  # tests/ is on sys.path

from mta_kernels.distill.__main__ import main
from mta_kernels.distill.student_gen import AdaptiveSchedule

pytest.importorskip("transformers")


# Tiny models: one intra-op thread is as fast, and spins no threads on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("student_gen"))


# ------------------------------------------------------------------------------------------- rule
def test_schedule_choice_matches_the_rule():
    """fresh when r < θ(1 − k/K), or r < θ with room in the buffer; replay when r < θ; else data."""
    sched = AdaptiveSchedule(0.6, 0.1)
    total = 10
    for step in range(1, total + 1):
        p_fresh = 0.6 * (total - step) / total
        for r in [i / 40 for i in range(40)]:
            for buffer_len, cap in ((3, 8), (8, 8)):
                if r < p_fresh or (r < 0.6 and buffer_len < cap):
                    want = "fresh"
                elif r < 0.6:
                    want = "replay"
                else:
                    want = "data"
                assert sched.choose(r, step, total, buffer_len, cap) == want, (r, step, buffer_len)


def test_schedule_update_rule():
    """θ grows by 0.1 (capped at 1) when the held-out loss is ≥ reference + eps; the reference moves then."""
    sched = AdaptiveSchedule(0.85, 0.1)
    assert not sched.update(2.0)  # the first loss is the reference
    assert sched.reference_loss == 2.0
    assert not sched.update(2.05)  # below reference + eps: nothing moves
    assert sched.threshold == 0.85 and sched.reference_loss == 2.0
    assert sched.update(2.1)  # exactly reference + eps counts
    assert sched.threshold == pytest.approx(0.95) and sched.reference_loss == 2.1
    assert not sched.update(1.0)  # a fall does not lower θ nor move the reference
    assert sched.reference_loss == 2.1
    assert sched.update(3.0)
    assert sched.threshold == 1.0  # capped
    state = sched.state_dict()
    other = AdaptiveSchedule(0.0, 0.1)
    other.load_state_dict(state)
    assert other.state_dict() == state


# ------------------------------------------------------------------------------------------- runs
def _args(assets, out, *extra, steps=6):
    return _distill_args(
        assets, out, "--kd", "srkl", "--student-gen", "--capacity", "8", "--eval-fraction", "0.25",
        "--max-prompt-length", "64", "--save-every", "3", *extra, student_tok="bpe", batch=4, steps=steps,
    )  # fmt: skip


def _gen_records(out):
    return [r["student_gen"] for r in _metrics(out) if r["kind"] == "train"]


def _losses(out):
    return [r["loss"] for r in _metrics(out) if r["kind"] == "train"]


def test_student_gen_fills_buffer_replays_and_is_deterministic(assets, tmp_path):
    """θ = 1: fresh generations until the buffer is full, then replay or fresh; two runs are equal."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_args(assets, a, "--no-mta", "--init-threshold", "1.0")) == 0
    assert main(_args(assets, b, "--no-mta", "--init-threshold", "1.0")) == 0
    recs = _gen_records(a)
    assert [r["buffer"] for r in recs[:2]] == [4, 8]  # capacity 8, batch 4
    assert all(r["data"] == 0 for r in recs)  # θ = 1: never the data batch
    assert sum(r["replay"] for r in recs) >= 1  # p_fresh falls to 0 at the last step: it replays
    assert recs[-1]["replay"] == 1
    assert _losses(a) == _losses(b) and _gen_records(a) == _gen_records(b)
    state = torch.load(a / "checkpoint.pt", weights_only=False)
    buffer = state["student_gen"]["buffer"]
    assert len(buffer) == 8
    assert all(0 < ex["prompt_length_chars"] <= len(ex["text"]) for ex in buffer)
    with open(assets / "data.jsonl") as f:
        prompts = {json.loads(ln)["prompt"] for ln in f}
    assert all(ex["text"][: ex["prompt_length_chars"]] in prompts for ex in buffer)
    # another seed samples other responses
    c = tmp_path / "c"
    assert main(_args(assets, c, "--no-mta", "--init-threshold", "1.0", "--seed", "1")) == 0
    other = torch.load(c / "checkpoint.pt", weights_only=False)["student_gen"]["buffer"]
    assert [e["text"] for e in other] != [e["text"] for e in buffer]


def test_threshold_zero_trains_on_data_only(assets, tmp_path):
    """The published --init-threshold 0.0: no generation until a held-out loss rise raises θ."""
    out = tmp_path / "run"
    assert main(_args(assets, out, "--no-mta", "--init-threshold", "0.0", steps=3)) == 0
    recs = _gen_records(out)
    assert all(r["data"] == 1 and r["fresh"] == 0 and r["buffer"] == 0 for r in recs)


def test_student_gen_resume_is_bit_exact(assets, tmp_path):
    """Stopped at step 3 (buffer, θ, RNG in the checkpoint) then resumed = the uninterrupted run."""
    pytest.importorskip("spacy")
    extra = ("--pairs", "1:1:word,2:2:phrase", "--init-threshold", "1.0")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_args(assets, full, *extra)) == 0
    assert main(_args(assets, cut, *extra, "--stop-at", "3")) == 0
    assert main(_args(assets, cut, *extra, "--resume")) == 0
    assert _losses(cut) == _losses(full)
    assert _gen_records(cut) == _gen_records(full)
    assert all(r["mta"] is not None for r in _metrics(full) if r["kind"] == "train")


def test_student_gen_bad_inputs(assets, tmp_path, capsys):
    text = tmp_path / "plain.txt"
    text.write_text("".join(f"line number {i} of some plain text\n" for i in range(16)))
    a = _args(assets, tmp_path / "t", "--no-mta")
    a[a.index("--data") + 1] = str(text)
    assert main(a) == 2
    assert "prompt" in capsys.readouterr().err
    a = _args(assets, tmp_path / "e", "--no-mta")
    a[a.index("--eval-fraction", a.index("--student-gen")) + 1] = "0"
    assert main(a) == 2
    assert "held-out" in capsys.readouterr().err
    assert main(_args(assets, tmp_path / "c", "--no-mta", "--capacity", "2")) == 2
    assert "--capacity" in capsys.readouterr().err
    for out in ("t", "e", "c"):
        assert not os.path.exists(tmp_path / out / "checkpoint.pt")
