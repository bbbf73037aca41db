"""Signals, what a run has on disk, and fault injection.

Signals: a cluster scheduler sends SIGTERM before it takes the machine; Ctrl-C sends SIGINT. While a
run trains, either signal only raises a flag: the current step finishes, a checkpoint of it is
written (atomically), and the CLI exits with :data:`PREEMPTED_EXIT_CODE`; ``--resume`` continues exactly
where it stopped. Anywhere else (loading models, preparing the data, writing the final model, a second
signal during training) the signal stops the command at once (:class:`Stopped`, exit ``128 + signal
number``: 130 for SIGINT, 143 for SIGTERM) and the message says what is on disk (:data:`on_disk`).

Fault injection, for the tests: the environment variable ``MTA_DISTILL_FAULT`` names one fault,
``sigterm@step:K`` / ``sigint@step:K`` (the run sends itself that signal in the middle of step K,
after the first micro-batch's forward), ``sigkill@save:N`` (the run SIGKILLs itself in the middle
of writing its N-th checkpoint of this process, after half of the bytes), ``sigterm@save:N`` (a
signal half-way through the N-th checkpoint), ``enospc@save:N`` (the N-th checkpoint's writes fail
with ``OSError(ENOSPC)`` half-way, as on a full disk), or ``sigterm@setup:1`` / ``@data:1`` /
``@finish:1`` (a signal at that stage, :func:`at`); several faults separated by commas. Unset, the hooks
do nothing.
"""

from __future__ import annotations

import errno
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
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A signal stopped the command at once (outside the training steps, or a second signal).

    A ``BaseException``, like ``KeyboardInterrupt``: ``except Exception`` blocks do not swallow it.
    """

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signame))


class OnDisk:
    """What the current run has on disk, for the message of a command stopped at any moment.

    :func:`~mta_kernels.distill.train.train` calls :meth:`start`; the loop calls :meth:`started`
    once its run directory holds files, and :meth:`saved` inside the atomic rename of each checkpoint
    (signals blocked, so the record and the file never disagree).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Nothing written (a new command)."""
        self.out: str | None = None
        self.checkpoint: str | None = None
        self.step: int | None = None
        self.written = False
        self.text: str | None = None

    def start(self, out: str, checkpoint: str) -> None:
        self.reset()
        self.out, self.checkpoint = out, checkpoint

    def note(self, text: str) -> None:
        """What a command other than a training has on disk (e.g. the files an evaluation wrote)."""
        self.text = text

    def started(self, resumed_step: int | None) -> None:
        self.written, self.step = True, resumed_step

    def saved(self, step: int) -> None:
        self.step = step

    def describe(self) -> str:
        """One sentence: what is on disk now and how to go on."""
        if self.text is not None:
            return self.text
        if self.out is None or not self.written:
            where = f" in {self.out!r}" if self.out else ""
            return f"nothing was written{where}: run the same command again to start"
        if self.step is None:
            return (
                f"{self.out!r} holds the run's config and metrics but no checkpoint yet: run the same "
                "command again to start afresh"
            )
        return (
            f"{self.checkpoint!r} holds step {self.step}, the last good checkpoint: run the same command "
            "with --resume to continue from it"
        )


on_disk = OnDisk()
"""The process's current run (one run at a time; the demo runs its trainings one after the other)."""


def _raise_stopped(signum: int, _frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


@contextmanager
def _handlers(handler: Any) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT within the block, the previous ones restored after it. No-op
    outside the main thread (where Python cannot install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, previous in old.items():
            signal.signal(s, previous)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Stopped` (the training loop's
    :func:`catch_signals` turns the first one into a flag instead). No-op outside the main thread."""
    with _handlers(_raise_stopped):
        yield


@contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGTERM and SIGINT held back for the block (delivered when it ends): a rename and the record
    of it happen together or not at all."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
            _raise_stopped(signum, frame)
        self.signame = signal.Signals(signum).name


@contextmanager
def catch_signals() -> Iterator[StopFlag]:
    """Within the block, SIGTERM and SIGINT set the returned flag instead of stopping the process.

    Outside the main thread (where Python cannot install handlers) the flag never rises.
    """
    flag = StopFlag()
    with _handlers(flag._handle):
        yield flag


def ignore_signals_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a scheduler's SIGTERM goes to the whole process group; the main
    process decides when to stop, and shuts its workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ------------------------------------------------------------------------------- fault injection
def _faults() -> list[tuple[str, str, int]]:
    """The faults of ``MTA_DISTILL_FAULT``: ``ACTION@WHERE:N``, several separated by commas."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return []
    found = []
    for item in spec.split(","):
        try:
            action, rest = item.strip().split("@")
            where, count = rest.split(":")
            found.append((action, where, int(count)))
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={spec!r} is not ACTION@WHERE:N (e.g. sigterm@step:3)") from None
    return found


def _signal(action: str) -> None:
    os.kill(os.getpid(), getattr(signal, action.upper()))


def at_step(step: int) -> None:
    """Hook in the middle of optimizer step ``step`` (1-based)."""
    for action, where, count in _faults():
        if (where, count) == ("step", step):
            _signal(action)


_reached: dict[str, int] = {}


def at(stage: str) -> None:
    """Hook at a stage of a command: ``setup`` (the run starts: nothing loaded, nothing written),
    ``data`` (the training set is being checked), ``finish`` (the final model is being saved). The
    N-th time this process reaches ``stage``, an ``ACTION@stage:N`` fault fires."""
    _reached[stage] = _reached.get(stage, 0) + 1
    for action, where, count in _faults():
        if (where, count) == (stage, _reached[stage]):
            _signal(action)


_saves = 0


def checkpoint_file(f: IO[bytes]) -> IO[bytes]:
    """The file a checkpoint is written to: ``f`` itself, or on the N-th save of an ``ACTION@save:N``
    fault a wrapper that, once half of the bytes are written, SIGKILLs the process (``sigkill``),
    signals it (``sigterm``, ``sigint``) or fails every later write with ``OSError(ENOSPC)``."""
    global _saves
    _saves += 1
    fault = next((f for f in _faults() if f[1:] == ("save", _saves)), None)
    if fault is None:
        return f
    return _FaultMidWrite(f, fault[0])


class _FaultMidWrite:
    """Buffers the checkpoint; at ``flush`` writes half of it to the real file, then the fault.

    ``enospc`` instead fails inside ``torch.save``, as a full disk does: the writes after the first
    :data:`ENOSPC_AFTER` bytes raise ``OSError(ENOSPC)``.
    """

    def __init__(self, f: IO[bytes], action: str) -> None:
        self.f, self.action, self.chunks, self.size = f, action, [], 0

    def write(self, data: bytes) -> int:
        if self.action == "enospc":
            self.size += len(data)
            if self.size > ENOSPC_AFTER:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(self.f, "name", None))
            return self.f.write(data)
        self.chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        if self.action == "enospc" or not self.chunks:  # torch.save flushes too: the fault fires once
            self.f.flush()
            return
        data = b"".join(self.chunks)
        self.chunks = []
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        os.kill(os.getpid(), getattr(signal, self.action.upper()))
        self.f.write(data[len(data) // 2 :])  # a signal that only raised the flag: the write goes on


ENOSPC_AFTER = 4096
"""Bytes an ``enospc@save:N`` checkpoint write gets onto the disk before the disk is "full"."""
