"""Trainer integrations (mta_kernels.integrations): MTATrainer on transformers.Trainer, MTAGKDTrainer on
TRL's on-policy DistillationTrainer, MTADataCollator, and the README's trainer snippets.

Tiny local GPT-2 models and a BPE tokenizer trained on the bundled corpus; no hub access. The ops run
their plain-torch path (``use_backend("torch")``): the Triton interpreter is tested elsewhere.
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("spacy")

from mta_kernels import MTALoss, use_backend  # noqa: E402
from mta_kernels.distill.demo import CORPUS, DOLLY  # noqa: E402
from mta_kernels.distill.models import build_model, train_tokenizer  # noqa: E402
from mta_kernels.layout import UnitBatch  # noqa: E402
from mta_kernels.units import UnitExtractor, align_units  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = [(1, 1, "word"), (2, 2, "phrase")]
SD, TD = 16, 32  # student / teacher widths


def _needs(*modules: str) -> None:
    for m in modules:
        pytest.importorskip(m, reason=f"{m} is not installed (pip install 'mta_kernels[integrations]')")


# Tiny models: one intra-op thread is as fast, and spins no threads on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A BPE and a WordPiece tokenizer, 8 short Dolly records, and the models' directories."""
    root = tmp_path_factory.mktemp("integrations")
    with open(CORPUS, encoding="utf-8") as f:
        corpus = [ln.strip() for ln in f if ln.strip()]
    bpe = train_tokenizer("bpe", corpus, 400, str(root / "bpe"))
    wp = train_tokenizer("wordpiece", corpus, 300, str(root / "wp"))
    with open(DOLLY, encoding="utf-8") as f:
        rows = [json.loads(ln) for ln in f if ln.strip()][:8]
    rows = [{"prompt": r["prompt"][:160], "output": r["output"][:160]} for r in rows]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    for name, spec in (("student", f"builtin:gpt2:2:{SD}"), ("teacher", f"builtin:gpt2:2:{TD}")):
        build_model(spec, bpe, 128).save_pretrained(str(root / name))
        bpe.save_pretrained(str(root / name))
    return {"root": root, "bpe": bpe, "wp": wp, "rows": rows}


def _models(assets, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_pretrained(str(assets["root"] / "student"))
    teacher = AutoModelForCausalLM.from_pretrained(str(assets["root"] / "teacher"))
    if seed:  # another initialisation: a resume must overwrite all of it
        for p in student.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return student, teacher


def _dataset(assets, extra_column: bool = True):
    import datasets

    rows = [dict(r, junk=i) if extra_column else dict(r) for i, r in enumerate(assets["rows"])]
    return datasets.Dataset.from_list(rows)


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
    )
    base.update(kw)
    return TrainingArguments(**base)


# ------------------------------------------------------------------------------------------ imports
def test_import_is_lazy():
    """``import mta_kernels.integrations`` loads neither transformers nor trl nor accelerate."""
    code = (
        "import sys, mta_kernels, mta_kernels.integrations as I; "
        "bad = [m for m in ('transformers', 'trl', 'accelerate') if m in sys.modules]; "
        "assert not bad, bad; I.MTADataCollator; "
        "assert 'trl' not in sys.modules and 'transformers' not in sys.modules; print('ok')"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------ collator
def test_units_from_token_ids_matches_tokenizer_offsets(assets):
    """Units built from decoded token ids equal the units of the tokenizer's own offsets (both padding
    sides), including a multi-byte character split over several tokens."""
    from mta_kernels.integrations import units_from_token_ids

    tok = copy.deepcopy(assets["bpe"])
    texts = [r["prompt"] + r["output"] for r in assets["rows"][:3]] + [
        "The old dog ran to the café 😀 quickly."
    ]
    extractor = UnitExtractor()
    for side in ("right", "left"):
        tok.padding_side = side
        enc = tok(texts, padding=True, return_offsets_mapping=True, return_tensors="np")
        assert tok.batch_decode(enc["input_ids"], skip_special_tokens=True) == texts
        got_texts, got = units_from_token_ids(
            tok,
            torch.from_numpy(enc["input_ids"]),
            torch.from_numpy(enc["attention_mask"]),
            extractor,
            ("word", "phrase"),
        )
        assert got_texts == texts
        text_units = extractor(texts)
        for g in ("word", "phrase"):
            want = align_units(text_units, texts, enc, None, g)
            assert want.num_units > 0
            assert torch.equal(got[g].student_ranges, want.student_ranges), (side, g)
            assert torch.equal(got[g].cu_units, want.cu_units)
            assert got[g].teacher_ranges is got[g].student_ranges


def test_collator_labels_and_columns(assets):
    from mta_kernels.integrations import MTADataCollator

    col = MTADataCollator(assets["bpe"], max_length=256)
    r = assets["rows"][0]
    batch = col(
        [
            {"prompt": r["prompt"], "output": r["output"]},
            {"text": "A dog ran home.", "prompt_length_chars": 0},
        ]
    )
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "units"}
    # One shared tokenizer: the teacher reads the student's tensors.
    assert batch["teacher_input_ids"] is batch["input_ids"]
    ids, labels = batch["input_ids"], batch["labels"]
    n_prompt = len(assets["bpe"](r["prompt"])["input_ids"])
    assert (labels[0, : n_prompt - 1] == -100).all() and (labels[0, n_prompt + 1 :] != -100).any()
    assert (labels[1][batch["attention_mask"][1] == 1] == ids[1][batch["attention_mask"][1] == 1]).all()
    assert isinstance(batch["units"]["word"], UnitBatch)
    # A different teacher tokenizer: teacher tensors and two range tensors.
    both = MTADataCollator(assets["bpe"], assets["wp"], max_length=64)([{"text": "The old dog ran home."}])
    assert (
        "teacher_input_ids" in both
        and both["units"]["word"].seq_len_teacher == both["teacher_input_ids"].shape[1]
    )
    assert set(col.input_columns) >= {"text", "prompt", "completion", "output", "prompt_length_chars"}


def test_collator_bad_inputs(assets):
    from mta_kernels.integrations import MTADataCollator

    col = MTADataCollator(assets["bpe"], granularities=())
    with pytest.raises(ValueError, match="remove_unused_columns"):
        col([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="empty batch"):
        col([])
    with pytest.raises(TypeError, match="expected a dict"):
        col(["just a string"])
    with pytest.raises(ValueError, match=r"prompt_length_chars=99"):
        col([{"text": "short", "prompt_length_chars": 99}])
    with pytest.raises(TypeError, match="must be strings"):
        col([{"prompt": "a", "output": 3}])
    with pytest.raises(ValueError, match="granularities"):
        MTADataCollator(assets["bpe"], granularities=("sentence",))
    with pytest.raises(ValueError, match="max_length"):
        MTADataCollator(assets["bpe"], max_length=0)
    with pytest.raises(ValueError, match="not a fast tokenizer"):
        MTADataCollator(object())
    from mta_kernels.integrations import units_from_token_ids

    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"both be \[B, T\]"):
        units_from_token_ids(assets["bpe"], ids, torch.ones(2, 4), UnitExtractor(), ("word",))
    with pytest.raises(ValueError, match="fast tokenizer"):
        units_from_token_ids(object(), ids, torch.ones(2, 3), UnitExtractor(), ("word",))
    no_pad = copy.deepcopy(assets["bpe"])
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        MTADataCollator(no_pad)


# ------------------------------------------------------------------------------------- MTATrainer
class _Snapshots:
    """A TrainerCallback recording projector weights and optimizer state (deep copies)."""

    def __new__(cls, at_step: int | None):
        from transformers import TrainerCallback

        class Snap(TrainerCallback):
            def __init__(self) -> None:
                self.at_step, self.begin, self.step = at_step, None, None

            @staticmethod
            def _take(model, optimizer):
                proj = {k: v.detach().clone() for k, v in model.mta_loss.state_dict().items()}
                return proj, copy.deepcopy(optimizer.state_dict())

            def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
                self.begin = self._take(model, optimizer)

            def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
                if state.global_step == self.at_step:
                    self.step = self._take(model, optimizer)

        return Snap()


def _assert_same_state(a, b) -> None:
    proj_a, opt_a = a
    proj_b, opt_b = b
    assert proj_a.keys() == proj_b.keys()
    for k in proj_a:
        assert torch.equal(proj_a[k], proj_b[k]), k
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and len(opt_a["state"]) > 0
    for i in opt_a["state"]:
        for k, v in opt_a["state"][i].items():
            w = opt_b["state"][i][k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (i, k)


def _event_scalars(logdir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(str(logdir), "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event file under {logdir}"
    out: dict[str, list[float]] = {}
    for f in files:
        acc = EventAccumulator(f)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def test_trainer_resume_and_tensorboard(assets, tmp_path):
    """3 steps, checkpoint, resume from it in a fresh trainer: projector weights and optimizer state are
    restored exactly and the resumed run ends where the uninterrupted one does; TensorBoard has every term.
    Runs with the default remove_unused_columns=True on a data set with an extra column."""
    _needs("tensorboard", "accelerate", "datasets")
    from mta_kernels.integrations import MTADataCollator, MTATrainer

    out = tmp_path / "run"
    common = dict(max_steps=5, per_device_train_batch_size=2, save_strategy="steps", save_steps=3)
    snap_a = _Snapshots(at_step=3)
    with use_backend("torch"):
        student, teacher = _models(assets)
        mta = MTALoss(PAIRS, SD, TD, hra="token")
        trainer = MTATrainer(
            student,
            teacher,
            mta,
            args=_args(out, report_to="tensorboard", **common),
            data_collator=MTADataCollator(assets["bpe"], max_length=96),
            train_dataset=_dataset(assets),
            lam=0.5,
            beta=2.0,
            callbacks=[snap_a],
        )
        assert trainer.args.remove_unused_columns
        # the projectors are parameters of the model the Trainer optimizes
        names = {n for n, _ in trainer.model.named_parameters()}
        assert {"mta_loss.projectors.0.weight", "mta_loss.projectors.1.bias"} <= names
        trainer.train()
        final_a = (
            {k: v.detach().clone() for k, v in trainer.model.mta_loss.state_dict().items()},
            copy.deepcopy(trainer.optimizer.state_dict()),
        )
        logs = [r for r in trainer.state.log_history if "ce" in r]

        ckpt = out / "checkpoint-3"
        assert (ckpt / "model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
        student_b, teacher_b = _models(assets, seed=1)
        mta_b = MTALoss(PAIRS, SD, TD, hra="token")
        snap_b = _Snapshots(at_step=None)
        trainer_b = MTATrainer(
            student_b,
            teacher_b,
            mta_b,
            args=_args(tmp_path / "run_b", **common),
            data_collator=MTADataCollator(assets["bpe"], max_length=96),
            train_dataset=_dataset(assets),
            lam=0.5,
            beta=2.0,
            callbacks=[snap_b],
        )
        trainer_b.train(resume_from_checkpoint=str(ckpt))
        final_b = (
            {k: v.detach().clone() for k, v in trainer_b.model.mta_loss.state_dict().items()},
            copy.deepcopy(trainer_b.optimizer.state_dict()),
        )
    _assert_same_state(snap_a.step, snap_b.begin)  # restored exactly
    for k in final_a[0]:  # and the two remaining steps redo the same updates
        torch.testing.assert_close(final_b[0][k], final_a[0][k], rtol=1e-5, atol=1e-6)

    # Every term logged, and the loss is the objective's combination of them.
    assert len(logs) == 5
    for r in logs:
        pairs = [f"{t}/pair{k}_s{s}_t{u}_{g}" for t in ("dsa", "hra") for k, (s, u, g) in enumerate(PAIRS)]
        assert all(math.isfinite(r[k]) for k in ("ce", "kd", "mta", *pairs))
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * (r["kd"] + 2.0 * r["mta"]), rel=1e-4)
    scalars = _event_scalars(out)
    for tag in (
        "train/ce",
        "train/kd",
        "train/mta",
        "train/dsa/pair0_s1_t1_word",
        "train/hra/pair1_s2_t2_phrase",
    ):
        assert tag in scalars and len(scalars[tag]) == 5, (tag, sorted(scalars))
        assert all(math.isfinite(v) for v in scalars[tag])


def test_trainer_different_tokenizers_and_projector_lr(assets, tmp_path):
    """A WordPiece student, a BPE teacher: teacher tensors in the batch, no KD term, unit-level HRA; the
    projectors in their own param groups with their own learning rate; evaluation logs the terms too."""
    _needs("accelerate", "datasets")
    from mta_kernels.integrations import MTADataCollator, MTATrainer

    with use_backend("torch"):
        torch.manual_seed(0)
        student = build_model(f"builtin:gpt2:2:{SD}", assets["wp"], 128)
        _, teacher = _models(assets)
        trainer = MTATrainer(
            student,
            teacher,
            MTALoss(PAIRS, SD, TD, hra="unit"),
            args=_args(tmp_path, max_steps=1),
            data_collator=MTADataCollator(assets["wp"], assets["bpe"], max_length=96),
            train_dataset=_dataset(assets, extra_column=False),
            eval_dataset=_dataset(assets),
            projector_lr=5e-4,
        )
        trainer.train()
        metrics = trainer.evaluate()
    (log,) = [r for r in trainer.state.log_history if "ce" in r]
    assert "kd" not in log and math.isfinite(log["mta"])
    # evaluation: the same terms, eval_-prefixed, on the 8 held-out examples
    assert all(
        math.isfinite(metrics[k]) for k in ("eval_loss", "eval_ce", "eval_mta", "eval_hra/pair0_s1_t1_word")
    )
    assert metrics["eval_loss"] == pytest.approx(
        0.5 * metrics["eval_ce"] + 0.5 * 2.0 * metrics["eval_mta"], rel=0.05
    )
    proj = {id(p) for p in trainer.model.mta_loss.parameters()}
    lrs = {g["initial_lr"] for g in trainer.optimizer.param_groups if any(id(p) in proj for p in g["params"])}
    assert lrs == {5e-4}


def test_trainer_gradient_accumulation_matches_one_batch(assets, tmp_path):
    """2 accumulation steps of 2 examples give the CE/KD update of one batch of 4 (plain SGD)."""
    _needs("accelerate", "datasets")
    from mta_kernels.integrations import MTADataCollator, MTATrainer

    deltas = []
    for batch, accum in ((4, 1), (2, 2)):
        student, teacher = _models(assets)
        before = {k: v.detach().clone() for k, v in student.state_dict().items()}
        args = _args(
            tmp_path / f"b{batch}",
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
        )
        # 4 examples: the step sees all of them whatever the sampler's order.
        collator = MTADataCollator(assets["bpe"], granularities=(), max_length=96)
        rows = [dict(r) for r in assets["rows"][:4]]
        trainer = MTATrainer(student, teacher, None, args=args, train_dataset=rows, data_collator=collator)
        trainer.train()
        deltas.append({k: v.detach() - before[k] for k, v in student.state_dict().items()})
    moved = 0
    for k in deltas[0]:
        moved += int(deltas[0][k].abs().max() > 0)
        torch.testing.assert_close(deltas[1][k], deltas[0][k], rtol=1e-4, atol=1e-6)
    assert moved > 0


def test_trainer_moves_units(assets, tmp_path):
    """``_prepare_inputs`` calls ``.to(device, non_blocking=True)`` on the UnitBatch values."""
    _needs("accelerate")
    from mta_kernels.integrations import MTADataCollator, MTATrainer

    calls = []

    class Spy(UnitBatch):
        def to(self, device, non_blocking=False):
            calls.append((str(device), non_blocking))
            return super().to(device, non_blocking)

    student, teacher = _models(assets)
    trainer = MTATrainer(
        student,
        teacher,
        MTALoss(PAIRS, SD, TD),
        args=_args(tmp_path),
        data_collator=MTADataCollator(assets["bpe"]),
    )
    ub = MTADataCollator(assets["bpe"])([{"text": "The old dog ran home."}])["units"]["word"]
    spy = Spy(ub.student_ranges, ub.teacher_ranges, ub.cu_units, ub.seq_len_student, ub.seq_len_teacher)
    moved = trainer._prepare_inputs(
        {"input_ids": torch.zeros(1, 2, dtype=torch.long), "units": {"word": spy}}
    )
    assert calls == [(str(trainer.args.device), True)]
    assert isinstance(moved["units"]["word"], UnitBatch) and moved["units"]["word"] is not spy


def test_trainer_bad_inputs(assets, tmp_path):
    _needs("accelerate", "datasets")
    from mta_kernels.integrations import MTADataCollator, MTATrainer

    student, teacher = _models(assets)
    col = MTADataCollator(assets["bpe"])
    mta = lambda: MTALoss(PAIRS, SD, TD)  # noqa: E731
    args = _args(tmp_path)
    with pytest.raises(TypeError, match="instantiated student"):
        MTATrainer("gpt2", teacher, mta(), args=args, data_collator=col)
    with pytest.raises(TypeError, match="teacher must be an instantiated model"):
        MTATrainer(student, "gpt2-xl", mta(), args=args, data_collator=col)
    with pytest.raises(ValueError, match=r"lam \(λ\)"):
        MTATrainer(student, teacher, mta(), args=args, data_collator=col, lam=1.5)
    with pytest.raises(ValueError, match="kd must be one of"):
        MTATrainer(student, teacher, mta(), args=args, data_collator=col, kd="jsd")
    with pytest.raises(TypeError, match="must be an MTADataCollator"):
        MTATrainer(student, teacher, mta(), args=args, data_collator=lambda xs: xs)
    with pytest.raises(ValueError, match="granularities"):
        MTATrainer(
            student,
            teacher,
            mta(),
            args=args,
            data_collator=MTADataCollator(assets["bpe"], granularities=("word",)),
        )
    with pytest.raises(ValueError, match=r"columns \['junk'\].*'text'"):
        import datasets

        MTATrainer(
            student,
            teacher,
            mta(),
            args=args,
            data_collator=col,
            train_dataset=datasets.Dataset.from_list([{"junk": 1}]),
        )
    with pytest.raises(ValueError, match="unknown MTALoss preset"):
        MTATrainer(student, teacher, "gpt5->gpt2", args=args, data_collator=col)
    with pytest.raises(ValueError, match="names student layer 6, but the student has 2 layers"):
        MTATrainer(student, teacher, "gpt2-xl->gpt2", args=args, data_collator=col)
    with pytest.raises(TypeError, match="mta must be an MTALoss"):
        MTATrainer(student, teacher, 3, args=args, data_collator=col)
    with pytest.raises(ValueError, match="data_collator=MTADataCollator"):
        MTATrainer(student, teacher, mta(), args=args)
    # A batch without units (another collator's output) names what is missing.
    trainer = MTATrainer(student, teacher, mta(), args=args, data_collator=col)
    batch = MTADataCollator(assets["bpe"], granularities=())([{"text": "A dog ran."}])
    with pytest.raises(ValueError, match="no 'units'"):
        trainer.compute_loss(trainer.model, batch)
    # Another MTALoss cannot replace the one the student holds.
    with pytest.raises(ValueError, match="already holds another MTALoss"):
        MTATrainer(student, teacher, mta(), args=args, data_collator=col)


def test_resume_without_projectors_is_an_error(assets, tmp_path):
    """A checkpoint of the student alone (no mta_loss entries) does not silently re-initialise them."""
    _needs("accelerate", "datasets")
    from mta_kernels.integrations import MTADataCollator, MTATrainer

    student, teacher = _models(assets)
    trainer = MTATrainer(
        student,
        teacher,
        MTALoss(PAIRS, SD, TD),
        args=_args(tmp_path),
        data_collator=MTADataCollator(assets["bpe"]),
    )
    with pytest.raises(ValueError, match="no MTA projector weights"):
        trainer._load_from_checkpoint(str(assets["root"] / "student"))


# ------------------------------------------------------------------------------------------- TRL
def test_trl_on_policy_two_steps(assets, tmp_path, monkeypatch):
    """2 steps of MTAGKDTrainer: the student generates the completions, the MTA term is computed on
    prompt + completion and logged next to TRL's metrics."""
    _needs("trl", "accelerate", "datasets")
    import datasets
    from trl import DistillationConfig

    import mta_kernels.integrations.trl_trainer as T
    from mta_kernels.integrations import MTAGKDTrainer

    seen: list[str] = []
    real = T.units_from_token_ids

    def spy(*args, **kwargs):
        texts, units = real(*args, **kwargs)
        seen.extend(texts)
        return texts, units

    monkeypatch.setattr(T, "units_from_token_ids", spy)
    tok = copy.deepcopy(assets["bpe"])
    tok.padding_side = "left"
    prompts = [r["prompt"][:60] for r in assets["rows"][:4]]
    student, teacher = _models(assets)
    args = DistillationConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        max_completion_length=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=2,
    )
    with use_backend("torch"):
        trainer = MTAGKDTrainer(
            student,
            teacher,
            MTALoss(PAIRS, SD, TD, hra="token"),
            args=args,
            train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tok,
        )
        proj_before = trainer.model.mta_loss.projectors[0].weight.detach().clone()
        trainer.train()
    logs = [r for r in trainer.state.log_history if "mta" in r]
    assert len(logs) == 2
    for r in logs:
        assert r["completions/mean_length"] > 0
        assert all(
            math.isfinite(r[k])
            for k in ("loss", "kd", "mta", "dsa/pair0_s1_t1_word", "hra/pair1_s2_t2_phrase")
        )
    # The sequences the MTA term saw are the prompts followed by generated text.
    assert len(seen) == 4
    for text in seen:
        prompt = next(p for p in prompts if text.startswith(p))
        assert len(text) > len(prompt)
    # The projectors are trained with the student, and saved in its checkpoint.
    assert not torch.equal(trainer.model.mta_loss.projectors[0].weight, proj_before)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert torch.equal(saved["mta_loss.projectors.0.weight"], trainer.model.mta_loss.projectors[0].weight)


def test_trl_bad_inputs(assets, tmp_path):
    _needs("trl", "accelerate", "datasets")
    from mta_kernels.integrations import MTAGKDTrainer

    student, teacher = _models(assets)
    with pytest.raises(ValueError, match="mta is None"):
        MTAGKDTrainer(student, teacher, None)
    with pytest.raises(ValueError, match="mta_beta"):
        MTAGKDTrainer(student, teacher, MTALoss(PAIRS, SD, TD), mta_beta=-1.0)
    with pytest.raises(TypeError, match="UnitExtractor"):
        MTAGKDTrainer(student, teacher, MTALoss(PAIRS, SD, TD), extractor="en_core_web_sm")


# ------------------------------------------------------------------------------------------- docs
def _readme_blocks() -> list[str]:
    """The fenced Python blocks of the README's "Use it in your trainer" section, in order."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Use it in your trainer", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["plain-loop", "hf-trainer", "trl"])
def test_readme_snippets_run(assets, tmp_path, index):
    """The README's trainer snippets run as written (tiny local models)."""
    needs = [[], ["accelerate", "datasets", "tensorboard"], ["accelerate", "datasets", "tensorboard", "trl"]]
    _needs(*needs[index])
    if index == 0:
        pytest.importorskip("spacy")
    blocks = _readme_blocks()
    assert len(blocks) == 3
    out = tmp_path / "out"
    namespace = {
        "STUDENT": str(assets["root"] / "student"),
        "TEACHER": str(assets["root"] / "teacher"),
        "DATA": str(assets["root"] / "data.jsonl"),
        "BATCHES": [[r["prompt"] + r["output"] for r in assets["rows"][:2]]] * 2,
        "OUTPUT_DIR": str(out),
        "MAX_STEPS": 2,
    }
    with use_backend("torch"):
        exec(compile(blocks[index], f"README.md[{index}]", "exec"), namespace)
    if index == 0:
        assert math.isfinite(float(namespace["loss"])) and float(namespace["out"].loss) > 0
        assert all(p.grad is None or not p.grad.any() for p in namespace["mta"].parameters())  # zero_grad ran
        return
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    assert any("mta" in r and math.isfinite(r["mta"]) for r in trainer.state.log_history)
    assert glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True)


# ------------------------------------------------------------------------------------------- fsdp
def test_fsdp_check_script_runs_without_a_launcher(tmp_path):
    """benchmarks/fsdp_check.py (the FSDP stage of gpu_check.sh; accelerate runs FSDP on GPUs only) runs
    here as a plain Trainer: steps, a checkpoint, a resume that restores the projectors."""
    _needs("accelerate")
    script = os.path.join(REPO, "benchmarks", "fsdp_check.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, script, "--out", str(tmp_path), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["projectors_trained"] and report["resume_matches"] and report["projector_tensors"] == 4


# ------------------------------------------------------------------------------------- accelerate
DDP_SCRIPT = r"""
import json, os, sys, torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
from mta_kernels import use_backend
from mta_kernels.integrations import MTADataCollator, MTATrainer

root, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(os.path.join(root, "data.jsonl"))][:4]
tok = AutoTokenizer.from_pretrained(os.path.join(root, "student"))
student = AutoModelForCausalLM.from_pretrained(os.path.join(root, "student"))
teacher = AutoModelForCausalLM.from_pretrained(os.path.join(root, "teacher"))
args = TrainingArguments(output_dir=out, max_steps=1, per_device_train_batch_size=batch, optim="sgd",
    learning_rate=1.0, max_grad_norm=0.0, logging_steps=1, report_to="none", use_cpu=True, seed=0,
    disable_tqdm=True, save_strategy="no", dataloader_drop_last=True)
with use_backend("torch"):
    trainer = MTATrainer(student, teacher, None, args=args, lam=0.5, train_dataset=rows,
                         data_collator=MTADataCollator(tok, granularities=(), max_length=96))
    trainer.train()
if trainer.is_world_process_zero():
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save(weights, os.path.join(out, "w.pt"))
    with open(os.path.join(out, "log.json"), "w") as f:
        json.dump({"world": trainer.args.world_size, "log": trainer.state.log_history}, f)

if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # With the MTA term: the projectors are inside the DDP module, so every rank ends with the same ones.
    from mta_kernels import MTALoss
    student = AutoModelForCausalLM.from_pretrained(os.path.join(root, "student"))
    mta = MTALoss([(1, 1, "word"), (2, 2, "phrase")], 16, 32, hra="token")
    init = {k: v.detach().clone() for k, v in mta.state_dict().items()}
    with use_backend("torch"):
        trainer = MTATrainer(student, teacher, mta, args=args, train_dataset=rows,
                             data_collator=MTADataCollator(tok, max_length=96))
        trainer.train()
    proj = {k: v.detach().clone() for k, v in trainer.model.mta_loss.state_dict().items()}
    torch.save({"init": init, "proj": proj}, os.path.join(out, f"proj{trainer.args.process_index}.pt"))
"""


def test_accelerate_two_processes_match_one(assets, tmp_path):
    """``accelerate launch --num_processes 2`` (CPU, gloo), 2 examples per process, gives the CE/KD update
    of one process with 4 examples (plain SGD, so the update is the gradient itself).

    ``--multi_gpu`` is accelerate's torchrun-style launcher; with ``use_cpu=True`` it runs CPU processes
    over gloo (``--cpu`` alone starts a single process).
    """
    _needs("accelerate", "datasets")
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    root = str(assets["root"])
    t0 = time.perf_counter()
    one = subprocess.run([sys.executable, str(script), root, str(tmp_path / "one"), "4"], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(script), root, str(tmp_path / "two"), "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    print(f"accelerate 1 + 2 processes: {time.perf_counter() - t0:.1f} s")
    logs = [json.loads((tmp_path / d / "log.json").read_text()) for d in ("one", "two")]
    assert [lg["world"] for lg in logs] == [1, 2]
    step1 = [lg["log"][0] for lg in logs]
    for key in ("loss", "ce", "kd", "grad_norm"):
        assert step1[1][key] == pytest.approx(step1[0][key], rel=1e-5), key
    w1 = torch.load(tmp_path / "one" / "w.pt")
    w2 = torch.load(tmp_path / "two" / "w.pt")
    from safetensors.torch import load_file

    w0 = load_file(str(assets["root"] / "student" / "model.safetensors"))
    moved = 0
    for k, v in w0.items():
        if k in w1:
            delta1, delta2 = w1[k] - v, w2[k] - v
            moved += int(delta1.abs().max() > 0)
            torch.testing.assert_close(delta2, delta1, rtol=1e-4, atol=1e-6)
    assert moved > 0
    ranks = [torch.load(tmp_path / "two" / f"proj{r}.pt") for r in (0, 1)]
    for k, v in ranks[0]["proj"].items():
        assert not torch.equal(v, ranks[0]["init"][k]), k  # trained
        assert torch.equal(v, ranks[1]["proj"][k]), k  # and synchronised
