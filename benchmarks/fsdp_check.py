"""MTATrainer under FSDP: a few steps, a checkpoint, a resume; the projectors must survive the round trip.

Accelerate runs FSDP on GPUs only, so this is a ``gpu_check.sh`` stage (one GPU: FSDP still wraps the
student and its projectors in flat parameters and writes sharded-state checkpoints). On the CPU the
script runs without a launcher (plain ``Trainer``), which is how the test suite keeps it working.

    accelerate launch --use_fsdp --num_processes 1 --fsdp_sharding_strategy FULL_SHARD \\
        benchmarks/fsdp_check.py --out /tmp/fsdp_check
    python benchmarks/fsdp_check.py --out /tmp/fsdp_check --device cpu      # no FSDP

No spaCy (the GPU machine has none): units are synthetic ranges over each sequence's real tokens. Prints
one JSON line, exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mta_kernels import MTALoss  # noqa: E402
from mta_kernels.distill.demo import CORPUS  # noqa: E402
from mta_kernels.distill.models import build_model, train_tokenizer  # noqa: E402
from mta_kernels.integrations import MTADataCollator, MTATrainer  # noqa: E402
from mta_kernels.layout import UnitBatch  # noqa: E402

PAIRS = [(1, 1, "word"), (2, 2, "phrase")]


def synthetic_units(attention_mask: torch.Tensor, span: int) -> UnitBatch:
    """Units of ``span`` tokens tiling each sequence's real tokens (the last one shorter), one shared
    tokenization; a stand-in for spaCy units with the same layout rules."""
    B, T = attention_mask.shape
    ranges, counts = [], []
    for b in range(B):
        real = torch.nonzero(attention_mask[b]).flatten().tolist()
        lo, hi = (real[0], real[-1] + 1) if real else (0, 0)
        seq = [(b * T + s, b * T + min(s + span, hi)) for s in range(lo, hi, span)]
        ranges += seq
        counts.append(len(seq))
    r = torch.tensor(ranges, dtype=torch.int32).reshape(-1, 2)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    return UnitBatch(r, r, cu, T, T)


class SyntheticUnitsCollator(MTADataCollator):
    """The trainer's collator (labels, truncation) with synthetic units instead of spaCy's."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        granularities, self.granularities = self.granularities, ()
        try:
            batch = super().__call__(examples)
        finally:
            self.granularities = granularities
        span = {"word": 1, "phrase": 3}
        batch["units"] = {g: synthetic_units(batch["attention_mask"], span[g]) for g in granularities}
        return batch


def build(out: str, steps: int, device: str) -> tuple[MTATrainer, Any]:
    from transformers import TrainingArguments

    with open(CORPUS, encoding="utf-8") as f:
        corpus = [ln.strip() for ln in f if ln.strip()]
    tok = train_tokenizer("bpe", corpus, 400, os.path.join(out, "tok"))
    torch.manual_seed(0)
    student, teacher = build_model("builtin:gpt2:2:32", tok, 128), build_model("builtin:gpt2:2:64", tok, 128)
    data = [{"text": t[:200]} for t in corpus[:16]]
    collator = SyntheticUnitsCollator(tok, granularities=("word", "phrase"), extractor=None, max_length=64)
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"),
        max_steps=steps,
        save_steps=steps // 2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=device == "cpu",
        seed=0,
    )
    trainer = MTATrainer(
        student, teacher, MTALoss(PAIRS, 32, 64, hra="token"), args=args, data_collator=collator,
        train_dataset=data,
    )  # fmt: skip
    return trainer, tok


def projector_state(trainer: MTATrainer) -> dict[str, torch.Tensor]:
    """The projectors' weights, gathered to full tensors on the host."""
    state = trainer.accelerator.get_state_dict(trainer.model)
    return {k: v.detach().float().cpu() for k, v in state.items() if k.startswith("mta_loss.")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be even and >= 2 (a checkpoint is written half-way)")
    os.makedirs(args.out, exist_ok=True)

    full, _ = build(args.out, args.steps, args.device)
    before = {k: v.clone() for k, v in projector_state(full).items()}
    full.train()
    after_full = projector_state(full)
    checkpoint = os.path.join(full.args.output_dir, f"checkpoint-{args.steps // 2}")

    resumed, _ = build(args.out, args.steps, args.device)
    resumed.train(resume_from_checkpoint=checkpoint)
    after_resumed = projector_state(resumed)

    fsdp = getattr(full, "is_fsdp_enabled", False)
    moved = bool(before) and any(not torch.equal(before[k], after_full[k]) for k in before)
    same = set(after_full) == set(after_resumed) and all(
        torch.allclose(after_full[k], after_resumed[k], rtol=1e-4, atol=1e-6) for k in after_full
    )
    losses = [r["loss"] for r in full.state.log_history if "loss" in r]
    report = {
        "fsdp": fsdp,
        "device": str(full.args.device),
        "projector_tensors": len(after_full),
        "projectors_trained": moved,
        "resume_matches": same,
        "losses": losses,
    }
    if full.accelerator.is_main_process:
        print(json.dumps(report))
    ok = moved and same and all(map(lambda x: x == x, losses))  # x == x: not NaN
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
