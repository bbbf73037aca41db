"""LoRA on the student (``--lora``): peft adapters, and the merged model a run saves.

As DistiLLM's ``get_model`` does: ``LoraConfig(task_type=CAUSAL_LM, r, lora_alpha, lora_dropout)``
with peft's default target modules for the architecture (``--lora-targets`` names others), so only the
adapters of the student train; the MTA projectors are not part of the student and train in full. The
checkpoint holds the wrapped model's whole state (base + adapters), so ``--resume`` rebuilds the same
wrapping and loads it. The saved ``model/`` (and ``best/``) is the base model with the adapters merged
in (``merge_and_unload`` of a copy), a plain Hugging Face checkpoint that ``from_pretrained`` and
``mta-distill evaluate`` read.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

from torch import nn

from mta_kernels.distill.config import DistillError, TrainConfig


def apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """``model`` wrapped in a peft ``PeftModelForCausalLM`` with ``cfg``'s adapters (the base frozen)."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise DistillError(
            "--lora needs the peft package: pip install peft (or the 'distill' extra)"
        ) from None
    targets = None
    if cfg.lora_targets:
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
    )
    try:
        with warnings.catch_warnings():  # peft asks transformers >= 5 for a renamed attribute (a notice)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(model, config)
    except ValueError as exc:  # no default targets for this architecture, or a name that matches nothing
        raise DistillError(f"--lora: {exc} (name the modules with --lora-targets)") from None
    if cfg.grad_checkpointing:
        wrapped.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return wrapped


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (``model`` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_model(model: nn.Module, tokenizer: Any, directory: str) -> None:
    """``save_pretrained`` of the model (LoRA merged, on a copy: training goes on) and the tokenizer."""
    os.makedirs(directory, exist_ok=True)
    plain = copy.deepcopy(model).merge_and_unload() if is_lora(model) else model
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
