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


_GREEK = {"lam": "lam (λ)", "beta": "beta (β)", "mta_beta": "mta_beta (β)"}


def check_numbers(**values: Any) -> None:
    """Keyword arguments of a trainer against the CLI's option table (``mta_beta`` is ``beta``'s rule):
    a ``ValueError`` naming the argument, the value and what it accepts; ``None`` is accepted."""
    from mta_kernels.distill.config import DistillError, check_field

    for name, value in values.items():
        if value is None:
            continue
        field = "beta" if name == "mta_beta" else name
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            check_field(field, value, _GREEK.get(name, name))
        except DistillError as exc:
            raise ValueError(str(exc)) from None


def _rows(model: nn.Module, side: str) -> int | None:
    """Rows of a model's input (``side="input"``) or output embedding; ``None`` when it has none."""
    get = getattr(model, f"get_{side}_embeddings", None)
    layer = get() if get is not None else None
    weight = getattr(layer, "weight", None)
    return None if weight is None else int(weight.shape[0])


def _saved_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved next to a model's weights (its ``name_or_path``, locally), else ``None``."""
    path = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", ""
    )
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    except Exception:  # noqa: BLE001 - no tokenizer there (or no hub cache): nothing to compare
        return None


def check_models_and_tokenizers(
    student: nn.Module,
    teacher: nn.Module,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    max_length: int | None,
    kd: bool,
) -> bool:
    """What the CLI checks before a run, for the trainers; returns whether the teacher reads the
    student's tokens (one tokenization: the logit KD over the shared vocabulary is possible).

    Raises ``ValueError`` when a tokenizer's ids do not fit a model's embedding, when ``max_length``
    exceeds a model's positions, when no teacher tokenizer is given (the teacher would read the
    student's ids) but the teacher was saved with another tokenizer, or, when none was saved, its
    output vocabulary differs from the student's; and, with ``kd``, when the shared vocabulary is wider
    than an output layer (the distributions cannot be compared).
    """
    from mta_kernels.distill.checks import max_positions

    for side, model, tok in (
        ("student", student, student_tokenizer),
        ("teacher", teacher, teacher_tokenizer),
    ):
        rows = _rows(model, "input")
        if tok is not None and rows is not None and len(tok) > rows:
            raise ValueError(
                f"the {side} tokenizer has {len(tok)} tokens but the {side}'s embedding has {rows} rows: "
                f"it is not the {side}'s tokenizer"
            )
        positions = max_positions(model) if getattr(model, "config", None) is not None else None
        if max_length is not None and positions is not None and max_length > positions:
            raise ValueError(
                f"max_length {max_length} is longer than the {side}'s {positions} positions: "
                f"build the collator with max_length={positions} or less"
            )
    if teacher_tokenizer is not None:
        shared = M.same_tokenizer(student_tokenizer, teacher_tokenizer)
    else:
        shared = True
        rows = _rows(teacher, "input")
        if rows is not None and len(student_tokenizer) > rows:
            raise ValueError(
                f"the teacher reads the student's tokens (the collator has no teacher_tokenizer), but the "
                f"student's tokenizer has {len(student_tokenizer)} tokens and the teacher's embedding {rows} "
                "rows: pass the teacher's tokenizer, MTADataCollator(..., teacher_tokenizer=...)"
            )
        own = _saved_tokenizer(teacher)
        if own is not None and not M.same_tokenizer(student_tokenizer, own):
            raise ValueError(
                f"the teacher was saved with its own tokenizer ({getattr(teacher, 'name_or_path', '')!r}, "
                f"{len(own)} tokens), not the student's ({len(student_tokenizer)} tokens), but the collator "
                "has no teacher_tokenizer: the teacher would read the student's token ids. Pass it, "
                "MTADataCollator(student_tokenizer, teacher_tokenizer=...)"
            )
        vs, vt = _rows(student, "output"), _rows(teacher, "output")
        if own is None and vs is not None and vt is not None and vs != vt:
            raise ValueError(
                f"the student's output vocabulary has {vs} entries and the teacher's {vt}, and the "
                "collator has no teacher_tokenizer: the teacher may not read the student's tokens. Pass "
                "the teacher's tokenizer, MTADataCollator(..., teacher_tokenizer=...) (the student's own "
                "when they share it: the logit KD then stays on)"
            )
    if kd and shared:
        vocab = len(student_tokenizer)
        widths = {side: _rows(m, "output") for side, m in (("student", student), ("teacher", teacher))}
        narrow = {side: w for side, w in widths.items() if w is not None and w < vocab}
        if narrow:
            side, w = next(iter(narrow.items()))
            raise ValueError(
                f"the logit KD compares distributions over the tokenizer's {vocab} tokens, but the "
                f"{side}'s output layer has {w}: the vocabularies cannot be compared (kd=None turns the "
                "term off)"
            )
    return shared


def check_projectors(mta: MTALoss, shapes: Mapping[str, tuple[int, ...]], checkpoint: str) -> None:
    """The ``mta_loss`` entries of a checkpoint (name -> shape) are this MTALoss's, shape for shape:
    another number of layer pairs or other widths is an error naming the first difference."""
    prefix = f"{MTA_ATTR}."
    saved = {k[len(prefix) :]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    expected = {k: tuple(v.shape) for k, v in mta.state_dict().items()}
    if not saved and expected:
        raise ValueError(
            f"checkpoint {checkpoint!r} has no MTA projector weights ({sorted(expected)[:2]}...): it was "
            "not written by an MTATrainer with this MTALoss"
        )
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(saved)) if expected[k] != saved[k]]
    if missing or extra or wrong:
        first = (
            f"{prefix}{wrong[0]} is {list(saved[wrong[0]])} there and {list(expected[wrong[0]])} here"
            if wrong
            else f"{len(saved)} projector tensors there, {len(expected)} here"
        )
        raise ValueError(
            f"checkpoint {checkpoint!r} holds the projectors of another MTALoss ({first}; layer pairs "
            f"{[tuple(p) for p in mta.pairs]} here): resume with the MTALoss it was trained with"
        )


def checkpoint_shapes(folder: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes of a Trainer checkpoint's model (safetensors, sharded or not, or a
    ``pytorch_model.bin``), read without loading the weights; ``None`` when there is none."""
    import json
    import os

    index = next(
        (os.path.join(folder, n) for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
         if os.path.isfile(os.path.join(folder, n))),
        None,
    )  # fmt: skip
    files = ["model.safetensors", "pytorch_model.bin"]
    if index is not None:
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f).get("weight_map", {}).values()))
    shapes: dict[str, tuple[int, ...]] = {}
    found = False
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        found = True
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            state = torch.load(path, map_location="meta", weights_only=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return shapes if found else None


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
