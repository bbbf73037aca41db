"""mta_kernels: fused kernels for MTA distillation (span pooling, token saliency, DSA loss)."""

from mta_kernels import layout, reference
from mta_kernels._dispatch import use_backend

__version__ = "0.1.0"
__all__ = ["layout", "reference", "use_backend"]
