"""Chunked CE + logit KD (``--kd-chunk``): the loss from the last hidden states and the LM heads, row
chunk by row chunk, without the ``[B, T, V]`` logits of either model.

The eager path takes ``logits = lm_head(h)`` of the student and the teacher over every position and
vocabulary entry (fp32 copies for the softmaxes on top). Here the selected rows (positions with a
target) are processed ``chunk`` at a time: logits of the chunk for both models, CE and KD of the chunk
(:func:`~mta_kernels.distill.objective.kd_rows_sum`, the same math as the eager path), summed. The
forward keeps no graph; the backward recomputes each chunk's logits and backpropagates the chunk's
``g_ce · CE + g_kd · KD`` into the hidden rows and the student head (the pattern of Liger-Kernel's
fused-linear distillation, with recomputation instead of gradients precomputed in the forward because
the CE and KD weights are only known in the backward). Peak extra memory: a few ``[chunk, V]`` fp32
tensors instead of several ``[B·T, V]``.

Requirements: the model's logits are ``lm_head(hidden_states[-1])`` with ``lm_head`` an ``nn.Linear``
(no soft-capping or logit scaling; checked once against the model's own last-position logits) and its
forward takes ``logits_to_keep`` (so that it does not compute the full logits itself).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mta_kernels.distill import objective as O
from mta_kernels.distill.config import DistillError
from mta_kernels.distill.lora import base_model

# auto chunk: at most this many logits per [chunk, V] tensor (64 MiB in fp32; the loss holds ~8 such).
AUTO_ELEMENTS = 2**24
# Config attributes of models whose logits are not a plain linear map of the last hidden state.
_NONLINEAR_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot use the chunked path (``None``: it can)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"{type(model).__name__} has no nn.Linear output layer"
    config = getattr(model, "config", None)
    for attr in _NONLINEAR_HEAD:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            return f"{type(model).__name__} scales its logits ({attr}={value})"
    # A peft-wrapped student (--lora) hands its keyword arguments to the base model's forward.
    base = base_model(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no logits_to_keep"
    return None


def resolve_kd_chunk(
    setting: str,
    device: torch.device,
    student: nn.Module,
    teacher: nn.Module | None,
    kd_vocab: int | None,
    entropy_weight: bool = False,
) -> tuple[int | None, str | None]:
    """Rows per chunk (``None``: the eager path) and a note for the run's log.

    ``auto``: chunked on CUDA when both models allow it, about :data:`AUTO_ELEMENTS` logits a chunk;
    ``off``: eager; ``N``: chunked with N rows (an error when a model does not allow it).
    """
    if setting == "off" or teacher is None or kd_vocab is None:
        return None, None
    reason = unsupported_reason(student) or unsupported_reason(teacher)
    if entropy_weight:
        reason = "--entropy-weight reads the teacher's full logits"
    if setting == "auto":
        if device.type != "cuda":
            return None, None
        if reason:
            return None, f"logit KD on the eager path (--kd-chunk auto): {reason}"
        v = student.get_output_embeddings().weight.shape[0]
        rows = 1 << max(4, (AUTO_ELEMENTS // v).bit_length() - 1)  # a power of two, at least 16
        return rows, f"logit KD chunked, {rows} rows a chunk (--kd-chunk auto)"
    if reason:
        raise DistillError(f"--kd-chunk {setting}: {reason}; pass --kd-chunk off")
    return int(setting), None


def head_params(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, head.bias


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h_s, w_s, b_s, h_t, w_t, b_t, targets, kind, temperature, alpha, kd_vocab, chunk):
        dev = h_s.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.args = (kind, temperature, alpha, kd_vocab, chunk)
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, targets)
        ce = torch.zeros((), dtype=O.acc(h_s[:0]).dtype, device=h_s.device)
        kd, ent = ce.clone(), ce.clone()
        for i in range(0, h_s.shape[0], chunk):
            s, t = _chunk_logits(h_s, w_s, b_s, h_t, w_t, b_t, kd_vocab, i, chunk)
            ce += F.cross_entropy(O.acc(s), targets[i : i + chunk], reduction="sum")
            kd += O.kd_rows_sum(s[:, :kd_vocab], t, kind, temperature, alpha)
            if kind == "skew":
                ent += O.teacher_entropy_rows_sum(t)
        ctx.mark_non_differentiable(ent)
        return ce, kd, ent

    @staticmethod
    def backward(ctx: Any, g_ce, g_kd, _g_ent):
        h_s, w_s, b_s, h_t, w_t, b_t, targets = ctx.saved_tensors
        kind, temperature, alpha, kd_vocab, chunk = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h_s) if need_h else None
        w = w_s.detach().requires_grad_(need_w)
        b = None if b_s is None else b_s.detach().requires_grad_(need_b)
        grad_w = (
            torch.zeros_like(w_s, dtype=torch.promote_types(w_s.dtype, torch.float32)) if need_w else None
        )
        grad_b = (
            torch.zeros_like(b_s, dtype=torch.promote_types(b_s.dtype, torch.float32))
            if need_b and b_s is not None
            else None
        )
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(h_s.device.type, dtype=dtype, enabled=enabled):
            for i in range(0, h_s.shape[0], chunk):
                h = h_s[i : i + chunk].detach().requires_grad_(need_h)
                s, t = _chunk_logits(h, w, b, h_t, w_t, b_t, kd_vocab, i, chunk, offset=False)
                loss = g_ce * F.cross_entropy(O.acc(s), targets[i : i + chunk], reduction="sum")
                loss = loss + g_kd * O.kd_rows_sum(s[:, :kd_vocab], t, kind, temperature, alpha)
                inputs = [x for x, need in ((h, need_h), (w, need_w), (b, need_b)) if need and x is not None]
                grads = list(torch.autograd.grad(loss, inputs))
                if need_h:
                    grad_h[i : i + chunk] = grads.pop(0)
                if need_w:
                    grad_w += grads.pop(0)
                if grad_b is not None:
                    grad_b += grads.pop(0)
        grad_w = None if grad_w is None else grad_w.to(w_s.dtype)
        grad_b = None if grad_b is None else grad_b.to(b_s.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _chunk_logits(h_s, w_s, b_s, h_t, w_t, b_t, kd_vocab, i, chunk, offset=True):
    """Student logits of rows ``i:i+chunk`` (``h_s`` already cut when ``offset`` is False) and the
    teacher's over the first ``kd_vocab`` entries (no gradient)."""
    s = F.linear(h_s[i : i + chunk] if offset else h_s, w_s, b_s)
    with torch.no_grad():
        t = F.linear(h_t[i : i + chunk], w_t[:kd_vocab], None if b_t is None else b_t[:kd_vocab])
    return s, t


def chunked_ce_kd_sum(
    student_hidden: torch.Tensor,
    student_head: tuple[torch.Tensor, torch.Tensor | None],
    teacher_hidden: torch.Tensor,
    teacher_head: tuple[torch.Tensor, torch.Tensor | None],
    labels: torch.Tensor,
    kind: str,
    temperature: float,
    skew_alpha: float,
    kd_vocab: int,
    chunk: int,
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor | None]:
    """Summed CE and KD (as :func:`~mta_kernels.distill.objective.ce_sum` and ``kd_sum`` of the logits
    ``h @ W.T + b``) without forming the ``[B, T, V]`` logits.

    Args:
        student_hidden: ``[B, T, D_s]`` last hidden states (the LM head's input); teacher_hidden
            ``[B, T, D_t]`` (constant). student_head / teacher_head: (weight ``[V, D]``, bias ``[V]`` or
            None). labels: int ``[B, T]`` (-100 = no target). kd_vocab: KD over the first ``kd_vocab``
            entries; chunk: rows per chunk (>= 1).
    Returns:
        CE sum (float32 scalar), number of target tokens, KD sum (float32 scalar), and the summed
        teacher entropy for ``kind="skew"`` (else ``None``; no gradient).
    """
    if kind not in O.KD_CONVENTIONS:
        raise ValueError(f"unknown KD kind {kind!r} (one of {tuple(O.KD_CONVENTIONS)})")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    targets, mask = O.shift_targets(labels)
    h_s = student_hidden[:, :-1][mask]  # [M, D_s]
    h_t = teacher_hidden[:, :-1][mask].detach()  # [M, D_t]
    (w_s, b_s), (w_t, b_t) = student_head, teacher_head
    ce, kd, ent = _ChunkedLMLoss.apply(
        h_s, w_s, b_s, h_t, w_t.detach(), None if b_t is None else b_t.detach(), targets[mask],
        kind, temperature, skew_alpha, kd_vocab, chunk,
    )  # fmt: skip
    return ce, int(mask.sum()), kd, ent if kind == "skew" else None


def _check_head(model_name: str, hidden: torch.Tensor, head: tuple, logits: torch.Tensor) -> None:
    """The model's own last-position logits must be ``head(hidden[:, -1])``: else the chunked loss would
    silently differ from the model's (a soft-cap, a scale, a head this module does not know)."""
    w, b = head
    with torch.no_grad():
        mine = F.linear(hidden[:, -1].to(w.dtype), w, b).float()
        theirs = logits[:, -1].float()
        err = (mine - theirs).abs().max().item()
        scale = theirs.abs().max().item() + 1.0
    if not err <= 2e-2 * scale:  # bf16 autocast rounds both sides differently
        raise DistillError(
            f"--kd-chunk: the {model_name}'s logits are not its output layer applied to its last hidden "
            f"state (max difference {err:.3g}); pass --kd-chunk off"
        )


def chunked_forward(module: Any, out: Any, teacher_out: Any, labels: torch.Tensor) -> dict[str, Any]:
    """The CE/KD entries of :class:`~mta_kernels.distill.step.Trainable`'s result, chunked.

    ``out``/``teacher_out``: model outputs with ``hidden_states`` (and logits of the last position only).
    """
    student_head = head_params(module.student)
    if not getattr(module, "_kd_heads_checked", False):
        _check_head("student", out.hidden_states[-1], student_head, out.logits)
        _check_head("teacher", teacher_out.hidden_states[-1], module.teacher_head, teacher_out.logits)
        module._kd_heads_checked = True
    term = module.kd_term
    ce, n_tok, kd, ent = chunked_ce_kd_sum(
        out.hidden_states[-1], student_head, teacher_out.hidden_states[-1], module.teacher_head, labels,
        term.kind, term.temperature, term.skew_alpha, term.vocab, module.kd_chunk,
    )  # fmt: skip
    return {"ce_sum": ce, "n_tok": n_tok, "kd_sum": kd, "kd_entropy_sum": ent}
