"""``python -m mta_kernels.distill demo`` (``make demo``): the whole pipeline on CPU in a few minutes.

1. trains two tokenizers on the bundled corpus (``mta_kernels/data/corpus.txt``): byte-level BPE for the
   teacher with 1200 tokens, a smaller byte-level BPE (600) for the student (the ``tokenizers``
   WordPiece and Unigram trainers number tied tokens differently from run to run, BPE does not);
2. trains a small GPT-2-style teacher on the bundled Dolly-style JSONL (``dolly_demo.jsonl``, made
   from the corpus by :func:`make_dolly`);
3. distils a smaller Llama-style student with the OTHER tokenizer twice, with and without MTA (the logit
   KD term is off: the vocabularies differ), everything else equal;
4. prints held-out loss / perplexity, step time and the MTA share of the step time, and draws
   ``<out>/curves.png``.
"""

from __future__ import annotations

import json
import os
import re
import time

import torch

from mta_kernels.distill.config import TrainConfig

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


def _config(**kw) -> TrainConfig:
    base = dict(
        data=DOLLY,
        eval_fraction=0.1,
        max_length=128,
        batch_size=8,
        seed=0,
        eval_every=50,
        save_every=1000,
        log_every=1,
        overwrite=True,
    )
    base.update(kw)
    return TrainConfig(**base)


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
    os.makedirs(out, exist_ok=True)
    tok_dir = _train_tokenizers(out)

    teacher_steps, student_steps = (6, 6) if quick else (600, 400)
    teacher_out = os.path.join(out, "teacher")
    t0 = time.perf_counter()
    print(f"[demo] 1/3 training the teacher {TEACHER} for {teacher_steps} steps")
    _stage(
        teacher_steps,
        progress,
        backend,
        mode="teacher",
        out=teacher_out,
        student=TEACHER,
        student_tokenizer=os.path.join(tok_dir, "teacher-bpe"),
        mta=False,
        kd="none",
    )
    t_teacher = time.perf_counter() - t0

    runs = {}
    for i, (name, mta) in enumerate((("student-mta", True), ("student-baseline", False)), start=2):
        t0 = time.perf_counter()
        print(
            f"[demo] {i}/3 distilling into {STUDENT} ({'with' if mta else 'without'} MTA) "
            f"for {student_steps} steps"
        )
        summary = _stage(
            student_steps,
            progress,
            backend,
            mode="distill",
            out=os.path.join(out, name),
            student=STUDENT,
            student_tokenizer=os.path.join(tok_dir, "student-bpe"),
            teacher=os.path.join(teacher_out, "model"),
            mta=mta,
            kd="forward",
        )
        summary["wall_s"] = time.perf_counter() - t0
        runs[name] = summary
    png = plot_runs({n: os.path.join(out, n, "metrics.jsonl") for n in runs}, os.path.join(out, "curves.png"))

    with open(os.path.join(teacher_out, "summary.json")) as f:
        teacher_summary = json.load(f)
    rows = [("teacher (BPE)", teacher_summary, t_teacher)] + [(n, s, s["wall_s"]) for n, s in runs.items()]
    _print_table(rows)
    print(f"metrics: {out}/<run>/metrics.jsonl   checkpoints: {out}/<run>/checkpoint.pt   plot: {png}")
    print(f"total demo time: {time.perf_counter() - t_start:.0f} s")
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
        _config(
            steps=steps,
            lr=2e-3,
            warmup_steps=max(1, steps // 20),
            progress=progress,
            backend=backend,
            plot=False,
            **kw,
        )
    )


def _print_table(rows: list[tuple[str, dict, float]]) -> None:
    """The demo's table: held-out loss, perplexity, step time, MTA share and wall time of each run."""
    print()
    print(
        f"{'run':<18} {'held-out loss':>13} {'perplexity':>10} {'step (ms)':>9} {'MTA share':>9} "
        f"{'wall (s)':>8}"
    )
    for name, s, wall in rows:
        share = "-" if s.get("mta_share") is None else f"{100 * s['mta_share']:.0f}%"
        print(
            f"{name:<18} {s.get('eval_loss', float('nan')):>13.3f} {s.get('eval_ppl', float('nan')):>10.2f} "
            f"{1000 * s['step_time_s']:>9.0f} {share:>9} {wall:>8.0f}"
        )
    print()
    print(
        "held-out numbers are per token of each model's own tokenizer: compare the two students with "
        "each other,"
    )
    print(
        "not with the teacher. The logit KD term is off (different vocabularies); MTA is the only "
        "teacher signal."
    )
