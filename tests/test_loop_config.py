"""``mta-distill distill --config FILE`` (YAML or JSON, the recipe schema) and its layering:
recipe < config file < flags given on the command line."""

from __future__ import annotations

import json

import pytest
from test_distill import STUDENT, TEACHER, make_assets  # tests/ is on sys.path

from mta_kernels.distill.__main__ import _config, build_parser, main
from mta_kernels.distill.config import TrainConfig
from mta_kernels.distill.recipe import load_recipe

pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("loop_config"))


def _cfg(argv: list[str]) -> TrainConfig:
    return _config(build_parser().parse_args(argv), argv)


def _write(path, doc) -> str:
    if str(path).endswith(".json"):
        path.write_text(json.dumps(doc))
    else:
        path.write_text(yaml.safe_dump(doc))
    return str(path)


def _run_doc(assets, out) -> dict:
    return {
        "description": "a tiny run",
        "config": {
            "data": str(assets / "data.jsonl"),
            "teacher": TEACHER,
            "teacher_tokenizer": str(assets / "bpe"),
            "student": STUDENT,
            "student_tokenizer": str(assets / "bpe"),
            "out": str(out),
            "eval_fraction": 0.0,
            "max_length": 64,
            "batch_size": 4,
            "steps": 2,
            "lr": 0.003,
            "mta": False,
            "backend": "torch",
            "device": "cpu",
            "progress": False,
            "plot": False,
        },
    }


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_runs_and_flags_override_it(assets, tmp_path, suffix):
    path = _write(tmp_path / f"run{suffix}", _run_doc(assets, tmp_path / "out"))
    assert main(["distill", "--config", path, "--steps", "1"]) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["steps"] == 1  # the flag
    assert saved["lr"] == 0.003 and saved["batch_size"] == 4 and saved["mta"] is False  # the file
    assert saved["max_length"] == 64 and saved["student"] == STUDENT
    assert saved["weight_decay"] == TrainConfig().weight_decay  # neither: the default


def test_recipe_then_file_then_flags(assets, tmp_path):
    recipe = load_recipe("mta-gpt2")["config"]
    doc = {"config": {"lr": 0.002, "gamma": 0.3, "pairs": "1:1:word", "data": "d.jsonl", "out": "o"}}
    path = _write(tmp_path / "run.yml", doc)
    cfg = _cfg(["distill", "--recipe", "mta-gpt2", "--config", path, "--teacher", "t", "--student", "s",
                "--gamma", "0.5"])  # fmt: skip
    assert cfg.recipe == "mta-gpt2"
    assert cfg.kd == recipe["kd"] and cfg.epochs == recipe["epochs"]  # recipe only
    assert cfg.lr == 0.002  # the file over the recipe
    assert cfg.gamma == 0.5  # the flag over both
    # the file's pairs replace the recipe's preset (two names of one setting)
    assert cfg.pairs == "1:1:word" and cfg.preset is None
    # --steps on the command line clears the recipe's epochs
    cfg = _cfg(["distill", "--recipe", "mta-gpt2", "--config", path, "--teacher", "t", "--student", "s",
                "--steps", "7"])  # fmt: skip
    assert (cfg.steps, cfg.epochs) == (7, None)


def test_yaml_numbers_without_a_dot(tmp_path):
    """YAML 1.1 reads ``1e-4`` as a string: converted to the field's number type."""
    path = tmp_path / "run.yaml"
    path.write_text("config:\n  lr: 1e-4\n  steps: '12'\n  kd_chunk: 256\n  data: d\n  out: o\n")
    cfg = _cfg(["distill", "--config", str(path), "--teacher", "t", "--student", "s"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.steps == 12 and cfg.kd_chunk == "256"


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return " ".join(err.split())


def test_config_file_errors(assets, tmp_path, capsys):
    doc = _run_doc(assets, tmp_path / "out")
    doc["config"]["learning_rate"] = 0.1
    err = _err(capsys, ["distill", "--config", _write(tmp_path / "a.yaml", doc)])
    assert "'learning_rate' is not a training setting" in err
    assert "valid keys:" in err and "lr" in err.split("valid keys:")[1] and "kd_chunk" in err
    assert not (tmp_path / "out").exists()

    doc = _run_doc(assets, tmp_path / "out")
    doc["config"]["batch_size"] = "eight"
    assert "'batch_size' must be an integer, got 'eight'" in _err(
        capsys, ["distill", "--config", _write(tmp_path / "b.json", doc)]
    )
    doc = _run_doc(assets, tmp_path / "out")
    doc["config"]["mode"] = "teacher"
    assert "'mode'" in _err(capsys, ["distill", "--config", _write(tmp_path / "c.json", doc)])
    doc = _run_doc(assets, tmp_path / "out")
    doc["extra"] = 1
    err = _err(capsys, ["distill", "--config", _write(tmp_path / "d.json", doc)])
    assert "unknown keys 'extra'" in err and "'config'" in err

    (tmp_path / "e.yaml").write_text("config: [1, 2\n")
    assert "is not valid YAML" in _err(capsys, ["distill", "--config", str(tmp_path / "e.yaml")])
    (tmp_path / "f.yaml").write_text("lr: 0.1\n")
    assert "no 'config' mapping" in _err(capsys, ["distill", "--config", str(tmp_path / "f.yaml")])
    assert "does not exist" in _err(capsys, ["distill", "--config", str(tmp_path / "none.yaml")])
    assert "must end in" in _err(capsys, ["distill", "--config", str(tmp_path / "run.toml")])
    doc = _run_doc(assets, tmp_path / "out")
    del doc["config"]["teacher"]
    err = _err(capsys, ["distill", "--config", _write(tmp_path / "g.json", doc)])
    assert "no --teacher given" in err
    doc = _run_doc(assets, tmp_path / "out")
    doc["config"]["report_to"] = "mlflow"
    assert "'report_to' must be one of none, tensorboard, wandb" in _err(
        capsys, ["distill", "--config", _write(tmp_path / "h.json", doc)]
    )
    doc["config"]["report_to"], doc["config"]["kd_chunk"] = "none", "0"
    assert "'kd_chunk' must be" in _err(capsys, ["distill", "--config", _write(tmp_path / "i.json", doc)])
