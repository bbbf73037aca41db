"""``--report-to``: every logged term of the reference loop reaches TensorBoard / W&B as a scalar."""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types

import pytest
from test_distill import _distill_args, _metrics, make_assets  # tests/ is on sys.path

from mta_kernels.distill.__main__ import main
from mta_kernels.distill.reporting import flatten

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = ["--pairs", "1:1:word,2:2:phrase"]
LAYERS = [(1, 1, "word"), (2, 2, "phrase")]
MUST = ("train/ce", "train/kd", "train/mta", "train/loss", "train/dsa/pair0_s1_t1_word",
        "train/dsa/pair1_s2_t2_phrase", "train/hra/pair0_s1_t1_word", "train/unit_coverage/word/tokens",
        "train/unit_coverage/phrase/examples", "eval/loss")  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("reporting"))


def _args(assets, out, *extra):
    return _distill_args(assets, out, *PAIRS, "--eval-fraction", "0.25", "--eval-every", "2", *extra,
                         student_tok="bpe", batch=4, steps=2)  # fmt: skip


def _expected(out) -> dict[str, dict[int, float]]:
    """Every number of metrics.jsonl, by scalar name and step."""
    want: dict[str, dict[int, float]] = {}
    for rec in _metrics(out):
        for name, value in flatten(rec, LAYERS).items():
            want.setdefault(name, {})[rec["step"]] = value
    return want


def test_flatten_names_every_term():
    rec = {"kind": "train", "step": 3, "ce": 2.0, "kd": 1.0, "mta": 0.5, "loss": 3.0, "mta_share": None,
           "dsa": [0.1, 0.2], "hra": [0.3, 0.4], "unit_coverage": {"word": {"tokens": 0.9, "examples": 1.0}},
           "student_gen": {"data": 1, "threshold": 0.2}}  # fmt: skip
    got = flatten(rec, LAYERS)
    assert got == {
        "train/ce": 2.0, "train/kd": 1.0, "train/mta": 0.5, "train/loss": 3.0,
        "train/dsa/pair0_s1_t1_word": 0.1, "train/dsa/pair1_s2_t2_phrase": 0.2,
        "train/hra/pair0_s1_t1_word": 0.3, "train/hra/pair1_s2_t2_phrase": 0.4,
        "train/unit_coverage/word/tokens": 0.9, "train/unit_coverage/word/examples": 1.0,
        "train/student_gen/data": 1.0, "train/student_gen/threshold": 0.2,
    }  # fmt: skip
    assert flatten({"kind": "eval", "step": 3, "eval_loss": 2.5, "eval_ppl": 12.0}, None) == {
        "eval/loss": 2.5,
        "eval/ppl": 12.0,
    }


def test_tensorboard_event_files_hold_every_term(assets, tmp_path):
    pytest.importorskip("spacy")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_args(assets, out, "--report-to", "tensorboard")) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = _expected(out)
    for name in MUST:
        assert name in want, name  # the run logged it
    assert tags == set(want)
    for name, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(name)}
        assert got == pytest.approx(by_step, rel=1e-6), name  # float32 in the event file
    assert sorted(want["train/ce"]) == [1, 2]


class _FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, scalars, step):
        self.logged.append((step, dict(scalars)))

    def finish(self):
        self.finished = True


def test_wandb_gets_every_term(assets, tmp_path, monkeypatch):
    """With a stand-in ``wandb`` module: init once with the config, every record logged, finish."""
    runs = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # transformers probes find_spec("wandb")
    fake.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert main(_args(assets, out, "--report-to", "wandb", "--no-mta")) == 0
    (run,) = runs
    assert run.finished and run.kwargs["config"]["report_to"] == "wandb" and run.kwargs["dir"] == str(out)
    got: dict[str, dict[int, float]] = {}
    for step, scalars in run.logged:
        for name, value in scalars.items():
            got.setdefault(name, {})[step] = value
    assert got == _expected(out) and "train/kd" in got and "eval/loss" in got


def test_wandb_missing_is_a_clear_error(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    out = tmp_path / "run"
    assert main(_args(assets, out, "--report-to", "wandb", "--no-mta")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install wandb" in err and "Traceback" not in err
    assert not out.exists()


def test_wandb_offline_run(assets, tmp_path, monkeypatch):
    """The real wandb package in offline mode (only where it is installed)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(_args(assets, out, "--report-to", "wandb", "--no-mta")) == 0
    assert any(p.startswith("offline-run") for p in os.listdir(out / "wandb"))
    assert json.loads((out / "config.json").read_text())["report_to"] == "wandb"
