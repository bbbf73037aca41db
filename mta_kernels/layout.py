"""Packed (varlen) unit layout of SPEC §2 and the face of the ``mta_kernels._C`` extension."""

from __future__ import annotations

import torch

try:
    from mta_kernels import _C  # noqa: F401  (loading it registers torch.ops.mta_kernels.*)
except ImportError as exc:  # pragma: no cover - exercised by hand on an unbuilt checkout
    raise ImportError(
        "mta_kernels: the compiled extension mta_kernels._C is missing or broken "
        f"({exc}). Build it with `make setup` or `pip install --no-build-isolation -e .` "
        "from the repository root."
    ) from exc


def extension_path() -> str:
    """File the compiled extension was loaded from."""
    return _C.__file__


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """CSR offsets ``[B+1]`` (int32) from per-sequence lengths ``[B]``."""
    return torch.ops.mta_kernels.offsets_from_lengths(lengths)
