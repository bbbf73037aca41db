"""The ops layer: token saliency, span pooling, the DSA structural loss, the fused HRA term and the glue
between them. Each op picks its implementation here and nowhere else: the Triton kernels for CUDA
tensors (and CPU tensors under ``TRITON_INTERPRET=1``), the torch path elsewhere, ``use_backend`` to
override the rule (docs/DESIGN.md#which-implementation-runs)."""

from mta_kernels.ops._dispatch import prefer_stacked, triton_installed, triton_runs_on, use_backend
from mta_kernels.ops.saliency import token_saliency
from mta_kernels.ops.span_pool import span_pool
from mta_kernels.ops.structural import structural_loss

__all__ = [
    "prefer_stacked",
    "span_pool",
    "structural_loss",
    "token_saliency",
    "triton_installed",
    "triton_runs_on",
    "use_backend",
]
