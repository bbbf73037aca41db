"""Packed (varlen) unit layout of SPEC §2 and the face of the ``mta_kernels._C`` extension.

Layout: a batch of ``B`` sequences padded to ``seq_len`` tokens is flattened to ``N = B * seq_len``
tokens. ``ranges`` int32 ``[U, 2]`` holds each unit's ``[start, end)`` flat token range and
``cu_units`` int32 ``[B+1]`` the CSR offsets (units of sequence ``b`` are rows
``cu_units[b]:cu_units[b+1]``). The ops below run on CPU and CUDA tensors (``char_spans_to_token_ranges``
on the CPU only) and give identical results on both. See ``docs/design/layout.md``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx.node

try:
    from mta_kernels import _C  # noqa: F401  (loading it registers torch.ops.mta_kernels.*)
except ImportError as exc:
    raise ImportError(
        "mta_kernels: the compiled extension mta_kernels._C is missing or broken "
        f"({exc}). Build it with `make setup` or `pip install --no-build-isolation -e .` "
        "from the repository root."
    ) from exc


def extension_path() -> str:
    """File the compiled extension was loaded from."""
    return _C.__file__


def validate_layout(ranges: torch.Tensor, cu_units: torch.Tensor, num_tokens: int, seq_len: int) -> None:
    """Check a packed layout; raise on the first offending entry, return ``None`` when it is valid.

    Args:
        ranges: int32 ``[U, 2]``, ``[start, end)`` flat token indices into ``num_tokens``.
        cu_units: int32 ``[B+1]``, same device as ``ranges``.
        num_tokens: ``N``, must equal ``B * seq_len``.
        seq_len: ``T``, padded length of every sequence.

    Raises:
        TypeError: a tensor is not int32.
        ValueError: anything else: shapes, devices, ``num_tokens != B * seq_len``, ``cu_units`` not
            starting at 0 / decreasing / not ending at ``U``, or a unit that is empty or reversed, out of
            bounds, outside its sequence, out of order or overlapping the previous unit of its sequence.
            The message names the first offending unit (index, sequence, token range) or ``cu_units`` entry.

    On CUDA one kernel finds the first error and one device-to-host copy brings it back (a sync).
    """
    torch.ops.mta_kernels.validate_layout(ranges, cu_units, int(num_tokens), int(seq_len))


def token_to_unit(ranges: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Unit index of every flat token.

    Args:
        ranges: int32 ``[U, 2]`` of a valid layout (see :func:`validate_layout`).
        num_tokens: ``N = B * seq_len``.

    Returns:
        int32 ``[N]`` on ``ranges``' device: ``u`` for the tokens of unit ``u``, ``-1`` for uncovered
        tokens. On the CPU an out-of-bounds range is a ValueError; the CUDA kernel clamps to ``[0, N)``.
    """
    return torch.ops.mta_kernels.token_to_unit(ranges, int(num_tokens))


def unit_to_seq(cu_units: torch.Tensor, num_units: int | None = None) -> torch.Tensor:
    """Sequence index of every unit.

    Args:
        cu_units: int32 ``[B+1]``.
        num_units: ``U = cu_units[-1]`` when the caller knows it (e.g. ``ranges.shape[0]``): saves the
            device-to-host read of ``cu_units[-1]`` on CUDA (on the CPU it is checked).

    Returns:
        int32 ``[U]`` on ``cu_units``' device.
    """
    return torch.ops.mta_kernels.unit_to_seq(cu_units, None if num_units is None else int(num_units))


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """CSR offsets from per-sequence lengths.

    Args:
        lengths: integer ``[B]``, non-negative, summing to at most ``2**31 - 1``.

    Returns:
        int32 ``[B+1]``, ``out[0] = 0``, ``out[b+1] = lengths[:b+1].sum()``, on ``lengths``' device.

    Raises:
        TypeError: ``lengths`` is not an integer tensor. ValueError: not 1-D, a negative length, or
        int32 overflow (on CUDA that check costs one device-to-host copy).
    """
    return torch.ops.mta_kernels.offsets_from_lengths(lengths)


def block_diagonal_work_list(cu_units: torch.Tensor, block_m: int) -> torch.Tensor:
    """Row blocks of the block-diagonal pairwise (DSA) kernels.

    Greedy in sequence order: sequences with fewer than 2 units start no block; consecutive sequences
    share one block while the block's contiguous row range spans ``<= block_m`` units; a sequence of more
    than ``block_m`` units gets its own blocks of ``block_m`` rows (the last one shorter). Inside a
    packed block the kernel masks pairs of different sequences with :func:`unit_to_seq`.

    Args:
        cu_units: int32 ``[B+1]``.
        block_m: rows per block, ``>= 1``.

    Returns:
        int32 ``[W, 4]`` on ``cu_units``' device, rows ``(row_start, row_end, col_start, col_end)`` in
        global unit indices; ``[col_start, col_end)`` is the units of the block's sequences. Computed
        on the host (CUDA: ``cu_units`` is copied to the host and the result back).
    """
    return torch.ops.mta_kernels.block_diagonal_work_list(cu_units, int(block_m))


def char_spans_to_token_ranges(
    texts: list[str], offsets: torch.Tensor, spans: list[list[tuple[int, int]]] | list[np.ndarray]
) -> torch.Tensor:
    """Token range of every character span (SPEC §2 "Mapping units to tokens"), on the CPU.

    A token covering characters ``[ts, te)`` has ``ts`` moved past whitespace (Python's
    ``str.isspace``); if then ``ts >= te`` it belongs to no unit, else to the span containing ``ts``.

    Args:
        texts: ``B`` strings, the texts that were tokenized.
        offsets: integer ``[B, T, 2]``, the fast tokenizer's ``offset_mapping`` (character indices into
            each text; special and padding tokens have an empty range). Moved to the CPU.
        spans: ``B`` lists of sorted, non-overlapping ``(start, end)`` character spans (``K`` in all),
            or ``B`` integer arrays/tensors ``[K_b, 2]`` (the faster path).

    Returns:
        int64 ``[K, 2]`` (CPU): ``[first token, last token + 1)`` of each span as positions local to its
        sequence (``0..T``), or ``[-1, -1]`` when the span received no token.
    """
    if offsets.dim() != 3 or offsets.shape[-1] != 2:
        raise ValueError(f"offsets must be [B, T, 2], got shape {tuple(offsets.shape)}")
    if offsets.dtype.is_floating_point or offsets.dtype.is_complex or offsets.dtype == torch.bool:
        raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype}")
    if not (len(texts) == len(spans) == offsets.shape[0]):
        raise ValueError(
            f"texts ({len(texts)}), spans ({len(spans)}) and offsets ({offsets.shape[0]}) "
            "must have B entries each"
        )
    # One UTF-32 encode of all texts; "surrogatepass" keeps lone surrogates as one code point each.
    encoded = "".join(texts).encode("utf-32-le", "surrogatepass")
    codepoints = torch.from_numpy(np.frombuffer(encoded, dtype=np.int32).copy())
    cu_chars = torch.from_numpy(np.cumsum([0, *map(len, texts)], dtype=np.int64))
    cu_spans = torch.from_numpy(np.cumsum([0, *map(len, spans)], dtype=np.int64))
    num_spans = int(cu_spans[-1])
    if spans and all(isinstance(s, (np.ndarray, torch.Tensor)) for s in spans):
        flat = np.concatenate([np.asarray(s, dtype=np.int64).reshape(-1) for s in spans])
    else:  # lists of (start, end) pairs: one pass over the flattened ints, no per-span Python call
        flat_ints = itertools.chain.from_iterable(itertools.chain.from_iterable(spans))
        flat = np.fromiter(flat_ints, dtype=np.int64, count=2 * num_spans)
    return torch.ops.mta_kernels.char_spans_to_token_ranges(
        codepoints,
        cu_chars,
        offsets.to("cpu", torch.int64).contiguous(),
        torch.from_numpy(flat).view(num_spans, 2),
        cu_spans,
    )


# validate_layout returns nothing: without this, torch.compile's dead-code elimination drops the call
# (and with it the check). Marked side-effectful, it stays in the graph (aot_eager and inductor).
torch.fx.node.has_side_effect(torch.ops.mta_kernels.validate_layout.default)


# Fake (meta) implementations, so that torch.compile can trace through the ops without running them.
@torch.library.register_fake("mta_kernels::validate_layout")
def _(ranges, cu_units, num_tokens, seq_len):
    return None


@torch.library.register_fake("mta_kernels::token_to_unit")
def _(ranges, num_tokens):
    return ranges.new_empty((num_tokens,), dtype=torch.int32)


@torch.library.register_fake("mta_kernels::unit_to_seq")
def _(cu_units, num_units=None):
    n = torch.library.get_ctx().new_dynamic_size() if num_units is None else num_units
    return cu_units.new_empty((n,), dtype=torch.int32)


@torch.library.register_fake("mta_kernels::offsets_from_lengths")
def _(lengths):
    return lengths.new_empty((lengths.shape[0] + 1,), dtype=torch.int32)


@torch.library.register_fake("mta_kernels::block_diagonal_work_list")
def _(cu_units, block_m):
    return cu_units.new_empty((torch.library.get_ctx().new_dynamic_size(), 4), dtype=torch.int32)


@torch.library.register_fake("mta_kernels::char_spans_to_token_ranges")
def _(codepoints, cu_chars, offsets, spans, cu_spans):
    return spans.new_empty((spans.shape[0], 2), dtype=torch.int64)


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
