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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mta_kernels.constants import HRA_LEVELS
from mta_kernels.layout import UnitBatch
from mta_kernels.loss_checks import (
    as_stacked,
    check_choices,
    check_confidence,
    check_layer_pairs,
    check_mask,
    check_same_tokenization,
    check_settings,
    check_stacked_pair,
    check_states,
    check_units,
    naming,
)
from mta_kernels.loss_terms import TermOptions, masks_stats, saliency, stack_layers, stacked_terms
from mta_kernels.ops import prefer_stacked
from mta_kernels.presets import PRESETS, MTAPreset, auto_pairs

__all__ = ["MTALoss", "MTALossOutput", "MTAPreset", "DSALoss", "HRALoss", "PRESETS", "auto_pairs"]


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
        pairs = check_settings(pairs, student_dim, teacher_dim, pooling, weighted, hra, gamma)
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
        s_states = check_states(student_hidden_states, "student")
        t_states = check_states(teacher_hidden_states, "teacher")
        if not isinstance(units, Mapping):
            raise TypeError(f"units must map granularity -> UnitBatch, got {type(units).__name__}")
        dims = (self.student_dim, self.teacher_dim)
        B, Ts, Tt = check_layer_pairs(
            self.pairs, s_states, t_states, units, dims, self.hra_level, self.check_units
        )
        device = s_states[self.pairs[0][0]].device
        student_mask = check_mask(student_mask, B, Ts, device, "student_mask")
        teacher_mask = check_mask(teacher_mask, B, Tt, device, "teacher_mask")
        conf = check_confidence(teacher_confidence, B, Tt, device, self.weighted)
        stats = masks_stats(student_mask, teacher_mask, self._options.saliency_sides(conf is not None))

        # Traced by torch.compile: the stacked glue (static, either backend; the compiler fuses it).
        stacked = prefer_stacked(s_states[self.pairs[0][0]])
        run = self._stacked_groups if stacked else self._pair_by_pair
        dsa_parts, hra_parts = run(s_states, t_states, units, stats, conf)
        reorder = stacked and self._reorder
        dsa = torch.cat(dsa_parts)
        if reorder:
            dsa = dsa[self._order]  # [K], pairs' order
        if self.hra_level is None:
            return MTALossOutput(loss=dsa.mean(), dsa=dsa.detach(), hra=None)
        hra = torch.cat(hra_parts)
        if reorder:
            hra = hra[self._order]
        return MTALossOutput(loss=(dsa + self.gamma * hra).mean(), dsa=dsa.detach(), hra=hra.detach())

    @property
    def _options(self) -> TermOptions:
        return TermOptions(self.pooling, self.weighted, with_dsa=True, hra_level=self.hra_level)

    def _projectors_of(self, ks: list[int]) -> list[nn.Linear]:
        return [self.projectors[k] for k in ks] if self.hra_level is not None else []

    def _stacked_groups(self, s_states, t_states, units, stats, confidence):
        """The Triton path: few launches. Every pair's layers stacked once per side, in group order
        ([K, B, T, D], one copy each); each group is a slice (a view). The saliency does not depend on
        the units: one call per side for all K layers. Returns the per-group ``[L_g]`` terms."""
        flat = [k for _, ks in self._groups for k in ks]
        student_all = stack_layers([s_states[self.pairs[k][0]] for k in flat])  # [K, B, Ts, Ds]
        with torch.no_grad():
            teacher_all = stack_layers([t_states[self.pairs[k][1]].detach() for k in flat])  # [K, B, Tt, Dt]
            s_sal = None if stats[0] is None else saliency(student_all.detach(), stats[0])
            t_sal = None if stats[1] is None else saliency(teacher_all, stats[1])
        dsa_parts, hra_parts = [], []
        start = 0
        for g, ks in self._groups:
            part = slice(start, start + len(ks))
            start += len(ks)
            names = ", ".join(f"pair {k} {self.pairs[k]}" for k in ks)
            with naming(f"{names} ({g!r} units)"):
                dsa, hra = stacked_terms(
                    student_all[part],
                    teacher_all[part],
                    units[g],
                    stats,
                    self._options,
                    self._projectors_of(ks),
                    student_saliency=None if s_sal is None else s_sal[part],
                    teacher_saliency=None if t_sal is None else t_sal[part],
                    teacher_confidence=confidence,
                )
            dsa_parts.append(dsa)
            hra_parts.append(hra)
        return dsa_parts, hra_parts

    def _pair_by_pair(self, s_states, t_states, units, stats, confidence):
        """The torch path (CPU): launches cost little there, copies do: each pair on views of its own
        layers (``[1, B, T, D]``), nothing stacked. Returns the ``[1]`` terms in the order of ``pairs``."""
        dsa_parts, hra_parts = [], []
        for k, (ls, lt, g) in enumerate(self.pairs):
            with naming(f"pair {k} {self.pairs[k]} ({g!r} units)"):
                dsa, hra = stacked_terms(
                    s_states[ls].unsqueeze(0),
                    t_states[lt].detach().unsqueeze(0),
                    units[g],
                    stats,
                    self._options,
                    self._projectors_of([k]),
                    teacher_confidence=confidence,
                )
            dsa_parts.append(dsa)
            hra_parts.append(hra)
        return dsa_parts, hra_parts


class _OneTermLoss(nn.Module):
    """The forward of :class:`DSALoss` and :class:`HRALoss`: checks, then one term over one layer pair
    ``[B, T, D]`` (scalar) or stacked pairs ``[L, B, T, D]`` (``[L]``)."""

    pooling: str
    weighted: bool
    check_units: bool
    level: str | None = None  # the HRA level; None: the DSA term

    def _dims(self) -> tuple[int | None, int | None]:
        return None, None

    def _projector_list(self) -> list[nn.Linear]:
        return []

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        units: UnitBatch,
        student_mask: torch.Tensor | None = None,
        teacher_mask: torch.Tensor | None = None,
        teacher_confidence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        what = type(self).__name__
        student4, teacher4, squeeze = as_stacked(student, teacher, what)
        check_stacked_pair(student4, teacher4, *self._dims(), what)
        L, B, Ts, _ = student4.shape
        Tt, device = teacher4.shape[2], student4.device
        projectors = self._projector_list()
        if self.level is not None and L != len(projectors):
            raise ValueError(f"{what}: {L} stacked layer pairs but {len(projectors)} projectors (num_pairs)")
        check_units(units, B, Ts, Tt, device, what, self.check_units)
        if self.level == "token":
            check_same_tokenization(units, what)
        conf = check_confidence(teacher_confidence, B, Tt, device, self.weighted)
        student_mask = check_mask(student_mask, B, Ts, device, "student_mask")
        teacher_mask = check_mask(teacher_mask, B, Tt, device, "teacher_mask")
        options = TermOptions(self.pooling, self.weighted, with_dsa=self.level is None, hra_level=self.level)
        stats = masks_stats(student_mask, teacher_mask, options.saliency_sides(conf is not None))
        with naming(what):
            dsa, hra = stacked_terms(
                student4, teacher4, units, stats, options, projectors, teacher_confidence=conf
            )
        term = dsa if self.level is None else hra
        return term[0] if squeeze else term


class DSALoss(_OneTermLoss):
    """DSA alone (docs/method.md#dsa-loss) for one layer pair or L stacked layer pairs of one granularity.

    ``forward(student, teacher, units, student_mask, teacher_mask, teacher_confidence=None)``:
        student ``[B, Ts, Ds]`` or ``[L, B, Ts, Ds]`` (gradient flows here); teacher ``[B, Tt, Dt]`` or
        ``[L, B, Tt, Dt]`` (constant); units: the UnitBatch of the granularity; masks ``[B, Ts]`` /
        ``[B, Tt]`` (None: all valid); teacher_confidence: optional ``[B, Tt]`` unit-weight source, as in
        :meth:`MTALoss.forward` (shared by the L pairs) -> float32 scalar, or ``[L]``.
    """

    def __init__(self, pooling: str = "attention", weighted: bool = True, check_units: bool = True) -> None:
        super().__init__()
        check_choices(pooling)
        self.pooling, self.weighted, self.check_units = pooling, bool(weighted), bool(check_units)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, weighted={self.weighted}"


class HRALoss(_OneTermLoss):
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
        check_choices(pooling, level)
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

    def _dims(self) -> tuple[int | None, int | None]:
        return self.student_dim, self.teacher_dim

    def _projector_list(self) -> list[nn.Linear]:
        return list(self.projectors)
