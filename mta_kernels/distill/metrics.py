"""Metrics I/O: ``<out>/metrics.jsonl`` (one JSON record a line) and the run's summary."""

from __future__ import annotations

import json
import os

import numpy as np

from mta_kernels.distill.checkpoint import atomic_write_bytes

METRICS_NAME = "metrics.jsonl"


def append_records(path: str, records: list[dict]) -> None:
    """Append records to a metrics file (one line each)."""
    if records:
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))


def trim_metrics(path: str, step: int) -> None:
    """On resume, drop the records written after the checkpoint's step (they will be written again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    # A line cut short by a killed process is dropped too (it belongs to a step after the checkpoint).
    keep = [ln for ln in lines if (rec := _parse(ln)) is not None and rec.get("step", 0) <= step]
    if len(keep) != len(lines):
        atomic_write_bytes(path, lambda f: f.write("".join(keep).encode()))


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
    with open(path) as f:
        return [rec for ln in f if ln.strip() and (rec := _parse(ln)) is not None]


def summarise(metrics_path: str) -> dict:
    """Medians of the step time and throughput over steps 2.. (step 1 pays for warm-up), final losses."""
    recs = read_metrics(metrics_path)
    train_recs = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    timed = train_recs[1:] or train_recs
    out = {
        "step_time_s": float(np.median([r["step_time_s"] for r in timed])) if timed else None,
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in timed])) if timed else None,
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
    }
    shares = [r["mta_share"] for r in timed if r.get("mta_share") is not None]
    out["mta_share"] = float(np.median(shares)) if shares else None
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
