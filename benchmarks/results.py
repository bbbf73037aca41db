"""Result files of a benchmark: ``<name>.json`` / ``<name>.csv`` (rewritten after every case) and the
``<name>_time.png`` / ``<name>_memory.png`` plots."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Parameters that identify a case (everything else in a record is a measurement).
CASE_KEYS = ("case", "preset", "mode", "gran", "L", "K", "B", "T", "D", "Ds", "Dt", "units_per_seq")


def case_label(rec: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    keys = keys or [k for k in CASE_KEYS if k in rec]
    text = " ".join(f"{k}={rec[k]}" for k in keys if k in rec and k != "T")
    return text + (f" T={rec['T']}" if "T" in rec else "")


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_results(json_path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_json_safe({"meta": meta, "records": records}), indent=1) + "\n")
    tmp.replace(json_path)
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    with open(json_path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in records:
            w.writerow(_json_safe(r))


def load_results(json_path: Path) -> dict[str, Any]:
    return json.loads(Path(json_path).read_text())


def plot_results(json_path: Path) -> list[Path]:
    """``<stem>_time.png`` and ``<stem>_memory.png``: median time / peak memory vs T, one line per
    provider, one panel per group of the other case parameters. OOM points are marked with an x at the
    top of the panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_results(json_path)
    recs = [r for r in data["records"] if "T" in r]
    if not recs:
        return []
    group_keys = [k for k in CASE_KEYS if k != "T" and any(k in r for r in recs)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault(" ".join(f"{k}={r.get(k)}" for k in group_keys if k in r), []).append(r)
    written = []
    for metric, ylabel, scale, fname in (
        ("ms_p50", "median time (ms)", 1.0, "time"),
        ("peak_mem_bytes", "peak memory (MiB)", 1 / 2**20, "memory"),
    ):
        if not any(isinstance(r.get(metric), (int, float)) for r in recs):
            continue
        n = len(groups)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
        for ax, (title, grp) in zip(axes.flat, groups.items()):
            for provider in data["meta"]["providers"]:
                mine = [r for r in grp if r["provider"] == provider]
                pts = sorted((r["T"], r[metric] * scale) for r in mine if r.get(metric))
                oom = sorted(r["T"] for r in mine if r["status"] == "OOM")
                if pts:
                    line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)[0]
                    if oom:
                        top = max(p[1] for p in pts)
                        ax.scatter(oom, [top] * len(oom), marker="x", color=line.get_color(), s=60)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T (tokens per sequence)")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        dev = data["meta"]["env"]["device"]
        fig.suptitle(f"{data['meta']['bench']} ({data['meta'].get('tag') or 'all'}) on {dev}", fontsize=10)
        fig.tight_layout()
        path = Path(json_path).with_name(f"{Path(json_path).stem}_{fname}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
