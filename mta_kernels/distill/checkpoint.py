"""Checkpoints of a run: atomic writes, the resume fingerprint check, RNG states.

``<out>/checkpoint.pt`` (format :data:`CHECKPOINT_FORMAT`) holds the student, the MTA projectors, the
optimizer, the scheduler, the step, the config, the fingerprint, the RNG states and, with
``--student-gen``, the replay buffer and the adaptive schedule's state. It is written to a
temporary file in the same directory, fsynced and renamed over the old one: a crash at any point leaves
either the old or the new checkpoint whole.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch

from mta_kernels.distill import faults
from mta_kernels.distill.config import DistillError

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "mta-distill-checkpoint/1"


def atomic_write_bytes(
    path: str, writer: Callable[[IO[bytes]], Any], on_replaced: Callable[[], None] | None = None
) -> None:
    """Write ``path`` through ``writer(file)`` into a temporary sibling, fsync, then ``os.replace``.

    A process killed before the rename leaves ``path`` as it was (and a ``.tmp.<pid>`` sibling that the
    next run in the directory removes, see :func:`remove_stale_temporaries`); a failed write (a full
    disk) removes the temporary and raises the ``OSError``. ``on_replaced`` runs right after the rename
    with SIGTERM/SIGINT held back, so that a record of the new file never disagrees with the disk.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        try:
            with open(tmp, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
        except RuntimeError as exc:  # torch.save reports a failed write of its file as "unexpected pos"
            raise_os_error(exc)
        with faults.signals_blocked():
            os.replace(tmp, path)
            if on_replaced is not None:
                on_replaced()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind an exception (itself, its cause or its context, or the ``(os error N)``
    a Rust writer such as safetensors puts in its message), ``None`` if none."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def raise_os_error(exc: BaseException) -> None:
    """Raise the ``OSError`` behind ``exc`` (:func:`os_error`) in its place, or ``exc`` itself if none.
    Call from an ``except`` block."""
    cause = os_error(exc)
    if cause is None:
        raise exc
    raise cause from None


def replace_dir(path: str, write: Callable[[str], Any]) -> None:
    """Write a directory next to ``path`` with ``write(tmp)``, then swap it in (a crash leaves one whole;
    :func:`remove_stale_temporaries` finishes or undoes a swap a killed process left).

    A failed write removes the half-written directory and raises the ``OSError`` behind it (a full
    disk: safetensors reports it as its own error type).
    """
    tmp, old = path + ".tmp", path + ".old"
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    try:
        write(tmp)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_os_error(exc)
    with faults.signals_blocked():
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def remove_earlier_run(out: str) -> list[str]:
    """Remove an earlier run's checkpoint, ``model/`` and ``best/`` from its run folder, so that none is
    taken for this run's (``best/`` of a run with --eval-gen would otherwise outlive a run without).
    Returns a note naming what was removed (empty when nothing was)."""
    removed = []
    for name in (CHECKPOINT_NAME, *SWAPPED_DIRS):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return [f"--overwrite: removed the earlier run's {', '.join(removed)} from {out!r}"] if removed else []


def remove_stale_temporaries(out: str) -> None:
    """Remove what a killed process left in ``out``: temporaries of atomic writes, and the half-swapped
    ``model``/``best`` directories (a whole ``.tmp`` one whose swap did not finish is moved in)."""
    for name in os.listdir(out):
        if ".tmp." in name and name.split(".tmp.")[0] in (CHECKPOINT_NAME, "metrics.jsonl", "config.json",
                                                          "summary.json"):  # fmt: skip
            os.remove(os.path.join(out, name))
    for name in SWAPPED_DIRS:
        path, tmp, old = (os.path.join(out, name + suffix) for suffix in ("", ".tmp", ".old"))
        if not os.path.exists(path) and os.path.isdir(old) and os.path.isdir(tmp):
            os.replace(tmp, path)  # killed between the two renames: the new directory is whole
        for d in (tmp, old):
            shutil.rmtree(d, ignore_errors=True)


SWAPPED_DIRS = ("model", "best")
"""Run directories written next to their place and swapped in (:func:`replace_dir`)."""


def save_checkpoint(path: str, state: dict) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: never half-written.

    A failed write (full disk, quota, folder gone) is a :class:`DistillError` that names the step and
    says which checkpoint is still the last good one (:data:`faults.on_disk`).
    """

    def write(f: IO[bytes]) -> None:
        target = faults.checkpoint_file(f)  # f itself unless a test injects a fault
        torch.save(state, target)
        target.flush()

    step = state["step"]
    try:
        atomic_write_bytes(path, write, on_replaced=lambda: faults.on_disk.saved(step))
    except OSError as exc:
        raise DistillError(
            f"could not write the checkpoint of step {step} to {path!r} ({write_failure(exc)}); "
            f"{faults.on_disk.describe()}"
        ) from None


def write_failure(exc: OSError) -> str:
    """``"[Errno 28] No space left on device: free some space first"`` and the like."""
    text = f"[Errno {exc.errno}] {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        text += ": free some space (or raise the quota) first"
    return text


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint of this tool; anything else is a :class:`DistillError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise DistillError(f"checkpoint {path!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DistillError(f"{path!r} is not a checkpoint of this tool (format {CHECKPOINT_FORMAT})")
    missing = [k for k in ("step", "student", "optimizer", "scheduler") if k not in state]
    if missing or not isinstance(state.get("optimizer"), dict):
        raise DistillError(f"checkpoint {path!r} is incomplete (no {', '.join(missing) or 'optimizer'})")
    return state


def check_resume_compatible(state: dict, fingerprint: dict, path: str) -> list[str]:
    """A checkpoint resumes only a run of the same configuration: name the first field that differs.

    A field the checkpoint does not record (it was written before the option existed) counts as the
    option's default, the behaviour of the version that wrote it: the run resumes when the option
    still has that value. Returns a note naming such fields (empty when there are none).
    """
    from mta_kernels.distill.config import TrainConfig

    old = state.get("fingerprint", {})
    defaults = TrainConfig()
    missing, unchecked = [], []
    for key, value in fingerprint.items():
        if key not in old and not hasattr(defaults, key):
            unchecked.append(key)  # a check added after the checkpoint was written (e.g. data_digest)
            continue
        if key not in old:
            missing.append(key)
            then, origin = getattr(defaults, key), " (its default: the checkpoint predates the option)"
        else:
            then, origin = old.get(key), ""
        if then != value:
            if key == "data_digest":
                raise DistillError(
                    f"checkpoint {path!r} was written for other data: the examples of --data / --eval-data "
                    "changed since (same file names, other content). Resume with the data it trained on, "
                    "or start a new run in another --out (the checkpoint was left untouched)."
                )
            raise DistillError(
                f"checkpoint {path!r} was written by another configuration: {key} is {then!r} there"
                f"{origin} and {value!r} now. Resume with the same settings, or write to another --out "
                "directory (the checkpoint was left untouched)."
            )
    notes = []
    if missing:
        notes.append(f"checkpoint {path!r} predates {', '.join(missing)}: resumed with their defaults")
    if unchecked:
        notes.append(f"checkpoint {path!r} predates the check of {', '.join(unchecked)}: not compared")
    return notes


def make_state(
    *,
    step: int,
    config: dict,
    fingerprint: dict,
    student: torch.nn.Module,
    mta: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    student_gen: dict | None = None,
    metrics_records: int | None = None,
) -> dict:
    """The checkpoint's content at the end of optimizer step ``step`` (RNG states included).

    ``metrics_records``: the records ``metrics.jsonl`` holds at this step (a resumed run warns when
    fewer are left).
    """
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": config,
        "fingerprint": fingerprint,
        "student": student.state_dict(),
        "mta": None if mta is None else mta.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "student_gen": student_gen,
        "metrics_records": metrics_records,
    }


def restore_state(
    state: dict,
    path: str,
    student: torch.nn.Module,
    mta: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> int:
    """Load a checkpoint into the run's objects and RNGs; returns its step."""
    try:
        student.load_state_dict(state["student"])
        if mta is not None:
            mta.load_state_dict(state["mta"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise DistillError(
            f"checkpoint {path!r} does not fit this model: {str(exc).splitlines()[0]}"
        ) from None
    saved = [len(g.get("params", ())) for g in state["optimizer"].get("param_groups", ())]
    now = [len(g["params"]) for g in optimizer.param_groups]
    if saved != now:
        raise DistillError(
            f"checkpoint {path!r} holds optimizer state for parameter groups of sizes {saved}, this run "
            f"has {now}: it was written for other trainable parameters (another --lora or --projector-lr "
            "setting, or a version of mta-distill that grouped weight decay otherwise) and cannot be "
            "resumed exactly. Start a new run in another --out"
        )
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise DistillError(
            f"checkpoint {path!r} does not fit this run's optimizer: {str(exc).splitlines()[0]}"
        ) from None
    _set_rng(state.get("rng"))
    return int(state["step"])


def _set_rng(rng: dict | None) -> None:
    if not rng:
        return
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
