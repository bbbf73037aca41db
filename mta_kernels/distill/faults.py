"""Pre-emption and fault injection.

Pre-emption: a cluster scheduler sends SIGTERM before it takes the machine; Ctrl-C sends SIGINT. While
a run trains, either signal only raises a flag: the current step finishes, a checkpoint of it is
written (atomically), and the CLI exits with :data:`PREEMPTED_EXIT_CODE`; ``--resume`` continues exactly
where it stopped. A second signal stops at once (the last checkpoint written is intact).

Fault injection, for the tests: the environment variable ``MTA_DISTILL_FAULT`` names one fault,
``sigterm@step:K`` / ``sigint@step:K`` (the run sends itself that signal in the middle of step K,
after the first micro-batch's forward) or ``sigkill@save:N`` (the run SIGKILLs itself in the middle
of writing its N-th checkpoint of this process, after half of the bytes). Unset, the hooks do nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

PREEMPTED_EXIT_CODE = 75
"""Exit status of a run stopped by SIGTERM/SIGINT after writing its checkpoint (``EX_TEMPFAIL``: try
again, with ``--resume``)."""

FAULT_ENV = "MTA_DISTILL_FAULT"


class Preempted(Exception):
    """The run stopped on a signal after checkpointing step ``step``."""

    def __init__(self, signame: str, step: int, checkpoint: str) -> None:
        super().__init__(f"{signame}: stopped after step {step}, checkpoint {checkpoint}")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint


class StopFlag:
    """SIGTERM/SIGINT handlers that only record the request (installed by :func:`catch_signals`)."""

    def __init__(self) -> None:
        self.signame: str | None = None

    @property
    def requested(self) -> bool:
        return self.signame is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signame is not None:  # the second signal: stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name


@contextmanager
def catch_signals() -> Iterator[StopFlag]:
    """Within the block, SIGTERM and SIGINT set the returned flag instead of stopping the process.

    Outside the main thread (where Python cannot install handlers) the flag never rises.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in old:
        signal.signal(s, flag._handle)
    try:
        yield flag
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def ignore_signals_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a scheduler's SIGTERM goes to the whole process group; the main
    process decides when to stop, and shuts its workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ------------------------------------------------------------------------------- fault injection
def _fault() -> tuple[str, str, int] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    try:
        action, rest = spec.split("@")
        where, count = rest.split(":")
        return action, where, int(count)
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r} is not ACTION@WHERE:N (e.g. sigterm@step:3)") from None


def at_step(step: int) -> None:
    """Hook in the middle of optimizer step ``step`` (1-based)."""
    fault = _fault()
    if fault is not None and fault[1:] == ("step", step):
        os.kill(os.getpid(), getattr(signal, fault[0].upper()))


_saves = 0


def checkpoint_file(f: IO[bytes]) -> IO[bytes]:
    """The file a checkpoint is written to: ``f`` itself, or under ``sigkill@save:N`` on the N-th save,
    a wrapper that kills the process once half of the bytes are written."""
    global _saves
    _saves += 1
    fault = _fault()
    if fault is None or fault[:2] != ("sigkill", "save") or fault[2] != _saves:
        return f
    return _KillMidWrite(f)


class _KillMidWrite:
    """Buffers the checkpoint, writes half of it to the real file, flushes, then SIGKILLs."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.chunks = f, []

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        data = b"".join(self.chunks)
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
