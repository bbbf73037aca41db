"""What the C++ extension is built from and how: sources, flags, the build record, the cache key.

One home for these facts, shared by the three ways the extension gets built: ``setup.py`` (ahead of
time, when torch is importable at build time), the compile on first use and ``python -m
mta_kernels.build`` (both through ``mta_kernels._jit``). ``setup.py`` loads this file by path, without
importing the package, so it imports only the standard library at module level (torch inside functions).

Sources (``mta_kernels/csrc``): ``*.cpp`` (op registration, checks shared by CPU and CUDA) and ``cpu/``
always; ``cuda/*.cu`` and ``cuda/*.cpp`` (the glue that may include c10/cuda) only when torch has CUDA and
``nvcc`` is found (``FORCE_CUDA=1`` / ``FORCE_ONLY_CPU=1`` override). See docs/design/layout.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
RECORD_NAME = "_C.build.json"
"""The build record next to the prebuilt ``_C`` (and, as ``build.json``, in a cache folder)."""
JIT_LIBRARY_NAME = "mta_kernels_C"
"""Library name of the build compiled on first use (``<cache>/<key>/mta_kernels_C.so``)."""
OP_NAMESPACE = "mta_kernels_C"
"""The namespace the compiled kernels register (``TORCH_LIBRARY`` in csrc/mta_kernels.cpp)."""

# -O3 -g0: the Python build flags add -g; debug info made _C.so 8.4 MB of which ~160 KB is code, and it
# cost 2.7x the compile CPU time (benchmarks/NOTES.md, "Building the extension").
CXX_FLAGS = ("-O3", "-g0")
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def openmp_flags() -> list[str]:
    """``-fopenmp`` (at::parallel_for), except on macOS or with ``MTA_NO_OPENMP=1``."""
    if sys.platform == "darwin" or _flag("MTA_NO_OPENMP"):
        return []
    return ["-fopenmp"]


def source_files() -> list[Path]:
    """Every file of ``csrc`` that takes part in a build (sources and headers), sorted."""
    return sorted(p for p in CSRC.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def sources_hash() -> str:
    """sha256 over the relative paths and contents of :func:`source_files`."""
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.relative_to(CSRC).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def compiled_sources(with_cuda: bool) -> list[str]:
    """The translation units: ``csrc/*.cpp`` and ``csrc/cpu/*.cpp``, plus ``csrc/cuda/*`` for CUDA."""
    units = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    if with_cuda:
        units += sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))
    return [str(p) for p in units]


def nvcc_path() -> str | None:
    """nvcc of the CUDA toolkit torch would use (``CUDA_HOME``), or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    return nvcc if os.path.isfile(nvcc) else None


def want_cuda() -> bool:
    """Whether a build compiles the CUDA kernels: torch has CUDA and nvcc is found (or FORCE_* says)."""
    import torch

    if _flag("FORCE_ONLY_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and nvcc_path() is not None


def compile_args(with_cuda: bool) -> dict[str, list[str]]:
    """Compiler and linker flags: ``{"cxx": ..., "nvcc": ..., "ld": ..., "defines": ...}``."""
    omp = openmp_flags()
    return {
        "cxx": [*CXX_FLAGS, *omp],
        "nvcc": list(NVCC_FLAGS) if with_cuda else [],
        "ld": omp,
        "defines": ["WITH_CUDA"] if with_cuda else [],
    }


def _cuda_arch_list() -> str:
    """The GPU architectures a CUDA build targets: ``TORCH_CUDA_ARCH_LIST``, else torch's choice, the
    visible GPUs (so a cache shared by nodes with different GPUs keeps one build per set)."""
    import torch

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs
    if not torch.cuda.is_available():
        return "torch default"
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


def python_tag() -> str:
    """The interpreter's ABI (the .so links libtorch_python of this Python), e.g. ``cpython-311``."""
    return sys.implementation.cache_tag


def build_record(with_cuda: bool) -> dict[str, Any]:
    """What a build was made for; stored next to the library and checked before it is loaded."""
    import torch

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_kernels": with_cuda,
        "python": python_tag(),
        "machine": platform.machine(),
        "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
        "flags": compile_args(with_cuda),
        "cuda_arch_list": _cuda_arch_list() if with_cuda else None,
        "sources": sources_hash(),
    }


def record_problem(record: dict[str, Any] | None) -> str | None:
    """Why a build with this record cannot run here (one clause), or None when it matches."""
    import torch

    if record is None:
        return "it has no build record"
    if record.get("torch") != torch.__version__:
        return f"it was built for torch {record.get('torch')}, you have {torch.__version__}"
    if record.get("cuda") != torch.version.cuda:
        return f"it was built for CUDA {record.get('cuda')}, your torch has CUDA {torch.version.cuda}"
    if record.get("python") != python_tag():
        return f"it was built for {record.get('python')}, this is {python_tag()}"
    if record.get("sources") != sources_hash():
        return "it was built from other C++ sources than the installed ones"
    return None


def cache_key(with_cuda: bool) -> str:
    """Folder name of a build in the cache: readable facts, then a hash of the whole record."""
    record = build_record(with_cuda)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    cuda = f"cu{record['cuda']}" if with_cuda else "cpu"
    return f"torch{record['torch']}-{cuda}-{record['python']}-{record['machine']}-{digest}"


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Written last and atomically: a build folder with a record is a complete build."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
