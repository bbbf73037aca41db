"""Build script: the package, and the ``mta_kernels._C`` extension when torch is importable at build time.

- Build isolation on (``pip install .``, ``pip install git+...``, ``uv pip install``, the sdist): the
  isolated build environment has no torch, so the wheel carries the C++ sources (``mta_kernels/csrc``)
  and no binary; the extension compiles on first use against the installed torch (or the pure-torch
  fallback runs). No second torch is ever installed for the build.
- ``pip install --no-build-isolation .`` / ``make setup``: torch is importable, so ``_C`` is built ahead
  of time against it, with a build record (``mta_kernels/_C.build.json``) checked at import.

Sources, flags and the record: ``mta_kernels/_build_spec.py`` (loaded by path, without importing the
package). ``MTA_KERNELS_BUILD_EXT=0`` builds no extension even when torch is importable;
``FORCE_CUDA=1`` / ``FORCE_ONLY_CPU=1`` choose the CUDA part; ``MAX_JOBS`` is honoured by ninja.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_build_spec():
    path = ROOT / "mta_kernels" / "_build_spec.py"
    spec = importlib.util.spec_from_file_location("_mta_kernels_build_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(f"mta_kernels: {message}", file=sys.stderr, flush=True)


def _torch_build_extension():
    """torch's cpp_extension, or None when torch is not importable (build isolation)."""
    if os.environ.get("MTA_KERNELS_BUILD_EXT", "auto") == "0":
        _say("MTA_KERNELS_BUILD_EXT=0: building without the C++ extension (it compiles on first use)")
        return None
    try:
        import torch.utils.cpp_extension as cpp_extension
    except ImportError:
        _say(
            "torch is not importable in this build environment (pip's build isolation): building the "
            "package without the C++ extension; it compiles on first use against your torch "
            "(`python -m mta_kernels.build` compiles it ahead, `python -m mta_kernels.info` shows the state)"
        )
        return None
    return cpp_extension


def _extension_and_command(cpp_extension, spec):
    import torch

    with_cuda = spec.want_cuda()
    args = spec.compile_args(with_cuda)
    sources = [os.path.relpath(p, ROOT) for p in spec.compiled_sources(with_cuda)]
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    compile_args = {"cxx": args["cxx"], "nvcc": args["nvcc"]} if with_cuda else {"cxx": args["cxx"]}
    # No -std flag: BuildExtension adds the standard the installed torch was built for.
    extension = kind(
        "mta_kernels._C",
        sources,
        include_dirs=[str(spec.CSRC)],
        define_macros=[(d, None) for d in args["defines"]],
        extra_compile_args=compile_args,
        extra_link_args=args["ld"],
    )

    class BuildWithRecord(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja) that writes the build record next to the library."""

        def build_extension(self, ext):
            _say(
                f"compiling the C++ extension for torch {torch.__version__} "
                f"({'CPU + CUDA' if with_cuda else 'CPU'}, {len(ext.sources)} files, "
                f"MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}); about 1-2 min on 2 cores"
            )
            super().build_extension(ext)
            record = Path(self.get_ext_fullpath(ext.name)).with_name(spec.RECORD_NAME)
            spec.write_record(record, spec.build_record(with_cuda))

        def copy_extensions_to_source(self):  # editable installs and --inplace
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace, regular = self._get_inplace_equivalent(build_py, ext)
                shutil.copyfile(
                    Path(regular).with_name(spec.RECORD_NAME), Path(inplace).with_name(spec.RECORD_NAME)
                )

    return extension, BuildWithRecord.with_options(use_ninja=True)


def main() -> None:
    spec = _load_build_spec()
    cpp_extension = _torch_build_extension()
    if cpp_extension is None:
        setup()
        return
    extension, command = _extension_and_command(cpp_extension, spec)
    setup(ext_modules=[extension], cmdclass={"build_ext": command})


main()
