"""``--report-to tensorboard|wandb``: the loop's metrics records, also sent as scalars to a tracker.

``metrics.jsonl`` and the PNG are written in every case; a tracker gets the same records, flattened:
``train/ce``, ``train/kd``, ``train/mta``, ``train/loss``, ``train/dsa/pair0_s6_t24_word`` (one per
layer pair, also ``hra``), ``train/unit_coverage/word/tokens``, ``eval/loss``, ... The trackers are
imported only when asked for (TensorBoard: the ``integrations`` extra; W&B: ``pip install wandb``).
"""

from __future__ import annotations

import math
import os
from typing import Any

from mta_kernels.distill.config import DistillError, TrainConfig
from mta_kernels.presets import pair_label

TENSORBOARD_DIR = "tensorboard"


def check_available(report_to: str) -> None:
    """Raise :class:`DistillError` (before any work) when the asked-for tracker is not installed."""
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            raise DistillError(
                "--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                "(or the 'integrations' extra), or pass --report-to none"
            ) from None
    elif report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise DistillError(
                "--report-to wandb needs the wandb package: pip install wandb (WANDB_MODE=offline runs "
                "without an account), or pass --report-to none"
            ) from None


def flatten(record: dict, pairs: list | None) -> dict[str, float]:
    """The numbers of one metrics record as ``{"train/ce": ..., ...}`` (``None`` and text left out).

    Per-pair lists (``dsa``, ``hra``) are named by their layer pair, ``pairs`` as
    ``[(student layer, teacher layer, granularity), ...]``.
    """
    kind = record.get("kind", "train")
    out: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[name] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                add(f"{name}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for k, v in enumerate(value):
                label = pair_label(k, pairs[k]) if pairs is not None and k < len(pairs) else f"pair{k}"
                add(f"{name}/{label}", v)

    for key, value in record.items():
        if key in ("kind", "step"):
            continue
        if kind == "eval" and key.startswith("eval_"):
            key = key[len("eval_") :]
        add(f"{kind}/{key}", value)
    return out


class Reporter:
    """Sends metrics records to TensorBoard (``<out>/tensorboard``) or W&B; rank 0 only.

    ``start_step`` > 0 (a resumed run): TensorBoard drops the events written after it (they are logged
    again), as ``metrics.jsonl`` is trimmed.
    """

    def __init__(self, cfg: TrainConfig, pairs: list | None, start_step: int) -> None:
        self.kind, self.pairs = cfg.report_to, pairs
        self.writer: Any = None
        self.run: Any = None
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                os.path.join(cfg.out, TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
            )
        elif self.kind == "wandb":
            import wandb

            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "mta-distill"),
                name=os.path.basename(os.path.normpath(cfg.out)),
                dir=cfg.out,
                config=cfg.to_dict(),
            )

    def log(self, records: list[dict]) -> None:
        for rec in records:
            scalars = flatten(rec, self.pairs)
            step = int(rec["step"])
            if self.writer is not None:
                for name, value in scalars.items():
                    self.writer.add_scalar(name, value, step)
            elif self.run is not None:
                self.run.log(scalars, step=step)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
