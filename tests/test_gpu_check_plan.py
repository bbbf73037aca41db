"""The GPU check's dry run (``bash benchmarks/gpu_check.sh --cpu``): its stage plan, in order, within budget.

One GPU lease must return a kernel verdict first and measurements after, and the script must end inside
9 minutes even if every stage hangs (each stage has its own ``timeout`` box).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 9 * 60
# The order that gives a verdict first: build, kernel tests, the target shape (eager, then autocast), the
# saliency case, the training step, the sweeps, torch.compile last.
ORDER = ["install", "kernels", "target", "target-autocast", "saliency", "step", "sweep:", "compile"]
KERNEL_TEST_FILES = [
    "test_saliency.py",
    "test_span_pool.py",
    "test_structural.py",
    "test_losses.py",
    "test_fused_hra.py",
    "test_host_syncs.py",  # zero syncs under sync_debug_mode("error"), CUDA-graph capture
]


@pytest.fixture(scope="module")
def plan() -> tuple[list[tuple[str, int, str]], str]:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    out = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"dry run failed:\n{out.stdout}\n{out.stderr}"
    stages = []
    for line in out.stdout.splitlines():
        m = re.match(r"^(\d+)\s+(\S+)\s+(\d+)s\s+(.*)$", line)
        if m:
            stages.append((m.group(2), int(m.group(3)), m.group(4)))
    assert stages, f"no stage lines in the dry run:\n{out.stdout}"
    return stages, out.stdout


def test_stages_come_in_the_verdict_first_order(plan):
    stages, _ = plan
    names = [name for name, _, _ in stages]
    positions = []
    for wanted in ORDER:
        prefix = wanted.endswith(":")
        hits = [i for i, n in enumerate(names) if n == wanted or (prefix and n.startswith(wanted))]
        assert hits, f"stage {wanted!r} missing from the plan {names}"
        positions.append((wanted, hits[0], hits[-1]))
    for (a, _, a_last), (b, b_first, _) in zip(positions, positions[1:]):
        assert a_last < b_first, f"{a} must come before {b}: {names}"


def test_worst_case_fits_in_nine_minutes(plan):
    stages, text = plan
    boxes = sum(box for _, box, _ in stages)
    m = re.search(r"worst case: (\d+) s \(boxes \+ (\d+) s kill grace \+ (\d+) s packing per stage\)", text)
    assert m, f"the dry run does not state its worst case:\n{text}"
    worst, grace, packing = map(int, m.groups())
    assert worst == boxes + len(stages) * (grace + packing), "the stated worst case is not the boxes' sum"
    assert worst <= LIMIT_S, f"worst case {worst} s > {LIMIT_S} s"
    assert all(box > 0 for _, box, _ in stages)


def test_kernel_stage_runs_only_the_cuda_test_files_without_stopping(plan):
    stages, _ = plan
    (cmd,) = [cmd for name, _, cmd in stages if name == "kernels"]
    for f in KERNEL_TEST_FILES:
        assert f"tests/{f}" in cmd
    assert " -x" not in cmd and "--exitfirst" not in cmd, "the verdict must not stop at the first failure"
    assert "test_extension_build" not in cmd and "test_distill" not in cmd
    assert "TRITON_INTERPRET" in cmd  # unset: the real kernels run


def test_only_the_compile_stage_uses_torch_compile(plan):
    stages, _ = plan
    for name, _, cmd in stages:
        uses_compile = re.search(r"--providers\s+\S*\bcompile\b", cmd) is not None
        assert uses_compile == (name == "compile"), f"{name}: {cmd}"
