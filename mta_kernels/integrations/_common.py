"""What both trainers share: resolving the MTA loss, attaching it to the student, running a loss inside
the student's distributed wrapper, and averaging the logged terms. Imports torch only."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mta_kernels.constants import GRANULARITIES
from mta_kernels.distill import models as M
from mta_kernels.layout import UnitBatch
from mta_kernels.losses import MTALoss
from mta_kernels.presets import pair_label

# The attribute of the student under which the MTA loss (and its projectors) lives: it makes the
# projectors parameters of the model the Trainer optimizes, wraps (DDP/FSDP) and checkpoints.
MTA_ATTR = "mta_loss"


def hidden_size(model: nn.Module) -> int:
    width = M.config_value(model, M.WIDTH_KEYS)
    if width is None:
        raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: build the MTALoss yourself")
    return width


def num_layers(model: nn.Module) -> int | None:
    return M.config_value(model, M.LAYER_KEYS)


def resolve_mta(mta: MTALoss | str | None, student: nn.Module, teacher: nn.Module) -> MTALoss | None:
    """An :class:`MTALoss`, a preset name (``MTALoss.from_preset`` with the models' hidden sizes), or None.

    Checks that every layer pair names a layer the models have (``hidden_states`` index 0..num_layers).
    """
    if mta is None:
        return None
    if isinstance(mta, str):
        mta = MTALoss.from_preset(mta, student_dim=hidden_size(student), teacher_dim=hidden_size(teacher))
    elif not isinstance(mta, MTALoss):
        raise TypeError(f"mta must be an MTALoss, a preset name or None, got {type(mta).__name__}")
    for side, model, index in (("student", student, 0), ("teacher", teacher, 1)):
        depth = num_layers(model)
        bad = [p for p in mta.pairs if depth is not None and p[index] > depth]
        if bad:
            raise ValueError(
                f"MTA layer pair {bad[0]} names {side} layer {bad[0][index]}, but the {side} has {depth} "
                f"layers (hidden_states 0..{depth}, 0 = embeddings): use MTALoss.auto(...) or other pairs"
            )
    return mta


def granularities_of(mta: MTALoss | None) -> tuple[str, ...]:
    if mta is None:
        return ()
    used = {g for _, _, g in mta.pairs}
    return tuple(g for g in GRANULARITIES if g in used)


def attach(student: nn.Module, mta: MTALoss) -> None:
    """Register ``mta`` as ``student.mta_loss`` (moved to the student's device and float dtype)."""
    current = getattr(student, MTA_ATTR, None)
    if current is not None and current is not mta:
        raise ValueError(f"the student already holds another MTALoss as .{MTA_ATTR}: pass that one")
    param = next(student.parameters(), None)
    if param is not None:
        mta.to(param.device)
    student.add_module(MTA_ATTR, mta)


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher is a constant of the objective."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an instantiated model (nn.Module), got {type(teacher).__name__}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def move_units(units: Any, device: torch.device) -> Any:
    """``{granularity: UnitBatch}`` (or anything with ``.to``) on ``device``."""
    if isinstance(units, Mapping):
        return {g: move_units(u, device) for g, u in units.items()}
    if isinstance(units, (torch.Tensor, UnitBatch)) or hasattr(units, "to"):
        return units.to(device, non_blocking=True)
    return units


def run_in_wrapper(wrapper: nn.Module, module: nn.Module, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as the forward of ``wrapper`` (DDP/FSDP around ``module``).

    A loss computed outside the wrapper's forward is invisible to DDP's unused-parameter search (the
    projectors would be marked unused, then get a gradient: an error) and to FSDP's parameter gathering.
    Patching ``module.forward`` for one call routes ``fn`` through the wrapper's hooks.
    """
    if wrapper is module:
        return fn()
    had_own = "forward" in module.__dict__
    original = module.forward

    def redirected(*_args: Any, **_kwargs: Any) -> Any:
        restore()
        return fn()

    def restore() -> None:
        if had_own:
            module.forward = original
        elif "forward" in module.__dict__:
            del module.forward

    module.forward = redirected
    try:
        return wrapper()
    finally:
        restore()


class TermLog:
    """Per-micro-batch values of the loss terms, averaged (over steps and processes) when the Trainer logs.

    ``add(name, value, weight)``: a per-token term is added with its token count as the weight, so the
    logged value is the mean over all target tokens of all processes.
    """

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # [Σ w·v, Σ w]

    def add(self, name: str, value: torch.Tensor | float, weight: float = 1.0) -> None:
        acc = self.values[name]
        acc[0] += float(value) * float(weight)
        acc[1] += float(weight)

    def add_mta(self, out: Any, pairs: Any) -> None:
        self.add("mta", out.loss.detach())
        for name, vec in (("dsa", out.dsa), ("hra", out.hra)):
            if vec is None:
                continue
            for k, (v, pair) in enumerate(zip(vec.tolist(), pairs)):
                self.add(f"{name}/{pair_label(k, pair)}", v)

    def pop_means(self, accelerator: Any, prefix: str = "") -> dict[str, float]:
        if not self.values:
            return {}
        names = sorted(self.values)
        sums = torch.tensor([self.values[n] for n in names], dtype=torch.float64)  # [terms, 2]
        self.values.clear()
        if accelerator is not None and accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
        means = sums[:, 0] / sums[:, 1].clamp_min(1e-12)
        return {f"{prefix}{n}": float(v) for n, v in zip(names, means.tolist())}
