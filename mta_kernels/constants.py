"""The names and constants the whole package agrees on: one home for each (see docs/method.md)."""

from __future__ import annotations

GRANULARITIES: tuple[str, ...] = ("word", "phrase")
"""Unit granularities, in the order their layer pairs come (docs/method.md#semantic-units)."""

WORD_MODES: tuple[str, ...] = ("in_phrases", "all")
"""Which words are units: only those inside a phrase (the published rule) or every word."""

POOLINGS: tuple[str, ...] = ("attention", "mean")
"""Span pooling modes: saliency-weighted or plain mean (docs/method.md#span-pooling)."""

HRA_LEVELS: tuple[str | None, ...] = ("token", "unit", None)
"""Where the HRA term compares the projected student with the teacher; ``None`` turns it off."""

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
"""Which implementation the ops run (``mta_kernels.use_backend``)."""

COSINE_EPS: float = 1e-8
"""Norm floor of the HRA cosine: ``torch.nn.functional.cosine_similarity``'s default
(docs/method.md#hra-loss)."""
