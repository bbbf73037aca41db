"""Turn a results folder into markdown tables (for benchmarks/README.md) and (re)draw its plots.

    python benchmarks/summarize.py benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-25
    python benchmarks/summarize.py RESULTS --plots                     # also redraw every *_time/_memory.png
    python benchmarks/summarize.py RESULTS --readme benchmarks/README.md  # replace the results section

Each row is one (case, provider). "× vs P" is P's median time over this row's (above 1: this row is
faster); "mem ÷ vs P" is P's peak memory over this row's (above 1: this row uses less). "% floor" is
the floor time (max of bytes / measured bandwidth, FLOPs / the measured matmul rate of their precision)
over the median time. "rule" is the tolerance check against the float64 oracle: the error over the
rule's bound (≤ 1 passes; "✗" marks a failure, "–" no oracle).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = ["mta_loss_target", "mta_loss_sweep", "saliency_issue", "saliency_sweep", "structural_sweep"]
ORDER += ["span_pool_sweep", "step_gpt2"]


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or x == "":
        return "–"
    if isinstance(x, str):
        return x
    return format(x, spec)


def _mib(x: Any) -> str:
    return "–" if not isinstance(x, (int, float)) else f"{x / 2**20:,.1f}"


def _status(r: dict[str, Any]) -> str:
    s = r["status"]
    return s if len(s) < 60 else s[:57] + "..."


def _rule(r: dict[str, Any]) -> str:
    ok, ratio = r.get("within_rule"), r.get("err_over_bound")
    if ok is None or not isinstance(ratio, (int, float)):
        return "–"
    return f"{ratio:.2f}" if ok else f"✗ {ratio:.2g}"


def table(data: dict[str, Any]) -> str:
    meta, recs = data["meta"], data["records"]
    providers = meta["providers"]
    keys = [k for k in harness.CASE_KEYS if any(k in r for r in recs) and k != "case"]
    head = keys + ["provider", "median ms [p20, p80]", "peak MiB"]
    head += [f"× vs {p}" for p in providers] + [f"mem ÷ vs {p}" for p in providers]
    head += ["% floor", "GB/s", "TFLOP/s", "rel.err", "rule"]
    is_step = meta["bench"] == "step"
    if is_step:
        head += ["MTA share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in recs:
        row = [_fmt(r.get(k)) for k in keys] + [r["provider"]]
        if r["status"] != "ok":
            row += [_status(r)] + ["–"] * (len(head) - len(row) - 1)
            lines.append("| " + " | ".join(row) + " |")
            continue
        row += [f"{r['ms_p50']:.4g} [{r['ms_p20']:.4g}, {r['ms_p80']:.4g}]", _mib(r.get("peak_mem_bytes"))]
        row += [_fmt(r.get(f"speedup_vs_{p}"), ".2f") for p in providers]
        row += [_fmt(r.get(f"mem_ratio_vs_{p}"), ".2f") for p in providers]
        row += [_fmt(r.get("pct_of_floor"), ".1f"), _fmt(r.get("GBps"), ".3g"), _fmt(r.get("TFLOPs"), ".3g")]
        row += [_fmt(r.get("rel_err_vs_ref"), ".1e"), _rule(r)]
        if is_step:
            share = r.get("mta_share")
            row += [f"{100 * share:.1f}% ({r['mta_ms']:.2f} ms)" if isinstance(share, float) else "–"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


BRIEF = ("mta_loss_target", "saliency_issue", "step_gpt2")


def brief(folder: Path) -> str:
    """The headline rows (target loss, saliency issue case, step share), narrow enough for a terminal."""
    out = []
    for stem in BRIEF:
        path = folder / f"{stem}.json"
        if not path.exists():
            out.append(f"{stem}: no result file")
            continue
        data = harness.load_results(path)
        providers = data["meta"]["providers"]
        out.append(f"{stem} on {data['meta']['env']['device']}:")
        for r in data["records"]:
            if r["status"] != "ok":
                out.append(f"  T={r.get('T', '?'):<5} {r['provider']:14s} {_status(r)}")
                continue
            ratios = []
            for p in providers:
                if r["provider"] != "mta_kernels" or f"speedup_vs_{p}" not in r or p == "no_mta":
                    continue
                mem = r.get(f"mem_ratio_vs_{p}")
                ratios.append(
                    f"{r[f'speedup_vs_{p}']:.2f}x" + (f" {mem:.2f}x less mem" if mem else "") + f" vs {p};"
                )
            ratios = " ".join(ratios)
            share = r.get("mta_share")
            share_s = f" MTA {100 * share:.1f}% of step" if isinstance(share, float) else ""
            out.append(
                f"  T={r.get('T', '?'):<5} {r['provider']:14s} {r['ms_p50']:10.3f} ms "
                f"{_mib(r.get('peak_mem_bytes')):>10s} MiB "
                f"floor {_fmt(r.get('pct_of_floor'), '.1f')}%{share_s} {ratios}"
            )
    return "\n".join(out)


def result_files(folder: Path) -> list[Path]:
    files = [p for p in folder.glob("*.json") if p.name not in ("ceilings.json", "environment.json")]
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(files, key=lambda p: (rank.get(p.stem, len(ORDER)), p.stem))


def summarize(folder: Path) -> str:
    files = result_files(folder)
    if not files:
        return f"No result files in `{folder}`."
    first = harness.load_results(files[0])["meta"]
    env, ceil = first["env"], first["ceilings"]
    out = [
        f"### {env['device']} — {env['utc'][:10]}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, commit {env['git_commit']}"
        f"{' (dirty)' if env.get('git_dirty') else ''}; fused ops on `{env['fused_backend']}`; inputs "
        f"{first['dtype']}. Timing: {first['timing']['method']}, median and 20/80th percentiles.",
        f"Ceilings measured in this run: copy {ceil['bandwidth_GBps']:,.0f} GB/s (read + write), "
        f"{ceil['matmul_dtype']} {ceil['matmul_n']}³ matmul {ceil['matmul_TFLOPs']:,.1f} TFLOP/s.",
        f"Unit density: {env['unit_stats']['source']}: units/token {env['unit_stats']['units_per_token']}, "
        f"covered fraction {env['unit_stats']['token_coverage']}.",
    ]
    for f in files:
        data = harness.load_results(f)
        out += ["", f"#### {f.stem}", "", table(data)]
    return "\n".join(out) + "\n"


def replace_readme(readme: Path, text: str) -> None:
    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{readme} has no {START} ... {END} section")
    pattern = re.escape(START) + ".*?" + re.escape(END)
    new = re.sub(pattern, lambda _: f"{START}\n{text}{END}", body, flags=re.S)
    readme.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--plots", action="store_true", help="(re)draw the plots of every result file")
    parser.add_argument("--readme", type=Path, default=None, help="replace the results section of this file")
    parser.add_argument("--write", type=Path, default=None, help="also write the markdown to this file")
    parser.add_argument("--brief", action="store_true", help="print the headline rows only")
    args = parser.parse_args(argv)
    if args.plots:
        for f in result_files(args.folder):
            try:
                harness.plot_results(f)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the summary
                print(f"plot of {f.name} failed: {exc!r}", file=sys.stderr)
    text = summarize(args.folder)
    print(brief(args.folder) if args.brief else text)
    if args.write:
        args.write.write_text(text)
    if args.readme:
        replace_readme(args.readme, text)


if __name__ == "__main__":
    main()
