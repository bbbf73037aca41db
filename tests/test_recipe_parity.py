"""Recipe parity of the loop's optimisation: DistiLLM's weight-decay names, one absolute learning-rate
floor for every group (projectors included), and the two gradient-accumulation means."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from mta_kernels.distill import objective as O
from mta_kernels.distill.config import TrainConfig
from mta_kernels.distill.prepare import DistEnv, decays, make_optimizer, make_scheduler
from mta_kernels.distill.step import Stepper


def test_weight_decay_names_as_distillm():
    no_decay = [
        "student.transformer.h.0.ln_1.weight",
        "student.transformer.h.3.ln_2.weight",
        "student.transformer.ln_f.weight",
        "student.transformer.h.0.attn.c_attn.bias",
        "student.model.layers.0.self_attn.q_proj.bias",
    ]
    decay = [
        "student.transformer.h.0.attn.c_attn.weight",
        "student.model.layers.0.input_layernorm.weight",  # not GPT-2's ln_*: decays there too
        "student.model.norm.weight",
        "student.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "mta.projectors.0.weight",
        "mta.projectors.0.bias",  # the projectors' group takes AdamW's decay whole
    ]
    assert not any(decays(n) for n in no_decay) and all(decays(n) for n in decay)


class _Module(nn.Module):
    """Student + projector stand-in: ``student.ln_f.weight``, ``student.lin.weight/bias``, ``mta.p``."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.ModuleDict({"ln_f": nn.LayerNorm(3), "lin": nn.Linear(3, 3)})
        self.mta = nn.Linear(3, 4)


def test_every_group_decays_to_one_absolute_floor():
    cfg = TrainConfig(lr=1e-4, projector_lr=5e-4, min_lr_ratio=1e-3, warmup_steps=0, steps=10)
    opt = make_optimizer(_Module(), cfg)
    by_rate = {}
    for g in opt.param_groups:
        by_rate.setdefault(g["lr"], []).append((len(g["params"]), g["weight_decay"]))
    # student: lin.weight decays; ln_f.weight, ln_f.bias and lin.bias do not. Projector: all decays.
    assert by_rate == {1e-4: [(1, cfg.weight_decay), (3, 0.0)], 5e-4: [(2, cfg.weight_decay), (0, 0.0)]}
    sched = make_scheduler(opt, cfg)
    for _ in range(cfg.steps):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-7] * 4)  # DistiLLM's --lr-min


class _Sums(nn.Module):
    """A Trainable stand-in: the CE sum of micro-batch i is ``w · c_i`` over its ``n_i`` target tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))
        self.mta, self.kd_term, self.kd_chunk = None, None, None
        self.mta_seconds: list = []
        self.teacher_out = None

    def forward(self, batch: dict) -> dict:
        n = int((batch["labels"][:, 1:] != -100).sum())
        return {
            "ce_sum": self.w * batch["c"],
            "n_tok": n,
            "kd_sum": None,
            "kd_entropy_sum": None,
            "mta": None,
        }


@pytest.mark.parametrize("accum_mean", ["tokens", "micro-batches"])
def test_gradient_accumulation_means(accum_mean):
    c, n = [3.0, 10.0], [1, 4]  # micro-batches of unequal target counts: the two means differ
    micro = [
        {
            "labels": torch.zeros(1, k + 1, dtype=torch.long),
            "attention_mask": torch.ones(1, k + 1),
            "c": torch.tensor(x),
        }
        for x, k in zip(c, n)
    ]
    module = _Sums()
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    objective = O.Objective(0.0, 0.0, distil=False)
    stepper = Stepper(
        env, module, module, None, opt, sched, objective, contextlib.nullcontext, 0.0, accum_mean
    )
    rec, _ = stepper.step(micro, 1)
    grad = 1.0 - float(module.w.detach())
    if accum_mean == "tokens":  # one process holding both: Σ c / Σ n
        assert grad == pytest.approx(sum(c) / sum(n))
    else:  # DeepSpeed's: the mean of the micro-batch means
        assert grad == pytest.approx((c[0] / n[0] + c[1] / n[1]) / 2)
    assert rec["ce"] == pytest.approx(sum(c) / sum(n))  # logged: per token over the step, either way
