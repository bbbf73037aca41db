"""mta_kernels: fused kernels for MTA distillation (token saliency, span pooling, DSA loss).

``import mta_kernels as mk`` gives the public API (docs/method.md#public-api): ``mk.token_saliency``,
``mk.span_pool``, ``mk.structural_loss``, the loss modules ``mk.MTALoss`` / ``mk.DSALoss`` /
``mk.HRALoss``, and the eager oracle ``mk.reference``. Units (spaCy) live in ``mta_kernels.units``,
imported on demand. The method: docs/method.md. ``mk.info()`` (or ``python -m mta_kernels.info``) says
what is installed and what runs; importing the package never compiles nor loads the C++ extension (the
first layout op does, see docs/design/layout.md).
"""

from mta_kernels import layout, reference
from mta_kernels.layout import UnitBatch
from mta_kernels.losses import DSALoss, HRALoss, MTALoss
from mta_kernels.ops import span_pool, structural_loss, token_saliency, use_backend

__version__ = "0.1.0"


def __getattr__(name: str):
    # mk.info: the callable module mta_kernels.info, imported on first use (so that `python -m
    # mta_kernels.info` does not find it imported already).
    if name == "info":
        import importlib

        return importlib.import_module("mta_kernels.info")
    raise AttributeError(f"module 'mta_kernels' has no attribute {name!r}")


__all__ = [
    "DSALoss",
    "HRALoss",
    "MTALoss",
    "UnitBatch",
    "info",
    "layout",
    "reference",
    "span_pool",
    "structural_loss",
    "token_saliency",
    "use_backend",
]
