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

DSA_NORM_FLOOR: float = 1e-3
"""Norm floor of the DSA unit vectors: ``Û = x / max(‖x‖, DSA_NORM_FLOOR)`` (docs/method.md#dsa-loss).
It bounds the gradient of a (near-)zero unit at ``|∂L/∂Û| / DSA_NORM_FLOOR`` (a floor of 1e-8 gave ~4e6);
pooled hidden states of real models have norms of 1 and more, far above it, where the result is
bit-identical to any smaller floor (docs/design/structural.md#near-zero-units)."""
