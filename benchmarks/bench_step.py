"""One distillation step end to end, and the share of it spent in the MTA loss.

Teacher GPT-2-XL (48 layers, 1600 wide) and student GPT-2 (12 layers, 768 wide) built from
``transformers.GPT2Config`` with the real sizes and random weights (offline), bf16, B=16, T=512. One
step = teacher forward (no grad, hidden states) + student forward + loss + student backward, where

    loss = (1 − λ)·CE + λ·(KD + β·L_MTA),   λ = 0.5, β = 2, KD = forward KL of the logits (τ = 1)

and L_MTA is computed by each provider (``bench_mta_loss``): ``eager_stacked``, ``eager``,
``mta_kernels``, plus ``no_mta`` (the same step without the MTA term). The share of the step spent in
the MTA loss is ``(t_provider − t_no_mta) / t_provider``. No optimizer step (it does not depend on the
loss). torch.compile is not run here (minutes of compilation for the whole step).

    python benchmarks/bench_step.py --quick --device cpu      # tiny GPT-2 configs
    python benchmarks/bench_step.py                           # GPU: the GPT-2-XL -> GPT-2 preset shapes
"""

from __future__ import annotations

import argparse
from typing import Any

import harness
import registry
import torch
import torch.nn.functional as F

BENCH = registry.get("step")  # the cases and providers
LAM, BETA = 0.5, 2.0

# (student, teacher) GPT2Config keyword arguments.
MODELS = {
    "gpt2": (
        dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
        dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024),
    ),
    "tiny": (
        dict(n_layer=3, n_embd=48, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0, eos_token_id=0),
        dict(n_layer=6, n_embd=80, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0, eos_token_id=0),
    ),
}


def _build_model(kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**kwargs, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.device(device):  # initialise on the device: seconds instead of minutes for 1.5B params
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype)


def model_flops(cfg: dict[str, Any], tokens: int, B: int, T: int) -> float:
    """Forward FLOPs: 2 per parameter of the blocks and the LM head per token + causal attention."""
    D, L, V = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    block_params = 12 * D * D  # attention 4·D² + MLP 8·D²
    return 2.0 * tokens * (L * block_params + D * V) + 2.0 * L * B * T * T * D  # QKᵀ and PV, causal half


def make_spec(args: argparse.Namespace) -> harness.BenchSpec:
    device = harness.pick_device(args.device)
    dtype = getattr(torch, args.dtype)

    def build(p: dict[str, Any]) -> dict[str, Any]:
        from mta_kernels.losses import MTALoss

        pre = harness.PRESETS[p["preset"]]
        s_cfg, t_cfg = MODELS[p["preset"]]
        torch.manual_seed(args.seed)
        student = _build_model(s_cfg, device, dtype).train()
        teacher = _build_model(t_cfg, device, dtype).eval().requires_grad_(False)
        B, T = p["B"], p["T"]
        gen = torch.Generator(device=device).manual_seed(args.seed)
        ids = torch.randint(0, s_cfg["vocab_size"], (B, T), device=device, generator=gen)
        mask = torch.ones(B, T, dtype=torch.long, device=device)
        pairs = list(zip(pre.student_layers, pre.teacher_layers, pre.granularities()))
        mta = MTALoss(pairs, pre.d_student, pre.d_teacher, hra="token").to(device)
        units = {
            g: harness.synth_unit_batch(B, T, g, True, args.seed + i, device)
            for i, g in enumerate(("word", "phrase"))
        }
        params = list(student.parameters()) + list(mta.parameters())
        return {
            "student": student,
            "teacher": teacher,
            "ids": ids,
            "mask": mask,
            "mta": mta,
            "pairs": pairs,
            "units": units,
            "grad_leaves": params,
            "check_leaves": [],  # compare the loss only: copying 124M gradients per provider costs seconds
            "s_cfg": s_cfg,
            "t_cfg": t_cfg,
        }

    def make_fn(provider: str, p: dict[str, Any], x: dict[str, Any]):
        if provider not in BENCH.providers:
            raise ValueError(provider)
        from mta_kernels import reference

        student, teacher, ids, mask, mta = x["student"], x["teacher"], x["ids"], x["mask"], x["mta"]
        bool_mask = mask.bool()

        def mta_term(s_states, t_states) -> torch.Tensor:
            if provider == "mta_kernels":
                return mta(s_states, t_states, x["units"], bool_mask, bool_mask).loss
            return reference.mta_loss(
                s_states,
                t_states,
                x["units"],
                bool_mask,
                bool_mask,
                pairs=x["pairs"],
                projectors=list(mta.projectors),
                hra="token",
                gamma=mta.gamma,
                stacked=provider == "eager_stacked",
            ).loss

        def step():
            with torch.no_grad():
                t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            V = s_out.logits.shape[-1]
            s_logits = s_out.logits[:, :-1].reshape(-1, V).float()
            t_logits = t_out.logits[:, :-1].reshape(-1, V).float()
            ce = F.cross_entropy(s_logits, ids[:, 1:].reshape(-1))
            log_ps, log_pt = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
            kd = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")  # KL(p_t || p_s)
            distil = kd
            if provider != "no_mta":
                distil = distil + BETA * mta_term(s_out.hidden_states, t_out.hidden_states)
            loss = (1 - LAM) * ce + LAM * distil
            loss.backward()
            return loss.detach()

        return step

    def floor(p: dict[str, Any], x: dict[str, Any]) -> tuple[float, float]:
        tokens = p["B"] * p["T"]
        flops = model_flops(x["t_cfg"], tokens, p["B"], p["T"])
        flops += 3 * model_flops(x["s_cfg"], tokens, p["B"], p["T"])  # forward + backward
        weight_bytes = sum(t.numel() * t.element_size() for t in x["teacher"].parameters())
        weight_bytes += 3 * sum(t.numel() * t.element_size() for t in x["student"].parameters())
        return float(weight_bytes), flops

    # no float64 oracle: a training step of whole models is compared by its loss only (rel_err_vs_ref)
    return harness.BenchSpec("step", build, make_fn, floor, BENCH.providers, oracle_provider=None)


def post_process(records: list[dict[str, Any]]) -> None:
    """Share of the step spent in the MTA loss: (t − t_no_mta) / t, per provider."""
    base = next((r.get("ms_p50") for r in records if r["provider"] == "no_mta"), None)
    for r in records:
        if r["provider"] == "no_mta":
            r["rel_err_vs_ref"] = None  # a different loss by construction
            continue
        if base and r.get("ms_p50"):
            r["mta_ms"] = r["ms_p50"] - base
            r["mta_share"] = (r["ms_p50"] - base) / r["ms_p50"]


def add_args(parser: argparse.ArgumentParser) -> None:
    """A step takes long: longer timing budgets by default (``harness.bench_args`` adds them)."""
    parser.set_defaults(rep_ms=1000.0, warmup_ms=200.0)


def main(argv: list[str] | None = None) -> None:
    args = harness.bench_args(BENCH, __doc__.splitlines()[0], argv)
    harness.run_registered(BENCH, args)
    # Print the share last: it is what this benchmark is for.
    folder = harness.results_dir(harness.pick_device(args.device), args.out)
    data = harness.load_results(folder / f"step{'_' + args.tag if args.tag else ''}.json")
    for r in data["records"]:
        share = r.get("mta_share")
        if isinstance(share, float):
            print(
                f"[step] {r['provider']:14s} step {r['ms_p50']:.2f} ms, "
                f"MTA loss {r['mta_ms']:.2f} ms = {100 * share:.1f}% of the step"
            )


if __name__ == "__main__":
    main()
