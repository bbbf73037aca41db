"""The accumulation dtype rule (docs/method.md#numerical-tolerance-rule), shared by the reference, the ops
and the losses."""

from __future__ import annotations

import torch


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any given tensor is float64 (the oracle, and gradcheck), float32 otherwise."""
    any_f64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if any_f64 else torch.float32
