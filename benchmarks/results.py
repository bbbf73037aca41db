"""Result files of a benchmark: ``<name>.json`` / ``<name>.csv`` (rewritten after every case), the
``<name>_time.png`` / ``<name>_memory.png`` plots, and the long CSV of all benchmarks of all machines
(:func:`append_to_table`, ``benchmarks/data/all_benchmark_data.csv``: one row per case, provider and
metric, with the machine and the versions that measured it)."""

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


# ------------------------------------------------------------------------------- the long CSV table
TABLE_COLUMNS = (
    "bench",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "y_p50",
    "y_p20",
    "y_p80",
    "case",
    "status",
    "within_rule",
    "pct_of_floor",
    "dtype",
    "quick",
    "device",
    "machine",
    "device_type",
    "fused_backend",
    "cpu_threads",
    "torch",
    "cuda",
    "triton",
    "python",
    "mta_kernels_commit",
    "utc",
)
"""Columns of the table (Liger-Kernel's layout: one measured value per row, its percentiles, the case
as JSON, and who measured it)."""

_METRICS = (
    ("time", "ms", ("ms_p50", "ms_p20", "ms_p80"), 1.0),
    ("memory", "MiB", ("peak_mem_bytes",) * 3, 2**-20),
)


def table_rows(data: dict[str, Any], x: str = "T") -> list[dict[str, Any]]:
    """The rows of one result file (``load_results``): per record, one row per metric it has (a record
    that did not run gives one ``time`` row with its status and no value)."""
    meta, env = data["meta"], data["meta"]["env"]
    who = {
        "dtype": meta.get("dtype"),
        "quick": meta.get("quick"),
        "device": env.get("device"),
        "machine": env.get("machine"),
        "device_type": env.get("device_type"),
        "fused_backend": env.get("fused_backend"),
        "cpu_threads": meta.get("timing", {}).get("cpu_threads"),
        "torch": env.get("torch"),
        "cuda": env.get("cuda"),
        "triton": env.get("triton"),
        "python": env.get("python"),
        "mta_kernels_commit": (env.get("git_commit") or "") + ("+dirty" if env.get("git_dirty") else ""),
        "utc": env.get("utc"),
    }
    rows = []
    for r in data["records"]:
        case = {k: r[k] for k in CASE_KEYS if k in r and k not in (x, "mode")}
        base = {
            "bench": meta["bench"],
            "provider": r["provider"],
            "mode": r.get("mode", "fwd+bwd" if meta["bench"] in ("mta_loss", "step") else "fwd"),
            "x_name": x,
            "x_value": r.get(x),
            "case": json.dumps(case, sort_keys=True),
            "status": r["status"],
            "within_rule": r.get("within_rule"),
            "pct_of_floor": r.get("pct_of_floor"),
            **who,
        }
        for metric, unit, keys, scale in _METRICS:
            values = [r.get(k) for k in keys]
            if not all(isinstance(v, (int, float)) for v in values):
                if metric == "time" and r["status"] != "ok":
                    rows.append({**base, "metric": metric, "unit": unit})
                continue
            p50, p20, p80 = (v * scale for v in values)
            rows.append({**base, "metric": metric, "unit": unit, "y_p50": p50, "y_p20": p20, "y_p80": p80})
    return rows


_KEY_COLUMNS = ("bench", "provider", "mode", "metric", "x_value", "case", "dtype", "quick", "device")
_KEY_COLUMNS += ("fused_backend",)


def _row_key(row: dict[str, Any]) -> tuple:
    """What one row measures, on which machine (a newer measurement of it replaces the row)."""
    return tuple(str(row.get(k)) for k in _KEY_COLUMNS)


def append_to_table(csv_path: Path, rows: list[dict[str, Any]]) -> int:
    """Add ``rows`` to the table at ``csv_path`` (created if missing); a row for the same case, provider,
    metric and machine replaces the older one. Returns the number of rows in the table."""
    csv_path = Path(csv_path)
    kept: dict[tuple, dict[str, Any]] = {}
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            for row in csv.DictReader(f):
                kept[_row_key(row)] = row
    for row in rows:
        kept[_row_key(row)] = {k: _json_safe(row.get(k)) for k in TABLE_COLUMNS}
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        w.writeheader()
        for row in kept.values():
            w.writerow({k: row.get(k) for k in TABLE_COLUMNS})
    tmp.replace(csv_path)
    return len(kept)


def read_table(csv_path: Path) -> list[dict[str, Any]]:
    """The table's rows, with the numbers as floats (empty cells as None)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for k in ("x_value", "y_p50", "y_p20", "y_p80", "pct_of_floor"):
            row[k] = float(row[k]) if row.get(k) not in (None, "") else None
    return rows
