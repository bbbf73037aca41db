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
    return 100.0 * max(scorer.score(target=t, prediction=prediction)["rougeL"].fmeasure for t in targets)


def corpus_rouge_l(
    predictions: Sequence[str], references: Sequence[Sequence[str]], rule: str = "max"
) -> float:
    """Mean over examples of :func:`rouge_l` (× 100); ``predictions[i]`` answers ``references[i]``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} examples")
    if not predictions:
        raise ValueError("no example to score")
    return sum(rouge_l(p, r, rule) for p, r in zip(predictions, references)) / len(predictions)
