"""Draw the table of all benchmark results (``benchmarks/data/all_benchmark_data.csv``).

    python benchmarks/plot.py                                   # every bench, metric and machine
    python benchmarks/plot.py --bench mta_loss --metric time --device "NVIDIA H100 80GB HBM3"

One PNG per (bench, metric, machine), ``<out>/<bench>_<metric>_<device>.png``: the median against the
bench's swept parameter (``x_name``, T for most), one line per provider with the 20th–80th percentile as
error bars, one panel per mode and case (the other parameters). Rows without a value (OOM, skipped) are
left out; a provider with none in a panel is not drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules

from machine import slug  # noqa: E402
from results import read_table  # noqa: E402

HERE = Path(__file__).resolve().parent
TABLE = HERE / "data" / "all_benchmark_data.csv"
OUT = HERE / "data" / "plots"


def _panel_title(mode: str, case: str) -> str:
    params = json.loads(case) if case else {}
    return f"{mode} " + " ".join(f"{k}={v}" for k, v in params.items())


def plot(rows: list[dict], out: Path) -> list[Path]:
    """The figures of ``rows`` (already filtered), written under ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r["y_p50"] is not None and r["x_value"] is not None:
            figures.setdefault((r["bench"], r["metric"], r["device"]), []).append(r)
    written = []
    out.mkdir(parents=True, exist_ok=True)
    for (bench, metric, device), recs in sorted(figures.items()):
        panels: dict[str, list[dict]] = {}
        for r in recs:
            panels.setdefault(_panel_title(r["mode"], r["case"]), []).append(r)
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
        for ax, (title, grp) in zip(axes.flat, sorted(panels.items())):
            for provider in sorted({r["provider"] for r in grp}):
                pts = sorted(
                    (r["x_value"], r["y_p50"], r["y_p20"], r["y_p80"])
                    for r in grp
                    if r["provider"] == provider
                )
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(grp[0]["x_name"])
            ax.set_ylabel(f"{metric} ({grp[0]['unit']})")
            ax.set_title(title, fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        machine = recs[0].get("machine") or device
        fig.suptitle(f"{bench}: {metric} on {machine} (torch {recs[0]['torch']})", fontsize=10)
        fig.tight_layout()
        path = out / f"{bench}_{metric}_{slug(device)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default=str(TABLE))
    parser.add_argument("--bench", default=None, help="comma-separated benches (default: all)")
    parser.add_argument("--metric", default=None, choices=["time", "memory"])
    parser.add_argument("--device", default=None, help="the device column's value (default: all)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    rows = read_table(Path(args.table))
    if args.bench:
        rows = [r for r in rows if r["bench"] in args.bench.split(",")]
    if args.metric:
        rows = [r for r in rows if r["metric"] == args.metric]
    if args.device:
        rows = [r for r in rows if r["device"] == args.device]
    written = plot(rows, Path(args.out))
    for path in written:
        print(path)
    if not written:
        print("no rows with values to plot", file=sys.stderr)
    return written


if __name__ == "__main__":
    main()
