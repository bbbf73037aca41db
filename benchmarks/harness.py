"""Shared benchmark harness: timing, peak memory, device ceilings, synthetic unit batches, result files.

Every ``bench_*.py`` script describes its cases (shape parameters), how to build the inputs, what each
provider runs and the floor (bytes, FLOPs) of a case; :func:`run_bench` does the rest, the same way for
every op:

1. the device ceilings (copy bandwidth, bf16 matmul rate) are measured ONCE per results folder and
   cached in ``ceilings.json`` there, so every script of one run divides by the same numbers;
2. per case and provider: one checked call (outputs and gradients kept for the cross-provider check;
   it also absorbs compilation and autotuning, timed as ``first_call_s``), one peak-memory call, then
   the timing (``triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8])`` on CUDA, a perf_counter loop
   with the same warm-up/repeat budget on the CPU);
3. an out-of-memory error is recorded as status ``"OOM"``, any other failure as ``"error: ..."``, a
   provider left out for time as ``"skipped: ..."``: a case never silently disappears;
4. the results folder gets ``<name>.json`` and ``<name>.csv`` rewritten after every case (a stage
   killed by a timeout keeps what it measured) and ``<name>_time.png`` / ``<name>_memory.png`` at the end.

Run the scripts as files (``python benchmarks/bench_saliency.py ...``); they import this module as a
sibling. Peak memory is measured on CUDA only (``max_memory_allocated`` after a reset, minus what was
allocated before the call); on the CPU it is recorded as null.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import functools
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PROVIDERS = ("eager_stacked", "eager", "mta_kernels", "compile")  # every provider a bench may have
QUANTILES = (0.5, 0.2, 0.8)

# ------------------------------------------------------------------------------------- unit statistics
# Units per token, per granularity, measured with the package's own extraction + alignment on 64
# English texts of ~207 words, byte-level BPE tokens (benchmarks/NOTES.md, "Units per sequence"):
# words (in_phrases, the published default) 0.626 per token, phrases 0.354 per token, 1.197 tokens per
# word. Fraction of tokens covered: words 0.626 x 1.197 = 0.75 (derived); phrases contain their words plus
# the odd inner punctuation token: 0.78 (estimate). GPT-2's own tokenizer would give ~8% fewer units per
# token (same file): these densities are slightly pessimistic for the fused kernels' work.
UNIT_STATS_SOURCE = "benchmarks/NOTES.md, 'Semantic units' (measured, byte-level BPE)"
UNITS_PER_TOKEN = {"word": 0.626, "phrase": 0.354}
TOKEN_COVERAGE = {"word": 0.75, "phrase": 0.78}

# ------------------------------------------------------------------------------------- model presets
# SPEC §7: widths and mapped layers (indices into Hugging Face hidden_states; the first n_word pairs are
# word level, the rest phrase level). `same_tokenizer` decides whether teacher and student share ranges.


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    student: str
    teacher: str
    d_student: int
    d_teacher: int
    student_layers: tuple[int, ...]
    teacher_layers: tuple[int, ...]
    n_word: int
    same_tokenizer: bool

    @property
    def num_pairs(self) -> int:
        return len(self.student_layers)

    def granularities(self) -> list[str]:
        return ["word" if k < self.n_word else "phrase" for k in range(self.num_pairs)]


PRESETS = {
    "gpt2": Preset("gpt2", "GPT-2 0.1B", "GPT-2-XL 1.5B", 768, 1600, (6, 9, 12), (24, 36, 48), 1, True),
    "qwen": Preset(
        "qwen",
        "Qwen1.5-0.5B",
        "Qwen1.5-1.8B",
        1024,
        2048,
        (14, 16, 18, 20, 22, 24),
        (14, 16, 18, 20, 22, 24),
        1,
        True,
    ),
    "mistral": Preset(
        "mistral",
        "TinyLlama-1.1B",
        "Mistral-7B",
        2048,
        4096,
        (6, 10, 14, 18, 22),
        (8, 14, 20, 26, 32),
        1,
        False,
    ),
    # Tiny stand-in for CPU smoke runs (not a published setting).
    "tiny": Preset("tiny", "tiny student", "tiny teacher", 48, 80, (1, 2, 3), (2, 4, 6), 1, True),
}

# ------------------------------------------------------------------------------------------ devices


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. ``cuda`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_label(device: torch.device) -> str:
    """Which implementation the fused ops run on this device (mta_kernels._dispatch rule)."""
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


# ------------------------------------------------------------------------------------------- timing


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of ``fn``'s run time in milliseconds.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); without triton, the same
    protocol with CUDA events. CPU: a ``perf_counter`` loop with the same warm-up and repeat budgets
    (at least 3 timed runs).
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _time_cuda_events(fn, warmup_ms, rep_ms, grad_to_none)
        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
        p50, p20, p80 = q
        return float(p50), float(p20), float(p80)
    return _time_cpu(fn, warmup_ms, rep_ms, grad_to_none)


def _clear_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def _quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _time_cpu(
    fn: Callable[[], Any], warmup_ms: float, rep_ms: float, grad_to_none: Sequence[torch.Tensor] | None
) -> tuple[float, float, float]:
    _clear_grads(grad_to_none)
    t0 = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(0, int(warmup_ms / estimate_ms) - 1)):
        _clear_grads(grad_to_none)
        fn()
    times: list[float] = []
    n_rep = max(3, int(rep_ms / estimate_ms))
    for _ in range(n_rep):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def _time_cuda_events(
    fn: Callable[[], Any], warmup_ms: float, rep_ms: float, grad_to_none: Sequence[torch.Tensor] | None
) -> tuple[float, float, float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        _clear_grads(grad_to_none)
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    n_rep = max(1, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        _clear_grads(grad_to_none)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def peak_memory_bytes(
    fn: Callable[[], Any], device: torch.device, grad_to_none: Sequence[torch.Tensor] | None = None
) -> int | None:
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before it (CUDA only).

    The inputs (and anything else alive) are in the baseline and so are not counted; what the call
    returns, the autograd graph it keeps and the gradients it writes are.
    """
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    _clear_grads(grad_to_none)
    return int(peak)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- ceilings


def measure_ceilings(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) and dense matmul rate on this device.

    CUDA: a 2 GiB device-to-device copy and a bf16 8192³ matmul on random data. CPU: 256 MiB and a
    float32 1024³ matmul (so the code path runs; CPU ceilings only label CPU numbers).
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

    def matmul_time() -> float:  # random data: zeros run faster than real data on some GPUs
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        return time_fn(lambda: a @ b, device)[0]

    copy_ms = copy_time()
    mm_ms = matmul_time()
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
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def ceilings_for(device: torch.device, folder: Path, quick: bool = False) -> dict[str, Any]:
    """The ceilings of this results folder: measured once, then read back from ``ceilings.json``."""
    path = folder / "ceilings.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("device") == device_name(device):
            return cached
    ceil = measure_ceilings(device, quick=quick)
    path.write_text(json.dumps(ceil, indent=2) + "\n")
    return ceil


# ------------------------------------------------------------------------------- synthetic unit batches


def synth_ranges(
    batch: int, seq_len: int, units_per_seq: int, covered_per_seq: int, generator: torch.Generator
) -> torch.Tensor:
    """Random non-overlapping unit ranges ``[B*units_per_seq, 2]`` (int32, flat indices into ``B*T``).

    Each sequence gets ``units_per_seq`` units covering exactly ``covered_per_seq`` tokens: unit lengths
    are 1 + a multinomial share of the surplus, the ``T - covered`` uncovered tokens are spread over the
    gaps before, between and after the units.
    """
    n, c = units_per_seq, covered_per_seq
    if not 0 <= n <= c <= seq_len:
        raise ValueError(f"need 0 <= units ({n}) <= covered ({c}) <= T ({seq_len})")
    if n == 0:
        return torch.zeros(0, 2, dtype=torch.int32)
    rows = []
    for b in range(batch):
        lengths = torch.ones(n, dtype=torch.int64)
        if c > n:
            lengths += torch.bincount(torch.randint(0, n, (c - n,), generator=generator), minlength=n)
        gaps = torch.bincount(torch.randint(0, n + 1, (seq_len - c,), generator=generator), minlength=n + 1)
        starts = torch.cumsum(gaps[:-1], 0) + torch.cumsum(lengths, 0) - lengths
        rows.append(torch.stack([starts, starts + lengths], 1) + b * seq_len)
    return torch.cat(rows).to(torch.int32)


def units_per_sequence(seq_len: int, granularity: str) -> tuple[int, int]:
    """(units, covered tokens) per sequence of ``seq_len`` tokens, from the measured unit statistics."""
    n = max(0, round(UNITS_PER_TOKEN[granularity] * seq_len))
    c = max(n, round(TOKEN_COVERAGE[granularity] * seq_len))
    return n, min(c, seq_len)


def synth_unit_batch(batch: int, seq_len: int, granularity: str, same_tokenizer: bool, seed: int, device):
    """A ``mta_kernels.layout.UnitBatch`` of synthetic units with the measured density.

    With different tokenizers the teacher's ranges are drawn independently (same unit count per
    sequence, same T): unit u is still unit u on both sides.
    """
    from mta_kernels.layout import UnitBatch

    gen = torch.Generator().manual_seed(seed)
    n, c = units_per_sequence(seq_len, granularity)
    student = synth_ranges(batch, seq_len, n, c, gen)
    teacher = student if same_tokenizer else synth_ranges(batch, seq_len, n, c, gen)
    cu = torch.arange(0, (batch + 1) * n, n, dtype=torch.int32)
    ub = UnitBatch(student, teacher, cu, seq_len, seq_len)
    return ub.to(device)


def random_hidden(shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Hidden states with a shared direction plus noise (cosines away from 0, like real activations)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(shape[-1], device=device, generator=gen)
    h = torch.randn(*shape, device=device, generator=gen) + 0.5 * base
    return h.to(dtype)


# ------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class BenchSpec:
    """What a bench script provides to :func:`run_bench`.

    build(params) -> inputs (any object; ``inputs["grad_leaves"]``, if present, lists the tensors
        whose gradients the timed call writes: they are reset between runs and compared across
        providers);
    make_fn(provider, params, inputs) -> a zero-argument callable that does the timed work (forward,
        or forward + backward) and returns the forward output (compared across providers);
    floor(params, inputs) -> (bytes, flops) the fewest bytes any implementation must move through
        device memory and the FLOPs it must do (see benchmarks/NOTES.md for each formula).
    """

    name: str
    build: Callable[[dict[str, Any]], dict[str, Any]]
    make_fn: Callable[[str, dict[str, Any], dict[str, Any]], Callable[[], Any]]
    floor: Callable[[dict[str, Any], dict[str, Any]], tuple[float, float]]
    providers: Sequence[str]


def op_providers(
    op: str, fused_module: str, more_references: dict[str, str] | None = None
) -> Callable[[str], Callable[..., Any]]:
    """The function each provider of a one-op bench times, by provider name.

    ``eager``: ``mta_kernels.reference.<op>``; ``compile``: that function under ``torch.compile``
    (compiled on first use, once per returned picker, i.e. once per ``make_spec``); ``mta_kernels``: the
    fused op ``<fused_module>.<op>``; ``more_references`` maps further provider names to other
    ``mta_kernels.reference`` functions (e.g. ``{"eager_stacked": "structural_loss_stacked"}``). Any
    other name is a ValueError. The package is imported when a function is picked, not here.
    """

    @functools.cache
    def compiled() -> Callable[..., Any]:
        from mta_kernels import reference

        return torch.compile(getattr(reference, op))

    def pick(provider: str) -> Callable[..., Any]:
        from mta_kernels import reference

        if provider == "eager":
            return getattr(reference, op)
        if more_references and provider in more_references:
            return getattr(reference, more_references[provider])
        if provider == "compile":
            return compiled()
        if provider == "mta_kernels":
            return getattr(importlib.import_module(fused_module), op)
        raise ValueError(provider)

    return pick


def forward_or_train(
    mode: str, forward: Callable[[], Any], backward: Callable[[Any], None]
) -> Callable[[], Any]:
    """The timed call of a ``mode`` = ``"fwd"`` / ``"fwd+bwd"`` case: ``forward`` alone, or ``forward``
    then ``backward(output)``; either returns the forward output (compared across providers)."""
    if mode == "fwd":
        return forward

    def fwd_bwd() -> Any:
        out = forward()
        backward(out)
        return out

    return fwd_bwd


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--out", default=None, help="results folder (default: results/<device>-<date>)")
    parser.add_argument("--tag", default=None, help="suffix of the result file names")
    parser.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-seconds", type=float, default=float("inf"), help="time budget for the cases")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-check", action="store_true", help="skip the cross-provider value check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch intra-op threads (default 1: stable when shared)",
    )
    parser.add_argument("--words-per-token", type=float, default=None, help="override the measured density")
    parser.add_argument("--phrases-per-token", type=float, default=None, help="override the measured density")


def apply_threads(args: argparse.Namespace, device: torch.device) -> None:
    """On the CPU, few threads: several spinning intra-op threads on a busy machine inflate timings 10x."""
    if device.type == "cpu":
        torch.set_num_threads(getattr(args, "threads", None) or 1)


def apply_unit_overrides(args: argparse.Namespace) -> None:
    if args.words_per_token is not None:
        UNITS_PER_TOKEN["word"] = args.words_per_token
        TOKEN_COVERAGE["word"] = max(TOKEN_COVERAGE["word"], args.words_per_token)
    if args.phrases_per_token is not None:
        UNITS_PER_TOKEN["phrase"] = args.phrases_per_token
        TOKEN_COVERAGE["phrase"] = max(TOKEN_COVERAGE["phrase"], args.phrases_per_token)


def configure_compile() -> None:
    """Let torch.compile recompile per case instead of silently falling back to eager after 8 shapes."""
    import logging

    import torch._dynamo.config as dc

    # Graph-break warnings of the reference (`.tolist()`, boolean indexing) would flood the GPU log.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dc, name):
            setattr(dc, name, 1024)
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dc, name):
            setattr(dc, name, 4096)


def _collect_values(out: Any, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Forward output(s) and the gradients of the leaves, as float32 CPU tensors."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    vals = [o.detach().float().cpu() for o in outs if isinstance(o, torch.Tensor)]
    vals += [t.grad.detach().float().cpu() for t in leaves if t.grad is not None]
    return vals


def _rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    worst = 0.0
    for x, y in zip(a, b):
        if not torch.isfinite(x).all():
            return float("inf")
        den = max(float(y.norm()), 1e-12)
        worst = max(worst, float((x - y).norm()) / den)
    return worst


def _error_status(exc: BaseException) -> str:
    if is_oom(exc):
        return "OOM"
    msg = " ".join(str(exc).split())
    return f"error: {type(exc).__name__}: {msg[:300]}"


def run_provider(
    spec: BenchSpec,
    provider: str,
    params: dict[str, Any],
    inputs: dict[str, Any],
    device: torch.device,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """Check call, memory call and timing of one provider on one case. Never raises (OOM -> "OOM")."""
    rec: dict[str, Any] = {"provider": provider, "status": "ok"}
    leaves = list(inputs.get("grad_leaves", ()))
    vals = None
    fn = None
    try:
        fn = spec.make_fn(provider, params, inputs)
        _clear_grads(leaves)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        rec["first_call_s"] = round(time.perf_counter() - t0, 4)
        if not args.no_check:
            vals = _collect_values(out, list(inputs.get("check_leaves", leaves)))
        del out
        _clear_grads(leaves)
        rec["peak_mem_bytes"] = peak_memory_bytes(fn, device, leaves)
        p50, p20, p80 = time_fn(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, grad_to_none=leaves)
        rec.update(ms_p50=p50, ms_p20=p20, ms_p80=p80)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, never dropped
        rec["status"] = _error_status(exc)
        vals = None
    finally:
        del fn
        _clear_grads(leaves)
        free_memory(device)
    return rec, vals


def _add_ratios(records: list[dict[str, Any]], check_ref: str = "eager") -> None:
    """Speed-up and memory ratio of every provider against every other one of the same case."""
    by_p = {r["provider"]: r for r in records}
    for r in records:
        for q, other in by_p.items():
            if q == r["provider"]:
                continue
            if r.get("ms_p50") and other.get("ms_p50"):
                r[f"speedup_vs_{q}"] = other["ms_p50"] / r["ms_p50"]
            if r.get("peak_mem_bytes") and other.get("peak_mem_bytes"):
                r[f"mem_ratio_vs_{q}"] = other["peak_mem_bytes"] / r["peak_mem_bytes"]


def _add_floor(rec: dict[str, Any], bytes_: float, flops: float, ceil: dict[str, Any]) -> None:
    bw = ceil["bandwidth_GBps"] * 1e9
    peak = ceil["matmul_TFLOPs"] * 1e12
    floor_ms = max(bytes_ / bw, flops / peak) * 1e3
    rec.update(floor_bytes=bytes_, floor_flops=flops, floor_ms=floor_ms)
    if rec.get("ms_p50"):
        s = rec["ms_p50"] * 1e-3
        rec.update(GBps=bytes_ / s / 1e9, TFLOPs=flops / s / 1e12)
        rec["pct_of_floor"] = 100.0 * floor_ms / rec["ms_p50"]


def run_bench(
    spec: BenchSpec,
    cases: Sequence[dict[str, Any]],
    args: argparse.Namespace,
    *,
    skip: Callable[[str, dict[str, Any]], str | None] | None = None,
    post: Callable[[list[dict[str, Any]]], None] | None = None,
    late: Sequence[str] = ("compile",),
) -> Path:
    """Run every case with every provider; write ``<name>[_<tag>].json/.csv`` and plots; return the JSON.

    Two passes: first every case with the providers not in ``late``, then every case with the ``late``
    ones (torch.compile: its compilation costs seconds to minutes per shape), so that a time budget
    cut spends the time on the cheap measurements of every shape first. ``skip(provider, params)`` may
    return a reason to leave a provider out of a case (recorded as ``"skipped: <reason>"``); once
    ``--max-seconds`` is spent, what is left is recorded as ``"skipped: time budget"``. Results are
    rewritten after every provider. ``post(case_records)`` may add derived columns to a case.
    """
    device = pick_device(args.device)
    apply_threads(args, device)
    apply_unit_overrides(args)
    configure_compile()
    folder = results_dir(device, args.out)
    ceil = ceilings_for(device, folder, quick=args.quick)
    providers = [p for p in spec.providers if not args.providers or p in args.providers.split(",")]
    passes = [[p for p in providers if p not in late], [p for p in providers if p in late]]
    stem = spec.name + (f"_{args.tag}" if args.tag else "")
    json_path = folder / f"{stem}.json"
    meta = {
        "bench": spec.name,
        "tag": args.tag,
        "quick": args.quick,
        "dtype": args.dtype,
        "providers": providers,
        "argv": sys.argv,
        "env": environment(device),
        "ceilings": ceil,
        "timing": {
            "method": "triton.testing.do_bench" if device.type == "cuda" else "perf_counter loop",
            "quantiles": QUANTILES,
            "warmup_ms": args.warmup_ms,
            "rep_ms": args.rep_ms,
            "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        },
    }
    deadline = time.monotonic() + args.max_seconds
    print(f"[{stem}] device={meta['env']['device']} results={folder}", flush=True)
    print(
        f"[{stem}] ceilings: copy {ceil['bandwidth_GBps']:.0f} GB/s, "
        f"{ceil['matmul_dtype']} matmul {ceil['matmul_TFLOPs']:.1f} TFLOP/s",
        flush=True,
    )
    by_case: list[dict[str, dict[str, Any]]] = [{} for _ in cases]  # case -> provider -> record
    ref_values: list[list[torch.Tensor] | None] = [None for _ in cases]  # "eager"'s outputs, for the check

    def flat() -> list[dict[str, Any]]:
        return [by_case[i][p] for i in range(len(cases)) for p in providers if p in by_case[i]]

    for pass_providers in passes:
        if not pass_providers:
            continue
        for i, params in enumerate(cases):
            recs = by_case[i]
            inputs, build_status = None, None
            wanted = [p for p in pass_providers if not (skip and skip(p, params))]
            if wanted and time.monotonic() < deadline:
                try:
                    inputs = spec.build(params)
                except Exception as exc:  # noqa: BLE001
                    build_status = _error_status(exc)
                    free_memory(device)
            values: dict[str, list[torch.Tensor]] = {}
            for provider in pass_providers:
                reason = skip(provider, params) if skip else None
                if reason:
                    rec = {"provider": provider, "status": f"skipped: {reason}"}
                elif time.monotonic() >= deadline:
                    rec = {"provider": provider, "status": "skipped: time budget"}
                elif build_status is not None:
                    rec = {"provider": provider, "status": f"inputs: {build_status}"}
                else:
                    rec, vals = run_provider(spec, provider, params, inputs, device, args)
                    if vals is not None:
                        values[provider] = vals
                        if provider == "eager":
                            ref_values[i] = vals
                rec = {**params, **rec}
                if inputs is not None:
                    _add_floor(rec, *spec.floor(params, inputs), ceil)
                recs[provider] = rec
                write_results(json_path, meta, flat())  # partial: a killed stage keeps what it measured
            ref = "eager" if ref_values[i] is not None else next(iter(values), None)
            for provider, vals in values.items():
                ref_vals = ref_values[i] if ref == "eager" else values[ref]
                recs[provider]["check_ref"] = ref
                recs[provider]["rel_err_vs_ref"] = _rel_err(vals, ref_vals)
            case_records = [recs[p] for p in providers if p in recs]
            _add_ratios(case_records)
            if post:
                post(case_records)
            if pass_providers is passes[0] and not any(not (skip and skip(p, params)) for p in passes[1]):
                ref_values[i] = None  # no later pass needs it
            del inputs, values
            free_memory(device)
            _print_case(stem, [recs[p] for p in pass_providers])
            write_results(json_path, meta, flat())
    if not args.no_plots:
        try:
            plot_results(json_path)
        except Exception as exc:  # noqa: BLE001 - a plot failure must not lose the numbers
            print(f"[{stem}] plotting failed: {exc!r}", flush=True)
    print(f"[{stem}] wrote {json_path}", flush=True)
    return json_path


def case_label(rec: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    keys = keys or [k for k in CASE_KEYS if k in rec]
    text = " ".join(f"{k}={rec[k]}" for k in keys if k in rec and k != "T")
    return text + (f" T={rec['T']}" if "T" in rec else "")


# A relative error against the eager reference above this is flagged in the log (bf16 inputs: ~1e-3).
CHECK_WARN = 5e-2

# Parameters that identify a case (everything else in a record is a measurement).
CASE_KEYS = ("case", "preset", "mode", "gran", "L", "K", "B", "T", "D", "Ds", "Dt", "units_per_seq")


def _print_case(stem: str, recs: list[dict[str, Any]]) -> None:
    print(f"[{stem}] {case_label(recs[0])}", flush=True)
    for r in recs:
        if r["status"] == "ok":
            mem = r.get("peak_mem_bytes")
            mem_s = f"{mem / 2**20:9.1f} MiB" if mem is not None else "      n/a    "
            err = r.get("rel_err_vs_ref")
            err_s = f"rel.err {err:.1e}" if isinstance(err, float) else ""
            if isinstance(err, float) and not err <= CHECK_WARN:
                err_s += f"  <-- CHECK: differs from {r.get('check_ref')}"
            print(
                f"    {r['provider']:14s} {r['ms_p50']:10.4f} ms [{r['ms_p20']:.4f}, {r['ms_p80']:.4f}]"
                f" {mem_s}  floor {r.get('pct_of_floor', float('nan')):5.1f}%  {err_s}",
                flush=True,
            )
        else:
            print(f"    {r['provider']:14s} {r['status']}", flush=True)


# ------------------------------------------------------------------------------------- result files


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


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def main_ceilings(argv: Sequence[str] | None = None) -> None:
    """``python benchmarks/harness.py --ceilings``: measure (or read back) a results folder's ceilings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ceilings", action="store_true", required=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    folder = results_dir(device, args.out)
    ceil = ceilings_for(device, folder, quick=args.quick)
    (folder / "environment.json").write_text(json.dumps(environment(device), indent=2) + "\n")
    print(json.dumps(ceil, indent=2))


if __name__ == "__main__":
    main_ceilings()
