"""MTA loss modules (docs/method.md#the-objective): layer pairs, granularity split, pooling, weighting, HRA.

``MTALoss`` turns the ``hidden_states`` tuples of a student and a teacher (Hugging Face,
``output_hidden_states=True``) and the packed units of each granularity into

    L_MTA = (1/K) Σ_k ( L_DSA^k + γ · L_HRA^k )

On the Triton path (CUDA, or the interpreter) the pairs are stacked ``[K, B, T, D]`` once per side: token
saliency runs once per side for all pairs, span pooling, the structural (DSA) loss and the fused HRA
term once per granularity; on the torch path (CPU) each pair runs on views of its own layers (no
copies). The teacher side runs under ``torch.no_grad()``. The units' layout plan (``UnitBatch.plan``,
built and validated on the host where the batch is built) gives the ops everything data-dependent, so
the forward and the backward read nothing from the device on the host. Design notes:
``docs/design/losses.md``.

``DSALoss`` and ``HRALoss`` compute one term for one layer pair (``[B, T, D]`` inputs) or for stacked
layer pairs (``[L, B, T, D]`` inputs).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mta_kernels import layout
from mta_kernels.constants import GRANULARITIES, HRA_LEVELS, POOLINGS
from mta_kernels.layout import UnitBatch
from mta_kernels.ops._dispatch import use_triton
from mta_kernels.ops.glue import normalised_weights
from mta_kernels.ops.hra import fused_hra
from mta_kernels.ops.saliency import token_saliency
from mta_kernels.ops.span_pool import _span_pool as span_pool  # saliency weights: >= 0 by construction
from mta_kernels.ops.structural import structural_loss
from mta_kernels.presets import PRESETS, MTAPreset, auto_pairs

__all__ = ["MTALoss", "MTALossOutput", "MTAPreset", "DSALoss", "HRALoss", "PRESETS", "auto_pairs"]


# ----------------------------------------------------------------------------- vectorised helpers
def _stack_layers(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L, B, T, D]`` from L tensors ``[B, T, D]``: a view when L == 1, one copy otherwise."""
    if len(layers) == 1:
        return layers[0].unsqueeze(0)
    return torch.stack(list(layers))


def _covered_mask(ranges: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """bool ``[N]``: token lies in some unit. Difference array + cumsum: O(N + U), no host sync."""
    r = ranges.long().clamp(0, num_tokens)  # never an out-of-bounds write, even for unchecked units
    delta = torch.zeros(num_tokens + 1, dtype=torch.int32, device=ranges.device)
    ones = torch.ones(r.shape[0], dtype=torch.int32, device=ranges.device)
    delta.index_add_(0, r[:, 0], ones)
    delta.index_add_(0, r[:, 1], -ones)
    return delta.cumsum(0)[:num_tokens] > 0


def _eager_triton(t: torch.Tensor) -> bool:
    """The ops run their Triton kernels on ``t`` and the glue is not being traced by torch.compile (the
    backend choice reads a context variable, which the tracer does not follow)."""
    return not torch.compiler.is_compiling() and use_triton(t)


def _covered(units: UnitBatch, side: str, num_tokens: int) -> torch.Tensor:
    """bool ``[N]`` covered tokens of one side: from the plan's token -> unit map when there is one."""
    plan = _plan(units)
    if plan is not None:
        return getattr(plan, side).token_to_unit >= 0
    return _covered_mask(getattr(units, f"{side}_ranges"), num_tokens)


def _normalised_weights(saliency: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """``ŵ_i = a_i / Σ_{k covered, same sequence} a_k`` on covered tokens, 0 elsewhere.

    (docs/method.md#span-pooling)

    saliency ``[L, B, T]``, covered bool ``[B*T]`` -> ``[L, B, T]`` (a sequence whose covered
    saliency sums to 0 gets weights 0, never 0/0). The layout is padded, so the per-sequence segment
    sum is a plain reduction over T.
    """
    L, B, T = saliency.shape
    a = saliency * covered.view(1, B, T)
    per_seq = a.sum(-1, keepdim=True)  # [L, B, 1]
    # per_seq = 0 only when every a_i of the sequence is 0: 0 / tiny = 0, never 0 / 0
    return a / per_seq.clamp_min(torch.finfo(per_seq.dtype).tiny)


def _normalised_confidence(
    confidence: torch.Tensor, units: UnitBatch, plan: layout.LayoutPlan | None, teacher: torch.Tensor
) -> torch.Tensor:
    """``ĉ_i = c_i / Σ_{k covered, same sequence} c_k`` on the teacher's covered tokens, 0 elsewhere: the
    teacher confidence ``[B, Tt]`` normalised like the saliency (the published ``--entropy_weight``).

    Returns ``[1, B, Tt]``, float64 for a float64 teacher, else float32.
    """
    B, Tt = confidence.shape
    dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    c = confidence.detach().to(dtype).reshape(1, B, Tt)
    if plan is not None and dtype == torch.float32 and _eager_triton(teacher):
        return normalised_weights(c, plan.teacher.token_to_unit)
    return _normalised_weights(c, _covered(units, "teacher", B * Tt))


def _unit_sums(token_weights: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """``W_u = Σ_{i in u} w_i`` for every unit, from per-sequence prefix sums (no loop, no host sync).

    token_weights ``[L, B, T]``, ranges int32 ``[U, 2]`` flat into ``B*T`` -> ``[L, U]``.
    The prefix sums run per sequence and in float64, so ``c[end] − c[start]`` loses nothing to
    cancellation; each sequence gets a leading 0, hence flat token f of sequence b sits at f + b.
    """
    L, B, T = token_weights.shape
    prefix = F.pad(token_weights.to(torch.float64).cumsum(-1), (1, 0)).reshape(L, B * (T + 1))
    start, end = ranges[:, 0].long(), ranges[:, 1].long()
    seq = torch.div(start, T, rounding_mode="floor")  # a unit never crosses a sequence
    sums = prefix[:, end + seq] - prefix[:, start + seq]  # [L, U]
    return sums.to(token_weights.dtype)


# ------------------------------------------------------------------------------- input validation
def _plan(units: UnitBatch) -> layout.LayoutPlan | None:
    """The batch's live layout plan (None for a duck-typed batch, an invalid or a modified one)."""
    live = getattr(units, "live_plan", None)
    return None if live is None else live()


def _check_float(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {t.dtype}")


def _check_mask(mask: torch.Tensor | None, B: int, T: int, device: torch.device, what: str) -> torch.Tensor:
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


def _check_confidence(
    confidence: torch.Tensor | None, B: int, Tt: int, device: torch.device, weighted: bool
) -> torch.Tensor | None:
    """The teacher's per-token confidence ``[B, Tt]`` (or None). Its values (finite, >= 0) are checked
    where that reads nothing back from a device: CPU tensors on the torch path."""
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
    if confidence.device.type == "cpu" and not torch.compiler.is_compiling() and not use_triton(confidence):
        c = confidence.detach()
        if not bool((torch.isfinite(c) & (c >= 0)).all()):
            raise ValueError("teacher_confidence must be finite and >= 0 (e.g. variants.teacher_confidence)")
    return confidence


def _check_units(
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


def _check_same_tokenization(units: UnitBatch, what: str) -> None:
    """Token-level HRA compares token i of the student with token i of the teacher."""
    sr, tr = units.student_ranges, units.teacher_ranges
    plan = _plan(units)
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


def _check_stacked_pair(
    student: torch.Tensor, teacher: torch.Tensor, student_dim: int | None, teacher_dim: int | None, what: str
) -> None:
    """student ``[L, B, Ts, Ds]`` and teacher ``[L, B, Tt, Dt]``."""
    _check_float(student, f"{what}: student hidden states")
    _check_float(teacher, f"{what}: teacher hidden states")
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
def _naming(what: str) -> Iterator[None]:
    """Prefix the ops' own errors (bad range values, found inside the ops) with the pairs concerned."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{what}: {exc}") from exc


def _check_choices(pooling: str, hra: str | None = "unit") -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if hra not in HRA_LEVELS:
        raise ValueError(f"hra must be one of {HRA_LEVELS}, got {hra!r}")


# --------------------------------------------------------------------------------------- the core
def _stacked_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    units: UnitBatch,
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
    *,
    pooling: str,
    weighted: bool,
    with_dsa: bool,
    hra_level: str | None,
    projectors: Sequence[nn.Linear],
    student_saliency: torch.Tensor | None = None,
    teacher_saliency: torch.Tensor | None = None,
    teacher_confidence: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """DSA and HRA of L stacked layer pairs of one granularity (inputs already validated).

    Args:
        student: ``[L, B, Ts, Ds]`` (gradient flows here); teacher: ``[L, B, Tt, Dt]`` (constant).
        units: the granularity's UnitBatch; masks ``[B, Ts]`` / ``[B, Tt]``.
        projectors: L Linear(Ds → Dt), used when ``hra_level`` is not None.
        student_saliency, teacher_saliency: ``[L, B, T]`` token saliencies when the caller computed them
            (for all its layers at once), else computed here when needed.
        teacher_confidence: ``[B, Tt]`` (checked) or None: replaces the teacher's saliency as the source
            of the unit importances and the token-level HRA weights (docs/method.md#entropy-weighting).
    Returns:
        ``(dsa [L] or None, hra [L] or None)``, float32 (float64 for float64 inputs).
    """
    L, B, Ts, Ds = student.shape
    Tt, Dt = teacher.shape[2], teacher.shape[3]
    need_units = with_dsa or hra_level == "unit"  # token-level HRA alone pools nothing
    attention = pooling == "attention" and need_units
    student_flat = student.reshape(L, B * Ts, Ds)  # a view for stacked / contiguous layers
    plan = _plan(units)

    teacher_units = student_units = unit_w = None
    with torch.no_grad():
        teacher = teacher.detach()
        teacher_flat = teacher.reshape(L, B * Tt, Dt)
        # ŵ^T: the teacher's attention weights normalised over the covered tokens of each sequence. It
        # drives the teacher's pooling, the unit importance W and the token-level HRA weights.
        teacher_w = None  # [L, B, Tt]
        if attention or (weighted and teacher_confidence is None):
            if teacher_saliency is None:
                teacher_saliency = token_saliency(teacher, teacher_mask)
            if plan is not None and _eager_triton(teacher):  # one launch for the whole normalisation
                teacher_w = normalised_weights(teacher_saliency, plan.teacher.token_to_unit)
            else:
                teacher_w = _normalised_weights(teacher_saliency, _covered(units, "teacher", B * Tt))
        # The published --entropy_weight: the confidence, normalised over the covered tokens like ŵ^T,
        # replaces ŵ^T as unit importance and token-HRA weight (ŵ^T still pools). Shared by the L layers.
        weight_w = teacher_w
        if weighted and teacher_confidence is not None:
            weight_w = _normalised_confidence(teacher_confidence, units, plan, teacher).expand(L, B, Tt)
        if need_units:
            pool_w = teacher_w.reshape(L, B * Tt) if attention else None
            teacher_units, den = _pool_with_mass(teacher_flat, units.teacher_ranges, pool_w)  # [L, U, Dt]
            if weighted and teacher_confidence is not None:  # W_u = Σ_{i in u} ĉ_i, the same for every layer
                unit_w = _unit_sums(weight_w[:1], units.teacher_ranges).expand(L, -1).contiguous()
            elif weighted:
                # W_u = Σ_{i in u} ŵ_i: the pooling's own weight sums when it pooled with ŵ
                unit_w = den.to(teacher_w.dtype) if attention else _unit_sums(teacher_w, units.teacher_ranges)
        # The student's pooling needs a_i only up to a per-sequence factor, which cancels in h_u: the raw
        # saliency (a view) pools exactly like its normalised version and saves the normalisation.
        student_w = None
        if attention:
            if student_saliency is None:
                student_saliency = token_saliency(student.detach(), student_mask)
            student_w = student_saliency.reshape(L, B * Ts)

    if need_units:
        student_units = span_pool(student_flat, units.student_ranges, student_w)  # [L, U, Ds]

    dsa = structural_loss(student_units, teacher_units, units.cu_units, unit_w) if with_dsa else None

    hra = None
    if hra_level is not None:
        if len(projectors) == 1:  # views
            weight, bias = projectors[0].weight.unsqueeze(0), projectors[0].bias.unsqueeze(0)
        else:
            weight = torch.stack([p.weight for p in projectors])  # [L, Dt, Ds]
            bias = torch.stack([p.bias for p in projectors])  # [L, Dt]
        if hra_level == "unit":
            hra = fused_hra(student_units, teacher_units, unit_w, None, weight, bias)
        else:
            # Only the covered tokens go through the projector (the plan's host-side list: static
            # shapes, no sync); without a plan, all B*T tokens with weight 0 off the covered set.
            rows = None if plan is None else plan.student.covered_tokens
            if weighted:
                token_w = weight_w.reshape(L, B * Ts).contiguous()
            elif rows is None:  # unweighted: every covered token counts 1
                token_w = _covered(units, "student", B * Ts).to(student.dtype).expand(L, -1)
            else:
                token_w = None
            hra = fused_hra(student_flat, teacher_flat, token_w, rows, weight, bias)
    return dsa, hra


def _pool_with_mass(
    hidden: torch.Tensor, ranges: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Span pooling that also returns each unit's weight sum ``[L, U]`` (a constant), from the op's
    ``1 / Σ w`` (0 for a unit of weight 0: 1/0 = inf becomes 0)."""
    out, inv_den = torch.ops.mta_kernels.span_pool(hidden, ranges, weights)
    return out, inv_den.reciprocal().nan_to_num(posinf=0.0)


# ----------------------------------------------------------------------------------------- modules
@dataclass
class MTALossOutput:
    """What :class:`MTALoss` returns.

    Attributes:
        loss: float32 scalar with grad, ``(1/K) Σ_k (dsa_k + γ · hra_k)``.
        dsa: ``[K]`` DSA loss of each pair, detached, in the order of ``pairs``.
        hra: ``[K]`` HRA loss of each pair, detached, in the order of ``pairs``; ``None`` when the
            module was built with ``hra=None`` (the term is absent, not zero).
    """

    loss: torch.Tensor
    dsa: torch.Tensor
    hra: torch.Tensor | None


class MTALoss(nn.Module):
    """The MTA objective over K mapped layer pairs (docs/method.md#the-objective).

    Args:
        pairs: ``[(student_layer, teacher_layer, granularity), ...]``: Hugging Face ``hidden_states``
            indices (0 = embeddings) and ``"word"`` or ``"phrase"``.
        student_dim, teacher_dim: hidden sizes D_s and D_t (checked against the hidden states).
        pooling: ``"attention"`` (saliency-weighted mean, the published default) or ``"mean"``.
        weighted: weight units (DSA, unit HRA) and tokens (token HRA) by the teacher's normalised
            attention weights; False weights everything 1.
        hra: ``"token"`` (shared tokenizer only), ``"unit"`` (any tokenizers) or ``None`` (DSA only).
        gamma: weight γ of the HRA term.
        check_units: raise the validation error of a UnitBatch whose layout is invalid (sorted,
            non-overlapping, inside its sequence; checked on the host when the batch was built, free
            here). A batch without a live plan is validated here (one device-to-host copy per ranges
            tensor on CUDA). False lets an invalid batch through to the ops' own bound/order checks.

    ``self.projectors`` is an ``nn.ModuleList`` of K ``nn.Linear(student_dim, teacher_dim)`` (bias),
    one per pair, present only when ``hra`` is not None: train them with the student.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[int, int, str]],
        student_dim: int,
        teacher_dim: int,
        pooling: str = "attention",
        weighted: bool = True,
        hra: str | None = "unit",
        gamma: float = 0.1,
        check_units: bool = True,
    ) -> None:
        super().__init__()
        _check_choices(pooling, hra)
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
        self.pairs: tuple[tuple[int, int, str], ...] = tuple(pairs)  # type: ignore[assignment]
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.pooling, self.weighted, self.hra_level, self.gamma = pooling, weighted, hra, float(gamma)
        self.check_units = bool(check_units)
        if hra is not None:
            self.projectors = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=True) for _ in pairs)
        # Pairs grouped by granularity (first-appearance order): one stacked call per group and side.
        self._groups: list[tuple[str, list[int]]] = []
        for g in dict.fromkeys(p[2] for p in self.pairs):
            self._groups.append((g, [k for k, p in enumerate(self.pairs) if p[2] == g]))
        # out[k] = concatenation-of-groups[_order[k]]
        flat = [k for _, ks in self._groups for k in ks]
        order = [flat.index(k) for k in range(len(flat))]
        self._reorder = order != sorted(order)  # only when granularities interleave in `pairs`
        self.register_buffer("_order", torch.tensor(order), persistent=False)

    # -------------------------------------------------------------------------------- constructors
    @classmethod
    def from_preset(cls, name: str, **overrides) -> MTALoss:
        """The published settings (docs/method.md#layer-presets, ``PRESETS``); any argument may be overridden.

        Known names: ``"gpt2-xl->gpt2"``, ``"opt-6.7b->opt-1.3b"``, ``"qwen1.5-1.8b->qwen1.5-0.5b"``,
        ``"qwen1.5-1.8b->gpt2"``, ``"mistral-7b->tinyllama"`` (teacher -> student). Dims come from the
        models (override ``student_dim=``/``teacher_dim=`` for small tests); ``hra`` defaults to
        ``"token"`` for the shared-tokenizer presets and ``"unit"`` for the cross-tokenizer ones.
        """
        key = name.strip().lower().replace(" ", "") if isinstance(name, str) else name
        if key not in PRESETS:
            raise ValueError(f"unknown MTALoss preset {name!r}; known presets: {', '.join(PRESETS)}")
        preset = PRESETS[key]
        kwargs = dict(
            pairs=preset.pairs,
            student_dim=preset.student_dim,
            teacher_dim=preset.teacher_dim,
            hra="token" if preset.same_tokenizer else "unit",
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def auto(
        cls,
        student_num_layers: int,
        teacher_num_layers: int,
        student_dim: int,
        teacher_dim: int,
        num_pairs: int = 3,
        n_word: int = 1,
        start_fraction: float = 0.5,
        **kwargs,
    ) -> MTALoss:
        """Depth-proportional mapping for any two models (see :func:`auto_pairs` for the rule).

        ``K = num_pairs`` student layers evenly spaced from ``start_fraction · L_s`` to the top layer
        ``L_s``, each matched to the teacher layer at the same relative depth, rounded half up; the
        first ``n_word`` pairs word level. GPT-2 (12) ← GPT-2-XL (48) with the defaults gives
        ``6 9 12 ← 24 36 48`` (the preset). ``*_num_layers`` are the models' transformer block counts
        (``config.num_hidden_layers``); other keyword arguments go to the constructor.
        """
        pairs = auto_pairs(student_num_layers, teacher_num_layers, num_pairs, n_word, start_fraction)
        return cls(pairs, student_dim, teacher_dim, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"pairs={list(self.pairs)}, student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
            f"pooling={self.pooling!r}, weighted={self.weighted}, hra={self.hra_level!r}, gamma={self.gamma}"
        )

    # ------------------------------------------------------------------------------------- forward
    def forward(
        self,
        student_hidden_states: Sequence[torch.Tensor],
        teacher_hidden_states: Sequence[torch.Tensor],
        units: Mapping[str, UnitBatch],
        student_mask: torch.Tensor | None,
        teacher_mask: torch.Tensor | None,
        teacher_confidence: torch.Tensor | None = None,
    ) -> MTALossOutput:
        """L_MTA for one batch.

        Args:
            student_hidden_states: the student's ``hidden_states`` tuple, each ``[B, Ts, Ds]``.
            teacher_hidden_states: the teacher's, each ``[B, Tt, Dt]`` (no gradient reaches them).
            units: ``{"word": UnitBatch, "phrase": UnitBatch}`` (the granularities the pairs use).
            student_mask, teacher_mask: attention masks ``[B, Ts]`` / ``[B, Tt]`` (None: all valid).
            teacher_confidence: optional float ``[B, Tt]``, the teacher's per-token confidence
                (:func:`mta_kernels.variants.teacher_confidence`, ``1 − H(p_T)/log V``; a constant).
                Normalised over each sequence's covered tokens like the saliency, it replaces the
                teacher's saliency as unit importance ``W_u`` and token-level HRA weight (the published
                ``--entropy_weight``); the pooling keeps the saliency. Needs ``weighted=True``
                (docs/method.md#entropy-weighting).
        Returns:
            :class:`MTALossOutput` with ``.loss`` (float32 scalar), ``.dsa`` and ``.hra`` (``[K]``).
        """
        s_states = self._check_states(student_hidden_states, "student")
        t_states = self._check_states(teacher_hidden_states, "teacher")
        if not isinstance(units, Mapping):
            raise TypeError(f"units must map granularity -> UnitBatch, got {type(units).__name__}")
        B = Ts = Tt = None
        checked: set[str] = set()  # granularities whose unit values were validated (once per call)
        for k, (ls, lt, g) in enumerate(self.pairs):
            what = f"pair {k} (student layer {ls}, teacher layer {lt}, {g!r})"
            for side, states, layer in (("student", s_states, ls), ("teacher", t_states, lt)):
                if layer >= len(states):
                    raise ValueError(
                        f"{what}: {side} layer {layer} is outside the {side}'s hidden_states "
                        f"({len(states)} entries: 0 = embeddings .. {len(states) - 1})"
                    )
            hs, ht = s_states[ls], t_states[lt]
            _check_stacked_pair(hs.unsqueeze(0), ht.unsqueeze(0), self.student_dim, self.teacher_dim, what)
            if B is None:
                B, Ts, Tt = hs.shape[0], hs.shape[1], ht.shape[1]
            elif (hs.shape[0], hs.shape[1], ht.shape[1]) != (B, Ts, Tt):
                raise ValueError(
                    f"{what}: hidden states {list(hs.shape)} / {list(ht.shape)} differ from other layers' "
                    f"[{B}, {Ts}, .] / [{B}, {Tt}, .]"
                )
            if g not in units:
                raise ValueError(f"{what}: needs units[{g!r}] but units has {sorted(units)}")
            _check_units(units[g], B, Ts, Tt, hs.device, what, self.check_units and g not in checked)
            checked.add(g)
            if self.hra_level == "token":
                _check_same_tokenization(units[g], what)
        device = s_states[self.pairs[0][0]].device
        student_mask = _check_mask(student_mask, B, Ts, device, "student_mask")
        teacher_mask = _check_mask(teacher_mask, B, Tt, device, "teacher_mask")
        conf = _check_confidence(teacher_confidence, B, Tt, device, self.weighted)

        # Traced by torch.compile: the stacked glue (static, either backend; the compiler fuses it).
        if torch.compiler.is_compiling() or use_triton(s_states[self.pairs[0][0]]):
            dsa_parts, hra_parts = self._stacked_groups(
                s_states, t_states, units, student_mask, teacher_mask, conf
            )
            reorder = self._reorder
        else:
            dsa_parts, hra_parts = self._pair_by_pair(
                s_states, t_states, units, student_mask, teacher_mask, conf
            )
            reorder = False
        dsa = torch.cat(dsa_parts)
        if reorder:
            dsa = dsa[self._order]  # [K], pairs' order
        if self.hra_level is None:
            return MTALossOutput(loss=dsa.mean(), dsa=dsa.detach(), hra=None)
        hra = torch.cat(hra_parts)
        if reorder:
            hra = hra[self._order]
        return MTALossOutput(loss=(dsa + self.gamma * hra).mean(), dsa=dsa.detach(), hra=hra.detach())

    def _stacked_groups(self, s_states, t_states, units, student_mask, teacher_mask, confidence=None):
        """The Triton path: few launches. Every pair's layers stacked once per side, in group order
        ([K, B, T, D], one copy each); each group is a slice (a view). The saliency does not depend on
        the units: one call per side for all K layers. Returns the per-group ``[L_g]`` terms."""
        flat = [k for _, ks in self._groups for k in ks]
        student_all = _stack_layers([s_states[self.pairs[k][0]] for k in flat])  # [K, B, Ts, Ds]
        with torch.no_grad():
            teacher_all = _stack_layers([t_states[self.pairs[k][1]].detach() for k in flat])  # [K, B, Tt, Dt]
            attention = self.pooling == "attention"
            s_sal = token_saliency(student_all.detach(), student_mask) if attention else None
            need_t_sal = attention or (self.weighted and confidence is None)
            t_sal = token_saliency(teacher_all, teacher_mask) if need_t_sal else None
        dsa_parts, hra_parts = [], []
        start = 0
        for g, ks in self._groups:
            part = slice(start, start + len(ks))
            start += len(ks)
            names = ", ".join(f"pair {k} {self.pairs[k]}" for k in ks)
            with _naming(f"{names} ({g!r} units)"):
                dsa, hra = _stacked_terms(
                    student_all[part],
                    teacher_all[part],
                    units[g],
                    student_mask,
                    teacher_mask,
                    pooling=self.pooling,
                    weighted=self.weighted,
                    with_dsa=True,
                    hra_level=self.hra_level,
                    projectors=[self.projectors[k] for k in ks] if self.hra_level is not None else [],
                    student_saliency=None if s_sal is None else s_sal[part],
                    teacher_saliency=None if t_sal is None else t_sal[part],
                    teacher_confidence=confidence,
                )
            dsa_parts.append(dsa)
            hra_parts.append(hra)
        return dsa_parts, hra_parts

    def _pair_by_pair(self, s_states, t_states, units, student_mask, teacher_mask, confidence=None):
        """The torch path (CPU): launches cost little there, copies do: each pair on views of its own
        layers (``[1, B, T, D]``), nothing stacked. Returns the ``[1]`` terms in the order of ``pairs``."""
        dsa_parts, hra_parts = [], []
        for k, (ls, lt, g) in enumerate(self.pairs):
            with _naming(f"pair {k} {self.pairs[k]} ({g!r} units)"):
                dsa, hra = _stacked_terms(
                    s_states[ls].unsqueeze(0),
                    t_states[lt].detach().unsqueeze(0),
                    units[g],
                    student_mask,
                    teacher_mask,
                    pooling=self.pooling,
                    weighted=self.weighted,
                    with_dsa=True,
                    hra_level=self.hra_level,
                    projectors=[self.projectors[k]] if self.hra_level is not None else [],
                    teacher_confidence=confidence,
                )
            dsa_parts.append(dsa)
            hra_parts.append(hra)
        return dsa_parts, hra_parts

    @staticmethod
    def _check_states(states: Sequence[torch.Tensor], side: str) -> Sequence[torch.Tensor]:
        if isinstance(states, torch.Tensor) or not isinstance(states, Sequence):
            raise TypeError(
                f"{side}_hidden_states must be the tuple of [B, T, D] tensors a Hugging Face model returns "
                f"with output_hidden_states=True, got {type(states).__name__}"
            )
        return states


def _as_stacked(
    student: torch.Tensor, teacher: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``[B, T, D]`` -> ``[1, B, T, D]`` views (and a flag to squeeze the result), or stacked as is."""
    _check_float(student, f"{what}: student hidden states")
    _check_float(teacher, f"{what}: teacher hidden states")
    if student.dim() == 3 and teacher.dim() == 3:
        return student.unsqueeze(0), teacher.unsqueeze(0), True
    if student.dim() == 4 and teacher.dim() == 4:
        return student, teacher, False
    raise ValueError(
        f"{what}: student and teacher must both be [B, T, D] or both [L, B, T, D], got "
        f"{list(student.shape)} and {list(teacher.shape)}"
    )


def _single_term(
    what: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    units: UnitBatch,
    student_mask: torch.Tensor | None,
    teacher_mask: torch.Tensor | None,
    *,
    dims: tuple[int | None, int | None],
    projectors: list[nn.Linear],
    pooling: str,
    weighted: bool,
    hra_level: str | None,
    check_units: bool,
    teacher_confidence: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward of :class:`DSALoss` (``hra_level=None``) and :class:`HRALoss`: checks, then one term
    over one layer pair ``[B, T, D]`` (scalar) or stacked pairs ``[L, B, T, D]`` (``[L]``)."""
    student4, teacher4, squeeze = _as_stacked(student, teacher, what)
    _check_stacked_pair(student4, teacher4, dims[0], dims[1], what)
    L, B, Ts, _ = student4.shape
    Tt = teacher4.shape[2]
    if hra_level is not None and L != len(projectors):
        raise ValueError(f"{what}: {L} stacked layer pairs but {len(projectors)} projectors (num_pairs)")
    _check_units(units, B, Ts, Tt, student4.device, what, check_units)
    if hra_level == "token":
        _check_same_tokenization(units, what)
    conf = _check_confidence(teacher_confidence, B, Tt, student4.device, weighted)
    with _naming(what):
        dsa, hra = _stacked_terms(
            student4,
            teacher4,
            units,
            _check_mask(student_mask, B, Ts, student4.device, "student_mask"),
            _check_mask(teacher_mask, B, Tt, student4.device, "teacher_mask"),
            pooling=pooling,
            weighted=weighted,
            with_dsa=hra_level is None,
            hra_level=hra_level,
            projectors=projectors,
            teacher_confidence=conf,
        )
    term = dsa if hra_level is None else hra
    return term[0] if squeeze else term


class DSALoss(nn.Module):
    """DSA alone (docs/method.md#dsa-loss) for one layer pair or L stacked layer pairs of one granularity.

    ``forward(student, teacher, units, student_mask, teacher_mask, teacher_confidence=None)``:
        student ``[B, Ts, Ds]`` or ``[L, B, Ts, Ds]`` (gradient flows here); teacher ``[B, Tt, Dt]`` or
        ``[L, B, Tt, Dt]`` (constant); units: the UnitBatch of the granularity; masks ``[B, Ts]`` /
        ``[B, Tt]`` (None: all valid); teacher_confidence: optional ``[B, Tt]`` unit-weight source, as in
        :meth:`MTALoss.forward` (shared by the L pairs) -> float32 scalar, or ``[L]``.
    """

    def __init__(self, pooling: str = "attention", weighted: bool = True, check_units: bool = True) -> None:
        super().__init__()
        _check_choices(pooling)
        self.pooling, self.weighted, self.check_units = pooling, bool(weighted), bool(check_units)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, weighted={self.weighted}"

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        units: UnitBatch,
        student_mask: torch.Tensor | None = None,
        teacher_mask: torch.Tensor | None = None,
        teacher_confidence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _single_term(
            "DSALoss",
            student,
            teacher,
            units,
            student_mask,
            teacher_mask,
            dims=(None, None),
            projectors=[],
            pooling=self.pooling,
            weighted=self.weighted,
            hra_level=None,
            check_units=self.check_units,
            teacher_confidence=teacher_confidence,
        )


class HRALoss(nn.Module):
    """HRA alone (docs/method.md#hra-loss) for one layer pair or ``num_pairs`` stacked layer pairs.

    Args:
        student_dim, teacher_dim: D_s and D_t; ``self.projectors`` holds ``num_pairs``
            ``nn.Linear(student_dim, teacher_dim)`` (bias), one per stacked pair.
        level: ``"token"`` (shared tokenizer) or ``"unit"``.
        pooling, weighted, check_units: as in :class:`MTALoss` (pooling matters for ``level="unit"``
            only).

    ``forward(student, teacher, units, student_mask, teacher_mask, teacher_confidence=None)``: student
    ``[B, Ts, Ds]`` or ``[L, B, Ts, Ds]`` with ``L == num_pairs``; teacher likewise with Tt, Dt; units:
    UnitBatch; masks ``[B, T]`` (None: all valid); teacher_confidence: optional ``[B, Tt]`` weight
    source, as in :meth:`MTALoss.forward` (shared by the L pairs) -> float32 scalar, or ``[L]``.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        level: str = "token",
        pooling: str = "attention",
        weighted: bool = True,
        num_pairs: int = 1,
        check_units: bool = True,
    ) -> None:
        super().__init__()
        if level is None or level not in HRA_LEVELS:
            raise ValueError(f"level must be 'token' or 'unit', got {level!r}")
        _check_choices(pooling, level)
        if not isinstance(num_pairs, int) or num_pairs < 1:
            raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.level, self.pooling, self.weighted = level, pooling, bool(weighted)
        self.check_units = bool(check_units)
        self.projectors = nn.ModuleList(
            nn.Linear(student_dim, teacher_dim, bias=True) for _ in range(num_pairs)
        )

    def extra_repr(self) -> str:
        return f"level={self.level!r}, pooling={self.pooling!r}, weighted={self.weighted}"

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        units: UnitBatch,
        student_mask: torch.Tensor | None = None,
        teacher_mask: torch.Tensor | None = None,
        teacher_confidence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _single_term(
            "HRALoss",
            student,
            teacher,
            units,
            student_mask,
            teacher_mask,
            dims=(self.student_dim, self.teacher_dim),
            projectors=list(self.projectors),
            pooling=self.pooling,
            weighted=self.weighted,
            hra_level=self.level,
            check_units=self.check_units,
            teacher_confidence=teacher_confidence,
        )
