"""Nothing silent, nothing lost: the distillation CLI's guards and its behaviour under faults.

Each numbered case of the guards is a way a run used to go wrong silently or with a traceback: a
model directory overwritten, a response truncated away, a length past the model's positions, data
without units, text in another language than the units pipeline, JSONL read as text, unclear errors.
The fault-injection tests start the CLI as a subprocess and stop it with SIGTERM mid-run, or SIGKILL it
while it writes a checkpoint, at a step chosen through the ``MTA_DISTILL_FAULT`` test hook
(``mta_kernels/distill/faults.py``), so that nothing depends on timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mta_kernels.distill.__main__ import main
from mta_kernels.distill.checkpoint import load_checkpoint
from mta_kernels.distill.checks import script_share
from mta_kernels.distill.data import load_examples
from mta_kernels.distill.demo import DOLLY
from tests.test_distill import _distill_args, _error, _metrics, _train_losses, make_assets

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Tiny models: one intra-op thread is as fast, and spins no threads on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("faults"))


def _snapshot(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def _model_dir(path, tokenizer_dir, n_positions: int = 128) -> str:
    """A tiny GPT-2 saved as a Hugging Face model directory (config.json, weights, tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mta_kernels.distill.models import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir), "builtin:gpt2:1:8")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=16, n_layer=2, n_head=1)
    GPT2LMHeadModel(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def _cli(args: list[str], env_extra: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m mta_kernels.distill ARGS`` in a subprocess, with no fault inherited (``env_extra`` may
    set one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MTA_DISTILL_FAULT")}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "mta_kernels.distill", *args],
        cwd=ROOT,  # this checkout's package, not another installed copy
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------------- 1. the output directory
def test_1_out_holding_a_model_is_refused_and_left_byte_identical(assets, tmp_path, capsys):
    model = _model_dir(tmp_path / "hf-model", assets / "bpe")
    before = _snapshot(model)
    r = _cli(_distill_args(assets, model, "--no-mta", steps=1))
    assert r.returncode == 2, r.stderr[-2000:]
    err = " ".join(r.stderr.split())
    assert err.startswith("error: ") and "holds a model" in err and "Traceback" not in err
    assert _snapshot(model) == before
    capsys.readouterr()  # transformers' save progress bar
    msg = _error(capsys, _distill_args(assets, model, "--no-mta", "--overwrite", steps=1))
    assert "holds a model" in msg  # --overwrite never allows writing into a model
    assert _snapshot(model) == before


def test_1_foreign_non_empty_out_needs_overwrite(assets, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.txt").write_text("my notes")
    msg = _error(capsys, _distill_args(assets, out, "--no-mta", steps=1))
    assert "not created by mta-distill" in msg and "--overwrite" in msg
    assert sorted(os.listdir(out)) == ["README.txt"]
    assert main(_distill_args(assets, out, "--no-mta", "--overwrite", steps=1)) == 0
    assert (out / "README.txt").read_text() == "my notes" and (out / "checkpoint.pt").exists()
    # Now it is ours: a second run asks for --resume / --overwrite as before, not for a new directory.
    msg = _error(capsys, _distill_args(assets, out, "--no-mta", steps=1))
    assert "already holds a checkpoint" in msg


def test_1_overwrite_removes_the_earlier_runs_outputs(assets, tmp_path, capsys):
    """A fresh start over an earlier run leaves none of its checkpoint, model/ or best/ behind (a best/
    of an --eval-gen run would pass for this run's); other files stay."""
    out = tmp_path / "run"
    assert main(_distill_args(assets, out, "--no-mta", steps=1)) == 0
    (out / "best").mkdir()
    (out / "best" / "best.json").write_text('{"step": 1}')
    (out / "model" / "from-the-earlier-run").write_text("")
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(_distill_args(assets, out, "--no-mta", "--overwrite", steps=1)) == 0
    printed = capsys.readouterr().out
    assert "removed the earlier run's checkpoint.pt, model, best" in printed
    assert not (out / "best").exists() and not (out / "model" / "from-the-earlier-run").exists()
    assert (out / "model" / "config.json").exists() and (out / "checkpoint.pt").exists()
    assert (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------- 2. truncation
def test_2_long_prompt_keeps_the_response_and_is_reported(assets, tmp_path, capsys):
    long_prompt = (
        "### Instruction:\n" + "Tell me about the teacher and the student. " * 30 + "\n### Response:\n"
    )
    records = [
        {"prompt": long_prompt, "output": f"The student learns from the teacher, {i} times."}
        for i in range(8)
    ]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = _distill_args(assets, tmp_path / "run", "--no-mta", batch=8, steps=2)
    args[args.index("--data") + 1] = str(data)
    args[args.index("--max-length") + 1] = "32"
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "8 of 8 training examples had their prompt shortened from the left" in out
    assert "0 had their response cut" in out
    recs = [r for r in _metrics(tmp_path / "run") if r["kind"] == "train"]
    assert all(r["target_tokens"] > 0 and r["ce"] > 0 for r in recs)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_checks"]["truncation"]["prompt_cut"] == 8


def test_2_no_target_token_is_an_error(assets, tmp_path, capsys):
    data = tmp_path / "letters.txt"
    data.write_text("".join(f"{c}\n" for c in "abcdefghijklmnop"))  # one token a line: nothing to predict
    args = _distill_args(assets, tmp_path / "run", "--no-mta", batch=8, steps=1)
    args[args.index("--data") + 1] = str(data)
    msg = _error(capsys, args)
    assert "no training example keeps a target token" in msg
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 3. start-up checks of the models
def test_3_lengths_and_vocabularies_checked_at_start_up(assets, tmp_path, capsys):
    teacher = _model_dir(tmp_path / "short", assets / "bpe", n_positions=64)
    small = _model_dir(tmp_path / "small-vocab", assets / "wp")  # 300 tokens
    capsys.readouterr()  # transformers' save progress bars
    args = _distill_args(assets, tmp_path / "run", "--no-mta", steps=1)
    args[args.index("--teacher") + 1] = teacher
    msg = _error(capsys, args)  # --max-length 96
    assert "--max-length 96 is longer than the teacher's 64 positions" in msg
    # A tokenizer bigger than the model's embedding (another model's tokenizer).
    args = _distill_args(assets, tmp_path / "run", "--no-mta", steps=1)
    args[args.index("--teacher") + 1] = small  # with --teacher-tokenizer bpe (400 tokens)
    msg = _error(capsys, args)  # the model's folder holds its own tokenizer: named first
    assert "(400 tokens) is not the one saved with the model" in msg and "(300 tokens)" in msg
    for name in os.listdir(small):  # without a saved tokenizer to compare: the embedding check
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(small, name))
    msg = _error(capsys, args)
    assert "teacher tokenizer has 400 tokens" in msg and "300 rows" in msg
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ 4. unit coverage
def test_4_data_without_units_warns_and_reports_coverage(assets, tmp_path, capsys):
    pytest.importorskip("spacy")
    records = [{"prompt": f"{i} + {i} =", "output": f" {2 * i}, {3 * i}; {4 * i}."} for i in range(8)]
    data = tmp_path / "numbers.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = _distill_args(assets, tmp_path / "run", "--pairs", "1:1:word,2:2:phrase", student_tok="bpe",
                         batch=8, steps=2)  # fmt: skip
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: few semantic units in the first 8 training examples" in err
    assert "word: 0% of examples" in err
    recs = [r for r in _metrics(tmp_path / "run") if r["kind"] == "train"]
    assert all(r["unit_coverage"]["word"] == {"examples": 0.0, "tokens": 0.0} for r in recs)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["unit_coverage"]["phrase"]["examples"] == 0.0 and summary["warnings"]


def test_4_coverage_of_english_text_is_reported(assets, tmp_path):
    pytest.importorskip("spacy")
    args = _distill_args(assets, tmp_path / "run", "--pairs", "1:1:word", student_tok="bpe", batch=8, steps=1)
    assert main(args) == 0
    cov = json.loads((tmp_path / "run" / "summary.json").read_text())["unit_coverage"]["word"]
    assert cov["examples"] == 1.0 and 0.2 < cov["tokens"] < 1.0


# ---------------------------------------------------------------------------------- 5. languages
def test_5_script_share_heuristic():
    assert script_share(["The cat sat on the mat."], "en") == 1.0
    assert script_share(["東京は大きい都市です。"], "en") == 0.0
    assert script_share(["東京 is big"], "en") == pytest.approx(5 / 7)  # 2 CJK + 5 Latin letters
    assert script_share(["😀🚀👍 ok"], "en") == pytest.approx(2 / 5)  # emoji count as outside
    assert script_share(["123, 456!"], "en") is None  # nothing to judge
    assert script_share(["東京"], "zh") == 1.0 and script_share(["abc"], "xx") is None


def test_5_text_outside_the_pipelines_language_warns(assets, tmp_path, capsys):
    pytest.importorskip("spacy")
    sentences = ["老师教学生如何学习语言模型。", "学生从老师那里学到了很多知识。", "我们今天训练一个小模型。"]
    records = [{"prompt": "问题：", "output": sentences[i % 3]} for i in range(8)]
    data = tmp_path / "zh.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    args = _distill_args(assets, tmp_path / "run", "--pairs", "1:1:word", student_tok="bpe", batch=8, steps=1)
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "is for language 'en', but only 0% of the letters and symbols" in err and "--spacy-model" in err
    msg = _error(capsys, [*args, "--spacy-model", "xx_no_such_pipeline", "--overwrite"])
    assert "xx_no_such_pipeline" in msg


# ------------------------------------------------------------------------------------ 6. formats
def test_6_format_from_the_content(tmp_path):
    record = {"prompt": "Say hi.\n", "output": "Hi."}
    misnamed = tmp_path / "dolly.txt"
    misnamed.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    ex = load_examples(str(misnamed))
    assert [(e.prompt, e.output) for e in ex] == [("Say hi.\n", "Hi.")] * 2
    as_text = load_examples(str(misnamed), "text")  # explicit --format text
    assert as_text[0].prompt == "" and as_text[0].output == json.dumps(record)
    prose = tmp_path / "prose.jsonl"  # not JSON despite the suffix: line-numbered errors, with a hint
    prose.write_text("Plain prose.\n")
    with pytest.raises(Exception, match="line 1: not valid JSON.*--format text"):
        load_examples(str(prose))
    assert load_examples(str(prose), "text")[0].text == "Plain prose."


# ------------------------------------------------------------------------------- 7. clear errors
def test_7_clear_errors(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    msg = _error(capsys, _distill_args(assets, tmp_path / "x", "--no-mta", "--backend", "triton", steps=1))
    assert "--backend triton" in msg and "CUDA device" in msg and "--backend auto or torch" in msg
    args = _distill_args(assets, tmp_path / "x", "--no-mta", steps=1)
    i = args.index("--teacher-tokenizer")
    del args[i : i + 2]
    args[args.index("--teacher") + 1] = str(tmp_path / "no-such-model")
    msg = _error(capsys, args)
    assert "model" in msg and "no-such-model" in msg and "neither a local directory" in msg
    assert "tokenizer" not in msg
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "output": "b"}\n\n{"prompt": "a", "output": \n')
    args = _distill_args(assets, tmp_path / "x", "--no-mta", steps=1)
    args[args.index("--data") + 1] = str(bad)
    msg = _error(capsys, args)
    assert "line 3" in msg and "at column 27 of 26" in msg  # the end of the record, not "column 1"
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------- 8. pre-emption, killed writes
@pytest.fixture(scope="module")
def resume_data(assets):
    """32 examples, batch 8: 4 batches an epoch, so a resumed run must also find its place in the data."""
    with open(DOLLY, encoding="utf-8") as f:
        (assets / "d32.jsonl").write_text("".join([ln for ln in f if ln.strip()][:32]))
    return assets / "d32.jsonl"


def _mta_args(assets, data, out, *extra) -> list[str]:
    args = _distill_args(assets, out, "--pairs", "1:1:word,2:2:phrase", "--batch-size", "8", *extra, steps=6)
    args[args.index("--data") + 1] = str(data)
    return args


@pytest.fixture(scope="module")
def uninterrupted(assets, resume_data, tmp_path_factory) -> list[float]:
    pytest.importorskip("spacy")
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(_mta_args(assets, resume_data, out, "--save-every", "2")) == 0
    return _train_losses(out)


def test_8_sigterm_mid_step_checkpoints_and_resume_is_exact(assets, resume_data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    args = _mta_args(assets, resume_data, out, "--save-every", "100")  # no checkpoint but the pre-emption's
    r = _cli(args, {"MTA_DISTILL_FAULT": "sigterm@step:3"})
    assert r.returncode == 75, r.stderr[-3000:]
    assert (
        "pre-empted (SIGTERM): step 3 finished and checkpointed" in r.stderr and "Traceback" not in r.stderr
    )
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
    assert [x["step"] for x in _metrics(out) if x["kind"] == "train"] == [1, 2, 3]
    assert main([*args, "--resume"]) == 0
    # Same data order, optimizer, schedule and RNG: the uninterrupted run's numbers, bit for bit.
    assert _train_losses(out) == uninterrupted


def test_8_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(
    assets, resume_data, uninterrupted, tmp_path
):
    out = tmp_path / "run"
    args = _mta_args(assets, resume_data, out, "--save-every", "2")
    r = _cli(args, {"MTA_DISTILL_FAULT": "sigkill@save:2"})  # killed half-way through step 4's checkpoint
    assert r.returncode == -9, r.stderr[-3000:]
    leftovers = [n for n in os.listdir(out) if ".tmp." in n]
    assert leftovers and all(n.startswith("checkpoint.pt.tmp.") for n in leftovers)
    assert (out / leftovers[0]).stat().st_size > 0
    state = load_checkpoint(str(out / "checkpoint.pt"))  # the previous checkpoint, whole
    assert state["step"] == 2
    assert main([*args, "--resume"]) == 0
    assert not [n for n in os.listdir(out) if ".tmp." in n]
    assert _train_losses(out) == uninterrupted


def test_8_ctrl_c_in_process_checkpoints_the_step(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MTA_DISTILL_FAULT", "sigint@step:1")
    out = tmp_path / "run"
    assert main(_distill_args(assets, out, "--no-mta", "--save-every", "100", steps=3)) == 75
    assert "pre-empted (SIGINT): step 1" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 1
    monkeypatch.delenv("MTA_DISTILL_FAULT")
    assert main(_distill_args(assets, out, "--no-mta", "--save-every", "100", "--resume", steps=3)) == 0
    assert [x["step"] for x in _metrics(out) if x["kind"] == "train"] == [1, 2, 3]
