"""Value checks of the ops' and losses' weight inputs: one home for the rule "finite and >= 0".

Unit importances (``structural_loss``'s ``unit_weights``) and token weights (``span_pool``'s, HRA's)
are sums and ratios of non-negative quantities in the method (docs/method.md#the-objective): a
negative weight turns the loss negative, an infinite one makes it NaN. Reading the values back costs a
host sync, so the check reads them only where that is free: CPU tensors on the torch path, eager (as
``losses`` checks ``teacher_confidence``). Elsewhere (a GPU, the Triton path the sync counts of
``tests/test_host_syncs.py`` stand for, ``torch.compile`` tracing) it is a device-side assert
(``torch._assert_async``: on CUDA the error surfaces at the next synchronisation; no sync is added).
"""

from __future__ import annotations

import torch

from mta_kernels._dispatch import use_triton

__all__ = ["check_weights"]


def check_weights(weights: torch.Tensor | None, name: str) -> None:
    """Raise when ``weights`` (any shape, floating point) holds a negative or non-finite value.

    Args:
        weights: the tensor to check; ``None`` (no weights) passes.
        name: how the message names it, e.g. ``"structural_loss: unit_weights"``.
    Raises:
        ValueError: on the torch path on the CPU, naming the first bad entry and its value.
        RuntimeError: elsewhere, from the device-side assert (CUDA reports it asynchronously; on the CPU
            under the Triton interpreter it is raised at the call).
    """
    if weights is None:
        return
    w = weights.detach()
    if w.device.type == "cpu" and not torch.compiler.is_compiling() and not use_triton(w):
        bad = ~(torch.isfinite(w) & (w >= 0))
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            where = index[0] if len(index) == 1 else index
            raise ValueError(
                f"{name} must be finite and >= 0, but entry {where} is {float(w[index])} "
                f"({int(bad.sum())} of {w.numel()} entries are negative or not finite)"
            )
        return
    torch._assert_async((torch.isfinite(w) & (w >= 0)).all(), f"{name} must be finite and >= 0")
