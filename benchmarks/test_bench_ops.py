"""pytest-benchmark cases (``pytest benchmarks --benchmark-only``): what the CPU can measure, and the GPU
cases that skip themselves without CUDA.

- the C++ extension's layout ops at realistic sizes (B=16, T=512/2048, the measured unit density);
- the CPU torch path of the MTA loss (fused ops' torch path and the eager reference) at small shapes;
- each benchmark script end to end in its ``--quick`` CPU mode (tiny shapes), checking its result
  files: every provider ran and agreed with the eager reference; the harness records OOM as "OOM";
- on a GPU: the full MTA loss at the target shape, per provider.
The full GPU numbers (all shapes, memory, floors, plots) come from ``bash benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import json

import harness
import pytest
import registry
import torch

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the GPU numbers come from `bash benchmarks/gpu_check.sh` on a GPU machine",
)
CPU = torch.device("cpu")


# ------------------------------------------------------------------------- extension layout ops
@pytest.fixture(scope="module", params=[512, 2048], ids=lambda t: f"B16-T{t}")
def word_units(request):
    return harness.synth_unit_batch(16, request.param, "word", True, 0, CPU)


LAYOUT_OPS = {
    "validate_layout": lambda L, ub: L.validate_layout(
        ub.student_ranges, ub.cu_units, ub.batch_size * ub.seq_len_student, ub.seq_len_student
    ),
    "token_to_unit": lambda L, ub: L.token_to_unit(ub.student_ranges, ub.batch_size * ub.seq_len_student),
    "unit_to_seq": lambda L, ub: L.unit_to_seq(ub.cu_units, ub.num_units),
    "offsets_from_lengths": lambda L, ub: L.offsets_from_lengths(ub.cu_units[1:] - ub.cu_units[:-1]),
    "block_diagonal_work_list": lambda L, ub: L.block_diagonal_work_list(ub.cu_units, 64),
}


@pytest.mark.parametrize("op", list(LAYOUT_OPS))
def test_layout_op_cpu(benchmark, word_units, op):
    from mta_kernels import layout

    if not hasattr(layout, op):
        pytest.skip(f"mta_kernels.layout.{op} does not exist in this build")
    benchmark.extra_info["units"] = word_units.num_units
    benchmark.extra_info["tokens"] = word_units.batch_size * word_units.seq_len_student
    benchmark(LAYOUT_OPS[op], layout, word_units)


# ------------------------------------------------------------------------------- CPU loss path
@pytest.fixture(scope="module")
def small_loss_inputs():
    """GPT-2-XL -> GPT-2 widths and pairs at B=2, T=128 (bf16 inputs, CPU)."""
    import bench_mta_loss

    p = registry.complete_loss_case(dict(case="cpu", preset="gpt2", B=2, T=128))
    return bench_mta_loss.build_inputs(p, CPU, torch.bfloat16, seed=0)


@pytest.mark.parametrize("provider", ["eager_stacked", "eager", "mta_kernels"])
def test_mta_loss_cpu_fwd_bwd(benchmark, small_loss_inputs, provider):
    import bench_mta_loss

    from mta_kernels import use_backend

    x = small_loss_inputs
    loss_fn = bench_mta_loss.make_loss_fn(provider, x)

    def fwd_bwd():
        for t in x["grad_leaves"]:
            t.grad = None
        with use_backend("torch"):
            loss = loss_fn()
        loss.backward()
        return loss

    loss = benchmark(fwd_bwd)
    assert torch.isfinite(loss)
    ref = bench_mta_loss.make_loss_fn("eager", x)()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------ scripts, quick mode
def _run_quick(module_name: str, tmp_path, extra=()):
    module = __import__(module_name)
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--rep-ms", "20", "--warmup-ms", "5"]
    argv += list(extra)
    module.main(argv)


SCRIPTS = {  # script: (result file stem, providers run here: the registry's, torch.compile left out)
    b.script: (f"{b.name}_{b.default_set}", [p for p in b.providers if p != "compile"])
    for b in registry.BENCHES.values()
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_script_quick_cpu(benchmark, tmp_path, script):
    """The script runs end to end on the CPU (torch.compile left out for time: the GPU run has it)."""
    name, providers = SCRIPTS[script]
    extra = ["--providers", ",".join(providers)]
    if script != "bench_mta_loss":
        extra.append("--no-plots")
    benchmark.pedantic(_run_quick, args=(script, tmp_path, extra), rounds=1, iterations=1)
    data = json.loads((tmp_path / f"{name}.json").read_text())
    recs = data["records"]
    assert recs and {r["provider"] for r in recs} == set(providers)
    for r in recs:
        assert r["status"] == "ok", r
        assert r["ms_p50"] > 0 and r["floor_bytes"] > 0
        if r["provider"] != "no_mta":
            assert r["rel_err_vs_ref"] is not None and r["rel_err_vs_ref"] < 2e-2, r
        # the tolerance rule against the float64 oracle: never failed; checked wherever an oracle exists
        assert r.get("within_rule") is not False, r
        if script in ("bench_saliency", "bench_span_pool", "bench_structural"):
            assert r["within_rule"] is True, r
    assert (tmp_path / f"{name}.csv").exists() and (tmp_path / "ceilings.json").exists()
    if script == "bench_mta_loss":
        assert (tmp_path / "mta_loss_sweep_time.png").stat().st_size > 0
        import summarize

        md = summarize.summarize(tmp_path)
        assert "#### mta_loss_sweep" in md and "| mta_kernels |" in md
    if script == "bench_step":
        assert all(isinstance(r.get("mta_share"), float) for r in recs if r["provider"] != "no_mta")


def test_run_adds_every_bench_to_one_table_and_plot_draws_it(benchmark, tmp_path):
    """run.py: every registered bench in one call, its rows added to the table with the machine and the
    versions (a second run replaces them, it does not add); plot.py: one figure per bench and metric."""
    import csv

    import plot
    import run

    table = tmp_path / "all.csv"
    argv = ["--bench", "saliency,span_pool", "--table", str(table), "--quick", "--device", "cpu"]
    argv += ["--out", str(tmp_path), "--rep-ms", "5", "--warmup-ms", "1", "--no-plots", "--no-check"]
    argv += ["--providers", "eager,mta_kernels"]
    benchmark.pedantic(run.main, args=(argv,), rounds=1, iterations=1)
    rows = list(csv.DictReader(open(table)))
    assert {r["bench"] for r in rows} == {"saliency", "span_pool"}
    assert {r["provider"] for r in rows} == {"eager", "mta_kernels"}
    for r in rows:
        assert r["status"] == "ok" and float(r["y_p50"]) > 0 and r["metric"] == "time"
        assert r["machine"] and r["torch"] == torch.__version__ and r["device"] == "cpu" and r["utc"]
    run.main(argv)
    assert len(list(csv.DictReader(open(table)))) == len(rows)
    written = plot.main(["--table", str(table), "--out", str(tmp_path / "plots")])
    assert {p.name for p in written} == {"saliency_time_cpu.png", "span_pool_time_cpu.png"}
    assert all(p.stat().st_size > 0 for p in written)


def test_committed_table_has_this_trees_cpu_results(benchmark):
    """benchmarks/data/all_benchmark_data.csv holds a CPU run of every registered bench and provider
    (torch.compile aside), each within the tolerance rule."""
    import csv

    import run

    rows = benchmark(lambda: list(csv.DictReader(open(run.TABLE))))
    cpu = [r for r in rows if r["device_type"] == "cpu" and r["metric"] == "time"]
    for b in registry.BENCHES.values():
        mine = [r for r in cpu if r["bench"] == b.name]
        assert {r["provider"] for r in mine} == {p for p in b.providers if p != "compile"}, b.name
        assert all(r["status"] == "ok" and r["within_rule"] != "False" for r in mine), b.name


def test_tolerance_rule_flags_what_it_should(benchmark):
    """The benchmark check is the tolerance rule: error against the float64 oracle <= 2 x the eager
    error in the same dtype + a floor relative to the oracle's scale."""
    oracle = [torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)]
    eager = [oracle[0] + torch.tensor([1e-3, 0.0, 0.0], dtype=torch.float64)]
    good = [oracle[0] + torch.tensor([0.0, 1.5e-3, 0.0], dtype=torch.float64)]
    bad = [oracle[0] + torch.tensor([0.0, 0.0, 3e-3], dtype=torch.float64)]
    ok, ratio, eager_err = benchmark(harness.tolerance_check, good, eager, oracle)
    assert ok is True and ratio < 1 and abs(eager_err - 1e-3 / 3) < 1e-12
    ok, ratio, _ = harness.tolerance_check(bad, eager, oracle)
    assert ok is False and ratio > 1
    nan = [oracle[0] * float("nan")]
    assert harness.tolerance_check(nan, eager, oracle)[0] is False
    assert harness.tolerance_check(good, eager, oracle + oracle) == (None, None, None)


def test_harness_records_oom_and_errors(benchmark, tmp_path):
    """An OOM is recorded as "OOM" and another failure as "error: ...": no case is dropped."""

    def make_fn(provider, p, x):
        if provider == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        if provider == "broken":
            return lambda: 1 / 0
        return lambda: x["a"] * 2

    spec = harness.BenchSpec(
        "selftest",
        build=lambda p: {"a": torch.ones(p["T"])},
        make_fn=make_fn,
        floor=lambda p, x: (8.0 * p["T"], 1.0 * p["T"]),
        providers=("eager", "oom", "broken"),
    )
    parser = argparse.ArgumentParser()
    harness.add_common_args(parser)
    args = parser.parse_args(["--device", "cpu", "--out", str(tmp_path), "--rep-ms", "5", "--warmup-ms", "1"])
    todo = [dict(T=16), dict(T=32)]
    path = benchmark.pedantic(harness.run_bench, args=(spec, todo, args), rounds=1, iterations=1)
    recs = harness.load_results(path)["records"]
    status = {(r["T"], r["provider"]): r["status"] for r in recs}
    assert status[(16, "oom")] == "OOM" and status[(32, "oom")] == "OOM"
    assert status[(16, "broken")].startswith("error: ZeroDivisionError")
    assert status[(16, "eager")] == "ok"
    assert len(recs) == 6


# ------------------------------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("provider", ["eager_stacked", "eager", "mta_kernels"])
def test_mta_loss_target_gpu(benchmark, provider):
    """GPT-2-XL -> GPT-2, B=16, T=512, three pairs, bf16, forward + backward."""
    import bench_mta_loss

    device = torch.device("cuda")
    p = registry.complete_loss_case(dict(case="target", preset="gpt2", B=16, T=512))
    x = bench_mta_loss.build_inputs(p, device, torch.bfloat16, seed=0)
    loss_fn = bench_mta_loss.make_loss_fn(provider, x)

    def fwd_bwd():
        for t in x["grad_leaves"]:
            t.grad = None
        loss = loss_fn()
        loss.backward()
        torch.cuda.synchronize()
        return loss

    fwd_bwd()  # compile / autotune outside the timing
    loss = benchmark(fwd_bwd)
    assert torch.isfinite(loss)
