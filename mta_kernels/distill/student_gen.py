"""Student-generated outputs with DistiLLM's adaptive off-policy schedule (``--student-gen``).

The rule, as DistiLLM's training loop applies it (our implementation, docs/design/distill.md):

- A threshold θ starts at ``--init-threshold``. After each held-out evaluation, when the held-out loss
  is at least ``--loss-eps`` above the reference loss, θ grows by 0.1 (at most 1) and the reference
  becomes that loss; otherwise nothing changes. The reference starts as the loss before the first step.
- Each micro-batch of step ``k`` (1-based) of ``K`` draws ``r ~ U[0, 1)``. With
  ``p_fresh = θ · (1 − k / K)``: when ``r < p_fresh``, or ``r < θ`` while the replay buffer holds
  fewer than ``--capacity`` examples, the student samples a response to each prompt of the micro-batch,
  the generations enter the buffer (oldest dropped past the capacity) and the step trains on them;
  else when ``r < θ`` it trains on ``--batch-size`` examples drawn from the buffer without replacement;
  else on the data batch. The data stream advances in every case.

Generations are text (``prompt + sampled response``) and go through the run's collator, so the
teacher's tokenization, the labels (response only) and the MTA units are made exactly as for data.
Everything random here is drawn from one ``random.Random(seed)``: the decision, the buffer draw, and
the seed of each generation call (run under :func:`torch.random.fork_rng`, so the global RNG is not
touched). Its state, θ, the reference loss and the buffer are part of the checkpoint: a resumed run
makes the same choices and the same generations.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import torch
from torch import nn

from mta_kernels.distill.collate import prompt_token_ids
from mta_kernels.distill.config import DistillError, TrainConfig

SOURCES = ("data", "fresh", "replay")
THRESHOLD_STEP = 0.1  # DistiLLM's increment of θ after a held-out loss rise


class AdaptiveSchedule:
    """θ and its update rule (module docstring)."""

    def __init__(self, init_threshold: float, loss_eps: float) -> None:
        self.threshold = float(init_threshold)
        self.loss_eps = float(loss_eps)
        self.reference_loss: float | None = None

    def fresh_probability(self, step: int, total: int) -> float:
        """``θ · (1 − step / total)``: the chance of a fresh generation once the buffer is full."""
        return self.threshold * (1.0 - step / total)

    def choose(self, r: float, step: int, total: int, buffer_len: int, capacity: int) -> str:
        """The source of a micro-batch of step ``step`` (1-based) for the draw ``r``: one of SOURCES."""
        if r < self.fresh_probability(step, total) or (r < self.threshold and buffer_len < capacity):
            return "fresh"
        if r < self.threshold:
            return "replay"
        return "data"

    def update(self, eval_loss: float) -> bool:
        """Feed a held-out loss; returns whether θ grew. The first call only sets the reference."""
        if self.reference_loss is None:
            self.reference_loss = float(eval_loss)
            return False
        if eval_loss >= self.reference_loss + self.loss_eps:
            self.threshold = min(self.threshold + THRESHOLD_STEP, 1.0)
            self.reference_loss = float(eval_loss)
            return True
        return False

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "reference_loss": self.reference_loss}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
        self.reference_loss = state["reference_loss"]


class OffPolicy:
    """The replay buffer, the schedule and the student's sampler of one run."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any, device: torch.device) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.device = device
        self.schedule = AdaptiveSchedule(cfg.init_threshold, cfg.loss_eps)
        self.buffer: deque[dict] = deque(maxlen=cfg.capacity)
        self.rng = random.Random(cfg.seed)
        self.max_prompt = cfg.generation_prompt_length
        self.max_new_tokens = cfg.max_length - self.max_prompt
        self.counts = dict.fromkeys(SOURCES, 0)

    # ------------------------------------------------------------------------------ choice
    def examples_for(
        self, student: nn.Module, examples: list[dict], step: int, total: int
    ) -> tuple[str, list]:
        """Source and examples of a micro-batch: ``("data", examples)`` or generated/replayed ones."""
        r = self.rng.random()
        source = self.schedule.choose(r, step, total, len(self.buffer), self.cfg.capacity)
        self.counts[source] += 1
        if source == "fresh":
            generated = self.generate(student, examples)
            self.buffer.extend(generated)
            return source, generated
        if source == "replay":
            return source, self.rng.sample(list(self.buffer), k=len(examples))
        return source, examples

    def take_counts(self) -> dict:
        """Micro-batches per source since the last call (for the step's metrics record)."""
        counts, self.counts = self.counts, dict.fromkeys(SOURCES, 0)
        return {**counts, "threshold": self.schedule.threshold, "buffer": len(self.buffer)}

    # -------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, student: nn.Module, examples: list[dict]) -> list[dict]:
        """One sampled response per example's prompt (the prompt kept as text: units stay on it)."""
        tok = self.tokenizer
        was_training = student.training
        student.eval()
        seed = self.rng.getrandbits(63)
        devices = [self.device] if self.device.type == "cuda" else []
        out = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for ex in examples:
                prompt = ex["text"][: ex["prompt_length_chars"]]
                ids = prompt_token_ids(tok, prompt, self.max_prompt, last=True)  # bounded for any size
                input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
                seq = student.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=True,
                    top_p=self.cfg.gen_top_p,
                    top_k=self.cfg.gen_top_k,
                    temperature=self.cfg.gen_temperature,
                    num_beams=1,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                response = tok.decode(seq[0, len(ids) :].tolist(), skip_special_tokens=True)
                out.append({"text": prompt + response, "prompt_length_chars": len(prompt)})
        student.train(was_training)
        return out

    # ---------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {
            "schedule": self.schedule.state_dict(),
            "buffer": list(self.buffer),
            "rng": self.rng.getstate(),
        }

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise DistillError("the checkpoint has no student-generation state (was it written without it?)")
        self.schedule.load_state_dict(state["schedule"])
        self.buffer = deque(state["buffer"], maxlen=self.cfg.capacity)
        self.rng.setstate(state["rng"])


def check_prompts(examples: list[dict]) -> None:
    """Student generation needs a prompt in every training example."""
    missing = sum(1 for ex in examples if not ex.get("prompt_length_chars"))
    if missing:
        raise DistillError(
            f"--student-gen samples responses to prompts, but {missing} training example(s) have none: "
            "use JSONL with non-empty 'prompt' fields"
        )
