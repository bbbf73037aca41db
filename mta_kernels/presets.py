"""Layer presets of the published settings and the depth-proportional rule for any other pair of models.

Layer indices are Hugging Face ``hidden_states`` indices (0 = embeddings); the first ``n_word`` pairs
are word level, the rest phrase level (docs/method.md#layer-presets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MTAPreset", "PRESETS", "auto_pairs", "pair_label"]


@dataclass(frozen=True)
class MTAPreset:
    """One published setting (docs/method.md#layer-presets); layer indices are ``hidden_states`` indices."""

    student_layers: tuple[int, ...]
    teacher_layers: tuple[int, ...]
    n_word: int
    student_dim: int
    teacher_dim: int
    student_num_layers: int
    teacher_num_layers: int
    same_tokenizer: bool

    @property
    def pairs(self) -> list[tuple[int, int, str]]:
        return [
            (s, t, "word" if k < self.n_word else "phrase")
            for k, (s, t) in enumerate(zip(self.student_layers, self.teacher_layers))
        ]


# Widths: GPT-2 768, GPT-2-XL 1600, OPT-1.3B 2048, OPT-6.7B 4096, Qwen1.5-0.5B 1024, Qwen1.5-1.8B 2048,
# TinyLlama 2048, Mistral-7B 4096. Depths: GPT-2 12, GPT-2-XL 48, OPT-1.3B 24, OPT-6.7B 32,
# Qwen1.5-0.5B 24, Qwen1.5-1.8B 24, TinyLlama 22, Mistral-7B 32.
PRESETS: dict[str, MTAPreset] = {
    "gpt2-xl->gpt2": MTAPreset((6, 9, 12), (24, 36, 48), 1, 768, 1600, 12, 48, True),
    "opt-6.7b->opt-1.3b": MTAPreset((16, 18, 20, 22, 24), (20, 23, 26, 29, 32), 1, 2048, 4096, 24, 32, True),
    "qwen1.5-1.8b->qwen1.5-0.5b": MTAPreset(
        (14, 16, 18, 20, 22, 24), (14, 16, 18, 20, 22, 24), 1, 1024, 2048, 24, 24, True
    ),
    "qwen1.5-1.8b->gpt2": MTAPreset((2, 4, 6, 8), (6, 12, 18, 24), 1, 768, 2048, 12, 24, False),
    "mistral-7b->tinyllama": MTAPreset(
        (6, 10, 14, 18, 22), (8, 14, 20, 26, 32), 1, 2048, 4096, 22, 32, False
    ),
}


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def auto_pairs(
    student_num_layers: int,
    teacher_num_layers: int,
    num_pairs: int = 3,
    n_word: int = 1,
    start_fraction: float = 0.5,
) -> list[tuple[int, int, str]]:
    """Depth-proportional layer mapping for any two models.

    Rule: ``K = num_pairs`` student layers evenly spaced from ``start_fraction · L_s`` to the top layer
    ``L_s`` (both ends included), each matched to the teacher layer at the same relative depth;
    all positions rounded half up::

        s_k = round(L_s · (f + (1 − f) · k / (K − 1)))      k = 0 .. K−1   (s_0 = L_s when K == 1)
        t_k = round(s_k · L_t / L_s)

    The first ``n_word`` pairs are word level, the rest phrase level. With the defaults
    (f = 0.5, K = 3) GPT-2 (12 layers) ← GPT-2-XL (48) gives ``6 9 12 ← 24 36 48``, the published preset.
    Indices are Hugging Face ``hidden_states`` indices (0 = embeddings), so a model with L layers has
    valid indices 0..L. Raises ValueError when the rule would map two pairs to the same layer.
    """
    for name, v in (("student_num_layers", student_num_layers), ("teacher_num_layers", teacher_num_layers)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
    if not isinstance(n_word, int) or not 0 <= n_word <= num_pairs:
        raise ValueError(f"n_word must be an int in [0, num_pairs={num_pairs}], got {n_word!r}")
    if not 0.0 <= start_fraction <= 1.0:
        raise ValueError(f"start_fraction must lie in [0, 1], got {start_fraction!r}")
    Ls, Lt, K, f = student_num_layers, teacher_num_layers, num_pairs, start_fraction
    rel = [1.0] if K == 1 else [f + (1.0 - f) * k / (K - 1) for k in range(K)]
    student = [_round_half_up(Ls * r) for r in rel]
    teacher = [_round_half_up(s * Lt / Ls) for s in student]
    if len(set(student)) < K or len(set(teacher)) < K:
        raise ValueError(
            f"auto mapping of {K} pairs onto {Ls} student / {Lt} teacher layers (start_fraction={f}) repeats "
            f"a layer (student {student}, teacher {teacher}): use fewer pairs or a lower start_fraction"
        )
    return [(s, t, "word" if k < n_word else "phrase") for k, (s, t) in enumerate(zip(student, teacher))]


def pair_label(k: int, pair: tuple[int, int, str]) -> str:
    """The name of layer pair ``k`` in logs and metrics: ``pair{k}_s{student}_t{teacher}_{granularity}``."""
    s, t, g = pair
    return f"pair{k}_s{s}_t{t}_{g}"
