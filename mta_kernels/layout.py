"""Packed (varlen) unit layout of SPEC §2 and the face of the ``mta_kernels._C`` extension."""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    from mta_kernels import _C  # noqa: F401  (loading it registers torch.ops.mta_kernels.*)
except ImportError as exc:  # pragma: no cover - exercised by hand on an unbuilt checkout
    raise ImportError(
        "mta_kernels: the compiled extension mta_kernels._C is missing or broken "
        f"({exc}). Build it with `make setup` or `pip install --no-build-isolation -e .` "
        "from the repository root."
    ) from exc


def extension_path() -> str:
    """File the compiled extension was loaded from."""
    return _C.__file__


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """CSR offsets ``[B+1]`` (int32) from per-sequence lengths ``[B]``."""
    return torch.ops.mta_kernels.offsets_from_lengths(lengths)


@dataclass
class UnitBatch:
    """Units of one granularity for a batch, packed (SPEC §2 "Packed layout").

    Attributes:
        student_ranges: int32 ``[U, 2]``, ``[start, end)`` flat token indices into the student's
            padded batch ``B * seq_len_student``.
        teacher_ranges: int32 ``[U, 2]``, the same units in the teacher's tokenization (the same
            tensor as ``student_ranges`` when both share one tokenizer).
        cu_units: int32 ``[B+1]``, units of sequence b are rows ``cu_units[b]:cu_units[b+1]``.
        seq_len_student: T of the student's padded batch.
        seq_len_teacher: T of the teacher's padded batch.
    """

    student_ranges: torch.Tensor
    teacher_ranges: torch.Tensor
    cu_units: torch.Tensor
    seq_len_student: int
    seq_len_teacher: int

    @property
    def num_units(self) -> int:
        return int(self.student_ranges.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.cu_units.shape[0]) - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> UnitBatch:
        """A copy with every tensor on ``device``."""
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return UnitBatch(
            move(self.student_ranges),
            move(self.teacher_ranges),
            move(self.cu_units),
            self.seq_len_student,
            self.seq_len_teacher,
        )
