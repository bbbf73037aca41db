"""Packed (varlen) unit layout (docs/method.md#packed-layout), its plan, and the face of ``mta_kernels._C``.

Layout: a batch of ``B`` sequences padded to ``seq_len`` tokens is flattened to ``N = B * seq_len``
tokens. ``ranges`` int32 ``[U, 2]`` holds each unit's ``[start, end)`` flat token range and
``cu_units`` int32 ``[B+1]`` the CSR offsets (units of sequence ``b`` are rows
``cu_units[b]:cu_units[b+1]``). The ops below run on CPU and CUDA tensors (``char_spans_to_token_ranges``
on the CPU only) and give identical results on both. See ``docs/design/layout.md``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.fx.node

from mta_kernels import _extension

# Defines torch.ops.mta_kernels.*: the compiled extension (prebuilt, or compiled on first use) or the
# pure-torch fallback runs them, chosen at the first call (mta_kernels/_extension.py).
_extension.register_ops()


def check_extension_choice() -> None:
    """Check ``MTA_KERNELS_EXT`` before any work: an unknown value is an error, and a forced
    ``prebuilt`` or ``jit`` implementation is loaded now (compiled if needed), so that one that cannot
    run fails here, not at the first layout op of a run. ``auto`` and ``torch`` load nothing.

    Raises:
        RuntimeError (``ExtensionUnavailable``): the value, or why the forced implementation cannot run.
    """
    if _extension.mode() in ("prebuilt", "jit"):
        _extension.load()


def extension_path() -> str | None:
    """File of the compiled extension the layout ops run (loading it, compiling it if needed), or None
    when they run the pure-torch fallback."""
    return _extension.load().path


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
        A :class:`LayoutPlan` carries this map for its ranges (``SidePlan.token_to_unit``).
    """
    return torch.ops.mta_kernels.token_to_unit(ranges, int(num_tokens))


def unit_to_seq(cu_units: torch.Tensor, num_units: int | None = None) -> torch.Tensor:
    """Sequence index of every unit.

    Args:
        cu_units: int32 ``[B+1]``.
        num_units: ``U = cu_units[-1]`` when the caller knows it (e.g. ``ranges.shape[0]``): saves the
            device-to-host read of ``cu_units[-1]`` on CUDA (on the CPU it is checked).

    Returns:
        int32 ``[U]`` on ``cu_units``' device (a :class:`LayoutPlan` carries it: ``unit_to_seq``).
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
        on the host (CUDA: ``cu_units`` is copied to the host and the result back); a :class:`LayoutPlan`
        carries the lists of :data:`WORK_LIST_BLOCKS` (``work_lists``).
    """
    return torch.ops.mta_kernels.block_diagonal_work_list(cu_units, int(block_m))


class PackedCharSpans(NamedTuple):
    """The texts and character spans of a batch in the tensor form of ``char_spans_to_token_ranges``
    (built once by :func:`pack_char_spans`, then reused for both tokenizations of the batch).

    Attributes:
        codepoints: int32 ``[C]``, the texts' code points, concatenated (UTF-32).
        cu_chars: int64 ``[B+1]`` offsets of each text in ``codepoints``.
        spans: int64 ``[K, 2]``, the ``(start, end)`` character spans of all texts.
        cu_spans: int64 ``[B+1]`` offsets of each text's spans in ``spans``.
    """

    codepoints: torch.Tensor
    cu_chars: torch.Tensor
    spans: torch.Tensor
    cu_spans: torch.Tensor


def pack_char_spans(
    texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]] | Sequence[np.ndarray]
) -> PackedCharSpans:
    """The ``B`` texts and their character spans (lists of ``(start, end)`` pairs, or integer arrays or
    tensors ``[K_b, 2]``: the faster path) as :class:`PackedCharSpans`, on the CPU."""
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
    return PackedCharSpans(codepoints, cu_chars, torch.from_numpy(flat).view(num_spans, 2), cu_spans)


def char_spans_to_token_ranges(
    texts: list[str],
    offsets: torch.Tensor,
    spans: list[list[tuple[int, int]]] | list[np.ndarray],
    packed: PackedCharSpans | None = None,
) -> torch.Tensor:
    """Token range of every character span (docs/method.md#mapping-units-to-tokens), on the CPU.

    A token covering characters ``[ts, te)`` has ``ts`` moved past whitespace (Python's
    ``str.isspace``); if then ``ts >= te`` it belongs to no unit, else to the span containing ``ts``.

    Args:
        texts: ``B`` strings, the texts that were tokenized.
        offsets: integer ``[B, T, 2]``, the fast tokenizer's ``offset_mapping`` (character indices into
            each text; special and padding tokens have an empty range). Moved to the CPU.
        spans: ``B`` lists of sorted, non-overlapping ``(start, end)`` character spans (``K`` in all),
            or ``B`` integer arrays/tensors ``[K_b, 2]`` (the faster path).
        packed: ``pack_char_spans(texts, spans)`` when the caller already built it (one batch, two
            tokenizations): then ``texts`` and ``spans`` are not converted again.

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
    if packed is None:
        packed = pack_char_spans(texts, spans)
    return torch.ops.mta_kernels.char_spans_to_token_ranges(
        packed.codepoints,
        packed.cu_chars,
        offsets.to("cpu", torch.int64).contiguous(),
        packed.spans,
        packed.cu_spans,
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


# ------------------------------------------------------------------------------------ the layout plan
WORK_LIST_BLOCKS: tuple[int, ...] = (16, 32, 64, 128)
"""Row-block sizes whose DSA work lists a plan prepares (other sizes are computed on demand)."""

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True, eq=False)
class SidePlan:
    """The facts about one tokenization of a batch's units, computed on the host (see :class:`LayoutPlan`).

    Attributes:
        ranges: int32 ``[U, 2]`` flat ``[start, end)`` token ranges (validated).
        token_to_unit: int32 ``[N]``, unit of every flat token, ``-1`` for tokens in no unit.
        covered_tokens: int32 ``[C]``, the flat indices of the covered tokens, ascending.
        seq_len: ``T``; num_tokens: ``N = B * T``.
        max_span: the longest unit in tokens (0 without units); num_covered: ``C``.
        buffer, version: the plan's buffer (every tensor above is a view of it) and its version counter
            when the plan was made (see :meth:`is_current`).
    """

    ranges: torch.Tensor
    token_to_unit: torch.Tensor
    covered_tokens: torch.Tensor
    seq_len: int
    num_tokens: int
    max_span: int
    num_covered: int
    buffer: torch.Tensor = field(repr=False)
    version: int = field(repr=False)

    def is_current(self) -> bool:
        """No tensor of the plan was modified in place since it was made (its facts still hold)."""
        return self.buffer._version == self.version


@dataclass(frozen=True, eq=False)
class LayoutPlan:
    """Everything the ops need to know about a batch's units, computed once on the host.

    Built by :func:`plan_layout` where the batch is built (the collator, in the DataLoader worker),
    validated there once, and moved to the device with one copy: all its tensors are views of a single
    int32 buffer. The plan is handed to the ops with the tensors it describes (``span_pool(...,
    plan=plan.student)``, ``structural_loss(..., plan=plan)``), so with a plan nothing in the forward or
    the backward reads device data on the host.

    Attributes:
        student, teacher: :class:`SidePlan` of each tokenization; the same object when both share one
            tokenization (then ``student.ranges is teacher.ranges``).
        cu_units: int32 ``[B+1]``; unit_to_seq: int32 ``[U]``.
        work_lists: ``{block_m: int32 [W, 4]}`` DSA work lists (:func:`block_diagonal_work_list`) for
            ``block_m`` in :data:`WORK_LIST_BLOCKS`.
        bounds: ``cu_units`` on the host (a tuple of B+1 ints); host_cu_units: the same as a CPU tensor.
        same_tokenization: the student's and the teacher's units are the same token ranges with the same T.
        buffer, version: the int32 buffer every tensor above except ``host_cu_units`` views, and its
            version counter when the plan was made (see :meth:`is_current`).
    """

    student: SidePlan
    teacher: SidePlan
    cu_units: torch.Tensor
    unit_to_seq: torch.Tensor
    work_lists: dict[int, torch.Tensor]
    bounds: tuple[int, ...]
    host_cu_units: torch.Tensor
    same_tokenization: bool
    buffer: torch.Tensor
    version: int
    slots: tuple[tuple[str, int, tuple[int, ...]], ...]  # (name, offset, shape) of each view

    @property
    def num_units(self) -> int:
        return len(self.bounds) and self.bounds[-1]

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def is_current(self) -> bool:
        """No tensor of the plan was modified in place since it was made (views share one version
        counter): a plan whose tensors were edited no longer describes them, and the ops must not use it."""
        return self.buffer._version == self.version

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LayoutPlan:
        """The plan on ``device``: one copy of the buffer, the views rebuilt on it (sharing kept)."""
        device = torch.device(device)
        if device == self.buffer.device:
            return self
        return _plan_from_buffer(self._template(), self.buffer.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> LayoutPlan:
        """The plan in pinned host memory (a later ``to(device, non_blocking=True)`` overlaps)."""
        if self.buffer.device.type != "cpu" or self.buffer.is_pinned():
            return self
        return _plan_from_buffer(self._template(), self.buffer.pin_memory())

    def __reduce__(self) -> tuple:
        # Pickled as its buffer and host facts: the views are rebuilt on the unpickled buffer, so they
        # share it again (a pickled view is a copy of its own), with the plan's state (current or not).
        return _plan_from_buffer, (self._template(), self.buffer, self.is_current())

    def _template(self) -> _PlanTemplate:
        def meta(p: SidePlan) -> tuple[int, int, int, int]:
            return p.seq_len, p.num_tokens, p.max_span, p.num_covered

        teacher = None if self.teacher is self.student else meta(self.teacher)
        blocks = tuple(self.work_lists)
        host = (self.bounds, self.host_cu_units, self.same_tokenization)
        return _PlanTemplate(meta(self.student), teacher, blocks, *host, self.slots)


class _PlanTemplate(NamedTuple):
    """What a :class:`LayoutPlan` holds besides its buffer: each side's ``(seq_len, num_tokens,
    max_span, num_covered)`` (teacher None: shared with the student), the work-list block sizes, the host
    offsets, and the buffer's slots."""

    student: tuple[int, int, int, int]
    teacher: tuple[int, int, int, int] | None
    work_blocks: tuple[int, ...]
    bounds: tuple[int, ...]
    host_cu_units: torch.Tensor
    same_tokenization: bool
    slots: tuple[tuple[str, int, tuple[int, ...]], ...]


def _plan_from_buffer(template: _PlanTemplate, buffer: torch.Tensor, current: bool = True) -> LayoutPlan:
    """The plan whose tensors are views of ``buffer`` (``current=False``: a plan that no longer holds)."""
    views = {name: buffer[off : off + math.prod(shape)].view(shape) for name, off, shape in template.slots}
    version = buffer._version if current else -1

    def side(key: str, meta: tuple[int, int, int, int]) -> SidePlan:
        names = (f"{key}.ranges", f"{key}.token_to_unit", f"{key}.covered_tokens")
        return SidePlan(*(views[n] for n in names), *meta, buffer, version)

    student = side("student", template.student)
    teacher = student if template.teacher is None else side("teacher", template.teacher)
    return LayoutPlan(
        student=student,
        teacher=teacher,
        cu_units=views["cu_units"],
        unit_to_seq=views["unit_to_seq"],
        work_lists={bm: views[f"work{bm}"] for bm in template.work_blocks},
        bounds=template.bounds,
        host_cu_units=template.host_cu_units,
        same_tokenization=template.same_tokenization,
        buffer=buffer,
        version=version,
        slots=template.slots,
    )


class LayoutSideError(ValueError):
    """Raised by :func:`plan_layout`: ``side`` (``"student"``/``"teacher"``) and the original error."""

    def __init__(self, side: str, error: Exception) -> None:
        super().__init__(f"{side} units: {error}")
        self.side, self.error = side, error


def plan_layout(
    student_ranges: torch.Tensor,
    teacher_ranges: torch.Tensor,
    cu_units: torch.Tensor,
    seq_len_student: int,
    seq_len_teacher: int,
) -> LayoutPlan:
    """Validate a batch's packed units and compute its :class:`LayoutPlan`, on the host.

    Args:
        student_ranges, teacher_ranges: int32 ``[U, 2]`` flat token ranges into ``B * seq_len_*``.
        cu_units: int32 ``[B+1]``.
        seq_len_student, seq_len_teacher: the padded lengths ``T``.

    Returns:
        The plan, on the CPU (device tensors are copied to the host first: one sync, here, not in the
        loss). Its ranges are the given values; a teacher side equal to the student side (same values,
        same T) is shared.

    Raises:
        LayoutSideError: a side fails :func:`validate_layout` (``.error`` is the original TypeError or
            ValueError, whose message names the offending unit).
    """
    sr, tr, cu = (t.detach().to("cpu") for t in (student_ranges, teacher_ranges, cu_units))
    sides = [("student", sr, int(seq_len_student)), ("teacher", tr, int(seq_len_teacher))]
    for side, ranges, T in sides:
        try:
            if not isinstance(ranges, torch.Tensor) or not isinstance(cu, torch.Tensor):
                raise TypeError("ranges and cu_units must be tensors")
            validate_layout(ranges, cu, (cu.shape[0] - 1) * T if cu.dim() == 1 else -1, T)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise LayoutSideError(side, exc) from exc
    shared = tr is sr or (seq_len_student == seq_len_teacher and torch.equal(sr, tr))
    B = cu.shape[0] - 1
    bounds = tuple(cu.tolist())
    U = bounds[-1]
    parts: list[tuple[str, torch.Tensor]] = []

    def side_plan(key: str, ranges: torch.Tensor, T: int) -> tuple[int, int, int, int]:
        N = B * T
        t2u = token_to_unit(ranges, N)
        covered = torch.nonzero(t2u >= 0).reshape(-1).to(torch.int32)
        lengths = (ranges[:, 1] - ranges[:, 0]).long()
        parts.extend(
            [(f"{key}.ranges", ranges), (f"{key}.token_to_unit", t2u), (f"{key}.covered_tokens", covered)]
        )
        return T, N, int(lengths.max()) if U else 0, int(covered.shape[0])

    student = side_plan("student", sr.contiguous(), int(seq_len_student))
    teacher = None if shared else side_plan("teacher", tr.contiguous(), int(seq_len_teacher))
    parts.append(("cu_units", cu))
    parts.append(("unit_to_seq", unit_to_seq(cu, U)))
    for bm in WORK_LIST_BLOCKS:
        parts.append((f"work{bm}", block_diagonal_work_list(cu, bm)))
    slots, offset = [], 0
    for name, t in parts:
        slots.append((name, offset, tuple(t.shape)))
        offset += t.numel()
    buffer = torch.cat([t.reshape(-1).to(torch.int32) for _, t in parts]) if parts else cu.new_empty(0)
    template = _PlanTemplate(student, teacher, WORK_LIST_BLOCKS, bounds, cu.clone(), shared, tuple(slots))
    return _plan_from_buffer(template, buffer)


@dataclass(eq=False)
class UnitBatch:
    """Units of one granularity for a batch, packed (docs/method.md#packed-layout), with its plan.

    Attributes:
        student_ranges: int32 ``[U, 2]``, ``[start, end)`` flat token indices into the student's
            padded batch ``B * seq_len_student``.
        teacher_ranges: int32 ``[U, 2]``, the same units in the teacher's tokenization (the same
            tensor as ``student_ranges`` when both share one tokenization).
        cu_units: int32 ``[B+1]``, units of sequence b are rows ``cu_units[b]:cu_units[b+1]``.
        seq_len_student: T of the student's padded batch.
        seq_len_teacher: T of the teacher's padded batch.
        plan: the :class:`LayoutPlan`, computed by the constructor on the host (pass tensors on the CPU:
            device tensors cost one device-to-host copy here), or ``None`` when the layout is invalid;
            then ``plan_error`` holds the :class:`LayoutSideError` and the losses raise it (with
            ``check_units=True``) or let the ops run their own checks.

    With a valid plan the fields are views of the plan's buffer: ``to()`` moves the batch with one
    copy and keeps a shared ``teacher_ranges`` shared; ``pin_memory()`` pins it (DataLoader
    ``pin_memory=True`` calls it).
    """

    student_ranges: torch.Tensor
    teacher_ranges: torch.Tensor
    cu_units: torch.Tensor
    seq_len_student: int
    seq_len_teacher: int
    plan: LayoutPlan | None = field(default=None, repr=False)
    plan_error: LayoutSideError | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.plan is None and self.plan_error is None:
            try:
                plan = plan_layout(
                    self.student_ranges,
                    self.teacher_ranges,
                    self.cu_units,
                    self.seq_len_student,
                    self.seq_len_teacher,
                )
            except LayoutSideError as exc:
                self.plan_error = exc
                return
            device = getattr(self.student_ranges, "device", plan.device)
            self.plan = plan.to(device)
        if self.plan is not None:
            self._take_plan_views()

    def _take_plan_views(self) -> None:
        self.student_ranges = self.plan.student.ranges
        self.teacher_ranges = self.plan.teacher.ranges
        self.cu_units = self.plan.cu_units

    def __getstate__(self) -> dict:
        # A batch with a live plan is pickled as its plan (the fields are views of the plan's buffer, and
        # come back as views of the unpickled buffer); any other batch field by field.
        state = dict(self.__dict__)
        if self.live_plan() is not None:
            del state["student_ranges"], state["teacher_ranges"], state["cu_units"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "cu_units" not in state:
            self._take_plan_views()

    @property
    def num_units(self) -> int:
        return int(self.student_ranges.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.cu_units.shape[0]) - 1

    def live_plan(self) -> LayoutPlan | None:
        """The plan, if the batch's tensors are still the plan's and unmodified; else None."""
        plan = self.plan
        if plan is None:
            return None
        if (
            self.student_ranges is not plan.student.ranges
            or self.teacher_ranges is not plan.teacher.ranges
            or self.cu_units is not plan.cu_units
        ):
            return None
        # torch.compile cannot trace a version counter: a traced graph trusts the plan it was given.
        return plan if torch.compiler.is_compiling() or plan.is_current() else None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> UnitBatch:
        """A copy with every tensor on ``device`` (one copy of the plan's buffer; sharing kept)."""
        plan = self.live_plan()
        if plan is not None:
            moved = plan.to(device, non_blocking=non_blocking)
            return UnitBatch(
                moved.student.ranges,
                moved.teacher.ranges,
                moved.cu_units,
                self.seq_len_student,
                self.seq_len_teacher,
                plan=moved,
            )
        move = lambda t: t.to(device, non_blocking=non_blocking)
        student = move(self.student_ranges)
        teacher = student if self.teacher_ranges is self.student_ranges else move(self.teacher_ranges)
        return UnitBatch(
            student,
            teacher,
            move(self.cu_units),
            self.seq_len_student,
            self.seq_len_teacher,
            plan_error=self.plan_error,
        )

    def pin_memory(self) -> UnitBatch:
        """The batch in pinned host memory (called by a DataLoader with ``pin_memory=True``)."""
        plan = self.live_plan()
        if plan is None or not torch.cuda.is_available():
            return self
        pinned = plan.pin_memory()
        return UnitBatch(
            pinned.student.ranges,
            pinned.teacher.ranges,
            pinned.cu_units,
            self.seq_len_student,
            self.seq_len_teacher,
            plan=pinned,
        )
