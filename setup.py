"""Build script for the ``mta_kernels._C`` extension.

The CPU part of ``csrc/`` is always built; the CUDA part is added when torch was built with CUDA
and ``nvcc`` is found. ``FORCE_CUDA=1`` builds CUDA even without a visible GPU, ``FORCE_ONLY_CPU=1``
skips it. ``MAX_JOBS`` is honoured by ninja. Build with the torch that is installed:
``pip install --no-build-isolation -e .``.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only on a broken build environment
    sys.exit(
        "mta_kernels: torch is not importable; install torch first, then build with "
        "`pip install --no-build-isolation -e .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _want_cuda() -> bool:
    if _flag("FORCE_ONLY_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _openmp_flags() -> list[str]:
    if sys.platform == "darwin" or _flag("MTA_NO_OPENMP"):
        return []
    return ["-fopenmp"]


def make_extension():
    # csrc/*.cpp: op registration and the checks shared by CPU and CUDA; csrc/cpu: CPU kernels;
    # csrc/cuda: CUDA kernels (*.cu) and the glue that may include c10/cuda (*.cpp), CUDA builds only.
    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    omp = _openmp_flags()
    # No -std flag: BuildExtension adds the standard the installed torch was built for (C++17 on older
    # torch, C++20 on newer), which its headers need.
    cxx = ["-O3", *omp]
    define_macros = []
    if _want_cuda():
        sources += sorted(
            glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
        )
        define_macros.append(("WITH_CUDA", None))
        nvcc = ["-O3", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "mta_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=omp,
        )
    return CppExtension(
        "mta_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=omp,
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
