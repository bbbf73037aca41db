"""Reference distillation loop for MTA: teacher training, KD + MTA distillation, checkpoints, DDP, demo.

Entry points: ``python -m mta_kernels.distill {train-teacher,distill,demo}`` (console script
``mta-distill``), or :func:`mta_kernels.distill.train.train` with a :class:`TrainConfig`.
"""

from mta_kernels.distill.config import DistillError, TrainConfig

__all__ = ["DistillError", "TrainConfig"]
