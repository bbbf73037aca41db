"""Input checks of the loss modules (docs/method.md#the-objective): metadata always (types, shapes,
devices), the unit layout's values where the batch has no live plan, and the HRA level's requirements.
Every error names the argument (and the layer pairs) concerned; nothing here reads device data except
:func:`check_units` for a batch without a plan.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from mta_kernels import layout
from mta_kernels.constants import GRANULARITIES, HRA_LEVELS, POOLINGS
from mta_kernels.layout import UnitBatch
from mta_kernels.ops.glue import check_weights


def live_plan(units: UnitBatch) -> layout.LayoutPlan | None:
    """The batch's live layout plan (None for a duck-typed batch, an invalid or a modified one)."""
    live = getattr(units, "live_plan", None)
    return None if live is None else live()


def check_float(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}")


def check_mask(mask: torch.Tensor | None, B: int, T: int, device: torch.device, what: str) -> torch.Tensor:
    """The attention mask ``[B, T]``; ``None`` means every token is valid."""
    if mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor [B, T] or None, got {type(mask).__name__}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(
            f"{what} must have shape [B, T] = {[B, T]} like its hidden states, got {list(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"{what} is on {mask.device} but its hidden states are on {device}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{what} must be bool or 0/1 integers, got {mask.dtype}")
    return mask


def check_confidence(
    confidence: torch.Tensor | None, B: int, Tt: int, device: torch.device, weighted: bool
) -> torch.Tensor | None:
    """The teacher's per-token confidence ``[B, Tt]`` (or None). Its values (finite, >= 0) are checked
    where that reads nothing back from a device (``ops.glue.check_weights``, no device assert: the
    loss's launch count)."""
    if confidence is None:
        return None
    if not isinstance(confidence, torch.Tensor):
        raise TypeError(
            f"teacher_confidence must be a torch.Tensor [B, Tt] or None, got {type(confidence).__name__}"
        )
    if not confidence.is_floating_point():
        raise TypeError(f"teacher_confidence must be a floating-point tensor, got {confidence.dtype}")
    if tuple(confidence.shape) != (B, Tt):
        raise ValueError(
            f"teacher_confidence must have shape [B, Tt] = {[B, Tt]} like the teacher's hidden states, "
            f"got {list(confidence.shape)}"
        )
    if confidence.device != device:
        raise ValueError(
            f"teacher_confidence is on {confidence.device} but the hidden states are on {device}"
        )
    if not weighted:
        raise ValueError(
            "teacher_confidence replaces the unit and token weights, but this loss is unweighted "
            "(weighted=False): build it with weighted=True or pass no confidence"
        )
    check_weights(confidence, "teacher_confidence (e.g. variants.teacher_confidence)", device_assert=False)
    return confidence


def check_units(
    units: UnitBatch, B: int, Ts: int, Tt: int, device: torch.device, what: str, check_values: bool
) -> None:
    """A UnitBatch against the hidden states: metadata always; with ``check_values`` also the values
    (sorted, non-overlapping, inside their sequence: ``layout.validate_layout``, one device-to-host
    copy per ranges tensor on CUDA). The ops check bounds and order themselves, but only this check
    sees ``cu_units`` and the ranges together (a unit crossing a sequence)."""
    for name in ("student_ranges", "teacher_ranges", "cu_units", "seq_len_student", "seq_len_teacher"):
        if not hasattr(units, name):
            raise TypeError(f"{what}: expected a UnitBatch, got {type(units).__name__} without .{name}")
    sr, tr, cu = units.student_ranges, units.teacher_ranges, units.cu_units
    for name, r in (("student_ranges", sr), ("teacher_ranges", tr)):
        if r.dim() != 2 or r.shape[1] != 2:
            raise ValueError(f"{what}: units.{name} must be [U, 2], got {list(r.shape)}")
        if r.dtype != torch.int32:
            raise TypeError(f"{what}: units.{name} must be int32, got {r.dtype}")
    if sr.shape[0] != tr.shape[0]:
        raise ValueError(
            f"{what}: {sr.shape[0]} student units but {tr.shape[0]} teacher units; unit u must be the same "
            "unit in both tokenizations"
        )
    if cu.dim() != 1 or cu.dtype != torch.int32:
        raise ValueError(f"{what}: units.cu_units must be int32 [B+1], got {cu.dtype} {list(cu.shape)}")
    if cu.shape[0] != B + 1:
        raise ValueError(
            f"{what}: units.cu_units has {cu.shape[0] - 1} sequences but the hidden states have B={B}"
        )
    if units.seq_len_student != Ts:
        raise ValueError(f"{what}: units.seq_len_student={units.seq_len_student} but the student's T is {Ts}")
    if units.seq_len_teacher != Tt:
        raise ValueError(f"{what}: units.seq_len_teacher={units.seq_len_teacher} but the teacher's T is {Tt}")
    for name, t in (("student_ranges", sr), ("teacher_ranges", tr), ("cu_units", cu)):
        if t.device != device:
            raise ValueError(f"{what}: units.{name} is on {t.device} but the hidden states are on {device}")
    if not check_values:
        return
    error = getattr(units, "plan_error", None)
    if error is not None:  # found when the batch was planned, on the host
        raise type(error.error)(f"{what}: {error}") from error.error
    live = getattr(units, "live_plan", None)
    if live is None or live() is None:  # not a planned UnitBatch (or modified since): check here
        sides = [("student", sr, Ts)] + ([] if tr is sr and Tt == Ts else [("teacher", tr, Tt)])
        for side, ranges, T in sides:
            try:
                layout.validate_layout(ranges, cu, B * T, T)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{what}: {side} units: {exc}") from exc


def check_same_tokenization(units: UnitBatch, what: str) -> None:
    """Token-level HRA compares token i of the student with token i of the teacher."""
    sr, tr = units.student_ranges, units.teacher_ranges
    plan = live_plan(units)
    if plan is not None:  # compared on the host when the batch was planned
        same = plan.same_tokenization
    else:
        same = units.seq_len_student == units.seq_len_teacher and (sr is tr or torch.equal(sr, tr))
    if not same:
        raise ValueError(
            f"{what}: hra level 'token' needs the student and the teacher to share one tokenizer, but their "
            f"units differ (T {units.seq_len_student} vs {units.seq_len_teacher}"
            f"{'' if units.seq_len_student != units.seq_len_teacher else ', different ranges'}); "
            "use hra='unit' for different tokenizers"
        )


def check_stacked_pair(
    student: torch.Tensor, teacher: torch.Tensor, student_dim: int | None, teacher_dim: int | None, what: str
) -> None:
    """student ``[L, B, Ts, Ds]`` and teacher ``[L, B, Tt, Dt]``."""
    check_float(student, f"{what}: student hidden states")
    check_float(teacher, f"{what}: teacher hidden states")
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{what}: hidden states must be [B, T, D] (or stacked [L, B, T, D]), got student "
            f"{list(student.shape[1:])} and teacher {list(teacher.shape[1:])}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{what}: {student.shape[0]} student layers but {teacher.shape[0]} teacher layers")
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"{what}: student batch size {student.shape[1]} != teacher batch size {teacher.shape[1]}"
        )
    if student.device != teacher.device:
        raise ValueError(f"{what}: student on {student.device} but teacher on {teacher.device}")
    if student_dim is not None and student.shape[-1] != student_dim:
        raise ValueError(
            f"{what}: student hidden size {student.shape[-1]} != declared student_dim {student_dim}"
        )
    if teacher_dim is not None and teacher.shape[-1] != teacher_dim:
        raise ValueError(
            f"{what}: teacher hidden size {teacher.shape[-1]} != declared teacher_dim {teacher_dim}"
        )


@contextlib.contextmanager
def naming(what: str) -> Iterator[None]:
    """Prefix the ops' own errors (bad range values, found inside the ops) with the pairs concerned."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{what}: {exc}") from exc


def check_choices(pooling: str, hra: str | None = "unit") -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if hra not in HRA_LEVELS:
        raise ValueError(f"hra must be one of {HRA_LEVELS}, got {hra!r}")


def as_stacked(
    student: torch.Tensor, teacher: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``[B, T, D]`` -> ``[1, B, T, D]`` views (and a flag to squeeze the result), or stacked as is."""
    check_float(student, f"{what}: student hidden states")
    check_float(teacher, f"{what}: teacher hidden states")
    if student.dim() == 3 and teacher.dim() == 3:
        return student.unsqueeze(0), teacher.unsqueeze(0), True
    if student.dim() == 4 and teacher.dim() == 4:
        return student, teacher, False
    raise ValueError(
        f"{what}: student and teacher must both be [B, T, D] or both [L, B, T, D], got "
        f"{list(student.shape)} and {list(teacher.shape)}"
    )


def check_settings(
    pairs: Sequence[tuple[int, int, str]],
    student_dim: int,
    teacher_dim: int,
    pooling: str,
    weighted: bool,
    hra: str | None,
    gamma: float,
) -> list[tuple[int, int, str]]:
    """The constructor arguments of :class:`~mta_kernels.losses.MTALoss`; returns the pairs as tuples."""
    check_choices(pooling, hra)
    for name, v in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(weighted, bool):
        raise TypeError(f"weighted must be a bool, got {weighted!r}")
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    pairs = [tuple(p) for p in pairs]
    if not pairs:
        raise ValueError("pairs must name at least one (student_layer, teacher_layer, granularity)")
    for k, p in enumerate(pairs):
        ok = (
            len(p) == 3
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p[:2])
            and p[2] in GRANULARITIES
        )
        if not ok:
            raise ValueError(
                f"pair {k} {p!r} must be (student_layer >= 0, teacher_layer >= 0, "
                f"granularity in {GRANULARITIES})"
            )
    return pairs


def check_states(states: Sequence[torch.Tensor], side: str) -> Sequence[torch.Tensor]:
    """A model's ``hidden_states`` tuple."""
    if isinstance(states, torch.Tensor) or not isinstance(states, Sequence):
        raise TypeError(
            f"{side}_hidden_states must be the tuple of [B, T, D] tensors a Hugging Face model returns "
            f"with output_hidden_states=True, got {type(states).__name__}"
        )
    return states


def check_layer_pairs(
    pairs: Sequence[tuple[int, int, str]],
    s_states: Sequence[torch.Tensor],
    t_states: Sequence[torch.Tensor],
    units: Mapping[str, UnitBatch],
    dims: tuple[int | None, int | None],
    hra_level: str | None,
    check_values: bool,
) -> tuple[int, int, int]:
    """Every pair's layers and units against each other and the declared widths ``dims``; returns
    ``(B, Ts, Tt)``. With ``check_values``, a granularity's unit values are validated once per call."""
    B = Ts = Tt = None
    checked: set[str] = set()
    for k, (ls, lt, g) in enumerate(pairs):
        what = f"pair {k} (student layer {ls}, teacher layer {lt}, {g!r})"
        for side, states, layer in (("student", s_states, ls), ("teacher", t_states, lt)):
            if layer >= len(states):
                raise ValueError(
                    f"{what}: {side} layer {layer} is outside the {side}'s hidden_states "
                    f"({len(states)} entries: 0 = embeddings .. {len(states) - 1})"
                )
        hs, ht = s_states[ls], t_states[lt]
        check_stacked_pair(hs.unsqueeze(0), ht.unsqueeze(0), dims[0], dims[1], what)
        if B is None:
            B, Ts, Tt = hs.shape[0], hs.shape[1], ht.shape[1]
        elif (hs.shape[0], hs.shape[1], ht.shape[1]) != (B, Ts, Tt):
            raise ValueError(
                f"{what}: hidden states {list(hs.shape)} / {list(ht.shape)} differ from other layers' "
                f"[{B}, {Ts}, .] / [{B}, {Tt}, .]"
            )
        if g not in units:
            raise ValueError(f"{what}: needs units[{g!r}] but units has {sorted(units)}")
        check_units(units[g], B, Ts, Tt, hs.device, what, check_values and g not in checked)
        checked.add(g)
        if hra_level == "token":
            check_same_tokenization(units[g], what)
    return B, Ts, Tt
