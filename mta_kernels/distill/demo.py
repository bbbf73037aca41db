"""``python -m mta_kernels.distill demo`` (``make demo``): the whole pipeline on CPU in a few minutes.

1. trains two tokenizers on the bundled corpus (``mta_kernels/data/corpus.txt``): byte-level BPE for the
   teacher with 1200 tokens, a smaller byte-level BPE (600) for the student (the ``tokenizers``
   WordPiece and Unigram trainers number tied tokens differently from run to run, BPE does not);
2. trains a small GPT-2-style teacher on the bundled Dolly-style JSONL (``dolly_demo.jsonl``, made
   from the corpus by :func:`make_dolly`);
3. distils a smaller Llama-style student with the OTHER tokenizer twice, with and without MTA (the logit
   KD term is off: the vocabularies differ), everything else equal;
4. scores the three models' sampled answers to the held-out prompts with ROUGE-L (one fixed seed,
   the protocol of ``mta-distill evaluate`` with the demo's lengths: :data:`EVAL_PROTOCOL`), writing
   ``<out>/<run>/eval/``;
5. prints held-out loss / perplexity, ROUGE-L, step time and the MTA share of the step time, draws
   ``<out>/curves.png``, and prints the commands that do the same with one's own models.
"""

from __future__ import annotations

import json
import os
import re
import time

import torch

from mta_kernels.distill.config import DistillError, TrainConfig
from mta_kernels.distill.data import load_examples, split_examples
from mta_kernels.distill.evaluation import Protocol

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
CORPUS = os.path.join(DATA_DIR, "corpus.txt")
DOLLY = os.path.join(DATA_DIR, "dolly_demo.jsonl")

# The Dolly/DSKD template without its fixed preamble sentence (it would double the demo's sequence length).
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTIONS = (
    "Continue this passage about model distillation: {prev}",
    "What comes after this sentence? {prev}",
    "Write the next two sentences of the text that starts here: {prev}",
)

# Sizes chosen so that the whole demo takes ~5 minutes on 2 CPU cores (timings in docs/design/distill.md).
TEACHER = "builtin:gpt2:4:128"
STUDENT = "builtin:llama:2:64"
TEACHER_VOCAB, STUDENT_VOCAB = 1200, 600
EVAL_SEED = 10  # the first of the published seeds
MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 64  # training window; evaluation: 64 prompt + 64 new tokens


EVAL_FRACTION, SPLIT_SEED = 0.1, 0  # the runs' held-out split, which write_heldout writes out again
EVAL_PROTOCOL = Protocol(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", paragraph.strip()) if s.strip()]


def make_dolly(corpus_path: str = CORPUS) -> list[dict]:
    """Dolly-style records from the corpus: the prompt quotes a sentence, the output is the next two."""
    records = []
    with open(corpus_path, encoding="utf-8") as f:
        paragraphs = [ln for ln in f if ln.strip()]
    k = 0
    for para in paragraphs:
        sents = split_sentences(para)
        for i in range(1, len(sents)):
            instruction = INSTRUCTIONS[k % len(INSTRUCTIONS)].format(prev=sents[i - 1])
            records.append(
                {
                    "prompt": PROMPT_TEMPLATE.format(instruction=instruction),
                    "output": " ".join(sents[i : i + 2]),
                }
            )
            k += 1
    return records


def write_dolly(path: str = DOLLY) -> None:
    """(Re)write the bundled JSONL from the corpus."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in make_dolly():
            f.write(json.dumps(rec) + "\n")


def run_demo(
    out: str = "runs/demo", quick: bool = False, progress: bool = True, backend: str = "auto"
) -> dict:
    """Run the demo into ``out``; returns the table's numbers (``backend`` forces the ops' path)."""
    from mta_kernels.distill.plot import plot_runs

    t_start = time.perf_counter()
    if "OMP_NUM_THREADS" not in os.environ:
        # Tiny models: per-op overhead dominates and a second intra-op thread buys little, while on a
        # machine with any other load two spinning threads made the demo 8x slower (measured).
        torch.set_num_threads(1)
    check_demo_out(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, DEMO_MARKER), "w") as f:
        f.write("mta-distill demo folder\n")
    tok_dir = _train_tokenizers(out)

    teacher_steps, student_steps = (6, 6) if quick else (600, 400)
    teacher_out = os.path.join(out, "teacher")
    t0 = time.perf_counter()
    print(f"[demo] 1/3 training the teacher {TEACHER} for {teacher_steps} steps")
    _stage(
        teacher_steps, progress, backend,
        mode="teacher", out=teacher_out, student=TEACHER,
        student_tokenizer=os.path.join(tok_dir, "teacher-bpe"), mta=False, kd="none",
    )  # fmt: skip
    t_teacher = time.perf_counter() - t0

    runs = {}
    for i, (name, mta) in enumerate((("student-mta", True), ("student-baseline", False)), start=2):
        t0 = time.perf_counter()
        print(
            f"[demo] {i}/3 distilling into {STUDENT} ({'with' if mta else 'without'} MTA) "
            f"for {student_steps} steps"
        )
        summary = _stage(
            student_steps, progress, backend,
            mode="distill", out=os.path.join(out, name), student=STUDENT,
            student_tokenizer=os.path.join(tok_dir, "student-bpe"),
            teacher=os.path.join(teacher_out, "model"), mta=mta, kd="forward",
        )  # fmt: skip
        summary["wall_s"] = time.perf_counter() - t0
        runs[name] = summary
    png = plot_runs({n: os.path.join(out, n, "metrics.jsonl") for n in runs}, os.path.join(out, "curves.png"))
    heldout = os.path.join(out, "heldout.jsonl")
    n_heldout = write_heldout(heldout)
    rouge = _score_rouge(out, ("teacher", *runs), heldout, progress)

    with open(os.path.join(teacher_out, "summary.json")) as f:
        teacher_summary = json.load(f)
    rows = [("teacher", teacher_summary, t_teacher)] + [(n, s, s["wall_s"]) for n, s in runs.items()]
    _print_table(rows, rouge)
    _print_notes(out, heldout, n_heldout, png)
    print(f"total demo time: {time.perf_counter() - t_start:.0f} s")
    for name, summary in (("teacher", teacher_summary), *runs.items()):
        summary["rougeL"] = rouge[name]
    return {"teacher": teacher_summary, **runs}


def _train_tokenizers(out: str) -> str:
    """The teacher's and the student's byte-level BPE, trained on the corpus, under ``<out>/tokenizers``."""
    from mta_kernels.distill.models import train_tokenizer

    with open(CORPUS, encoding="utf-8") as f:
        corpus = [ln.strip() for ln in f if ln.strip()]
    tok_dir = os.path.join(out, "tokenizers")
    train_tokenizer("bpe", corpus, TEACHER_VOCAB, os.path.join(tok_dir, "teacher-bpe"))
    train_tokenizer("bpe", corpus, STUDENT_VOCAB, os.path.join(tok_dir, "student-bpe"))
    print(
        f"[demo] tokenizers trained on {len(corpus)} paragraphs of {CORPUS}: "
        f"byte-level BPE ({TEACHER_VOCAB}) for the teacher, byte-level BPE ({STUDENT_VOCAB}) for the student"
    )
    return tok_dir


def _stage(steps: int, progress: bool, backend: str, **kw) -> dict:
    """One training run of the demo: the settings every stage shares, and the stage's own ``kw``."""
    from mta_kernels.distill.train import train

    return train(
        TrainConfig(
            data=DOLLY,
            eval_fraction=EVAL_FRACTION,
            seed=SPLIT_SEED,
            max_length=MAX_LENGTH,
            batch_size=8,
            eval_every=50,
            save_every=1000,
            log_every=1,
            overwrite=True,
            steps=steps,
            lr=2e-3,
            warmup_steps=max(1, steps // 20),
            progress=progress,
            backend=backend,
            plot=False,
            **kw,
        )
    )


def _score_rouge(out: str, names: tuple[str, ...], heldout: str, progress: bool) -> dict[str, float]:
    """ROUGE-L of each run's saved model on the held-out prompts (one seed), written to ``<run>/eval``."""
    from mta_kernels.distill.evaluation import run_evaluate

    rouge = {}
    for name in names:
        t0 = time.perf_counter()
        scores = run_evaluate(
            os.path.join(out, name, "model"), [heldout], os.path.join(out, name, "eval"), seeds=[EVAL_SEED],
            protocol=EVAL_PROTOCOL, overwrite=True, progress=progress, show=False,
        )  # fmt: skip
        rouge[name] = next(iter(scores.values()))["rougeL"]["mean"]
        print(f"[demo] ROUGE-L of {name} on the {heldout} prompts: {time.perf_counter() - t0:.0f} s")
    return rouge


def _print_table(rows: list[tuple[str, dict, float]], rouge: dict[str, float]) -> None:
    """The demo's table: held-out loss, perplexity, ROUGE-L, step time, MTA share, wall time per run."""
    print()
    print(
        f"{'run':<18} {'held-out loss':>13} {'perplexity':>10} {'ROUGE-L':>7} {'step (ms)':>9} "
        f"{'MTA share':>9} {'wall (s)':>8}"
    )
    for name, s, wall in rows:
        share = "-" if s.get("mta_share") is None else f"{100 * s['mta_share']:.0f}%"
        print(
            f"{name:<18} {s.get('eval_loss', float('nan')):>13.3f} {s.get('eval_ppl', float('nan')):>10.2f} "
            f"{rouge[name]:>7.2f} {1000 * s['step_time_s']:>9.0f} {share:>9} {wall:>8.0f}"
        )


def _print_notes(out: str, heldout: str, n_heldout: int, png: str) -> None:
    """How to read the table, where the files are, and the same commands for the user's own models."""
    print()
    print(
        "held-out numbers are per token of each model's own tokenizer: compare the two students with "
        "each other,"
    )
    print(
        "not with the teacher. The logit KD term is off (different vocabularies); MTA is the only "
        "teacher signal."
    )
    print(
        f"ROUGE-L: sampled answers to the {heldout} prompts (seed {EVAL_SEED}) against the held-out "
        "responses, x 100;"
    )
    print(
        f"it compares across tokenizers. {n_heldout} examples and one seed: a few points "
        "are noise (evaluate's default is 5 seeds)."
    )
    print("Answers and scores: <run>/eval/predictions.jsonl, scores.json.")
    print(f"metrics: {out}/<run>/metrics.jsonl   checkpoints: {out}/<run>/checkpoint.pt   plot: {png}")
    print()
    print("The same with your own models (README, 'Evaluate like the paper'):")
    for line in USER_COMMANDS:
        print(f"  {line}")


USER_COMMANDS = (
    "mta-distill distill --recipe mta-gpt2 --teacher TEACHER_DIR --student STUDENT_DIR \\",
    "    --data train.jsonl --eval-data dev.jsonl --out runs/mine",
    "    # the recipe scores validation ROUGE-L each epoch (--eval-gen) and keeps the best in runs/mine/best",
    "mta-distill evaluate --model runs/mine/best --out runs/mine/eval --data data/dolly/valid.jsonl \\",
    "    data/self-inst/valid.jsonl data/vicuna/valid.jsonl data/sinst/11_/valid.jsonl \\",
    "    data/uinst/11_/valid.jsonl",
    "    # 5 sampling seeds (10..50); ROUGE-L mean and std per file in runs/mine/eval/table.md",
)


DEMO_MARKER = ".mta-distill-demo"
"""File that marks a folder as the demo's (a later demo may write there again)."""
DEMO_NAMES = {"tokenizers", "teacher", "student-mta", "student-baseline", "curves.png", "heldout.jsonl"}
"""What the demo writes in its folder (a folder holding only these is an earlier demo's)."""


def check_demo_out(out: str) -> None:
    """The demo writes into a new or empty folder, or an earlier demo's; never elsewhere (exit 2)."""
    from mta_kernels.distill.checks import check_out_against_inputs, check_writable

    check_out_against_inputs(out, {"the demo's corpus": CORPUS, "the demo's data": DOLLY})
    check_writable(out)
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise DistillError(f"--out {out!r} is a file, not a directory")
    names = set(os.listdir(out))
    if names and DEMO_MARKER not in names and not names <= DEMO_NAMES:
        raise DistillError(
            f"--out {out!r} is not empty and is not an earlier demo's folder: the demo replaces the "
            "tokenizers, runs and plots it writes there. Pass a new or empty folder"
        )


def write_heldout(path: str) -> int:
    """Write the held-out part of the bundled JSONL the demo's runs leave out (their split) as JSONL;
    returns its number of examples."""
    _, held = split_examples(load_examples(DOLLY), None, EVAL_FRACTION, SPLIT_SEED)
    with open(path, "w", encoding="utf-8") as f:
        for ex in held:
            f.write(json.dumps({"prompt": ex.prompt, "output": ex.output}) + "\n")
    return len(held)
