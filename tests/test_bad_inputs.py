"""Bad inputs of every kind, as a new user makes them: each ends in one clear error or is handled.

A table of wrong option values for every sub-command (exit 2, one ``error:`` paragraph naming the
option, the value and what it accepts, nothing written, nothing loaded); output folders that are, hold
or lie inside what a command reads (refused even with ``--overwrite``, the inputs byte-identical);
unwritable folders and full disks; ``--resume`` without a checkpoint, torn and deleted metrics,
checkpoints from before an option existed; broken ``--config`` files; records that are huge, mixed,
BOM-prefixed, JSON arrays or unparseable by spaCy; signals at every stage (through the
``MTA_DISTILL_FAULT`` hooks of ``mta_kernels/distill/faults.py``, so nothing depends on timing); and the
Python API (trainers, collator, the weight check of the ops).
"""

from __future__ import annotations

import codecs
import json
import os
import subprocess

import pytest
import torch

from mta_kernels.distill.__main__ import main
from mta_kernels.distill.checkpoint import load_checkpoint
from mta_kernels.distill.config import FIELD_RULES, DistillError, TrainConfig, field_kinds
from tests.test_distill import STUDENT, TEACHER, _distill_args, _metrics, _train_losses, make_assets
from tests.test_faults import _cli, _snapshot

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tokenizers, 16 Dolly records, and a trained teacher's run folder (``teacher-run/model``)."""
    root = make_assets(tmp_path_factory.mktemp("bad_inputs"))
    args = [
        "train-teacher",
        "--model",
        TEACHER,
        "--tokenizer",
        str(root / "bpe"),
        "--data",
        str(root / "data.jsonl"),
        "--eval-fraction",
        "0",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--max-length",
        "96",
        "--device",
        "cpu",
        "--out",
        str(root / "teacher-run"),
        "--no-progress",
        "--no-plot",
    ]
    assert main(args) == 0
    return root


def _refused(capsys, argv: list[str], *needles: str) -> str:
    """``main(argv)`` exits 2 with one ``error:`` paragraph holding every needle; returns it joined."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    assert "Traceback" not in err and "\n\n" not in err.strip(), err
    text = " ".join(err.split())
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# ---------------------------------------------------------------------------------- 1. every option
# (extra argv, what the message must name). Each is refused before anything loads: the models are
# built-in specs, and the output folder must not appear.
OPTION_CASES = [
    (["--lr", "-1"], ["--lr", "-1.0", "greater than 0"]),
    (["--lr", "nan"], ["--lr", "nan", "finite"]),
    (["--lr", "inf"], ["--lr", "inf", "finite"]),
    (["--lr", "0"], ["--lr", "greater than 0"]),
    (["--lr", "abc"], ["--lr", "'abc'", "greater than 0"]),
    (["--projector-lr", "0"], ["--projector-lr", "greater than 0"]),
    (["--beta", "-1"], ["--beta", "-1.0", "at least 0"]),
    (["--beta", "nan"], ["--beta", "nan", "finite"]),
    (["--gamma", "-0.5"], ["--gamma", "-0.5", "at least 0"]),
    (["--lam", "1.5"], ["--lam", "1.5", "in [0, 1]"]),
    (["--temperature", "0"], ["--temperature", "greater than 0"]),
    (["--temperature", "inf"], ["--temperature", "finite"]),
    (["--skew-alpha", "1"], ["--skew-alpha", "in [0, 1)"]),
    (["--adam-beta1", "1"], ["--adam-beta1", "in [0, 1)"]),
    (["--adam-beta2", "-0.1"], ["--adam-beta2", "-0.1"]),
    (["--weight-decay", "-0.01"], ["--weight-decay", "-0.01", "at least 0"]),
    (["--warmup-steps", "-1"], ["--warmup-steps", "-1", "at least 0"]),
    (["--min-lr-ratio", "2"], ["--min-lr-ratio", "in [0, 1]"]),
    (["--clip", "-1"], ["--clip", "at least 0"]),
    (["--clip", "nan"], ["--clip", "finite"]),
    (["--seed", "-1"], ["--seed", "-1", "in [0, 4294967295]"]),
    (["--seed", "99999999999"], ["--seed", "99999999999"]),
    (["--max-length", "2"], ["--max-length", "2", "in [4, 1048576]"]),
    (["--max-length", "100000000"], ["--max-length", "100000000"]),
    (["--batch-size", "0"], ["--batch-size", "0", "at least 1"]),
    (["--grad-accum", "0"], ["--grad-accum", "at least 1"]),
    (["--steps", "0"], ["--steps", "0", "at least 1"]),
    (["--steps", "1.5"], ["--steps", "'1.5'", "invalid int"]),
    (["--epochs", "0"], ["--epochs", "at least 1"]),
    (["--eval-fraction", "1"], ["--eval-fraction", "in [0, 1)"]),
    (["--eval-fraction", "-0.1"], ["--eval-fraction", "-0.1"]),
    (["--eval-every", "0"], ["--eval-every", "0", "-1 (once an epoch)"]),
    (["--save-every", "-2"], ["--save-every", "-2"]),
    (["--log-every", "0"], ["--log-every", "0", "at least 1"]),
    (["--eval-gen-limit", "0"], ["--eval-gen-limit", "at least 1"]),
    (["--num-workers", "-1"], ["--num-workers", "-1", "in [0, 256]"]),
    (["--num-workers", "100000"], ["--num-workers", "100000"]),
    (["--stop-at", "0"], ["--stop-at", "at least 1"]),
    (["--device", "tpu"], ["--device", "'tpu'", "cpu, cuda or cuda:N"]),
    (["--device", "cuda:x"], ["--device", "'cuda:x'"]),
    (["--kd-chunk", "0"], ["--kd-chunk", "'0'", "positive row count"]),
    (["--kd", "jsd"], ["--kd", "'jsd'", "invalid choice"]),
    (["--pooling", "max"], ["--pooling", "'max'"]),
    (["--words", "none"], ["--words", "'none'"]),
    (["--backend", "cuda"], ["--backend", "'cuda'"]),
    (["--report-to", "mlflow"], ["--report-to", "'mlflow'"]),
    (["--grad-accum-mean", "sum"], ["--grad-accum-mean", "'sum'"]),
    (["--format", "csv"], ["--format", "'csv'"]),
    (["--mta-variant", "x"], ["--mta-variant", "'x'"]),
    (["--preset", "gpt5->gpt2"], ["--preset", "'gpt5->gpt2'", "gpt2-xl->gpt2"]),
    (["--pairs", "1:1"], ["--pairs", "'1:1'", "STUDENT:TEACHER:word|phrase"]),
    (["--pairs=-1:1:word"], ["--pairs", "'-1:1:word'", "at least 0"]),
    (["--pairs", "-1:1:word"], ["--pairs", "expected one argument", "--pairs=VALUE"]),
    (["--pairs", ","], ["--pairs", "names no layer pair"]),
    (["--lora", "--lora-r", "0"], ["--lora-r", "at least 1"]),
    (["--lora-alpha", "0"], ["--lora-alpha", "greater than 0"]),
    (["--lora-dropout", "1"], ["--lora-dropout", "in [0, 1)"]),
    (["--lora-targets", ","], ["--lora-targets", "names no module"]),
    (["--init-threshold", "2"], ["--init-threshold", "in [0, 1]"]),
    (["--loss-eps", "-1"], ["--loss-eps", "at least 0"]),
    (["--capacity", "0"], ["--capacity", "at least 1"]),
    (["--gen-top-p", "0"], ["--gen-top-p", "in (0, 1]"]),
    (["--gen-top-k", "-1"], ["--gen-top-k", "at least 0"]),
    (["--gen-temperature", "0"], ["--gen-temperature", "greater than 0"]),
    (["--max-prompt-length", "0"], ["--max-prompt-length", "at least 1"]),
    (["--max-prompt-length", "96"], ["--max-prompt-length", "[1, --max-length=96)", "96"]),
    (["--student-gen", "--capacity", "2"], ["--capacity (2)", "--batch-size 16"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite", "not both"]),
    (["--preset", "gpt2-xl->gpt2", "--pairs", "1:1:word"], ["--preset or --pairs"]),
    (["--entropy-weight", "--no-mta"], ["--entropy-weight", "--no-mta"]),
    (["--mta-variant", "published-xtok", "--pooling", "mean"], ["published-xtok", "--pooling mean"]),
    (["--warmup", "3"], ["unrecognized arguments: --warmup", "did you mean --warmup-steps?"]),
    (["--over"], ["unrecognized arguments: --over"]),  # no abbreviations: --over is not --overwrite
    (["--spacy-model", ""], ["--spacy-model is empty"]),
    # options that mean nothing without their switch: an error, not silently ignored
    (["--lora-r", "8"], ["--lora-r has no effect without --lora", "add --lora"]),
    (["--no-lora", "--lora-targets", "q_proj"], ["--lora-targets has no effect without --lora"]),
    (["--eval-gen-limit", "5"], ["--eval-gen-limit has no effect without --eval-gen"]),
    (["--gen-top-k", "5"], ["--gen-top-k has no effect without --student-gen"]),
]


@pytest.mark.parametrize("extra, needles", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_option_out_of_its_meaning_is_one_error_paragraph(assets, tmp_path, capsys, extra, needles):
    out = tmp_path / "run"
    _refused(capsys, _distill_args(assets, out, *extra, steps=1), *needles)
    assert not out.exists()


def test_an_unknown_extension_choice_is_an_error_before_any_work(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("MTA_KERNELS_EXT", "bogus")
    _refused(capsys, _distill_args(assets, out, "--no-mta", steps=1), "MTA_KERNELS_EXT", "'bogus'",
             "auto, prebuilt, jit, torch")  # fmt: skip
    assert not out.exists()
    from mta_kernels import info

    facts = info.info()["extension"]  # what is installed is still reported
    assert facts["state"] == "error" and "prebuilt" in facts


def test_models_specs_and_missing_options(assets, tmp_path, capsys):
    out = tmp_path / "run"
    args = _distill_args(assets, out, steps=1)
    args[args.index("--student") + 1] = "builtin:gpt2:0:8"
    _refused(capsys, args, "--student", "'builtin:gpt2:0:8'", "LAYERS must lie in [1, 128]")
    args[args.index("--student") + 1] = "builtin:bert:1:8"
    _refused(capsys, args, "--student", "builtin:gpt2:LAYERS:DIM")
    args[args.index("--student") + 1] = "builtin:llama:128:8192"
    _refused(capsys, args, "--student", "about 1e+11 parameters", "load a real model")
    args = _distill_args(assets, out, steps=1)
    args[args.index("--out") + 1] = ""
    _refused(capsys, args, "no --out given")
    args = _distill_args(assets, out, steps=1)
    del args[args.index("--teacher") : args.index("--teacher") + 2]
    _refused(capsys, args, "no --teacher given")
    assert not out.exists()


def test_every_rule_names_its_range():
    """Every rule of the table says what it accepts; a value just outside each range is refused."""
    for name, rule in FIELD_RULES.items():
        assert rule.describe() and rule.describe() != "any value", name
        if rule.choices or rule.low is None:
            continue
        below = rule.low if rule.low_open else rule.low - 1
        below = int(below) if "int" in field_kinds(name) else float(below)
        if any(below == v for v, _ in rule.special):
            below -= 1
        with pytest.raises(DistillError, match=name.replace("_", "-")):
            TrainConfig(data="x", teacher="t", **{name: below}).validate()


def test_python_api_types_are_checked():
    """TrainConfig built in Python (or from a file) gets the same checks as the flags: types too."""
    for bad, needle in (
        (dict(lr="1e-4"), "--lr must be a number"),
        (dict(steps=True), "--steps must be an integer"),
        (dict(lora=1), "--lora must be true or false"),
        (dict(data=3), "--data must be text"),
        (dict(eval_data="a\0b"), "NUL"),
    ):
        with pytest.raises(DistillError, match=needle):
            TrainConfig(**{"data": "x", "teacher": "t", **bad}).validate()


EVAL_CASES = [
    (["--seeds", "10,-1"], ["--seeds", "every seed must lie in [0, 4294967295]"]),
    (["--seeds", "10,10"], ["--seeds", "each once"]),
    (["--batch-size", "0"], ["--batch-size", "must be at least 1"]),
    (["--max-new-tokens", "-3"], ["--max-new-tokens"]),
    (["--device", "tpu"], ["--device", "'tpu'"]),
    (["--references", "all"], ["--references", "'all'"]),
    (
        ["--max-length", "64", "--max-prompt-length", "64"],
        ["--max-length (64) must exceed --max-prompt-length (64)"],
    ),
]


@pytest.mark.parametrize("extra, needles", EVAL_CASES, ids=[" ".join(c[0]) for c in EVAL_CASES])
def test_evaluate_options(assets, tmp_path, capsys, extra, needles):
    out = tmp_path / "eval"
    model = str(assets / "teacher-run" / "model")
    _refused(
        capsys,
        [
            "evaluate",
            "--model",
            model,
            "--data",
            str(assets / "data.jsonl"),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ],
        *needles,
    )
    assert not out.exists()


def test_evaluate_lengths_past_the_model_and_another_tokenizer(assets, tmp_path, capsys):
    model = str(assets / "teacher-run" / "model")  # 512 positions, 400 tokens
    base = [
        "evaluate",
        "--model",
        model,
        "--data",
        str(assets / "data.jsonl"),
        "--out",
        str(tmp_path / "e"),
        "--no-progress",
        "--limit",
        "1",
    ]
    _refused(capsys, [*base, "--max-new-tokens", "100000"], "100000 new tokens", "512 positions")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(vocab_size=100, n_positions=64, n_embd=8, n_layer=1, n_head=1)
    ).save_pretrained(str(tmp_path / "small"))
    args = [*base, "--max-length", "48", "--max-prompt-length", "16"]
    args[args.index("--model") + 1] = str(tmp_path / "small")
    _refused(capsys, [*args, "--tokenizer", str(assets / "bpe")], "400 tokens", "100 rows", "--tokenizer")
    assert not (tmp_path / "e").exists()


def test_a_tokenizer_other_than_the_models_own_is_refused(assets, tmp_path, capsys):
    """A model directory that holds its tokenizer, given another one: the model would read foreign ids."""
    model = str(assets / "teacher-run" / "model")  # saved with the BPE tokenizer
    args = _distill_args(assets, tmp_path / "run", "--no-mta", steps=1)
    args[args.index("--teacher") + 1] = model
    args[args.index("--teacher-tokenizer") + 1] = str(assets / "wp")
    _refused(capsys, args, "'" + str(assets / "wp") + "' (300 tokens) is not the one saved with the model")
    _refused(
        capsys,
        [
            "evaluate",
            "--model",
            model,
            "--tokenizer",
            str(assets / "wp"),
            "--data",
            str(assets / "data.jsonl"),
            "--out",
            str(tmp_path / "e"),
        ],
        "is not the one saved with",
    )
    args[args.index("--teacher-tokenizer") + 1] = str(assets / "bpe")  # its own: fine
    assert main(args) == 0


def test_recipes_and_demo_options(tmp_path, capsys):
    (tmp_path / "bin.json").write_bytes(b"\x00\x01\x02")
    _refused(capsys, ["recipes", "--show", str(tmp_path / "bin.json")], "recipe file", "NUL bytes")
    _refused(capsys, ["recipes", "--show", "no-such-recipe"], "unknown recipe 'no-such-recipe'")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _refused(capsys, ["demo", "--out", str(foreign)], "not empty and is not an earlier demo's folder")
    from mta_kernels.distill.demo import DATA_DIR

    _refused(capsys, ["demo", "--out", DATA_DIR], "holds the file of the demo's")
    _refused(capsys, ["demo", "--quick", "--out"], "--out", "expected one argument")
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(os.listdir(foreign)) == ["notes.txt"]


# ---------------------------------------------------------------------------------------- 2. paths
def test_out_holding_the_teacher_is_refused_even_with_overwrite(assets, tmp_path, capsys):
    """The reported data loss: --out the teacher's run folder (the parent of its model/) --overwrite."""
    run = assets / "teacher-run"
    before = _snapshot(run)
    teacher = str(run / "model")
    for out, needle in (
        (run, "holds the directory of --teacher"),
        (run / "model", "is the directory of --teacher"),
        (run / "model" / "sub", "lies inside the directory of --teacher"),
    ):
        args = _distill_args(assets, out, "--no-mta", "--overwrite", steps=1)
        args[args.index("--teacher") + 1] = teacher
        del args[args.index("--teacher-tokenizer") : args.index("--teacher-tokenizer") + 2]
        _refused(capsys, args, needle, "refused even with --overwrite")
    link = tmp_path / "link"
    link.symlink_to(run)  # the same folder under another name
    args = _distill_args(assets, link, "--no-mta", "--overwrite", steps=1)
    args[args.index("--teacher") + 1] = teacher
    _refused(capsys, args, "holds the directory of --teacher")
    # train-teacher continuing from its own model, and evaluate into the run folder
    _refused(
        capsys,
        [
            "train-teacher",
            "--model",
            teacher,
            "--data",
            str(assets / "data.jsonl"),
            "--out",
            str(run),
            "--overwrite",
            "--steps",
            "1",
        ],
        "holds the directory of --model",
    )
    _refused(
        capsys,
        ["evaluate", "--model", teacher, "--data", str(assets / "data.jsonl"), "--out", str(run)],
        "holds the directory of --model",
    )
    assert _snapshot(run) == before


def test_out_holding_data_tokenizers_or_config_is_refused(assets, tmp_path, capsys):
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text((assets / "data.jsonl").read_text())
    args = _distill_args(assets, data_dir, "--no-mta", "--overwrite", steps=1)
    args[args.index("--data") + 1] = str(data_dir / "train.jsonl")
    _refused(capsys, args, "holds the file of --data")
    _refused(
        capsys,
        _distill_args(assets, assets / "bpe", "--no-mta", "--overwrite", steps=1),
        "is the directory of --teacher-tokenizer",
    )
    cfg = tmp_path / "o" / "run.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"config": {"lr": 0.01}}))
    _refused(
        capsys,
        [*_distill_args(assets, cfg.parent, "--no-mta", "--overwrite", steps=1), "--config", str(cfg)],
        "holds the file of --config",
    )
    _refused(
        capsys,
        [
            "evaluate",
            "--model",
            str(assets / "teacher-run" / "model"),
            "--data",
            str(data_dir / "train.jsonl"),
            "--out",
            str(data_dir),
        ],
        "holds the file of --data",
    )
    assert sorted(os.listdir(data_dir)) == ["train.jsonl"] and sorted(os.listdir(cfg.parent)) == ["run.json"]


def test_out_under_a_file_or_unwritable(assets, tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("a file")
    _refused(
        capsys,
        _distill_args(assets, tmp_path / "f" / "run", "--no-mta", steps=1),
        "cannot be created",
        "is a file, not a directory",
    )
    _refused(capsys, _distill_args(assets, tmp_path / "f", "--no-mta", steps=1), "is a file, not a directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(locked) else real_access(p, m))
    _refused(
        capsys,
        _distill_args(assets, locked / "run", "--no-mta", steps=1),
        "nearest existing parent",
        "is not writable",
    )
    _refused(
        capsys,
        [
            "evaluate",
            "--model",
            str(assets / "teacher-run" / "model"),
            "--data",
            str(assets / "data.jsonl"),
            "--out",
            str(locked),
        ],
        "is not writable",
    )
    assert os.listdir(locked) == []


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody may write in: chmod 555, or (as root, who ignores modes) a read-only tmpfs."""
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o555)
    if not os.access(path, os.W_OK):
        yield path
        path.chmod(0o755)
        return
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("running as root and cannot mount a read-only tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_read_only_folder_is_refused_before_any_work(assets, readonly_dir, capsys):
    _refused(capsys, _distill_args(assets, readonly_dir / "run", "--no-mta", steps=1), "is not writable")


# ------------------------------------------------------------------------------------------ 3. resume
def test_resume_without_a_checkpoint_is_an_error(assets, tmp_path, capsys):
    out = tmp_path / "run"
    _refused(
        capsys, _distill_args(assets, out, "--no-mta", "--resume", steps=1), "--resume", "holds no checkpoint"
    )
    assert not out.exists()


def test_torn_and_deleted_metrics_are_reported_on_resume(assets, tmp_path, capsys):
    out = tmp_path / "run"
    base = _distill_args(assets, out, "--no-mta", "--save-every", "2", steps=4)
    assert main([*base, "--stop-at", "2"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a write cut short by a kill or a full disk
    capsys.readouterr()
    assert main([*base, "--resume"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "1 line(s) are not whole JSON records" in err and "metrics.jsonl.torn" in err
    assert (out / "metrics.jsonl.torn").read_text() == '{"kind": "train", "step": 3, "lo\n'
    assert [r["step"] for r in _metrics(out) if r["kind"] == "train"] == [1, 2, 3, 4]
    # A deleted metrics file: the resumed run says which records are gone.
    assert main([*base, "--stop-at", "2", "--overwrite"]) == 0
    (out / "metrics.jsonl").unlink()
    capsys.readouterr()
    assert main([*base, "--resume"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "metrics.jsonl is missing" in err and "records of steps 1..2 are lost" in err
    summary = json.loads((out / "summary.json").read_text())
    assert any("missing" in w for w in summary["warnings"])


def test_checkpoint_from_before_an_option_resumes_with_its_default(assets, tmp_path, capsys):
    """A checkpoint whose fingerprint lacks options added later (as before --grad-accum-mean and
    LoRA) resumes when they keep their defaults, and names them otherwise."""
    out = tmp_path / "run"
    base = _distill_args(assets, out, "--no-mta", "--save-every", "2", steps=4)
    assert main([*base, "--stop-at", "2"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    # (lora_r, ... are not recorded by a run without LoRA: they mean nothing there)
    assert not {"lora_r", "lora_alpha", "lora_dropout", "lora_targets"} & set(state["fingerprint"])
    for key in ("accum_mean", "lora", "data_digest"):
        del state["fingerprint"][key]
    del state["metrics_records"]
    torch.save(state, out / "checkpoint.pt")
    _refused(
        capsys,
        [*base, "--resume", "--grad-accum-mean", "micro-batches"],
        "accum_mean is 'tokens' there (its default: the checkpoint predates the option)",
    )
    capsys.readouterr()
    assert main([*base, "--resume"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "predates accum_mean, lora:" in printed and "predates the check of data_digest" in printed
    assert [r["step"] for r in _metrics(out) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_resume_on_other_data_of_the_same_name_is_refused(assets, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text((assets / "data.jsonl").read_text())
    out = tmp_path / "run"
    base = _distill_args(assets, out, "--no-mta", "--save-every", "1", steps=2)
    base[base.index("--data") + 1] = str(data)
    assert main([*base, "--stop-at", "1"]) == 0
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same records, another order
    before = (out / "checkpoint.pt").read_bytes()
    _refused(capsys, [*base, "--resume"], "written for other data", "changed since")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_broken_checkpoints_are_named(assets, tmp_path, capsys):
    out = tmp_path / "run"
    base = _distill_args(assets, out, "--no-mta", steps=2)
    assert main(base) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    torch.save({k: v for k, v in state.items() if k != "step"}, out / "checkpoint.pt")
    _refused(capsys, [*base, "--resume"], "is incomplete (no step)")
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]
    torch.save(state, out / "checkpoint.pt")
    _refused(
        capsys, [*base, "--resume"], "optimizer state for parameter groups of sizes", "cannot be resumed"
    )


# ------------------------------------------------------------------------------------------ 4. config
def test_broken_config_files(assets, tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    run = lambda path: ["distill", "--config", str(path)]  # noqa: E731
    cases = {
        "binary.yaml": (b"config:\n  lr: 0.1\x00\x00", "holds NUL bytes"),
        "latin1.yaml": ("config:\n  lr: 0.1 # café\n".encode("latin-1"), "is not UTF-8 text"),
        "utf16.json": (codecs.BOM_UTF16_LE + '{"config": {}}'.encode("utf-16-le"), "is UTF-16 text"),
        "list.yaml": (b"- 1\n- 2\n", "no 'config' mapping"),
        "key.yaml": (b"config:\n  1: 2\n", "the key 1 is not a training setting"),
        "inf.yaml": (b"config:\n  lr: .inf\n", "'lr' must be a finite number"),
        "neg.json": (b'{"config": {"lr": -1}}', "'lr' must be greater than 0, got -1.0"),
        "float.json": (b'{"config": {"steps": 1.5}}', "'steps' must be an integer, got 1.5"),
        "notes.json": (b'{"config": {}, "not_reproduced": "x"}', "'not_reproduced' must be a list"),
        "deep.json": (b"[" * 100000, "is not valid JSON"),
        "big.json": (b" " * (2 << 20), "more than the 1048576"),
    }
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_bytes(content)
        _refused(capsys, run(tmp_path / name), needle)
    (tmp_path / "dir.yaml").mkdir()
    _refused(capsys, run(tmp_path / "dir.yaml"), "is a directory, not a file")
    assert yaml  # PyYAML read the YAML cases


# ------------------------------------------------------------------------------------------ 5. records
def _with_data(assets, out, path, *extra, steps=1) -> list[str]:
    args = _distill_args(assets, out, *extra, steps=steps, batch=2)
    args[args.index("--data") + 1] = str(path)
    return args


def test_formats_the_lines_disagree_on(assets, tmp_path, capsys):
    rec = json.dumps({"prompt": "Say hi.\n", "output": "Hi there."})
    bad = {
        "array.json": ("[" + rec + ",\n" + rec + "]\n", ["line 1 opens a JSON array", "jq -c"]),
        "mixed.txt": (
            "Plain prose here.\nMore prose.\n" + rec + "\n",
            ["read as plain text", "line 3 is a JSON object"],
        ),
        "mixed2.jsonl": (
            rec + "\nPlain prose here.\n",
            ["line 2: not valid JSON", "line 1 is a JSON object"],
        ),
        "surrogate.jsonl": (
            '{"prompt": "a", "output": "b \\ud800 c"}\n' * 2,
            ["line 1", "unpaired surrogate"],
        ),
    }
    for name, (content, needles) in bad.items():
        (tmp_path / name).write_text(content)
        _refused(capsys, _with_data(assets, tmp_path / "x", tmp_path / name, "--no-mta"), *needles)
    (tmp_path / "utf16.jsonl").write_bytes(codecs.BOM_UTF16_LE + (rec + "\n").encode("utf-16-le"))
    _refused(capsys, _with_data(assets, tmp_path / "x", tmp_path / "utf16.jsonl", "--no-mta"), "UTF-16")
    assert not (tmp_path / "x").exists()
    # A UTF-8 byte-order mark is skipped, and the note says how the file was read.
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + ((rec + "\n") * 4).encode())
    assert main(_with_data(assets, tmp_path / "ok", tmp_path / "bom.jsonl", "--no-mta")) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "4 examples read as JSON Lines (line 1 is a JSON object, a UTF-8 byte-order mark skipped)" in out
    # --format text reads every line as text, JSON or not (the user said so).
    (tmp_path / "mixed3.txt").write_text("Plain prose here.\n" + rec + "\n")
    assert (
        main(_with_data(assets, tmp_path / "ok2", tmp_path / "mixed3.txt", "--no-mta", "--format", "text"))
        == 0
    )


def test_long_records_reach_spacy_cut_to_the_window(bpe, wordpiece):
    """The collator hands spaCy only the characters the windows keep, and its batch is the one the
    whole text gives (the truncation rule on the full tokenization)."""
    from mta_kernels.distill.collate import UnitCollator
    from tests.test_collate import _expected_encoding

    seen = []

    class Recording:
        def load(self):
            return None

        def __call__(self, texts):
            from mta_kernels.units import TextUnits

            seen.extend(len(t) for t in texts)
            return [TextUnits([], []) for _ in texts]

    sentence = "The teacher shows the student how the small model learns from the large one. "
    prompt, response = sentence * 3000, sentence * 2500  # 230 KB and 190 KB
    examples = [
        {"text": prompt + response, "prompt_length_chars": len(prompt)},
        {"text": response, "prompt_length_chars": 0},
        {"text": prompt + "A short answer.", "prompt_length_chars": len(prompt)},
        {"text": "Short.", "prompt_length_chars": 0},
    ]
    for teacher in (None, wordpiece):
        seen.clear()
        col = UnitCollator(bpe, teacher, extractor=Recording(), max_length=64, granularities=("word",))
        batch = col(examples)
        assert max(seen) < 64 * 8 * 2 + 1 and len(seen) == 4  # 1 KB a side of the prompt's end at most
        texts = [e["text"] for e in examples]
        prompts = [e["prompt_length_chars"] for e in examples]
        for tok, key in ((bpe, "input_ids"), (teacher, "teacher_input_ids")):
            if tok is None:
                continue
            assert torch.equal(batch[key], _expected_encoding(tok, texts, prompts, 64)["input_ids"])
        assert batch["stats"]["prompt_cut"] == 2 and batch["stats"]["response_cut"] == 2
        plain = UnitCollator(bpe, teacher, max_length=64, granularities=())(examples)
        assert torch.equal(plain["labels"], batch["labels"])


def test_the_edge_tokens_of_a_long_prompt_are_the_whole_prompts(bpe, wordpiece):
    """Generation keeps the first (evaluate) or last (--student-gen) tokens of a prompt; they are read
    from a part of it, equal to those of the whole text's tokenization."""
    from mta_kernels.distill.collate import edge_token_ids

    sentence = "The teacher shows the student how the small model learns from the large one. "
    for text in (sentence * 3, sentence * 4000):
        for tok in (bpe, wordpiece):
            full = tok(text)["input_ids"]
            for n in (1, 16, 256):
                assert edge_token_ids(tok, text, n) == full[:n]
                assert edge_token_ids(tok, text, n, last=True) == full[-n:]


def test_a_text_spacy_cannot_parse_is_skipped_and_counted(bpe, extractor):
    from mta_kernels.distill.collate import UnitCollator

    class Picky(type(extractor)):
        def _extract(self, texts):
            if any("unparseable" in t for t in texts):
                raise ValueError("[E999] cannot parse this")
            return super()._extract(texts)

    picky = Picky()
    picky._nlp, picky._matcher = extractor._nlp, extractor._matcher
    col = UnitCollator(bpe, None, extractor=picky, max_length=64)
    with pytest.warns(UserWarning, match="spaCy could not parse a text.*E999"):
        batch = col(["The old dog runs home.", "An unparseable text.", "The cat sleeps."])
    assert batch["stats"]["units_failed"] == 1
    counts = batch["units"]["word"].cu_units.diff().tolist()
    assert counts[1] == 0 and counts[0] > 0 and counts[2] > 0


@pytest.mark.slow
def test_a_megabyte_record_trains_with_units(assets, tmp_path, capsys):
    """A record longer than spaCy's limit (1 000 000 characters: E088 before) trains with MTA."""
    pytest.importorskip("spacy")
    sentence = "The teacher shows the student how the small model learns from the large one. "
    big = {"prompt": "### Instruction:\nWrite a lot.\n\n### Response:\n", "output": sentence * 14000}
    lines = (assets / "data.jsonl").read_text().splitlines()[:7]
    (tmp_path / "big.jsonl").write_text(json.dumps(big) + "\n" + "\n".join(lines) + "\n")
    args = _with_data(
        assets, tmp_path / "run", tmp_path / "big.jsonl", "--pairs", "1:1:word,2:2:phrase", steps=4
    )
    args[args.index("--batch-size") + 1] = "8"
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "1 had their response cut on the right" in out
    recs = [r for r in _metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(recs) == 4 and all(r["unit_coverage"]["word"]["examples"] == 1.0 for r in recs)


def test_rouge_of_a_long_reference_is_rouge_scores():
    pytest.importorskip("rouge_score")
    import random

    from rouge_score import rouge_scorer

    from mta_kernels.distill.rouge import LONG_REFERENCE_CHARS, lcs_length, rouge_l

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        table = rouge_scorer._lcs_table(a, b) if a and b else [[0]]
        assert lcs_length(a, b) == table[-1][-1]
    words = "the teacher student model learns small large from data running ran runs".split()
    reference = " ".join(rng.choice(words) for _ in range(LONG_REFERENCE_CHARS // 4))
    prediction = " ".join(rng.choice(words) for _ in range(60))
    assert len(reference) > LONG_REFERENCE_CHARS
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)
    assert rouge_l(prediction, [reference]) == pytest.approx(100 * expected["rougeL"].fmeasure, rel=1e-12)


# -------------------------------------------------------------------------------- 6. signals, disks
@pytest.fixture(scope="module")
def d32(assets):
    lines = (assets / "data.jsonl").read_text().splitlines()
    (assets / "d32.jsonl").write_text("\n".join(lines + lines) + "\n")
    return assets / "d32.jsonl"


def _fault_args(assets, d32, out, *extra) -> list[str]:
    if "--save-every" not in extra:
        extra = ("--save-every", "2", *extra)
    args = _distill_args(assets, out, "--no-mta", *extra, steps=6, batch=8)
    args[args.index("--data") + 1] = str(d32)
    return args


@pytest.mark.parametrize(
    "fault, code, on_disk",
    [
        ("sigterm@setup:1", 143, "nothing was written in"),
        ("sigint@data:1", 130, "nothing was written in"),
        # the first signal in step 3 asks for a checkpoint; a second one while it is written stops at once
        ("sigterm@step:3,sigterm@save:1", 143, "holds the run's config and metrics but no checkpoint yet"),
        (
            "sigterm@finish:1",
            143,
            "holds step 6, the last good checkpoint: run the same command with --resume",
        ),
    ],
    ids=["before-models", "during-data-checks", "second-signal-during-checkpoint", "during-final-save"],
)
def test_a_signal_at_any_moment_says_what_is_on_disk(assets, d32, tmp_path, fault, code, on_disk):
    out = tmp_path / "run"
    every = "100" if "step" in fault else "2"
    r = _cli(_fault_args(assets, d32, out, "--save-every", every), {"MTA_DISTILL_FAULT": fault}, 180)
    assert r.returncode == code, r.stderr[-3000:]
    text = " ".join(r.stderr.split())
    message = text[text.index("stopped by ") :]
    assert message.startswith(f"stopped by {fault.split('@')[0].upper()}: ") and on_disk in message, message
    assert "Traceback" not in r.stderr
    if "nothing was written" in on_disk:
        assert not out.exists()
    else:
        assert not [n for n in os.listdir(out) if ".tmp" in n]  # no torn file left behind
    if fault == "sigterm@finish:1":
        assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 6 and not (out / "model").exists()
        assert main([*_fault_args(assets, d32, out), "--resume"]) == 0
        assert (out / "model" / "config.json").exists()


def test_a_signal_during_a_checkpoint_stops_on_that_checkpoint(assets, d32, tmp_path):
    out = tmp_path / "run"
    r = _cli(_fault_args(assets, d32, out), {"MTA_DISTILL_FAULT": "sigterm@save:2"}, 180)
    assert r.returncode == 75, r.stderr[-3000:]
    assert "pre-empted (SIGTERM): step 4 finished and checkpointed" in r.stderr
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 4


def test_a_full_disk_during_a_checkpoint_names_the_last_good_one(assets, d32, tmp_path, capsys, monkeypatch):
    """Fault injection: the second checkpoint's writes raise OSError(ENOSPC) half-way (inside
    torch.save, as a full disk does). The run stops with an error paragraph naming the step it could not
    save and the checkpoint that is still good; no temporary is left; --resume then ends the run as an
    uninterrupted one does."""
    full = tmp_path / "full"
    assert main(_fault_args(assets, d32, full)) == 0
    monkeypatch.setenv("MTA_DISTILL_FAULT", "enospc@save:2")
    monkeypatch.setattr("mta_kernels.distill.faults._saves", 0)
    out = tmp_path / "run"
    text = _refused(
        capsys,
        _fault_args(assets, d32, out),
        "could not write the checkpoint of step 4",
        "No space left on device",
        "free some space",
        "checkpoint.pt' holds step 2, the last good checkpoint",
        "--resume",
    )
    assert "unexpected pos" not in text
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 2
    monkeypatch.delenv("MTA_DISTILL_FAULT")
    assert main([*_fault_args(assets, d32, out), "--resume"]) == 0
    assert _train_losses(out) == _train_losses(full)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KB tmpfs: room for a run's config and metrics, not for a checkpoint (skipped where
    mounting is not allowed)."""
    path = tmp_path / "disk"
    path.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_really_full_disk(assets, d32, tiny_disk, capsys):
    out = tiny_disk / "run"
    _refused(
        capsys,
        _fault_args(assets, d32, out),
        "could not write the checkpoint of step 2",
        "No space left on device",
        "no checkpoint yet",
    )
    assert sorted(os.listdir(out)) == [".mta-distill-run", "config.json", "metrics.jsonl"]


# -------------------------------------------------------------------------------------- 7. Python API
@pytest.fixture(scope="module")
def hf(assets, tmp_path_factory):
    """Tiny student and teacher directories: the teacher saved with another tokenizer of the student's
    size (WordPiece and BPE, 400 tokens each) and one saved with the student's."""
    from mta_kernels.distill.demo import CORPUS
    from mta_kernels.distill.models import build_model, load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("hf")
    with open(CORPUS, encoding="utf-8") as f:
        corpus = [ln.strip() for ln in f if ln.strip()]
    wp = train_tokenizer("wordpiece", corpus, 400, str(root / "wp400"))
    bpe = load_tokenizer(str(assets / "bpe"), STUDENT)
    assert len(wp) == len(bpe) == 400
    torch.manual_seed(0)
    build_model("builtin:gpt2:2:16", bpe, 128).save_pretrained(str(root / "student"))
    for name, tok in (("teacher-own", wp), ("teacher-shared", bpe)):
        build_model("builtin:gpt2:2:32", tok, 128).save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    return {"root": root, "bpe": bpe, "wp": wp}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


def test_trainer_refuses_a_teacher_of_another_tokenizer(hf, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from mta_kernels.integrations import MTADataCollator, MTATrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no")
    student = _load(hf["root"] / "student")
    teacher = _load(hf["root"] / "teacher-own")
    with pytest.raises(ValueError, match="saved with its own tokenizer.*teacher would read the student's"):
        MTATrainer(
            student, teacher, None, args=args, data_collator=MTADataCollator(hf["bpe"], granularities=())
        )
    # Its own tokenizer given: no KD across vocabularies (a warning), and the trainer builds.
    with pytest.warns(UserWarning, match="logit KD term is off"):
        t = MTATrainer(
            student,
            teacher,
            None,
            args=args,
            data_collator=MTADataCollator(hf["bpe"], hf["wp"], granularities=()),
        )
    assert t.kd_vocab is None
    # A teacher built in memory (no tokenizer to compare) with another output vocabulary.
    from mta_kernels.distill.models import build_model

    other = build_model("builtin:gpt2:2:32", hf["wp"], 128)
    other.resize_token_embeddings(512)
    with pytest.raises(ValueError, match="output vocabulary has 400 entries and the teacher's 512"):
        MTATrainer(
            student, other, None, args=args, data_collator=MTADataCollator(hf["bpe"], granularities=())
        )
    # ... fine when the shared tokenizer is passed as the teacher's: the KD over it stays on.
    t = MTATrainer(
        student, other, None, args=args, data_collator=MTADataCollator(hf["bpe"], hf["bpe"], granularities=())
    )
    assert t.kd_vocab == 400
    shared = MTATrainer(
        _load(hf["root"] / "student"),
        _load(hf["root"] / "teacher-shared"),
        None,
        args=args,
        data_collator=MTADataCollator(hf["bpe"], granularities=()),
    )
    assert shared.kd_vocab == 400


def test_trainer_refuses_what_the_cli_refuses(hf, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from mta_kernels.distill.models import build_model
    from mta_kernels.integrations import MTADataCollator, MTATrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no")
    col = MTADataCollator(hf["bpe"], granularities=())
    student, teacher = _load(hf["root"] / "student"), _load(hf["root"] / "teacher-shared")
    for kw, needle in (
        (dict(beta=float("nan")), r"beta \(β\) must be a finite number"),
        (dict(temperature=float("inf")), "temperature must be a finite number"),
        (dict(projector_lr=float("nan")), "projector_lr must be a finite number"),
        (dict(lam=-0.1), r"lam \(λ\) must be in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=needle):
            MTATrainer(student, teacher, None, args=args, data_collator=col, **kw)
    with pytest.raises(ValueError, match="max_length 1024 is longer than the student's 512 positions"):
        MTATrainer(
            student,
            teacher,
            None,
            args=args,
            data_collator=MTADataCollator(hf["bpe"], granularities=(), max_length=1024),
        )
    small = build_model("builtin:gpt2:1:16", hf["bpe"], 128)
    small.resize_token_embeddings(300)  # a tokenizer of 400 tokens: ids past its embedding
    with pytest.raises(
        ValueError, match="student tokenizer has 400 tokens but the student's embedding has 300"
    ):
        MTATrainer(small, teacher, None, args=args, data_collator=col)
    narrow = build_model("builtin:gpt2:1:32", hf["bpe"], 128)
    narrow.lm_head = torch.nn.Linear(32, 300, bias=False)  # an output layer narrower than the tokenizer
    with pytest.raises(
        ValueError, match="teacher's output layer has 300: the vocabularies cannot be compared"
    ):
        MTATrainer(
            student,
            narrow,
            None,
            args=args,
            data_collator=MTADataCollator(hf["bpe"], hf["bpe"], granularities=()),
        )
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        MTADataCollator(hf["bpe"], max_length=True)


def test_trainer_resume_with_other_projectors_is_an_error(hf, tmp_path):
    pytest.importorskip("accelerate")
    from safetensors.torch import save_file
    from transformers import TrainingArguments

    from mta_kernels import MTALoss
    from mta_kernels.integrations import MTADataCollator, MTATrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no")
    two = MTALoss([(1, 1, "word"), (2, 2, "phrase")], 16, 32)
    trainer = MTATrainer(
        _load(hf["root"] / "student"),
        _load(hf["root"] / "teacher-shared"),
        two,
        args=args,
        data_collator=MTADataCollator(hf["bpe"]),
    )
    state = {k: v.contiguous() for k, v in trainer.model.state_dict().items() if "lm_head" not in k}
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    save_file(state, str(ckpt / "model.safetensors"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer._load_from_checkpoint(str(ckpt))  # its own projectors: fine
    one = MTALoss([(2, 2, "word")], 16, 32)
    other = MTATrainer(
        _load(hf["root"] / "student"),
        _load(hf["root"] / "teacher-shared"),
        one,
        args=args,
        data_collator=MTADataCollator(hf["bpe"]),
    )
    with pytest.raises(ValueError, match="holds the projectors of another MTALoss.*layer pairs"):
        other._load_from_checkpoint(str(ckpt))
    wide = MTALoss([(1, 1, "word"), (2, 2, "phrase")], 16, 48)  # projectors to 48 features, not 32
    trainer3 = MTATrainer(
        _load(hf["root"] / "student"),
        _load(hf["root"] / "teacher-shared"),
        wide,
        args=args,
        data_collator=MTADataCollator(hf["bpe"]),
    )
    with pytest.raises(ValueError, match=r"projectors\.0\.bias is \[32\] there and \[48\] here"):
        trainer3._load_from_checkpoint(str(ckpt))
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_gkd_trainer_refuses_a_teacher_of_another_tokenizer(hf, tmp_path):
    """TRL compares the vocabulary sizes (400 both here); the tokenizers themselves differ."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import datasets
    from trl import DistillationConfig

    from mta_kernels import MTALoss
    from mta_kernels.integrations import MTAGKDTrainer

    args = DistillationConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_completion_length=8,
        save_strategy="no",
    )
    data = datasets.Dataset.from_list([{"prompt": "The teacher"}, {"prompt": "The student"}])
    student, teacher = _load(hf["root"] / "student"), _load(hf["root"] / "teacher-own")
    with pytest.raises(ValueError, match="saved with its own tokenizer"):
        MTAGKDTrainer(
            student,
            teacher,
            MTALoss([(1, 1, "word")], 16, 32),
            args=args,
            train_dataset=data,
            processing_class=hf["bpe"],
        )
    with pytest.raises(ValueError, match=r"mta_beta \(β\) must be a finite number"):
        MTAGKDTrainer(student, teacher, MTALoss([(1, 1, "word")], 16, 32), mta_beta=float("nan"))


def test_check_weights():
    from mta_kernels import use_backend
    from mta_kernels.ops._dispatch import triton_interpreting
    from mta_kernels.ops.glue import check_weights

    check_weights(None, "w")
    check_weights(torch.tensor([0.0, 1.5, 2.0]), "w")
    bad_cases = (
        (torch.tensor([1.0, -1.0]), "entry 1 is -1.0"),
        (torch.tensor([[1.0, float("inf")]]), r"entry \(0, 1\) is inf"),
        (torch.tensor([float("nan")]), "entry 0 is nan"),
    )
    with use_backend("torch"):
        for bad, where in bad_cases:
            with pytest.raises(ValueError, match=f"unit_weights must be finite and >= 0, but {where}"):
                check_weights(bad, "unit_weights")
    if triton_interpreting():  # the Triton path: no value read back, a device-side assert instead
        with use_backend("triton"):
            for bad, _ in bad_cases:
                with pytest.raises(RuntimeError, match="unit_weights must be finite and >= 0"):
                    check_weights(bad, "unit_weights")


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_structural_loss_refuses_bad_unit_weights(value):
    from mta_kernels import use_backend
    from mta_kernels.ops import structural_loss

    s, t = torch.randn(6, 8), torch.randn(6, 12)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    w = torch.ones(6)
    w[2] = value
    with use_backend("torch"), pytest.raises(ValueError, match="finite and >= 0"):
        structural_loss(s, t, cu, w)


def test_span_pool_refuses_infinite_weights():
    from mta_kernels import use_backend
    from mta_kernels.ops import span_pool

    h, r = torch.randn(10, 4), torch.tensor([[0, 3], [3, 10]], dtype=torch.int32)
    with use_backend("torch"), pytest.raises(ValueError, match="finite and >= 0"):
        span_pool(h, r, torch.full((10,), float("inf")))
