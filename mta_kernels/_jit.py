"""The C++ extension compiled on first use: the cache, the cross-process build lock, the compile.

A build lives in ``<cache>/<key>/`` (``mta_kernels_C.so``, ninja's files, ``build.json``): the key names
torch, CUDA, the Python ABI and the machine, and hashes the whole build record (those, the flags and
the C++ sources), so one cache serves several environments. The cache is ``$MTA_KERNELS_CACHE``, else
``$XDG_CACHE_HOME/mta_kernels``, else ``~/.cache/mta_kernels``. A folder with ``build.json`` is a
complete build (the record is written last).

Processes that start together (DDP ranks, DataLoader workers) build once: the builder holds an
exclusive ``flock`` on ``<key>.lock``, the others wait on it and then load the result. The kernel
releases a flock when its holder dies, so a killed build never blocks the next one; the lock file
still names the dead builder, which tells the next one to clear the half-built folder (and torch's own
``lock`` file in it, which torch would otherwise wait on forever) before compiling again.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mta_kernels import _build_spec as spec

LIBRARY = f"{spec.JIT_LIBRARY_NAME}.so"
RECORD = "build.json"
PROGRESS_EVERY_S = 30.0


class BuildUnavailable(RuntimeError):
    """The extension cannot be compiled here; the message is one line saying why. ``toolchain``: the
    compiler or ninja is what is missing (installing one is the remedy), not the cache or the sources."""

    def __init__(self, message: str, toolchain: bool = False) -> None:
        super().__init__(message)
        self.toolchain = toolchain


def say(message: str) -> None:
    """One line on stderr (the compile is minutes: users should see it start and end)."""
    print(f"mta_kernels: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- the cache
def cache_root() -> Path:
    """``$MTA_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/mta_kernels``, else ``~/.cache/mta_kernels``."""
    explicit = os.environ.get("MTA_KERNELS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mta_kernels"


def cache_problem() -> str | None:
    """Why the cache folder cannot take a build (it is a file, or neither it nor its nearest existing
    parent is a writable folder), or None. A cheap look before a compile, for ``info``."""
    root = cache_root()
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"the cache folder {root} is not usable ({probe} is a file)"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"the cache folder {root} is not usable ({probe} is not writable)"
    return None


def build_folder(with_cuda: bool) -> Path:
    return cache_root() / spec.cache_key(with_cuda)


def is_complete(folder: Path) -> bool:
    return (folder / RECORD).is_file() and (folder / LIBRARY).is_file()


# -------------------------------------------------------------------------------------- toolchain
def compiler() -> tuple[str, str | None]:
    """The C++ compiler torch would call (``$CXX``, else ``c++``) and its path, or None when missing."""
    command = os.environ.get("CXX") or "c++"
    words = shlex.split(command) or ["c++"]
    return command, shutil.which(words[0])


def ninja() -> str | None:
    """The ninja executable: on PATH, or the one of the ``ninja`` Python package (a dependency)."""
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja as ninja_package
    except ImportError:
        return None
    path = os.path.join(ninja_package.BIN_DIR, "ninja")
    return path if os.path.isfile(path) else None


def toolchain_problem() -> str | None:
    """Why nothing can be compiled here (one clause), or None."""
    command, path = compiler()
    if path is None:
        return f"no C++ compiler: {command!r} (CXX) is not found"
    if ninja() is None:
        return "ninja is not found (pip install ninja)"
    return None


# ------------------------------------------------------------------------------------------- lock
@dataclass
class Lock:
    """Held while building. ``interrupted``: what the lock file said when it was taken, if it named a
    builder (one that died before it finished), else None."""

    path: Path
    interrupted: str | None


@contextlib.contextmanager
def build_lock(path: Path, poll_s: float = 0.2) -> Iterator[Lock]:
    """Exclusive cross-process lock on ``path`` (flock): waits while another process builds. Where
    there is no flock (Windows) the build is not locked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield Lock(path, None)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    say(f"waiting for {owner} to finish compiling the C++ extension (lock {path})")
                    told = True
                time.sleep(poll_s)
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield Lock(path, previous or None)
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves the file empty: nothing was interrupted
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ build
def _compile(folder: Path, with_cuda: bool, verbose: bool) -> None:
    """torch.utils.cpp_extension.load with ninja into ``folder`` (it also loads the library)."""
    import torch.utils.cpp_extension as cpp_extension

    args = spec.compile_args(with_cuda)
    defines = [f"-D{d}" for d in args["defines"]]
    path = os.environ.get("PATH", "")
    ninja_dir = os.path.dirname(ninja() or "")
    if ninja_dir and ninja_dir not in path.split(os.pathsep):
        os.environ["PATH"] = ninja_dir + os.pathsep + path  # torch runs `ninja` from PATH
    try:
        cpp_extension.load(
            name=spec.JIT_LIBRARY_NAME,
            sources=spec.compiled_sources(with_cuda),
            extra_cflags=[*args["cxx"], *defines],
            extra_cuda_cflags=[*args["nvcc"], *defines],
            extra_ldflags=args["ld"],
            extra_include_paths=[str(spec.CSRC)],
            build_directory=str(folder),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        os.environ["PATH"] = path


def _first_error(text: str) -> str:
    """The line that says what went wrong: the compiler's first ``error:``, else the first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line.lower():
            return line[:300]
    return lines[0][:300] if lines else "no output"


class _Progress:
    """A line every ``PROGRESS_EVERY_S`` while compiling: object files done so far and the time."""

    def __init__(self, folder: Path, total: int) -> None:
        self.folder, self.total, self.start = folder, total, time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(PROGRESS_EVERY_S):
            done = len(list(self.folder.glob("*.o")))
            say(f"  ... compiling: {done}/{self.total} files done, {time.monotonic() - self.start:.0f} s")

    def __enter__(self) -> _Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@dataclass
class Built:
    """A build in the cache: its library, its record, and the compile time when compiled just now."""

    library: Path
    record: dict
    seconds: float | None


def ensure_built(
    folder: Path,
    compile_fn: Callable[[Path], None],
    record: Callable[[], dict],
    announce: str,
) -> Built:
    """The build in ``folder``, compiled by ``compile_fn(folder)`` unless complete; once across processes.

    ``announce`` is the line printed before compiling. A build interrupted earlier (its builder died) is
    cleared first. The record is written after ``compile_fn`` returns, so an incomplete build is never
    used. Raises BuildUnavailable when ``compile_fn`` fails (its output goes to ``build.log``).
    """
    if is_complete(folder):
        return Built(folder / LIBRARY, spec.read_record(folder / RECORD) or {}, None)
    with build_lock(folder.with_name(folder.name + ".lock")) as lock:
        if is_complete(folder):  # another process built it while this one waited
            return Built(folder / LIBRARY, spec.read_record(folder / RECORD) or {}, None)
        if lock.interrupted:
            say(
                f"a previous build ({lock.interrupted}) was interrupted; clearing {folder} and starting again"
            )
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "lock").unlink(missing_ok=True)  # torch's own lock file, left by a killed build
        say(announce)
        start = time.monotonic()
        try:
            compile_fn(folder)
        except Exception as exc:  # a compiler error, a missing header, a crashed ninja...
            log = folder / "build.log"
            log.write_text(str(exc), encoding="utf-8", errors="replace")
            raise BuildUnavailable(f"the compile failed: {_first_error(str(exc))} (full log: {log})") from exc
        seconds = time.monotonic() - start
        facts = record()
        spec.write_record(folder / RECORD, facts)
        say(f"compiled the C++ extension in {seconds:.0f} s ({folder / LIBRARY})")
        return Built(folder / LIBRARY, facts, seconds)


def build(reason: str = "", verbose: bool = False, force: bool = False) -> Built:
    """Compile (unless cached) and load the extension for the installed torch; ``reason`` prefixes the
    announcement (e.g. why the prebuilt one is not used). Raises BuildUnavailable."""
    import torch

    with_cuda = spec.want_cuda()
    folder = build_folder(with_cuda)
    if force and folder.exists():
        with build_lock(folder.with_name(folder.name + ".lock")):
            shutil.rmtree(folder)
    if not is_complete(folder):
        problem = toolchain_problem()
        if problem:
            raise BuildUnavailable(problem, toolchain=True)
    kernels = "CPU and CUDA kernels, a few minutes" if with_cuda else "CPU kernels, about 1 min"
    announce = (
        f"{reason}compiling the C++ extension for torch {torch.__version__} ({kernels}), once; "
        f"cached in {folder}"
    )
    files = len(spec.compiled_sources(with_cuda))

    def compile_fn(dest: Path) -> None:
        with _Progress(dest, files):
            _compile(dest, with_cuda, verbose)

    try:
        built = ensure_built(folder, compile_fn, lambda: spec.build_record(with_cuda), announce)
    except OSError as exc:  # a read-only or full cache folder
        raise BuildUnavailable(
            f"the cache folder {cache_root()} is not usable ({exc}): point MTA_KERNELS_CACHE (or "
            "`python -m mta_kernels.build --cache`) at a writable folder"
        ) from exc
    if built.seconds is None and reason:
        say(f"{reason}using the build for this torch in {folder}")
    try:
        torch.ops.load_library(str(built.library))
    except OSError as exc:
        raise BuildUnavailable(
            f"the cached build {built.library} could not be loaded ({str(exc).splitlines()[0][:200]}); "
            "`python -m mta_kernels.build --force` compiles it again"
        ) from exc
    return built
