"""Checkpoints of a run: atomic writes, the resume fingerprint check, RNG states.

``<out>/checkpoint.pt`` (format :data:`CHECKPOINT_FORMAT`) holds the student, the MTA projectors, the
optimizer, the scheduler, the step, the config, the fingerprint, the RNG states and, with
``--student-gen``, the replay buffer and the adaptive schedule's state. It is written to a
temporary file in the same directory, fsynced and renamed over the old one: a crash at any point leaves
either the old or the new checkpoint whole.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch

from mta_kernels.distill import faults
from mta_kernels.distill.config import DistillError

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "mta-distill-checkpoint/1"


def atomic_write_bytes(path: str, writer: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``writer(file)`` into a temporary sibling, fsync, then ``os.replace``.

    A process killed before the rename leaves ``path`` as it was (and a ``.tmp.<pid>`` sibling that the
    next run in the directory removes, see :func:`remove_stale_temporaries`).
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(out: str) -> None:
    """Remove the temporary files of atomic writes that a killed process left in ``out``."""
    for name in os.listdir(out):
        if ".tmp." in name and name.split(".tmp.")[0] in (CHECKPOINT_NAME, "metrics.jsonl", "config.json"):
            os.remove(os.path.join(out, name))


def save_checkpoint(path: str, state: dict) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: never half-written."""

    def write(f: IO[bytes]) -> None:
        target = faults.checkpoint_file(f)  # f itself unless a test injects a fault
        torch.save(state, target)
        target.flush()

    atomic_write_bytes(path, write)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint of this tool; anything else is a :class:`DistillError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise DistillError(f"checkpoint {path!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DistillError(f"{path!r} is not a checkpoint of this tool (format {CHECKPOINT_FORMAT})")
    return state


def check_resume_compatible(state: dict, fingerprint: dict, path: str) -> None:
    """A checkpoint resumes only a run of the same configuration: name the first field that differs."""
    old = state.get("fingerprint", {})
    for key, value in fingerprint.items():
        if old.get(key) != value:
            raise DistillError(
                f"checkpoint {path!r} was written by another configuration: {key} is {old.get(key)!r} there "
                f"and {value!r} now. Resume with the same settings, or write to another --out directory "
                "(the checkpoint was left untouched)."
            )


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
) -> dict:
    """The checkpoint's content at the end of optimizer step ``step`` (RNG states included)."""
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
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise DistillError(
            f"checkpoint {path!r} does not fit this model: {str(exc).splitlines()[0]}"
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
