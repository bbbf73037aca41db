"""ROUGE-L as the published evaluations compute it (docs/method.md#evaluation).

The F-measure of ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` (the
``rouge-score`` package: its own tokenizer, lower-casing, Porter stemming), scaled by 100. An example
with several references scores the best of them (DistiLLM's ``rouge_metric.py``,
``metric_max_over_ground_truths``) or only the first (the MTA evaluator, which keeps ``output[0]``):
:data:`REFERENCE_RULES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from mta_kernels.distill.config import DistillError

REFERENCE_RULES = ("max", "first")
"""How an example with several references is scored: the best of them, or the first only."""


@lru_cache(maxsize=1)
def _scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise DistillError(
            "ROUGE-L needs the rouge-score package: pip install rouge-score (or the 'distill' extra)"
        ) from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str], rule: str = "max") -> float:
    """ROUGE-L F-measure × 100 of one prediction against its references (``rule``: REFERENCE_RULES)."""
    if rule not in REFERENCE_RULES:
        raise ValueError(f"rule must be one of {REFERENCE_RULES}, got {rule!r}")
    if not references:
        raise ValueError("an example needs at least one reference")
    targets = references[:1] if rule == "first" else references
    scorer = _scorer()
    return 100.0 * max(_fmeasure(scorer, t, prediction) for t in targets)


LONG_REFERENCE_CHARS = 20_000
"""A reference this long is scored with :func:`lcs_length` (time and memory linear in its tokens):
rouge-score's LCS table takes ``len(reference) × len(prediction)`` Python ints (gigabytes for a
multi-megabyte reference). The score is the same (rouge-score's tokenizer, LCS and F-measure)."""


def _fmeasure(scorer: Any, target: str, prediction: str) -> float:
    if len(target) < LONG_REFERENCE_CHARS:
        return scorer.score(target=target, prediction=prediction)["rougeL"].fmeasure
    ref, pred = _long_tokens(target), _tokenizer().tokenize(prediction)
    if not ref or not pred:
        return 0.0
    lcs = lcs_length(ref, pred)
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    _scorer()  # the import error, if any
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)


@lru_cache(maxsize=4)
def _long_tokens(text: str) -> tuple[str, ...]:
    """The tokens of a long reference, kept for the next seeds' passes."""
    return tuple(_tokenizer().tokenize(text))


def lcs_length(long: Sequence[str], short: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel over ``short`` (Hyyrö's algorithm): one
    pass over ``long``, a few big-integer operations per token, memory ``O(len(short))``."""
    masks: dict[str, int] = {}
    for i, token in enumerate(short):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(short)) - 1
    v = full
    for token in long:
        m = masks.get(token)
        if m is not None:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(short) - bin(v).count("1")

