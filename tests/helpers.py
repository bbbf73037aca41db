"""Shared test utilities: the tolerance rule (docs/method.md#numerical-tolerance-rule), devices, LLM-like
activations, and an allocation watch."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Devices the op tests run on: the GPU where there is one, else the CPU (Triton under the interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Low-precision dtypes the kernels accept. float64 is the oracle's.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item() if x.numel() else 0.0


def assert_within_rule(
    fused: torch.Tensor,
    eager: torch.Tensor,
    oracle: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-5,
    what: str = "",
) -> None:
    """The tolerance rule (docs/method.md#numerical-tolerance-rule): the fused error against the float64
    oracle is at most ``factor`` × the error of the eager reference run in the same input dtype, plus an
    absolute ``floor``."""
    assert fused.shape == oracle.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(fused.detach()).all(), f"{what}: non-finite values in the fused result"
    err_fused = max_abs_err(fused, oracle)
    err_eager = max_abs_err(eager, oracle)
    bound = factor * err_eager + floor
    assert err_fused <= bound, (
        f"{what}: fused error {err_fused:.3e} > {factor} x eager error {err_eager:.3e} + {floor:g}"
    )


def llm_like_hidden(
    *shape: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    channels: int = 3,
    token_fraction: float = 0.25,
    magnitude: tuple[float, float] = (1e3, 1e4),
    device: str | torch.device = DEVICE,
) -> torch.Tensor:
    """Hidden states ``[..., T, D]`` shaped like a decoder's: unit-scale features, plus a few outlier
    channels (``channels`` of them, the same on every token) of magnitude ``magnitude[0]`` to
    ``magnitude[1]`` on some tokens (the first token, an "attention sink", and about ``token_fraction`` of
    the others) with random signs. Drawn in float64 on the CPU from ``seed``, then cast to ``dtype``."""
    *lead, T, D = shape
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=g, dtype=torch.float64)
    cols = torch.randperm(D, generator=g)[: min(channels, D)]  # [C]
    tokens = torch.rand(*lead, T, generator=g) < token_fraction  # [..., T]
    tokens[..., 0] = True
    lo, hi = magnitude
    size = lo * (hi / lo) ** torch.rand(*lead, T, len(cols), generator=g, dtype=torch.float64)  # log-uniform
    sign = torch.where(torch.rand(*lead, T, len(cols), generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    h[..., cols] = torch.where(tokens[..., None], size * sign, h[..., cols])
    return h.to(dtype).to(device)


class AllocationWatch(TorchDispatchMode):
    """Records the element count of every tensor an op under the mode returns (allocations included).

    A dispatch mode is switched off while it handles an op, so by default it would see a custom op
    as one call and none of the tensors its implementation allocates. For this package's Python
    custom ops (``mta_kernels::*``) the watch therefore runs the op's registered implementation
    itself, with the mode on, so every allocation inside the op is seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.largest_op = ""
        self.custom_ops_entered: list[str] = []

    def _record(self, out, func, args, kwargs) -> None:
        if _inside_triton_interpreter():
            return  # the interpreter's host copies of kernel arguments are not the op's allocations
        inputs = {_storage_ptr(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or _storage_ptr(t) in inputs:
                continue  # a view of an input allocates nothing
            if t.numel() > self.largest:
                self.largest, self.largest_op = t.numel(), str(func)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _python_custom_op_impl(func, args)
        if impl is not None:
            self.custom_ops_entered.append(func._schema.name)
            with self:
                out = impl(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        self._record(out, func, args, kwargs)
        return out


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _inside_triton_interpreter() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if _INTERPRETER_FILE in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


_INTERPRETER_FILE = os.path.join("triton", "runtime", "interpreter")


def _python_custom_op_impl(func, args):
    """The Python implementation behind an ``mta_kernels::`` custom op, or None for any other op."""
    if getattr(func, "namespace", None) != "mta_kernels":
        return None
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(func._schema.name)
    if opdef is None:  # a C++ op of the extension: its (O(N)) allocations stay invisible
        return None
    device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    return opdef._backend_fns.get(device) or opdef._init_fn


@contextlib.contextmanager
def watch_allocations() -> Iterator[AllocationWatch]:
    """``with watch_allocations() as w: ...`` then ``w.largest`` is the biggest tensor seen."""
    watch = AllocationWatch()
    with watch:
        yield watch
