"""Trainer integrations: ``MTATrainer`` (Hugging Face ``Trainer``), ``MTAGKDTrainer`` (TRL's on-policy
``DistillationTrainer``) and ``MTADataCollator``.

Names are imported on first use, so ``import mta_kernels.integrations`` loads neither ``transformers``
nor ``trl``; ``MTAGKDTrainer`` needs ``trl``, the rest ``transformers`` (``pip install
'mta_kernels[integrations]'``). Usage: ``docs/integrations.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MTADataCollator": "mta_kernels.integrations.collator",
    "units_from_token_ids": "mta_kernels.integrations.collator",
    "MTATrainer": "mta_kernels.integrations.trainer",
    "MTAGKDTrainer": "mta_kernels.integrations.trl_trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mta_kernels.integrations' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ImportError(
            f"mta_kernels.integrations.{name} needs {exc.name or 'a missing package'}: "
            "pip install 'mta_kernels[integrations]'"
        ) from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
