"""The compiled extension: the prebuilt one loads and its build record matches the sources, it registers
its ops, and its CUDA sources compile. Loading without it: tests/test_extension_loading.py."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

import mta_kernels
from mta_kernels import _build_spec, _extension, layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = str(_build_spec.CSRC)
OPS = [
    "validate_layout",
    "token_to_unit",
    "unit_to_seq",
    "offsets_from_lengths",
    "block_diagonal_work_list",
    "char_spans_to_token_ranges",
]


def test_the_prebuilt_extension_runs_the_layout_ops():
    """`make setup` builds _C ahead of time; the first layout op loads it (not a fallback)."""
    if _extension.mode() != "auto":
        pytest.skip("MTA_KERNELS_EXT forces another choice")
    path = layout.extension_path()
    assert path is not None and path.endswith(".so") and os.path.isfile(path), path
    assert _extension.state().kind == "prebuilt" and "mta_kernels._C" in sys.modules
    assert mta_kernels.layout is layout
    for name in OPS:
        for namespace in (torch.ops.mta_kernels, torch.ops.mta_kernels_C):
            assert isinstance(getattr(namespace, name), torch._ops.OpOverloadPacket), name


def test_the_prebuilt_build_record_matches_the_sources():
    """The record next to _C names this torch and the hash of the current csrc (else: `make setup`)."""
    library = _extension.prebuilt_library()
    assert library is not None, "no prebuilt extension: run `make setup`"
    assert _extension.prebuilt_problem(library) is None, (
        f"rebuild the extension (`make setup`): {_extension.prebuilt_problem(library)}"
    )
    record = _build_spec.read_record(library.with_name(_build_spec.RECORD_NAME))
    assert record["torch"] == torch.__version__ and "-g0" in record["flags"]["cxx"]


def test_public_schemas_are_the_compiled_ones():
    """torch.ops.mta_kernels.* (defined in Python) and mta_kernels_C.* (C++) have the same signatures."""
    layout.extension_path()  # loads the compiled library
    for name in OPS:
        public = str(getattr(torch.ops.mta_kernels, name).default._schema)
        compiled = str(getattr(torch.ops.mta_kernels_C, name).default._schema)
        assert public == compiled.replace("mta_kernels_C::", "mta_kernels::"), (public, compiled)
    assert set(_extension.SCHEMAS) == set(OPS)


def test_the_layout_ops_share_their_namespace_with_the_python_custom_ops():
    import mta_kernels.ops  # noqa: F401  (registers the custom ops of ops/)

    custom = ["token_saliency", "span_pool", "span_pool_backward", "structural_loss", "fused_hra"]
    for name in OPS + custom:
        assert isinstance(getattr(torch.ops.mta_kernels, name), torch._ops.OpOverloadPacket), name


def find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    for home in (cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def find_cuda_include() -> str | None:
    """The CUDA toolkit's include dir (nvcc may be a wrapper script, so several places are tried)."""
    homes = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = find_nvcc()
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    dirs = [os.path.join(h, "include") for h in homes if h]
    return next((d for d in dirs if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))), None)


def include_flags() -> list[str]:
    dirs = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], CSRC]
    return [f"-I{d}" for d in dirs]


def run_all(commands: list[list[str]], timeout: float) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
        return list(
            pool.map(lambda c: subprocess.run(c, capture_output=True, text=True, timeout=timeout), commands)
        )


@pytest.mark.slow
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """`nvcc -c` on every csrc/cuda/*.cu against this torch's headers (a CPU wheel's headers suffice,
    as the .cu files include no c10/cuda or ATen/cuda header)."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)")
    sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    assert sources, "no CUDA sources in csrc/cuda"
    # The defines torch's own extension builds pass to nvcc (COMMON_NVCC_FLAGS), plus ours.
    flags = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", ["--expt-relaxed-constexpr"]))
    flags = [f for f in flags if not f.startswith("-std")] + ["-std=c++17", "-O0", "-DWITH_CUDA"]
    commands = [
        [nvcc, "-c", *flags, *include_flags(), src, "-o", str(tmp_path / (os.path.basename(src) + ".o"))]
        for src in sources
    ]
    for src, result in zip(sources, run_all(commands, timeout=300)):
        assert result.returncode == 0, (
            f"nvcc failed on {os.path.relpath(src, ROOT)}:\n{result.stderr[-4000:]}"
        )


def test_cuda_glue_sources_parse(tmp_path):
    """The host-side CUDA sources (csrc/cuda/*.cpp and the CUDA registration of csrc/mta_kernels.cpp)
    parse with WITH_CUDA against this torch's headers and the CUDA toolkit's. A CPU torch wheel lacks
    the generated c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in is put last on the include path."""
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_include = find_cuda_include()
    if cxx is None or cuda_include is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers (cuda_runtime_api.h)")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))) + [os.path.join(CSRC, "mta_kernels.cpp")]
    commands = [
        [cxx, "-fsyntax-only", "-std=c++17", "-DWITH_CUDA", *include_flags(), f"-I{cuda_include}",
         f"-I{tmp_path / 'stub'}", src]
        for src in sources
    ]  # fmt: skip
    for src, result in zip(sources, run_all(commands, timeout=300)):
        assert result.returncode == 0, (
            f"{cxx} failed on {os.path.relpath(src, ROOT)}:\n{result.stderr[-4000:]}"
        )
