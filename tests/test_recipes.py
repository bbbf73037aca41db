"""Recipes (the published settings): every shipped recipe loads, names its source, and runs a few steps
on tiny CPU models with the model paths and sizes overridden; flags override recipe values."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_distill import STUDENT, TEACHER, make_assets  # tests/ is on sys.path

from mta_kernels.distill.__main__ import main
from mta_kernels.distill.config import DistillError, TrainConfig
from mta_kernels.distill.recipe import load_recipe, recipe_names
from mta_kernels.presets import PRESETS

pytest.importorskip("transformers")

EXPECTED = {
    "mta-gpt2",
    "mta-gpt2-entropy",
    "mta-opt",
    "mta-qwen1.5",
    "mta-xtok-gpt2",
    "mta-xtok-gpt2-entropy",
    "mta-xtok-tinyllama",
}


# Tiny models: one intra-op thread is as fast, and spins no threads on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("recipes"))


def test_shipped_recipes_are_complete():
    assert set(recipe_names()) == EXPECTED
    for name in recipe_names():
        r = load_recipe(name)
        assert r["name"] == name
        assert r["source"].startswith(("voluyen/mta ", "voluyen/mta_dskd_v2 ")) and r["source"].endswith(
            ".sh"
        )
        cfg = r["config"]
        assert cfg["preset"] in PRESETS
        assert cfg["projector_lr"] == 5e-4 and (cfg["adam_beta1"], cfg["adam_beta2"]) == (0.9, 0.999)
        assert cfg["warmup_steps"] == 0 and cfg["max_length"] == 256 and cfg["epochs"] >= 5
        same_tokenizer = PRESETS[cfg["preset"]].same_tokenizer
        if same_tokenizer:  # DistiLLM's adaptive SRKL with student generation, kd-ratio 1.0
            assert cfg["lam"] == 1.0 and cfg["kd"] == "srkl" and cfg["student_gen"]
            assert (cfg["init_threshold"], cfg["loss_eps"], cfg["capacity"]) == (0.0, 0.1, 1000)
            assert (cfg["gen_top_p"], cfg["gen_temperature"]) == (1.0, 1.0)
        else:
            assert cfg["lam"] == 0.5 and cfg["temperature"] == 2.0 and not cfg["student_gen"]
            assert cfg["mta_variant"] == "published-xtok"
        assert cfg.get("entropy_weight", False) == name.endswith("-entropy")
        assert cfg["beta"] == (3.0 if name == "mta-opt" else 2.0)
        assert cfg.get("lora", False) == (name in ("mta-opt", "mta-xtok-tinyllama"))
        if name == "mta-opt":  # --peft lora without r/alpha: the MTA code's defaults (DistiLLM's), 16/64
            assert (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (16, 64.0, 0.1)
        # the published runs select by validation ROUGE-L and accumulate DeepSpeed's way
        assert cfg["eval_gen"] and cfg["eval_gen_limit"] == 1000 and cfg["accum_mean"] == "micro-batches"
        assert not any("Evaluation with generation" in item for item in r["not_reproduced"])
        if not same_tokenizer:  # the missing DSKD logit term is named, with its reason
            assert any(
                item.startswith("DSKD logit term") and "because" in item for item in r["not_reproduced"]
            )
        TrainConfig(**{**cfg, "data": "x", "teacher": "t"}).validate()


def test_recipes_listing(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out and load_recipe(name)["source"] in out
    assert main(["recipes", "--show", "mta-opt"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["beta"] == 3.0


def _recipe_args(assets, name, out, *extra):
    cross = not PRESETS[load_recipe(name)["config"]["preset"]].same_tokenizer
    return [
        "distill", "--recipe", name,
        "--data", str(assets / "data.jsonl"), "--eval-fraction", "0.25",
        "--teacher", TEACHER, "--teacher-tokenizer", str(assets / "bpe"),
        "--student", STUDENT, "--student-tokenizer", str(assets / ("wp" if cross else "bpe")),
        "--pairs", "1:1:word,2:2:phrase", "--steps", "2", "--batch-size", "4", "--grad-accum", "1",
        "--max-length", "96", "--max-prompt-length", "64",
        "--backend", "torch", "--device", "cpu", "--out", str(out), "--no-progress", "--no-plot",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_recipe_runs_on_tiny_models(assets, tmp_path, name, capsys):
    pytest.importorskip("spacy")
    recipe = load_recipe(name)
    out = tmp_path / "run"
    assert main(_recipe_args(assets, name, out)) == 0
    err = capsys.readouterr().err
    assert all(item[:40] in err.replace("\n", " ") for item in recipe["not_reproduced"])
    with open(out / "config.json") as f:
        cfg = json.load(f)
    assert cfg["recipe"] == name
    # overridden by flags
    assert (cfg["steps"], cfg["epochs"], cfg["preset"], cfg["pairs"]) == (
        2,
        None,
        None,
        "1:1:word,2:2:phrase",
    )
    assert cfg["batch_size"] == 4 and cfg["max_length"] == 96
    assert cfg["lora"] == recipe["config"].get("lora", False)
    # kept from the recipe
    kept = ("lam", "beta", "gamma", "kd", "temperature", "lr", "projector_lr", "adam_beta2", "student_gen")
    assert cfg["entropy_weight"] == recipe["config"].get("entropy_weight", False)
    for key in kept:
        if key in recipe["config"]:
            assert cfg[key] == recipe["config"][key], key
    assert cfg["mta_variant"] == recipe["config"].get("mta_variant", "mta")
    recs = [json.loads(ln) for ln in open(out / "metrics.jsonl") if ln.strip()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["eval_rougeL"] >= 0 for r in recs if r["kind"] == "eval"] == [True]  # eval_gen, once
    assert os.path.exists(out / "best" / "config.json") and os.path.exists(out / "model" / "config.json")
    assert len(train) == 2 and all(r["mta"] is not None for r in train)
    assert all((r["hra"] is None) == (cfg["mta_variant"] == "published-xtok") for r in train)
    assert ("student_gen" in train[0]) == recipe["config"]["student_gen"]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    lrs = sorted({g["initial_lr"] for g in state["optimizer"]["param_groups"]})
    assert lrs == sorted({recipe["config"]["lr"], 5e-4})
    assert all(tuple(g["betas"]) == (0.9, 0.999) for g in state["optimizer"]["param_groups"])


def test_recipe_refusals(assets, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(_recipe_args(assets, "mta-opt", out, "--lora-r", "0")) == 2
    assert "--lora-r must be at least 1" in capsys.readouterr().err
    assert not os.path.exists(out / "checkpoint.pt")
    a = _recipe_args(assets, "mta-gpt2", tmp_path / "x")
    a[a.index("--recipe") + 1] = "nope"
    assert main(a) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "config": {"lr": 1e-4, "learning_rate": 1}}))
    a = _recipe_args(assets, "mta-gpt2", tmp_path / "y")
    a[a.index("--recipe") + 1] = str(bad)
    assert main(a) == 2
    assert "'learning_rate' is not a training setting" in " ".join(capsys.readouterr().err.split())


def test_docs_name_every_recipe_and_its_values():
    """docs/recipes.md lists every recipe with its source script and its values (the table's columns)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "recipes.md").read_text()
    names = sorted(EXPECTED)
    header = next(ln for ln in doc.splitlines() if ln.startswith("| setting |"))
    assert [c.strip(" `") for c in header.split("|")[2:-1]] == names
    for name in names:
        repo, path = load_recipe(name)["source"].split(" ")
        assert f"`{repo}` `{path}`" in doc
    for line in doc.splitlines():
        if line.startswith("| ") and "(`" in line.split("|")[1]:
            key = line.split("|")[1].split("(`")[-1].split("`)")[0]
            cells = [c.strip(" `") for c in line.split("|")[2:-1]]
            for name, cell in zip(names, cells):
                value = load_recipe(name)["config"].get(key)
                if value is True or value is False:
                    shown = "yes" if value else "no"
                elif value is None:
                    shown = "–"
                elif key == "eval_every" and value == -1:
                    shown = "epoch"
                else:
                    shown = value
                assert cell == str(shown), (name, key, cell, value)


def test_epochs_and_once_an_epoch():
    """``--epochs`` sets the steps from DistiLLM's count; ``-1`` evaluates / saves once an epoch."""
    from mta_kernels.distill.prepare import resolve_schedule

    once = {"eval_every": -1, "save_every": -1}
    cfg = TrainConfig(data="x", teacher="t", batch_size=8, grad_accum=2, epochs=5, **once)
    cfg.validate()
    notes = resolve_schedule(cfg, n_train=100, world=1)
    assert (cfg.steps, cfg.eval_every, cfg.save_every) == (5 * (100 // 16), 100 // 16, 100 // 16)
    assert "30 optimizer steps" in notes[0]
    cfg = TrainConfig(data="x", teacher="t", batch_size=8, steps=7, eval_every=3)
    resolve_schedule(cfg, n_train=100, world=2)
    assert (cfg.steps, cfg.eval_every, cfg.save_every) == (7, 3, 50)
    cfg = TrainConfig(data="x", teacher="t", batch_size=64, epochs=2, eval_every=-1)
    resolve_schedule(cfg, n_train=100, world=2)  # fewer examples than a global batch: 1 step an epoch
    assert (cfg.steps, cfg.eval_every) == (2, 1)
    for bad in ({"eval_every": 0}, {"epochs": 0}, {"adam_beta2": 1.0}, {"projector_lr": 0.0}):
        with pytest.raises(DistillError, match="must"):
            TrainConfig(data="x", teacher="t", **bad).validate()


def test_entropy_weight_reaches_mta_loss(assets, tmp_path, capsys):
    """``--entropy-weight`` with this package's MTALoss (shared tokenizer, token-level HRA): a short run
    whose MTA term differs from the same run without it (same seed, same first batch), and the refusals."""
    pytest.importorskip("spacy")
    from test_distill import _distill_args

    first = {}
    for flag in ((), ("--entropy-weight",)):
        out = tmp_path / f"run{len(flag)}"
        args = _distill_args(assets, out, "--pairs", "1:1:word,2:2:phrase", *flag, student_tok="bpe", steps=2)
        assert main(args) == 0
        with open(out / "config.json") as f:
            assert json.load(f)["entropy_weight"] == bool(flag)
        recs = [json.loads(ln) for ln in open(out / "metrics.jsonl") if ln.strip()]
        train = [r for r in recs if r["kind"] == "train"]
        assert len(train) == 2 and all(r["mta"] > 0 and len(r["hra"]) == 2 for r in train)
        first[bool(flag)] = train[0]
    assert first[True]["mta"] != pytest.approx(first[False]["mta"], rel=1e-6)
    for refused, msg in ((("--unweighted",), "drop --unweighted"), (("--no-mta",), "--no-mta")):
        args = _distill_args(assets, tmp_path / "x", "--entropy-weight", *refused, student_tok="bpe", steps=1)
        assert main(args) == 2
        assert msg in " ".join(capsys.readouterr().err.split())
