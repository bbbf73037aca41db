"""Metrics I/O: ``<out>/metrics.jsonl`` (one JSON record a line) and the run's summary."""

from __future__ import annotations

import json
import os

import numpy as np

from mta_kernels.distill.checkpoint import atomic_write_bytes

METRICS_NAME = "metrics.jsonl"
TORN_SUFFIX = ".torn"
"""Where :func:`trim_metrics` keeps the lines of a metrics file that are not whole records."""


def append_records(path: str, records: list[dict]) -> None:
    """Append records to a metrics file (one line each)."""
    if records:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))


def trim_metrics(path: str, step: int, expected: int | None = None) -> tuple[list[str], list[str], int]:
    """On resume: keep the records of steps up to the checkpoint's ``step``; returns (notes, warnings,
    the number of records the file holds now).

    Records of later steps are dropped (the resumed run writes them again: a note says how many).
    A line that is not a whole JSON record (cut short by a kill or a full disk, or edited) is never
    dropped silently: it is moved to ``<path>.torn`` with a warning. ``expected``: the records the
    checkpoint's run had written up to ``step``; fewer left (the file deleted or edited) is a warning.
    A fresh run (``step == 0``) starts the file again.
    """
    notes: list[str] = []
    warnings: list[str] = []
    if not os.path.exists(path):
        if step and expected:
            warnings.append(
                f"{path} is missing: the {expected} records of steps 1..{step} are lost (the curves and "
                "the summary cover the resumed steps only)"
            )
        return notes, warnings, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    if step == 0:
        if lines:
            atomic_write_bytes(path, lambda f: None)
        return notes, warnings, 0
    keep, later, torn = [], [], []
    for lineno, line in enumerate(lines, start=1):
        rec = _parse(line)
        if rec is None:
            if line.strip():
                torn.append((lineno, line))
        elif isinstance(rec.get("step"), int) and rec["step"] > step:
            later.append(line)
        else:
            keep.append(line)
    if torn:
        with open(path + TORN_SUFFIX, "a", encoding="utf-8") as f:
            f.write("".join(line if line.endswith("\n") else line + "\n" for _, line in torn))
        first = torn[0][0]
        warnings.append(
            f"{path}: {len(torn)} line(s) are not whole JSON records (line {first} first: cut short by a "
            f"kill or a full disk?); kept aside in {path + TORN_SUFFIX}"
        )
    if later:
        notes.append(
            f"{path}: {len(later)} record(s) of steps after the checkpoint's step {step} dropped; the "
            "resumed run writes them again"
        )
    if expected is not None and len(keep) < expected:
        warnings.append(
            f"{path} holds {len(keep)} of the {expected} records written up to step {step} (deleted or "
            "edited?): the curves and the summary miss the others"
        )
    if len(keep) != len(lines):  # blank lines go too: only whole records are kept
        atomic_write_bytes(path, lambda f: f.write("".join(keep).encode()))
    return notes, warnings, len(keep)


def best_rouge(path: str) -> float | None:
    """The best ``eval_rougeL`` of a metrics file (``None``: none yet)."""
    if not os.path.exists(path):
        return None
    values = [r["eval_rougeL"] for r in read_metrics(path) if r.get("eval_rougeL") is not None]
    return max(values) if values else None


def _parse(line: str) -> dict | None:
    if not line.endswith("\n"):
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics file (a last line cut short by a killed process is skipped)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [rec for ln in f if ln.strip() and (rec := _parse(ln)) is not None]


def summarise(metrics_path: str) -> dict:
    """Medians of the step time and throughput over steps 2.. (step 1 pays for warm-up), final losses."""
    recs = read_metrics(metrics_path)
    train_recs = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    timed = train_recs[1:] or train_recs
    out = {
        "step_time_s": float(np.median([r["step_time_s"] for r in timed])) if timed else None,
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in timed])) if timed else None,
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
    }
    shares = [r["mta_share"] for r in timed if r.get("mta_share") is not None]
    out["mta_share"] = float(np.median(shares)) if shares else None
    failed = sum(int(r.get("units_failed") or 0) for r in train_recs)
    if failed:
        out["units_failed"] = failed
    covered = [r["unit_coverage"] for r in train_recs if r.get("unit_coverage")]
    if covered:  # mean over the logged steps of each step's fractions
        out["unit_coverage"] = {
            g: {k: float(np.mean([c[g][k] for c in covered])) for k in ("examples", "tokens")}
            for g in covered[0]
        }
    if evals:
        out["eval_loss"], out["eval_ppl"] = evals[-1]["eval_loss"], evals[-1]["eval_ppl"]
        rouge = [r["eval_rougeL"] for r in evals if r.get("eval_rougeL") is not None]
        if rouge:  # --eval-gen
            out["eval_rougeL"], out["eval_rougeL_best"] = rouge[-1], max(rouge)
    return out
