"""Which implementation of the layout ops runs: the compiled extension or the pure-torch fallback.

The public ops ``torch.ops.mta_kernels.{validate_layout, token_to_unit, unit_to_seq,
offsets_from_lengths, block_diagonal_work_list, char_spans_to_token_ranges}`` are defined here, with
the schemas of the compiled ones (``csrc/mta_kernels.cpp`` registers those under ``mta_kernels_C``).
Their CPU and CUDA kernels are small Python functions that pass each call to the implementation chosen
at the first call, once per process (:func:`load`), so importing the package never compiles nor loads a
library, ``torch.compile`` and the fake implementations see one op whatever runs, and the CUDA tensors
can run the fallback while the CPU ones run C++ (an extension built without CUDA).

The choice, ``MTA_KERNELS_EXT`` = ``auto`` (default):

1. the prebuilt ``mta_kernels._C`` (built by ``setup.py`` where torch was importable at build time),
   if its build record matches the installed torch, CUDA, Python and C++ sources;
2. else the build compiled on first use (``mta_kernels._jit``: from the cache, or compiled now with
   ninja, announced on stderr);
3. else the pure-torch ops (``mta_kernels._layout_fallback``: same results, slower), with one warning
   that says why and what to install.

``prebuilt`` and ``jit`` allow only that step and raise :class:`ExtensionUnavailable` when it fails;
``torch`` runs the fallback without a warning. See docs/design/layout.md.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mta_kernels import _build_spec as spec
from mta_kernels import _jit
from mta_kernels import _layout_fallback as fallback

SCHEMAS = {
    "validate_layout": "validate_layout(Tensor ranges, Tensor cu_units, int num_tokens, int seq_len) -> ()",
    "token_to_unit": "token_to_unit(Tensor ranges, int num_tokens) -> Tensor",
    "unit_to_seq": "unit_to_seq(Tensor cu_units, int? num_units=None) -> Tensor",
    "offsets_from_lengths": "offsets_from_lengths(Tensor lengths) -> Tensor",
    "block_diagonal_work_list": "block_diagonal_work_list(Tensor cu_units, int block_m) -> Tensor",
    "char_spans_to_token_ranges": (
        "char_spans_to_token_ranges(Tensor codepoints, Tensor cu_chars, Tensor offsets, Tensor spans, "
        "Tensor cu_spans) -> Tensor"
    ),
}
"""The public ops and their schemas, the same as the compiled ones (a test compares them)."""
CPU_ONLY = frozenset({"char_spans_to_token_ranges"})  # host preprocessing of tokenizer output
MODES = ("auto", "prebuilt", "jit", "torch")
INSTALL_HINT = (
    "To compile the extension, install a C++ compiler (g++ or clang++; CXX picks one) and run "
    "`python -m mta_kernels.build`; `python -m mta_kernels.info` shows the state"
)


class ExtensionUnavailable(RuntimeError):
    """``MTA_KERNELS_EXT`` asked for an implementation that cannot be used here."""


class ExtensionFallbackWarning(RuntimeWarning):
    """The layout ops run in plain torch because the compiled extension is not available."""


@dataclass
class ExtensionState:
    """What runs the layout ops in this process.

    Attributes:
        mode: ``MTA_KERNELS_EXT`` (``auto``, ``prebuilt``, ``jit``, ``torch``).
        kind: ``"prebuilt"``, ``"jit"`` (compiled on first use) or ``"torch"`` (the fallback).
        path: the library file, None for the fallback.
        record: its build record (``torch``, ``cuda``, ``cuda_kernels``, ... see ``_build_spec``).
        notes: one line each: why an earlier step was not taken.
        compile_seconds: the compile time when it was compiled in this process.
    """

    mode: str
    kind: str
    path: str | None = None
    record: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    compile_seconds: float | None = None

    @property
    def cuda_kernels(self) -> bool:
        return bool(self.record and self.record.get("cuda_kernels"))


def mode() -> str:
    """``MTA_KERNELS_EXT``, checked."""
    value = os.environ.get("MTA_KERNELS_EXT", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ExtensionUnavailable(f"MTA_KERNELS_EXT must be one of {', '.join(MODES)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------ the choice
_lock = threading.RLock()
_state: ExtensionState | None = None


def state() -> ExtensionState | None:
    """The choice made in this process, or None before the first layout op ran (see :func:`load`)."""
    return _state


def load() -> ExtensionState:
    """Make the choice (once per process; may compile the extension) and return it."""
    global _state
    with _lock:
        if _state is None:
            _state = _choose(mode())
    return _state


def prebuilt_library() -> Path | None:
    """The file of the prebuilt ``mta_kernels._C``, if the package has one."""
    try:
        found = importlib.util.find_spec("mta_kernels._C")
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin else None


def prebuilt_problem(library: Path) -> str | None:
    """Why the prebuilt extension cannot run here (its build record does not match), or None."""
    return spec.record_problem(spec.read_record(library.with_name(spec.RECORD_NAME)))


def _load_prebuilt(current_mode: str) -> tuple[ExtensionState | None, str | None]:
    """(the state, None) when the prebuilt extension loads; else (None, why not) or (None, None) if absent."""
    library = prebuilt_library()
    if library is None:
        return None, None
    problem = prebuilt_problem(library)
    if problem is None:
        try:
            importlib.import_module("mta_kernels._C")
        except (ImportError, OSError) as exc:
            problem = f"it could not be loaded ({str(exc).splitlines()[0][:200]})"
    if problem:
        return None, f"the prebuilt extension {library.name} is not used: {problem}"
    record = spec.read_record(library.with_name(spec.RECORD_NAME))
    return ExtensionState(current_mode, "prebuilt", str(library), record), None


def _choose(current_mode: str) -> ExtensionState:
    if current_mode == "torch":
        return ExtensionState(current_mode, "torch", notes=["MTA_KERNELS_EXT=torch"])
    notes: list[str] = []
    if current_mode in ("auto", "prebuilt"):
        loaded, why = _load_prebuilt(current_mode)
        if loaded is not None:
            return loaded
        if current_mode == "prebuilt":
            raise ExtensionUnavailable(
                f"MTA_KERNELS_EXT=prebuilt: {why or 'the package has no prebuilt extension (mta_kernels._C)'}"
            )
        if why:
            notes.append(why)
    try:
        built = _jit.build(reason=f"{notes[0]}: " if notes else "")
        return ExtensionState(
            current_mode, "jit", str(built.library), built.record, notes, compile_seconds=built.seconds
        )
    except _jit.BuildUnavailable as exc:
        if current_mode == "jit":
            raise ExtensionUnavailable(
                f"MTA_KERNELS_EXT=jit: the extension cannot be compiled: {exc}"
            ) from exc
        notes.append(f"the extension cannot be compiled: {exc}")
    warnings.warn(
        f"mta_kernels: the layout ops run in plain torch (same results, slower): {'; '.join(notes)}. "
        f"{INSTALL_HINT}.",
        ExtensionFallbackWarning,
        stacklevel=2,
    )
    return ExtensionState(current_mode, "torch", notes=notes)


# ------------------------------------------------------------------------- the ops and their routing
def _compiled_ops() -> types.SimpleNamespace:
    namespace = getattr(torch.ops, spec.OP_NAMESPACE)
    return types.SimpleNamespace(**{name: getattr(namespace, name).default for name in SCHEMAS})


_implementations: dict[str, Any] = {}  # device type -> an object with one callable per op


def implementation(device_type: str) -> Any:
    """What runs the layout ops on tensors of ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    impl = _implementations.get(device_type)
    if impl is not None:
        return impl
    with _lock:
        if device_type not in _implementations:
            current = load()
            if current.kind == "torch":
                impl = fallback
            elif device_type == "cuda" and not current.cuda_kernels:
                warnings.warn(
                    "mta_kernels: the C++ extension was built without CUDA kernels (no nvcc at build "
                    "time), so the layout ops on CUDA tensors run in plain torch; build with nvcc found "
                    "(CUDA_HOME) for the CUDA kernels",
                    ExtensionFallbackWarning,
                    stacklevel=3,
                )
                impl = fallback
            else:
                impl = _compiled_ops()
            _implementations[device_type] = impl
        return _implementations[device_type]


def _kernel(name: str, device_type: str) -> Callable[..., Any]:
    def kernel(*args: Any) -> Any:
        return getattr(implementation(device_type), name)(*args)

    kernel.__name__ = f"{name}_{device_type}"
    return kernel


_library: torch.library.Library | None = None


def register_ops() -> None:
    """Define ``torch.ops.mta_kernels.*`` (the layout ops) with their CPU and CUDA kernels; once."""
    global _library
    with _lock:
        if _library is not None:
            return
        library = torch.library.Library("mta_kernels", "FRAGMENT")
        for name, schema in SCHEMAS.items():
            library.define(schema)
            library.impl(name, _kernel(name, "cpu"), "CPU")
            if name not in CPU_ONLY:
                library.impl(name, _kernel(name, "cuda"), "CUDA")
        _library = library


@contextlib.contextmanager
def use_fallback() -> Iterator[None]:
    """Run the layout ops in plain torch inside the block, whatever was chosen (tests, benchmarks)."""
    with _lock:
        saved = dict(_implementations)
        _implementations.update(cpu=fallback, cuda=fallback)
    try:
        yield
    finally:
        with _lock:
            _implementations.clear()
            _implementations.update(saved)
