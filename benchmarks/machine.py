"""The machine a benchmark runs on: device choice, results folder, environment record, and the device
ceilings (copy bandwidth, dense matmul rate) that the floors are divided by."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch
from memory import free_memory
from synthetic import TOKEN_COVERAGE, UNIT_STATS_SOURCE, UNITS_PER_TOKEN
from timing import time_fn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. ``cuda`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def results_dir(device: torch.device, out: str | None = None) -> Path:
    """``--out``, else ``$MTA_BENCH_RESULTS``, else ``benchmarks/results/<device slug>-<UTC date>/``."""
    path = out or os.environ.get("MTA_BENCH_RESULTS")
    if not path:
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        path = str(BENCH_DIR / "results" / f"{slug(device_name(device))}-{date}")
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def backend_label(device: torch.device) -> str:
    """Which implementation the fused ops run on this device (mta_kernels.ops._dispatch rule)."""
    if device.type == "cuda":
        return "triton"
    return "triton-interpreter" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "torch"


def environment(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: versions, device, commit."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional on the CPU
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except Exception:  # noqa: BLE001 - no git on the machine
        commit, dirty = None, None
    info: dict[str, Any] = {
        "device": device_name(device),
        "machine": device_name(device)
        if device.type == "cuda"
        else f"{cpu_model()} ({os.cpu_count()} cores)",
        "device_type": device.type,
        "fused_backend": backend_label(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "host": platform.node(),
        "git_commit": commit,
        "git_dirty": dirty,
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "unit_stats": {
            "source": UNIT_STATS_SOURCE,
            "units_per_token": UNITS_PER_TOKEN,
            "token_coverage": TOKEN_COVERAGE,
        },
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info["sm_count"] = prop.multi_processor_count
        info["total_memory_bytes"] = prop.total_memory
    return info


# ----------------------------------------------------------------------------------------- ceilings


def measure_ceilings(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) and dense matmul rates on this device.

    CUDA: a 2 GiB device-to-device copy, a bf16 8192³ matmul (the tensor-core rate) and a float32 matmul
    with TF32 off (the fp32 rate that fp32-operand work is priced at), on random data. CPU: 256 MiB and
    float32 1024³ matmuls (so the code path runs; CPU ceilings only label CPU numbers).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        copy_bytes, n, dtype = (256 << 20) if quick else (2 << 30), (2048 if quick else 8192), torch.bfloat16
    else:
        copy_bytes, n, dtype = (64 << 20) if quick else (256 << 20), (512 if quick else 1024), torch.float32

    def copy_time() -> float:
        src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_(generator=gen)
        dst = torch.empty_like(src)
        return time_fn(lambda: dst.copy_(src), device)[0]

    def matmul_time(dt: torch.dtype, size: int) -> float:  # random data: zeros run faster on some GPUs
        a = torch.randn(size, size, device=device, generator=gen).to(dt)
        b = torch.randn(size, size, device=device, generator=gen).to(dt)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 for the fp32 rate
        try:
            return time_fn(lambda: a @ b, device)[0]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32

    copy_ms = copy_time()
    mm_ms = matmul_time(dtype, n)
    n32 = n // 2 if device.type == "cuda" else n  # fp32 is ~15x slower than bf16 on Hopper: a smaller cube
    mm32_ms = matmul_time(torch.float32, n32)
    free_memory(device)
    return {
        "device": device_name(device),
        "copy_bytes": copy_bytes,
        "copy_ms": copy_ms,
        "bandwidth_GBps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "matmul_n": n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_ms": mm_ms,
        "matmul_TFLOPs": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_fp32_n": n32,
        "matmul_fp32_ms": mm32_ms,
        "matmul_fp32_TFLOPs": 2 * n32**3 / (mm32_ms * 1e-3) / 1e12,
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def ceilings_for(device: torch.device, folder: Path, quick: bool = False) -> dict[str, Any]:
    """The ceilings of this results folder: measured once, then read back from ``ceilings.json``."""
    path = folder / "ceilings.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("device") == device_name(device) and "matmul_fp32_TFLOPs" in cached:
            return cached
    ceil = measure_ceilings(device, quick=quick)
    path.write_text(json.dumps(ceil, indent=2) + "\n")
    return ceil
