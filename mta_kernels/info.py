"""What is installed and what runs: ``python -m mta_kernels.info`` and ``mta_kernels.info()``.

Versions (package, Python, torch, CUDA, Triton), the C++ extension's state (prebuilt, compiled on first
use, or the pure-torch fallback; its file and the torch it was built for), the implementation each op
uses on CPU and on CUDA, the compiler and ninja, and the cache folder. Nothing is compiled or loaded
unless asked (``--load`` / ``load=True``): before the first layout op the state says what *will* run.

``mta_kernels.info()`` returns the facts as a dict (this module is callable); :func:`summary` is the
one-line form that ``mta-distill`` prints at start-up.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import torch

from mta_kernels import _build_spec as spec
from mta_kernels import _extension, _jit

KIND_LABEL = {"prebuilt": "C++ (prebuilt)", "jit": "C++ (compiled on first use)", "torch": "torch (fallback)"}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(command: list[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _built_for(record: dict | None) -> str | None:
    if not record:
        return None
    kernels = "CPU and CUDA kernels" if record.get("cuda_kernels") else "CPU kernels"
    cuda = f", CUDA {record['cuda']}" if record.get("cuda") else ""
    return f"torch {record.get('torch')}{cuda}, {record.get('python')}, {kernels}"


def _prebuilt_facts() -> dict[str, Any] | None:
    """The prebuilt extension's file, the torch it was built for and why it cannot run (or None)."""
    library = _extension.prebuilt_library()
    if library is None:
        return None
    record = spec.read_record(library.with_name(spec.RECORD_NAME))
    problem = _extension.prebuilt_problem(library)
    return {"path": str(library), "built_for": _built_for(record), "problem": problem}


def _extension_facts(load: bool) -> dict[str, Any]:
    try:
        mode = _extension.mode()
    except _extension.ExtensionUnavailable as exc:  # what is installed still says where to look
        return {"mode": os.environ.get("MTA_KERNELS_EXT"), "state": "error", "error": str(exc),
                "prebuilt": _prebuilt_facts()}  # fmt: skip
    if load:
        try:
            _extension.load()
        except _extension.ExtensionUnavailable as exc:
            return {"mode": mode, "state": "error", "error": str(exc), "prebuilt": _prebuilt_facts()}
    library = _extension.prebuilt_library()
    prebuilt = _prebuilt_facts()
    with_cuda = spec.want_cuda()
    folder = _jit.build_folder(with_cuda)
    jit = {"folder": str(folder), "built": _jit.is_complete(folder), "cuda_kernels": with_cuda}
    facts: dict[str, Any] = {"mode": mode, "prebuilt": prebuilt, "jit": jit}
    current = _extension.state()
    if current is not None:  # chosen in this process
        facts.update(
            state=current.kind,
            loaded=current.kind != "torch",
            path=current.path,
            built_for=_built_for(current.record),
            cuda_kernels=current.cuda_kernels,
            notes=list(current.notes),
        )
        return facts
    # Not chosen yet: what the first layout op will do (the same steps as _extension.load).
    problem = _jit.toolchain_problem() or (None if jit["built"] else _jit.cache_problem())
    facts.update(loaded=False, notes=[])
    if mode == "torch":
        facts.update(
            state="torch", path=None, built_for=None, cuda_kernels=False, notes=["MTA_KERNELS_EXT=torch"]
        )
    elif mode in ("auto", "prebuilt") and prebuilt and not prebuilt["problem"]:
        record = spec.read_record(library.with_name(spec.RECORD_NAME))
        facts.update(state="prebuilt", path=str(library), built_for=prebuilt["built_for"])
        facts["cuda_kernels"] = bool(record and record.get("cuda_kernels"))
    elif mode == "prebuilt":
        facts.update(state="error", error="MTA_KERNELS_EXT=prebuilt, but no usable prebuilt extension")
    elif jit["built"]:
        record = spec.read_record(folder / _jit.RECORD)
        facts.update(state="jit", path=str(folder / _jit.LIBRARY), built_for=_built_for(record))
        facts["cuda_kernels"] = with_cuda
    elif problem is None:
        facts.update(state="jit", path=None, built_for=None, cuda_kernels=with_cuda)
        facts["notes"].append(
            "not compiled yet: compiles at the first layout op (or `python -m mta_kernels.build`)"
        )
    elif mode == "jit":
        facts.update(
            state="error", error=f"MTA_KERNELS_EXT=jit, but the extension cannot be compiled: {problem}"
        )
    else:
        facts.update(state="torch", path=None, built_for=None, cuda_kernels=False)
        facts["notes"].append(f"the extension cannot be compiled: {problem}")
    if prebuilt and prebuilt["problem"] and mode == "auto":
        facts["notes"].insert(0, f"the prebuilt extension is not used: {prebuilt['problem']}")
    return facts


def _backends(ext: dict[str, Any], triton: str | None) -> dict[str, dict[str, str]]:
    has_cuda = torch.version.cuda is not None
    layout_cpu = KIND_LABEL.get(ext.get("state", ""), "unavailable")
    if not has_cuda:
        layout_cuda = fused_cuda = "n/a (torch without CUDA)"
    else:
        layout_cuda = (
            layout_cpu if ext.get("cuda_kernels") or ext.get("state") == "torch" else "torch (fallback)"
        )
        fused_cuda = "Triton" if triton else "torch (Triton not installed)"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and triton
    return {
        "layout ops": {"cpu": layout_cpu, "cuda": layout_cuda},
        "fused ops": {"cpu": "Triton (interpreter)" if interpreting else "torch", "cuda": fused_cuda},
    }


def info(load: bool = False) -> dict[str, Any]:
    """The facts as a dict (JSON-serialisable). ``load=True`` makes the extension's choice first (which
    may compile it); otherwise the state says what the first layout op will run."""
    import mta_kernels

    triton = _version("triton") if importlib.util.find_spec("triton") else None
    ext = _extension_facts(load)
    command, path = _jit.compiler()
    ninja = _jit.ninja()
    return {
        "mta_kernels": mta_kernels.__version__,
        "package": str(Path(mta_kernels.__file__).parent),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": triton,
        "extension": ext,
        "backends": _backends(ext, triton),
        "compiler": {
            "command": command,
            "path": path,
            "version": _first_line([path, "--version"]) if path else None,
        },
        "ninja": {"path": ninja, "version": _first_line([ninja, "--version"]) if ninja else None},
        "nvcc": spec.nvcc_path() if torch.version.cuda else None,
        "cache": str(_jit.cache_root()),
    }


def _state_phrase(ext: dict[str, Any]) -> str:
    state = ext.get("state")
    if state == "error":
        return f"error: {ext.get('error')}"
    if state == "torch":
        return "pure-torch fallback"
    label = "prebuilt" if state == "prebuilt" else "compiled on first use"
    if ext.get("loaded"):
        return f"{label}, loaded ({ext.get('path')})"
    if ext.get("path") is None:
        return f"{label}: not compiled yet, compiles at the first layout op"
    return f"{label}, loads at the first layout op ({ext.get('path')})"


def summary(facts: dict[str, Any] | None = None) -> str:
    """One line: versions, the extension's state and the torch it was built for, the ops' backends."""
    f = facts or info()
    ext, be = f["extension"], f["backends"]
    parts = [
        f"mta_kernels {f['mta_kernels']}",
        f"torch {f['torch']} (CUDA {f['cuda'] or 'none'})",
        f"triton {f['triton'] or 'not installed'}",
        f"C++ extension: {_state_phrase(ext)}"
        + (f", built for {ext['built_for']}" if ext.get("built_for") else ""),
        f"layout ops: CPU {be['layout ops']['cpu']}, CUDA {be['layout ops']['cuda']}",
        f"fused ops: CPU {be['fused ops']['cpu']}, CUDA {be['fused ops']['cuda']}",
    ]
    return " | ".join(parts)


def format_report(f: dict[str, Any]) -> str:
    """The multi-line report of ``python -m mta_kernels.info``."""
    ext, be = f["extension"], f["backends"]
    lines = [
        f"mta_kernels  {f['mta_kernels']} ({f['package']})",
        f"python       {f['python']}",
        f"torch        {f['torch']} (CUDA {f['cuda'] or 'none'}; GPU {f['gpu'] or 'none'})",
        f"triton       {f['triton'] or 'not installed (pip install mta_kernels[triton])'}",
        f"extension    {_state_phrase(ext)}",
    ]
    if ext.get("built_for"):
        lines.append(f"             built for {ext['built_for']}")
    lines.append(f"             MTA_KERNELS_EXT={ext.get('mode', '?')}")
    lines += [f"             note: {n}" for n in ext.get("notes", [])]
    if ext.get("prebuilt"):
        p = ext["prebuilt"]
        verdict = f"not usable: {p['problem']}" if p["problem"] else "matches this torch"
        lines.append(f"prebuilt     {p['path']} ({verdict})")
    else:
        lines.append("prebuilt     none (the package was built without torch: build isolation)")
    jit = ext.get("jit") or {}
    if jit:
        lines.append(f"jit build    {jit['folder']} ({'built' if jit['built'] else 'not built'})")
    lines += [
        f"layout ops   CPU: {be['layout ops']['cpu']}; CUDA: {be['layout ops']['cuda']}",
        "             (validate_layout, token_to_unit, unit_to_seq, offsets_from_lengths, the work lists,",
        "             char_spans_to_token_ranges)",
        f"fused ops    CPU: {be['fused ops']['cpu']}; CUDA: {be['fused ops']['cuda']}",
        "             (token_saliency, span_pool, structural_loss, fused_hra and the glue between them)",
    ]
    cxx = f["compiler"]
    found = f"{cxx['path']} ({cxx['version']})" if cxx["path"] else "NOT FOUND"
    lines.append(f"compiler     {cxx['command']}: {found}")
    nj = f["ninja"]
    lines.append(f"ninja        {nj['path']} ({nj['version']})" if nj["path"] else "ninja        NOT FOUND")
    if f["cuda"]:
        lines.append(f"nvcc         {f['nvcc'] or 'NOT FOUND (the CUDA kernels need it: set CUDA_HOME)'}")
    lines.append(f"cache        {f['cache']} (MTA_KERNELS_CACHE, else XDG_CACHE_HOME/mta_kernels)")
    if ext.get("state") == "torch" and ext.get("mode") != "torch":
        lines.append(f"hint         {_extension.INSTALL_HINT.split(';')[0]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mta_kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    parser.add_argument(
        "--load", action="store_true", help="load the extension first (compiles it if needed)"
    )
    parser.add_argument("--line", action="store_true", help="print the one-line summary")
    args = parser.parse_args(argv)
    facts = info(load=args.load)
    if args.json:
        print(json.dumps(facts, indent=1))
    elif args.line:
        print(summary(facts))
    else:
        print(format_report(facts))
    return 1 if facts["extension"].get("state") == "error" else 0


class _CallableModule(types.ModuleType):
    """``mta_kernels.info()`` calls :func:`info`; ``python -m mta_kernels.info`` runs :func:`main`."""

    def __call__(self, load: bool = False) -> dict[str, Any]:
        return info(load=load)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
