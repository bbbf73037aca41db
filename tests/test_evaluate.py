"""Evaluation like the paper (``mta-distill evaluate``, ``--eval-gen``) and LoRA (``--lora``): ROUGE-L
against ``rouge-score``, the published prompt builder, greedy batch invariance, seed reproducibility,
the files it writes, a LoRA run that trains adapters and projectors only and whose saved model evaluates.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from test_distill import STUDENT, TEACHER, make_assets  # tests/ is on sys.path

from mta_kernels.distill.__main__ import main
from mta_kernels.distill.config import DistillError
from mta_kernels.distill.data import load_eval_records, record_fields
from mta_kernels.distill.evaluation import Protocol, data_names, encode_prompt, score_records
from mta_kernels.distill.rouge import rouge_l

pytest.importorskip("transformers")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("evaluate"))


@pytest.fixture(scope="module")
def tiny(assets):
    """A random-init tiny Llama with the BPE tokenizer, and 8 records of the bundled data."""
    from mta_kernels.distill import models as M

    tok = M.load_tokenizer(str(assets / "bpe"), STUDENT)
    torch.manual_seed(0)
    model = M.build_model("builtin:llama:2:32", tok, 128).eval()
    with torch.no_grad():  # at the init scale every prompt gets the same answer: make them depend on it
        for p in model.parameters():
            p.mul_(5.0)
    return model, tok, load_eval_records(str(assets / "data.jsonl"), limit=8)


# ----------------------------------------------------------------------------------------------- ROUGE-L
PAIRS = [
    ("the cat sat", ["the cat sat on the mat"]),  # LCS 3 of 3 and 6 words: F = 2/3
    ("The students were running quickly.", ["A student runs quick", "students were running"]),
    ("Distillation trains small models", ["", "small models are trained by distillation"]),
    ("", ["anything at all"]),
    ("completely different words", ["nothing in common here", "the cat"]),
    ("Paris is the capital of France.", ["The capital of France is Paris.", "paris"]),
]


def test_rouge_l_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for prediction, refs in PAIRS:
        each = [100 * scorer.score(target=r, prediction=prediction)["rougeL"].fmeasure for r in refs]
        assert rouge_l(prediction, refs, "max") == max(each)
        assert rouge_l(prediction, refs, "first") == each[0]
    assert rouge_l("the cat sat", ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    # stemming: "running"/"runs" and "students"/"student" match
    assert rouge_l("students running", ["student runs"]) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        rouge_l("x", ["y"], "best")


# ------------------------------------------------------------------------------------- prompt builder
def published_prompt_ids(tokenizer, line: dict, max_prompt_length: int) -> list[int]:
    """Transcription of DistiLLM's prompt builder: ``tools/process_data_dolly.py`` (the template, a model
    other than Qwen; ``tokenizer.encode(prompt, add_special_tokens=False)`` cut to its first
    ``max_prompt_length`` tokens). The demo's BPE adds no special token, so the ids are comparable with
    ours; a tokenizer that adds a BOS is the documented deviation (the test below)."""
    if "input" not in line or len(line["input"]) == 0:
        template = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        )
        prompt = template.format(instruction=line["instruction"])
    else:
        template = (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
        prompt = template.format(instruction=line["instruction"], input=line["input"])
    prompt = prompt.replace("<n>", "\n")
    return tokenizer.encode(prompt, add_special_tokens=False)[:max_prompt_length]


def _raw_records(n: int = 20) -> list[dict]:
    from mta_kernels.distill.demo import CORPUS, split_sentences

    with open(CORPUS, encoding="utf-8") as f:
        sents = [s for para in f if para.strip() for s in split_sentences(para)]
    records = []
    for i in range(n):
        context = " ".join(sents[i : i + 3 * (i % 4)])  # none, short, long (cut at the prompt budget)
        records.append({"instruction": f"Summarise this: {sents[i + 40]}", "input": context,
                        "output": sents[i + 41]})  # fmt: skip
    return records


def test_prompts_keep_the_special_tokens_the_loop_trains_with(wordpiece):
    """The documented deviation (docs/method.md#evaluation): a prompt is encoded as the loop encodes its
    training text, with the tokenizer's special tokens (a BOS where it adds one), then cut; DistiLLM's
    ``add_special_tokens=False`` ids differ by that token."""
    prompt = "### Instruction:\nSay something about the weather today.\n\n### Response:\n"
    full = wordpiece(prompt)["input_ids"]
    assert full[0] == wordpiece.cls_token_id  # this tokenizer adds one at the start
    assert encode_prompt(wordpiece, prompt, 6) == full[:6]
    assert encode_prompt(wordpiece, prompt, 6) != wordpiece.encode(prompt, add_special_tokens=False)[:6]


def test_prompt_template_and_truncation_match_the_published_builder(assets, tmp_path):
    from mta_kernels.distill import models as M

    tok = M.load_tokenizer(str(assets / "bpe"), STUDENT)
    raw = _raw_records()
    path = tmp_path / "raw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw))
    records = load_eval_records(str(path))
    cut = 0
    for line, rec in zip(raw, records):
        ours = encode_prompt(tok, rec.prompt, 256)  # the published --max-prompt-length
        assert ours == published_prompt_ids(tok, line, 256)
        assert rec.references == [line["output"]]
        cut += len(tok.encode(rec.prompt)) > 256
    assert 0 < cut < len(raw)  # both kinds: prompts within and over the budget
    # Dolly's own field names and DistiLLM's exports ("<n>" newlines, reference lists) read the same way
    dolly = {"instruction": raw[5]["instruction"], "context": raw[5]["input"], "response": raw[5]["output"]}
    assert record_fields(dolly, "x")[0] == records[5].prompt
    export = tmp_path / "export.jsonl"
    export.write_text(
        json.dumps({"prompt": records[5].prompt.replace("\n", "<n>"), "output": ["a", "b"]}) + "\n"
    )
    (rec,) = load_eval_records(str(export))
    assert rec.prompt == records[5].prompt and rec.references == ["a", "b"]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"text": "x"}, "needs 'prompt' and 'output'"),
        ({"prompt": "p", "output": []}, "an empty list"),
        ({"prompt": "p", "output": ["a", 3]}, "non-strings"),
        ({"instruction": "i", "context": "c"}, "'response' must be a string"),
        ({"prompt": 3, "output": "o"}, "'prompt' must be a string"),
    ],
)
def test_bad_records_are_named(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "output": "o"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DistillError, match="line 2") as err:
        load_eval_records(str(path))
    assert message in str(err.value)


# -------------------------------------------------------------------------------------------- generation
def _predictions(rows: list[dict]) -> list[str]:
    return [r["prediction"] for r in rows]


def test_greedy_outputs_do_not_depend_on_the_batch_size(tiny):
    model, tok, records = tiny
    protocol = Protocol(max_length=108, max_prompt_length=96, greedy=True)
    one, _ = score_records(model, tok, records, protocol, [10], batch_size=1, progress=False)
    eight, _ = score_records(model, tok, records, protocol, [10], batch_size=8, progress=False)
    assert len({len(encode_prompt(tok, r.prompt, 96)) for r in records}) > 1  # batch 8 is left-padded
    assert _predictions(one) == _predictions(eight)
    assert len(set(_predictions(one))) == len(records)  # answers that depend on the prompt


def test_the_models_own_generation_settings_do_not_apply(tiny):
    """A saved generation_config.json (a repetition penalty, a minimum length, banned words) does not
    change the protocol's answers, and the model's config is given back afterwards."""
    model, tok, records = tiny
    protocol = Protocol(max_length=108, max_prompt_length=96, greedy=True)
    plain, _ = score_records(model, tok, records, protocol, [10], batch_size=4, progress=False)
    ids = torch.tensor([encode_prompt(tok, records[0].prompt, 96)])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        before = model.generate(ids, **kw)
    saved = model.generation_config
    custom = copy.deepcopy(saved)
    custom.repetition_penalty, custom.min_new_tokens = 5.0, 8
    model.generation_config = custom
    try:
        with torch.no_grad():  # the model's settings do change the answers when generate reads them
            assert not torch.equal(model.generate(ids, **kw), before)
        again, _ = score_records(model, tok, records, protocol, [10], batch_size=4, progress=False)
        assert model.generation_config is custom
    finally:
        model.generation_config = saved
    assert _predictions(again) == _predictions(plain)


def test_the_same_seed_gives_the_same_text(tiny):
    model, tok, records = tiny
    protocol = Protocol(max_length=108, max_prompt_length=96)
    state = torch.get_rng_state()
    a, ra = score_records(model, tok, records, protocol, [10, 20], batch_size=4, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    b, rb = score_records(model, tok, records, protocol, [10, 20], batch_size=4, progress=False)
    assert _predictions(a) == _predictions(b) and ra == rb
    by_seed = {s: [r["prediction"] for r in a if r["seed"] == s] for s in (10, 20)}
    assert by_seed[10] != by_seed[20]  # the seed is what changes the samples
    assert ra["std"] == pytest.approx(abs(ra["per_seed"]["10"] - ra["per_seed"]["20"]) / 2)


def test_answers_stop_at_the_section_mark(tiny):
    from mta_kernels.distill.evaluation import _StopString, cut_at_stop

    assert cut_at_stop(" Paris.\n\n### Instruction:\nmore", "###") == "Paris."
    assert cut_at_stop(" Paris. ### x", "") == "Paris. ### x"
    _, tok, _ = tiny
    prompt = tok("### Instruction:\nWhere?\n\n### Response:\n")["input_ids"]
    rows = [
        prompt + tok(" Paris.\n\n### Inst")["input_ids"],
        prompt + tok(" Paris is in France, it")["input_ids"],
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    done = _StopString(tok, "###", width - min(len(r) for r in rows) + len(prompt))(ids, None)
    assert done.tolist() == [True, False]  # the prompt's own marks do not count


def test_data_names_of_published_layouts():
    paths = ["d/dolly/valid.jsonl", "d/sinst/11_/valid.jsonl", "d/vicuna/valid.jsonl"]
    assert data_names(paths) == ["dolly-valid", "sinst-11_-valid", "vicuna-valid"]
    assert data_names(["a/x.jsonl", "b/y.json"]) == ["x", "y"]
    with pytest.raises(DistillError, match="same file twice"):
        data_names(["a/x.jsonl", "a/x.jsonl"])


def test_evaluate_cli_files_and_refusals(assets, tmp_path, capsys):
    """Two data files: a sub-folder each with predictions.jsonl and scores.json, one table; no overwrite."""
    from mta_kernels.distill import models as M

    tok = M.load_tokenizer(str(assets / "bpe"), STUDENT)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    M.build_model("builtin:gpt2:2:32", tok, 128).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in _raw_records(3)))
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(model_dir), "--data", str(assets / "data.jsonl"), str(other),
            "--out", str(out), "--seeds", "10,20", "--limit", "3", "--max-length", "56",
            "--max-prompt-length", "48", "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    for name in ("data", "other"):
        scores = json.loads((out / name / "scores.json").read_text())
        assert scores["n_examples"] == 3 and set(scores["rougeL"]["per_seed"]) == {"10", "20"}
        assert scores["protocol"]["new_tokens"] == 8 and scores["protocol"]["references"] == "max"
        assert f"| {name} | 3 |" in printed
        rows = [json.loads(ln) for ln in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and set(rows[0]) == {
            "id",
            "seed",
            "prompt",
            "references",
            "prediction",
            "rougeL",
        }
    assert (out / "table.md").read_text().startswith("| data |")
    assert main(args) == 2
    assert "already holds evaluation results" in " ".join(capsys.readouterr().err.split())
    assert main([*args, "--overwrite"]) == 0
    # a file of the user's that evaluate would write (table.md) is not replaced without --overwrite
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "table.md").write_text("my notes\n")
    out_at = args.index(str(out))
    assert main([*args[:out_at], str(mine), *args[out_at + 1 :]]) == 2
    assert (mine / "table.md").read_text() == "my notes\n"
    assert "already holds evaluation results" in " ".join(capsys.readouterr().err.split())
    bad = [*args[:-1], "--seeds", "10,x", "--no-progress"]
    capsys.readouterr()
    assert main(bad) == 2  # a usage error is an error paragraph too
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--seeds" in err and "'10,x'" in err
    assert main(["evaluate", "--model", str(model_dir), "--data", str(other), "--out", str(model_dir)]) == 2
    assert "is the directory of --model" in " ".join(capsys.readouterr().err.split())


# -------------------------------------------------------------------------------- evaluate recomputed
def check_scores_recompute(out_dir) -> dict:
    """The per-seed ROUGE-L of ``scores.json`` is the mean, over the examples of ``predictions.jsonl``,
    of rouge-score's stemmed ROUGE-L F-measure (best reference) × 100."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = json.loads((out_dir / "scores.json").read_text())
    rows = [json.loads(ln) for ln in (out_dir / "predictions.jsonl").read_text().splitlines()]
    for seed, value in scores["rougeL"]["per_seed"].items():
        mine = [r for r in rows if str(r["seed"]) == seed]
        assert len(mine) == scores["n_examples"]
        recomputed = [
            100
            * max(
                scorer.score(target=t, prediction=r["prediction"])["rougeL"].fmeasure for t in r["references"]
            )
            for r in mine
        ]
        assert sum(recomputed) / len(recomputed) == pytest.approx(value, abs=1e-9)
    values = list(scores["rougeL"]["per_seed"].values())
    assert scores["rougeL"]["mean"] == pytest.approx(sum(values) / len(values))
    return scores


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_trains_adapters_and_projectors_only_and_its_model_evaluates(assets, tmp_path, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("spacy")
    from safetensors.torch import load_file

    from mta_kernels.distill import models as M

    out = tmp_path / "lora"
    args = ["distill", "--data", str(assets / "data.jsonl"), "--eval-fraction", "0.25",
            "--teacher", TEACHER, "--teacher-tokenizer", str(assets / "bpe"),
            "--student", STUDENT, "--student-tokenizer", str(assets / "bpe"), "--max-length", "96",
            "--batch-size", "6", "--steps", "2", "--lr", "1e-2", "--pairs", "1:1:word,2:2:phrase",
            "--lora", "--lora-r", "4", "--lora-alpha", "8", "--eval-gen", "--eval-every", "1",
            "--max-prompt-length", "88", "--backend", "torch", "--device", "cpu", "--out", str(out),
            "--no-progress", "--no-plot"]  # fmt: skip
    assert main(args) == 0
    tok = M.load_tokenizer(str(assets / "bpe"), STUDENT)
    torch.manual_seed(0)  # the run's --seed: the student's initial weights
    initial = M.build_model(STUDENT, tok, 96).state_dict()
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    lora = {k: v for k, v in state["student"].items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in state["student"].items() if "lora_" not in k}  # fmt: skip
    assert base.keys() == initial.keys() and all(torch.equal(base[k], initial[k]) for k in base)
    n_trained = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert n_trained == len(lora) + len(state["mta"])  # adapters and every projector tensor
    merged = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in k for k in merged)  # a plain checkpoint: adapters merged in
    changed = [k for k in merged if not torch.equal(merged[k], initial[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    # --eval-gen: ROUGE-L at each evaluation, the best model kept
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert [e["step"] for e in evals] == [1, 2] and all(math.isfinite(e["eval_rougeL"]) for e in evals)
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["eval_rougeL"] == max(e["eval_rougeL"] for e in evals)
    capsys.readouterr()
    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(out / "model"), "--data", str(assets / "data.jsonl"),
                 "--out", str(ev), "--limit", "4", "--greedy", "--max-length", "96",
                 "--max-prompt-length", "88", "--no-progress"]) == 0  # fmt: skip
    assert check_scores_recompute(ev)["rougeL"]["std"] == 0.0


def test_lora_options_are_checked(assets, tmp_path, capsys):
    bpe = str(assets / "bpe")
    base = ["distill", "--data", str(assets / "data.jsonl"), "--teacher", TEACHER,
            "--teacher-tokenizer", bpe, "--student", STUDENT, "--student-tokenizer", bpe, "--no-mta",
            "--out", str(tmp_path / "x"), "--no-progress", "--lora"]  # fmt: skip
    bad = (
        (["--lora-dropout", "1"], "--lora-dropout"),
        (["--lora-alpha", "0"], "--lora-alpha"),
        (["--lora-targets", "nope_proj"], "--lora"),
    )
    for extra, message in bad:
        assert main([*base, *extra]) == 2
        assert message in " ".join(capsys.readouterr().err.split())
    assert not os.path.exists(tmp_path / "x" / "checkpoint.pt")


def test_lora_run_resumes_exactly(assets, tmp_path):
    """A LoRA run (adapter dropout 0.1) stopped after step 1 and resumed equals the uninterrupted run."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    def args(out, *extra):
        return ["distill", "--data", str(assets / "data.jsonl"), "--eval-fraction", "0",
                "--teacher", TEACHER, "--teacher-tokenizer", str(assets / "bpe"), "--student", STUDENT,
                "--student-tokenizer", str(assets / "bpe"), "--max-length", "96", "--batch-size", "4",
                "--steps", "3", "--lr", "1e-2", "--no-mta", "--lora", "--lora-dropout", "0.1",
                "--backend", "torch", "--device", "cpu", "--out", str(out), "--no-progress", "--no-plot",
                *extra]  # fmt: skip

    assert main(args(tmp_path / "whole")) == 0
    assert main(args(tmp_path / "cut", "--stop-at", "1")) == 0
    assert main(args(tmp_path / "cut", "--resume")) == 0
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chunked_kd_accepts_a_lora_student(assets):
    """peft hands ``logits_to_keep`` to the base model: --kd-chunk works with --lora."""
    pytest.importorskip("peft")
    from mta_kernels.distill import models as M
    from mta_kernels.distill.config import TrainConfig
    from mta_kernels.distill.kd_chunked import unsupported_reason
    from mta_kernels.distill.lora import apply_lora, is_lora

    tok = M.load_tokenizer(str(assets / "bpe"), STUDENT)
    wrapped = apply_lora(M.build_model(STUDENT, tok, 96), TrainConfig(lora=True, lora_r=2))
    assert is_lora(wrapped) and unsupported_reason(wrapped) is None
