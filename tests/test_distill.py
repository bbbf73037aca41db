"""The reference distillation loop (mta_kernels.distill): end to end on CPU with tiny models.

Every run forces the plain-torch path of the ops (``backend="torch"``): the Triton interpreter is tested
elsewhere and would make these runs minutes long.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mta_kernels.distill.__main__ import main
from mta_kernels.distill.checks import RUN_MARKER
from mta_kernels.distill.demo import CORPUS, DOLLY
from mta_kernels.distill.models import train_tokenizer

pytest.importorskip("transformers")

TEACHER = "builtin:gpt2:2:32"
STUDENT = "builtin:llama:2:16"


# Tiny models: one intra-op thread is as fast, and spins no threads on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("distill"))


def make_assets(root):
    """Two tokenizers trained on the bundled corpus and a 16-example Dolly JSONL (one fixed batch)."""
    with open(CORPUS, encoding="utf-8") as f:
        corpus = [ln.strip() for ln in f if ln.strip()]
    train_tokenizer("bpe", corpus, 400, str(root / "bpe"))
    train_tokenizer("wordpiece", corpus, 300, str(root / "wp"))
    with open(DOLLY, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()][:16]
    (root / "data.jsonl").write_text("".join(lines))
    return root


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _train_losses(out) -> list[float]:
    return [r["loss"] for r in _metrics(out) if r["kind"] == "train"]


def _distill_args(assets, out, *extra, student_tok="wp", batch=16, steps=6) -> list[str]:
    return [
        "distill",
        "--data", str(assets / "data.jsonl"),
        "--eval-fraction", "0",
        "--teacher", TEACHER,
        "--teacher-tokenizer", str(assets / "bpe"),
        "--student", STUDENT,
        "--student-tokenizer", str(assets / student_tok),
        "--max-length", "96",
        "--batch-size", str(batch),
        "--steps", str(steps),
        "--lr", "1e-2",
        "--warmup-steps", "1",
        "--backend", "torch",
        "--device", "cpu",
        "--out", str(out),
        "--no-progress",
        "--no-plot",
        *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("student_tok", ["bpe", "wp"], ids=["same-tokenizer", "different-tokenizers"])
def test_distill_end_to_end(assets, tmp_path, student_tok):
    pytest.importorskip("spacy")
    out = tmp_path / "run"
    # The cross-tokenizer run extracts the units in a DataLoader worker process.
    workers = ["--num-workers", "1"] if student_tok == "wp" else []
    args = _distill_args(assets, out, "--pairs", "1:1:word,2:2:phrase", "--eval-fraction", "0.25", *workers,
                         student_tok=student_tok, batch=12, steps=8)  # fmt: skip
    assert main(args) == 0
    recs = [r for r in _metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, 9))
    for r in recs:
        assert all(math.isfinite(r[k]) for k in ("loss", "ce", "mta", "step_time_s", "tokens_per_s"))
        assert len(r["dsa"]) == 2 and len(r["hra"]) == 2
        assert 0 < r["mta_share"] < 1
    if student_tok == "bpe":  # shared vocabulary: logit KD on
        assert all(math.isfinite(r["kd"]) and r["kd"] >= 0 for r in recs)
    else:  # different vocabularies: KD off
        assert all(r["kd"] is None for r in recs)
    # One fixed batch (12 training examples, batch 12): the loss must fall.
    assert recs[-1]["loss"] < 0.95 * recs[0]["loss"], [r["loss"] for r in recs]
    evals = [r for r in _metrics(out) if r["kind"] == "eval"]
    assert evals and math.isfinite(evals[-1]["eval_ppl"]) and evals[-1]["eval_tokens"] > 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (
        ckpt["step"] == 8
        and ckpt["mta"] is not None
        and ckpt["fingerprint"]["pairs"]
        == [
            [1, 1, "word"],
            [2, 2, "phrase"],
        ]
    )
    assert (out / "model" / "config.json").exists()


def test_train_teacher_and_plot(assets, tmp_path):
    out = tmp_path / "teacher"
    args = [
        "train-teacher", "--model", TEACHER, "--tokenizer", str(assets / "bpe"),
        "--data", str(assets / "data.jsonl"), "--eval-fraction", "0", "--batch-size", "16",
        "--steps", "6", "--max-length", "96", "--lr", "3e-3", "--warmup-steps", "1", "--device", "cpu",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    losses = _train_losses(out)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert (out / "curves.png").stat().st_size > 1000
    # The trained teacher loads back by path.
    base = _distill_args(assets, tmp_path / "s", "--no-mta", student_tok="bpe", steps=2)
    base[base.index("--teacher") + 1] = str(out / "model")
    assert main(base) == 0


def test_plain_text_data_response_labels(assets, tmp_path):
    """Plain text: every token is a target; JSONL: only the response tokens."""
    from mta_kernels.distill.collate import UnitCollator
    from mta_kernels.distill.data import TextDataset, load_examples
    from mta_kernels.distill.models import load_tokenizer

    tok = load_tokenizer(str(assets / "bpe"), "builtin:gpt2:1:8")
    (tmp_path / "a.txt").write_text("The teacher is frozen.\n\nThe student learns.\n")
    text = load_examples(str(tmp_path / "a.txt"))
    assert [e.text for e in text] == ["The teacher is frozen.", "The student learns."]
    jsonl = load_examples(str(assets / "data.jsonl"))[:2]
    batch = UnitCollator(tok, None, max_length=160, granularities=())(TextDataset(jsonl).items)
    for b, ex in enumerate(jsonl):
        enc = tok(ex.text, return_offsets_mapping=True, truncation=True, max_length=160)
        labelled = [
            off for off, lab in zip(enc["offset_mapping"], batch["labels"][b].tolist()) if lab != -100
        ]
        assert labelled and all(start >= len(ex.prompt) for start, _ in labelled)
        assert len(labelled) == sum(1 for s, e in enc["offset_mapping"] if s >= len(ex.prompt))
    plain = UnitCollator(tok, None, max_length=160, granularities=())(TextDataset(text).items)
    assert bool(((plain["labels"] != -100) == plain["attention_mask"].bool()).all())


def test_grad_accumulation_matches_big_batch(assets, tmp_path):
    """batch 4 x 2 micro-batches (with gradient checkpointing) == batch 8: CE/KD are global token sums."""
    big = _distill_args(assets, tmp_path / "big", "--no-mta", student_tok="bpe", batch=8, steps=4)
    acc = _distill_args(assets, tmp_path / "acc", "--no-mta", "--grad-accum", "2", "--grad-checkpointing",
                        student_tok="bpe", batch=4, steps=4)  # fmt: skip
    assert main(big) == 0 and main(acc) == 0
    m_big = [r for r in _metrics(tmp_path / "big") if r["kind"] == "train"]
    m_acc = [r for r in _metrics(tmp_path / "acc") if r["kind"] == "train"]
    for a, b in zip(m_big, m_acc, strict=True):
        assert a["target_tokens"] == b["target_tokens"]
        for key in ("loss", "ce", "kd"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"])


# ------------------------------------------------------------------------------------------ resume
def test_resume_reproduces_uninterrupted_run(assets, tmp_path):
    pytest.importorskip("spacy")
    # 32 examples, batch 8: 4 batches an epoch, so the resumed run must also find its place in the data.
    with open(DOLLY, encoding="utf-8") as f:
        (tmp_path / "d.jsonl").write_text("".join([ln for ln in f if ln.strip()][:32]))
    common = ["--pairs", "1:1:word,2:2:phrase", "--save-every", "3", "--batch-size", "8"]

    def args(out, *extra):
        a = _distill_args(assets, out, *common, *extra, steps=6)
        a[a.index("--data") + 1] = str(tmp_path / "d.jsonl")
        return a

    assert main(args(tmp_path / "full")) == 0
    assert main(args(tmp_path / "cut", "--stop-at", "3")) == 0
    assert _train_losses(tmp_path / "cut") == _train_losses(tmp_path / "full")[:3]
    assert main(args(tmp_path / "cut", "--resume")) == 0
    full, resumed = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "cut")
    assert len(resumed) == 6
    # Same data order, optimizer, schedule and RNG: the same numbers up to float32 rounding.
    torch.testing.assert_close(torch.tensor(resumed[3:]), torch.tensor(full[3:]), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------- DDP
def _launch(args: list[str], port: int | None = None) -> subprocess.CompletedProcess:
    """``mta-distill ARGS`` in a subprocess: one process, or two under torchrun on ``port``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [] if port is None else ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                        "--master_port", str(port)]  # fmt: skip
    return subprocess.run([sys.executable, *launcher, "-m", "mta_kernels.distill", *args],
                          env=env, capture_output=True, text=True, timeout=240)  # fmt: skip


def test_torchrun_two_processes_match_one_with_double_batch(assets, tmp_path):
    pytest.importorskip("spacy")
    common = ["--pairs", "1:1:word,2:2:phrase", "--steps", "4"]
    one = _distill_args(assets, tmp_path / "one", *common, student_tok="bpe", batch=8)
    two = _distill_args(assets, tmp_path / "two", *common, student_tok="bpe", batch=4)
    r1 = _launch(one)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _launch(two, port=29517)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1 = [r for r in _metrics(tmp_path / "one") if r["kind"] == "train"]
    m2 = [r for r in _metrics(tmp_path / "two") if r["kind"] == "train"]
    assert len(m1) == len(m2) == 4
    # Step 1, same weights: CE and KD are token sums over the global batch divided by its token count:
    # equal to float32 rounding (different padding and matmul shapes per rank).
    for key in ("ce", "kd"):
        assert m2[0][key] == pytest.approx(m1[0][key], rel=1e-5)
    assert m2[0]["target_tokens"] == m1[0]["target_tokens"]
    # MTA: the DSA denominator is per batch (docs/method.md#dsa-loss), so two half batches average two
    # ratios instead of taking one ratio of sums; the weights then drift apart slightly. Measured on this
    # data over 4 steps: MTA within 0.6 % (step 2), total loss within 5e-4; the bounds leave 3-4x room.
    for a, b in zip(m1, m2):
        assert b["mta"] == pytest.approx(a["mta"], rel=0.02)
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)


def test_torchrun_eval_gen_shares_the_prompts(assets, tmp_path):
    """``--eval-gen`` under two processes: each rank answers its share of the held-out prompts (5: 3 and
    2) and the score is their mean over all of them; rank 0 keeps best/."""
    out = tmp_path / "two"
    args = _distill_args(assets, out, "--no-mta", "--eval-every", "2", "--eval-gen", "--eval-gen-limit", "5",
                         "--max-prompt-length", "64", student_tok="bpe", batch=4, steps=2)  # fmt: skip
    args[args.index("--eval-fraction") + 1] = "0.2"  # held-out examples to answer
    run = _launch(args, port=29519)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [r for r in _metrics(out) if r.get("eval_rougeL") is not None]
    assert len(rows) == 1 and 0.0 <= rows[0]["eval_rougeL"] <= 100.0
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 2


def test_eval_gen_answers_this_ranks_share_and_sums_over_ranks(monkeypatch, tmp_path):
    """Rank 1 of 2 answers held-out examples 1, 3, ... (not nothing, waiting for rank 0) and takes the
    mean over every rank's answers."""
    from types import SimpleNamespace

    from mta_kernels.distill import evaluation
    from mta_kernels.distill import train as T
    from mta_kernels.distill.config import TrainConfig

    seen = []

    def fake_score(model, tok, records, protocol, seeds, **kw):
        seen.extend(r.id for r in records)
        return [{"rougeL": 10.0} for _ in records], None

    class Rank1:
        rank, world, main = 1, 2, False

        def all_reduce(self, values):  # rank 0 answered 3 examples, 20 points each
            return [values[0] + 60.0, values[1] + 3.0]

    monkeypatch.setattr(evaluation, "score_records", fake_score)
    monkeypatch.setattr(T.dist, "barrier", lambda: None)
    items = [{"text": f"Q{i}? A{i}.", "prompt_length_chars": 4} for i in range(5)]
    s = SimpleNamespace(env=Rank1(), student=torch.nn.Linear(1, 1), student_tokenizer=None,
                        eval_set=SimpleNamespace(items=items))  # fmt: skip
    cfg = TrainConfig(data="x", teacher="t", out=str(tmp_path), eval_gen=True, max_length=32)
    gen = T.GenerationEval(cfg, s)
    assert gen(2, contextlib.nullcontext) is None  # rank 1 reports nothing; rank 0 writes
    assert seen == [1, 3]
    assert gen.best is None
    s.env = SimpleNamespace(rank=0, world=2, main=True, all_reduce=Rank1.all_reduce.__get__(Rank1()))
    monkeypatch.setattr(T, "replace_dir", lambda path, write: None)
    assert gen(2, contextlib.nullcontext)["eval_rougeL"] == pytest.approx((3 * 10.0 + 60.0) / 6)


# ------------------------------------------------------------------------------------- bad inputs
def _error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return " ".join(err.split())


def test_bad_inputs_give_one_paragraph_errors(assets, tmp_path, capsys):
    base = lambda out, *extra: _distill_args(assets, out, *extra, steps=1)  # noqa: E731

    a = base(tmp_path / "x")
    a[a.index("--data") + 1] = str(tmp_path / "missing.jsonl")
    assert "missing.jsonl" in _error(capsys, a) and "does not exist" in _error(capsys, a)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "output": "b"}\n\n{"prompt": "a", "output": \n')
    a[a.index("--data") + 1] = str(bad)
    assert "line 3" in _error(capsys, a) and "not valid JSON" in _error(capsys, a)
    bad.write_text('{"prompt": "a", "output": "b"}\n{"prompt": "a", "response": "b"}\n')
    msg = _error(capsys, a)
    assert "line 2" in msg and "'output'" in msg

    msg = _error(capsys, base(tmp_path / "x", "--preset", "gpt5->gpt2"))
    assert "gpt5->gpt2" in msg and "gpt2-xl->gpt2" in msg  # lists the known presets
    msg = _error(capsys, base(tmp_path / "x", "--preset", "gpt2-xl->gpt2"))
    assert "student layer 6" in msg and "2 layers" in msg
    msg = _error(capsys, base(tmp_path / "x", "--pairs", "1:7:phrase"))
    assert "teacher layer 7" in msg and "0..2" in msg
    msg = _error(capsys, base(tmp_path / "x", "--pairs", "1:2:sentence"))
    assert "word|phrase" in msg
    msg = _error(capsys, base(tmp_path / "x", "--teacher", str(tmp_path / "nope")))
    assert "nope" in msg
    assert not (tmp_path / "x").exists()  # nothing was written by a refused run


def test_foreign_checkpoint_is_refused_and_kept(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_distill_args(assets, out, "--no-mta", steps=2)) == 0
    ckpt = out / "checkpoint.pt"
    before = ckpt.read_bytes()
    metrics_before = (out / "metrics.jsonl").read_text()
    msg = _error(capsys, _distill_args(assets, out, "--no-mta", "--lam", "0.9", "--resume", steps=2))
    assert "another configuration" in msg and "lam" in msg and "0.5" in msg and "0.9" in msg
    msg = _error(capsys, _distill_args(assets, out, "--no-mta", steps=2))  # fresh run into a used dir
    assert "--resume" in msg and "--overwrite" in msg
    ckpt.with_name("junk.pt").write_bytes(b"not a checkpoint")
    os.replace(ckpt.with_name("junk.pt"), tmp_path / "junk.pt")
    assert ckpt.read_bytes() == before and (out / "metrics.jsonl").read_text() == metrics_before
    # A file that is not a checkpoint is refused too.
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes(b"garbage")
    msg = _error(capsys, _distill_args(assets, other, "--no-mta", "--resume", steps=2))
    assert "not created by mta-distill" in msg and "--overwrite" in msg  # not ours: not even read
    (other / RUN_MARKER).write_text("")
    msg = _error(capsys, _distill_args(assets, other, "--no-mta", "--resume", steps=2))
    assert "cannot be read" in msg or "not a checkpoint" in msg
    assert (other / "checkpoint.pt").read_bytes() == b"garbage"


def test_demo_quick(tmp_path, capsys):
    """``make demo``'s code path, 6 steps per run: the table, the plot and every run's files."""
    pytest.importorskip("spacy")
    from mta_kernels.distill.demo import run_demo

    runs = run_demo(out=str(tmp_path / "demo"), quick=True, progress=False, backend="torch")
    printed = capsys.readouterr().out
    assert "student-mta" in printed and "student-baseline" in printed and "MTA share" in printed
    assert "ROUGE-L" in printed and "mta-distill evaluate --model" in printed
    assert runs["student-mta"]["mta_share"] > 0 and runs["student-baseline"]["mta_share"] is None
    for name in ("teacher", "student-mta", "student-baseline"):
        assert (tmp_path / "demo" / name / "checkpoint.pt").exists()
        assert math.isfinite(runs[name]["eval_ppl"]) and 0 <= runs[name]["rougeL"] <= 100
        assert (tmp_path / "demo" / name / "eval" / "predictions.jsonl").exists()
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 1000
    # mta-distill evaluate on the demo's student, two seeds: the files' per-seed ROUGE-L is rouge-score's
    pytest.importorskip("rouge_score")
    from test_evaluate import check_scores_recompute

    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tmp_path / "demo" / "student-mta" / "model"),
                 "--data", str(tmp_path / "demo" / "heldout.jsonl"), "--out", str(ev), "--seeds", "10,20",
                 "--max-length", "128", "--max-prompt-length", "64", "--no-progress"]) == 0  # fmt: skip
    scores = check_scores_recompute(ev)
    assert set(scores["rougeL"]["per_seed"]) == {"10", "20"} and scores["rougeL"]["std"] > 0


def test_accelerate_launch_two_processes_match_one_with_double_batch(assets, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo) runs the loop as DDP: CE/KD of
    step 1 equal one process with the doubled batch. (``--cpu --num_processes 2`` starts one process
    only; ``--multi_gpu`` is accelerate's torchrun launcher and ``--device cpu`` picks gloo.) The two
    processes use ``--kd-chunk 8``, the one process the eager CE + KD."""
    pytest.importorskip("accelerate")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    common = ["--no-mta", "--steps", "2"]
    one = _distill_args(assets, tmp_path / "one", *common, student_tok="bpe", batch=8)
    # the 2-process run also takes the chunked CE + KD path (forced on the CPU): same numbers under DDP
    two = _distill_args(assets, tmp_path / "two", *common, "--kd-chunk", "8", student_tok="bpe", batch=4)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29519", "-m", "mta_kernels.distill"]  # fmt: skip
    r1 = subprocess.run([sys.executable, "-m", "mta_kernels.distill", *one], env=env, capture_output=True,
                        text=True, timeout=240)  # fmt: skip
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([*launch, *two], env=env, capture_output=True, text=True, timeout=240)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    m1 = [r for r in _metrics(tmp_path / "one") if r["kind"] == "train"]
    m2 = [r for r in _metrics(tmp_path / "two") if r["kind"] == "train"]
    assert len(m1) == len(m2) == 2
    assert m2[0]["target_tokens"] == m1[0]["target_tokens"]
    for a, b in zip(m1, m2):  # no MTA term: the whole update is a global token sum, both steps agree
        for key in ("ce", "kd", "loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"])


def test_accelerate_fsdp_or_deepspeed_launch_is_refused(assets, tmp_path, monkeypatch, capsys):
    """The environment ``accelerate launch --use_fsdp`` / ``--use_deepspeed`` sets: one paragraph (the
    loop shards by DDP only), nothing written; fp16 mixed precision likewise."""
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(var, "true")
        err = _error(capsys, _distill_args(assets, tmp_path / "x", "--no-mta", steps=1))
        assert "shards by DDP only" in err and "MTATrainer" in err
        assert not (tmp_path / "x" / "metrics.jsonl").exists()
        monkeypatch.delenv(var)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert "fp16 is not supported" in _error(capsys, _distill_args(assets, tmp_path / "x", steps=1))
