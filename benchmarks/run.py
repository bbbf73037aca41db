"""Run registered benchmarks (``registry.py``) and add their results to the table of all results.

    python benchmarks/run.py --quick --device cpu --providers eager_stacked,eager,mta_kernels,no_mta
    python benchmarks/run.py --bench saliency,span_pool --max-seconds 120
    python benchmarks/plot.py                      # draws the table

Each bench runs its default case set (``--case`` of its script picks another one) through its script's
``make_spec``, writes its own result files to the results folder (``--out``, default
``benchmarks/results/<device>-<date>/``) and appends its rows to ``--table`` (default
``benchmarks/data/all_benchmark_data.csv``), with the machine and the versions on every row. Options
other than ``--bench`` and ``--table`` go to every bench (``--providers`` keeps, per bench, the ones it
has).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules

import harness  # noqa: E402
import registry  # noqa: E402
from results import append_to_table, load_results, table_rows  # noqa: E402

TABLE = Path(__file__).resolve().parent / "data" / "all_benchmark_data.csv"


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", default=None, help=f"comma-separated subset of {sorted(registry.BENCHES)}")
    parser.add_argument("--table", default=str(TABLE), help="the CSV the rows are added to")
    ours, rest = parser.parse_known_args(argv)
    names = ours.bench.split(",") if ours.bench else list(registry.BENCHES)
    written = []
    for name in names:
        bench = registry.get(name)
        args = harness.bench_args(bench, bench.name, rest)
        if args.providers:
            args.providers = ",".join(p for p in args.providers.split(",") if p in bench.providers)
        path = harness.run_registered(bench, args)
        rows = table_rows(load_results(path), x=bench.x)
        total = append_to_table(Path(ours.table), rows)
        print(f"[run] {name}: {len(rows)} rows added to {ours.table} ({total} in all)", flush=True)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
