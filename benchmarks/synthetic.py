"""Synthetic benchmark inputs: unit batches with the measured unit density, hidden states, and the model
presets of the benchmarks (layer pairs and widths from ``mta_kernels.presets.PRESETS``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from mta_kernels.presets import PRESETS as _MTA_PRESETS
from mta_kernels.presets import MTAPreset

# ------------------------------------------------------------------------------------- unit statistics
# Units per token, per granularity, measured with the package's own extraction + alignment on 64
# English texts of ~207 words, byte-level BPE tokens (benchmarks/NOTES.md, "Units per sequence"):
# words (in_phrases, the published default) 0.626 per token, phrases 0.354 per token, 1.197 tokens per
# word. Fraction of tokens covered: words 0.626 x 1.197 = 0.75 (derived); phrases contain their words plus
# the odd inner punctuation token: 0.78 (estimate). GPT-2's own tokenizer would give ~8% fewer units per
# token (same file): these densities are slightly pessimistic for the fused kernels' work.
UNIT_STATS_SOURCE = "benchmarks/NOTES.md, 'Semantic units' (measured, byte-level BPE)"
UNITS_PER_TOKEN = {"word": 0.626, "phrase": 0.354}
TOKEN_COVERAGE = {"word": 0.75, "phrase": 0.78}


# ------------------------------------------------------------------------------------- model presets
@dataclasses.dataclass(frozen=True)
class Preset:
    """A benchmark preset: a short name and display names around an ``MTAPreset`` (layer pairs, widths,
    tokenizer sharing come from ``mta_kernels.presets``; nothing is restated here)."""

    name: str
    student: str  # display name
    teacher: str
    preset: MTAPreset

    @property
    def d_student(self) -> int:
        return self.preset.student_dim

    @property
    def d_teacher(self) -> int:
        return self.preset.teacher_dim

    @property
    def student_layers(self) -> tuple[int, ...]:
        return self.preset.student_layers

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return self.preset.teacher_layers

    @property
    def n_word(self) -> int:
        return self.preset.n_word

    @property
    def same_tokenizer(self) -> bool:
        return self.preset.same_tokenizer

    @property
    def num_pairs(self) -> int:
        return len(self.preset.student_layers)

    def granularities(self) -> list[str]:
        return [g for _, _, g in self.preset.pairs]


# Benchmark-only: the CPU smoke-run stand-in (not a published setting), with the same fields.
_TINY = MTAPreset((1, 2, 3), (2, 4, 6), 1, 48, 80, 3, 6, True)

PRESETS = {
    "gpt2": Preset("gpt2", "GPT-2 0.1B", "GPT-2-XL 1.5B", _MTA_PRESETS["gpt2-xl->gpt2"]),
    "qwen": Preset("qwen", "Qwen1.5-0.5B", "Qwen1.5-1.8B", _MTA_PRESETS["qwen1.5-1.8b->qwen1.5-0.5b"]),
    "mistral": Preset("mistral", "TinyLlama-1.1B", "Mistral-7B", _MTA_PRESETS["mistral-7b->tinyllama"]),
    "tiny": Preset("tiny", "tiny student", "tiny teacher", _TINY),  # benchmark-only CPU stand-in
}


# ------------------------------------------------------------------------------- synthetic unit batches


def synth_ranges(
    batch: int, seq_len: int, units_per_seq: int, covered_per_seq: int, generator: torch.Generator
) -> torch.Tensor:
    """Random non-overlapping unit ranges ``[B*units_per_seq, 2]`` (int32, flat indices into ``B*T``).

    Each sequence gets ``units_per_seq`` units covering exactly ``covered_per_seq`` tokens: unit lengths
    are 1 + a multinomial share of the surplus, the ``T - covered`` uncovered tokens are spread over the
    gaps before, between and after the units.
    """
    n, c = units_per_seq, covered_per_seq
    if not 0 <= n <= c <= seq_len:
        raise ValueError(f"need 0 <= units ({n}) <= covered ({c}) <= T ({seq_len})")
    if n == 0:
        return torch.zeros(0, 2, dtype=torch.int32)
    rows = []
    for b in range(batch):
        lengths = torch.ones(n, dtype=torch.int64)
        if c > n:
            lengths += torch.bincount(torch.randint(0, n, (c - n,), generator=generator), minlength=n)
        gaps = torch.bincount(torch.randint(0, n + 1, (seq_len - c,), generator=generator), minlength=n + 1)
        starts = torch.cumsum(gaps[:-1], 0) + torch.cumsum(lengths, 0) - lengths
        rows.append(torch.stack([starts, starts + lengths], 1) + b * seq_len)
    return torch.cat(rows).to(torch.int32)


def units_per_sequence(seq_len: int, granularity: str) -> tuple[int, int]:
    """(units, covered tokens) per sequence of ``seq_len`` tokens, from the measured unit statistics."""
    n = max(0, round(UNITS_PER_TOKEN[granularity] * seq_len))
    c = max(n, round(TOKEN_COVERAGE[granularity] * seq_len))
    return n, min(c, seq_len)


def synth_unit_batch(batch: int, seq_len: int, granularity: str, same_tokenizer: bool, seed: int, device):
    """A ``mta_kernels.layout.UnitBatch`` of synthetic units with the measured density.

    With different tokenizers the teacher's ranges are drawn independently (same unit count per
    sequence, same T): unit u is still unit u on both sides.
    """
    from mta_kernels.layout import UnitBatch

    gen = torch.Generator().manual_seed(seed)
    n, c = units_per_sequence(seq_len, granularity)
    student = synth_ranges(batch, seq_len, n, c, gen)
    teacher = student if same_tokenizer else synth_ranges(batch, seq_len, n, c, gen)
    cu = torch.arange(0, (batch + 1) * n, n, dtype=torch.int32)
    ub = UnitBatch(student, teacher, cu, seq_len, seq_len)
    return ub.to(device)


# LLM-like outliers: decoder hidden states carry a few feature channels of magnitude 1e3–1e4 on some
# tokens (the first token of a sequence among them). They make the scores large (where the saliency's two
# passes must round alike) and dominate pooled units, so the accuracy check sees realistic inputs.
OUTLIER_CHANNELS = 3
OUTLIER_TOKEN_FRACTION = 0.1
OUTLIER_MAGNITUDE = (1e3, 1e4)


def random_hidden(shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Hidden states ``[..., T, D]`` like a decoder's: a shared direction plus noise (cosines away from 0)
    and ``OUTLIER_CHANNELS`` channels of magnitude 1e3–1e4 (log-uniform, random sign) on the first token
    and on about ``OUTLIER_TOKEN_FRACTION`` of the others."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(shape[-1], device=device, generator=gen)
    h = torch.randn(*shape, device=device, generator=gen) + 0.5 * base
    if len(shape) >= 2 and shape[-1] > OUTLIER_CHANNELS:
        cols = torch.randperm(shape[-1], device=device, generator=gen)[:OUTLIER_CHANNELS]
        tokens = torch.rand(*shape[:-1], device=device, generator=gen) < OUTLIER_TOKEN_FRACTION
        tokens[..., 0] = True
        lo, hi = OUTLIER_MAGNITUDE
        size = lo * (hi / lo) ** torch.rand(*shape[:-1], OUTLIER_CHANNELS, device=device, generator=gen)
        sign = torch.rand(*shape[:-1], OUTLIER_CHANNELS, device=device, generator=gen).lt(0.5) * 2.0 - 1.0
        h[..., cols] = torch.where(tokens[..., None], size * sign, h[..., cols])
    return h.to(dtype)
