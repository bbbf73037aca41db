"""Fused ops: token saliency, span pooling, DSA structural loss (Triton on GPU, torch path on CPU)."""

from mta_kernels.ops.saliency import token_saliency
from mta_kernels.ops.span_pool import span_pool
from mta_kernels.ops.structural import structural_loss

__all__ = ["token_saliency", "span_pool", "structural_loss"]
