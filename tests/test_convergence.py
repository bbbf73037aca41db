"""Convergence: the fused loss trains like the eager oracle (in the manner of Liger-Kernel's
``test/convergence``).

The demo's models (``mta_kernels.distill.demo``: a GPT-2-style teacher, a smaller Llama-style student,
each with its own byte-level BPE tokenizer trained on the bundled corpus) take 30 optimizer steps on a
fixed batch of the demo's data, with the demo's objective without KD (the vocabularies differ):
``(1 − λ) CE + λ β L_MTA``, units from spaCy aligned to both tokenizations (``UnitCollator``). Three
runs from the same initial weights: the fused loss (``MTALoss``, on the path the ops pick: the Triton
kernels on a GPU or under the interpreter; and on the torch path), the eager oracle
(``reference.mta_loss`` with the same projectors) in float32, and the eager oracle in float64. The loss
curves must agree within the tolerance rule (docs/method.md#numerical-tolerance-rule): the fused curve's
largest deviation from the float64 curve is at most 2 × the float32 eager curve's + a small floor.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import DEVICE, assert_within_rule

from mta_kernels import reference, use_backend
from mta_kernels.losses import MTALoss

pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

STEPS, BATCH, MAX_LENGTH = 30, 4, 48
LAM, BETA, LR = 0.5, 2.0, 2e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, extractor):
    from mta_kernels.distill import demo
    from mta_kernels.distill.collate import UnitCollator
    from mta_kernels.distill.models import build_model, load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("convergence")
    with open(demo.CORPUS, encoding="utf-8") as f:
        corpus = [ln.strip() for ln in f if ln.strip()]
    train_tokenizer("bpe", corpus, demo.TEACHER_VOCAB, str(root / "teacher"))
    train_tokenizer("bpe", corpus, demo.STUDENT_VOCAB, str(root / "student"))
    t_tok = load_tokenizer(str(root / "teacher"), demo.TEACHER)
    s_tok = load_tokenizer(str(root / "student"), demo.STUDENT)
    with open(demo.DOLLY, encoding="utf-8") as f:
        records = [json.loads(ln) for ln in f if ln.strip()][:BATCH]
    collate = UnitCollator(s_tok, t_tok, extractor=extractor, max_length=MAX_LENGTH)
    batch = collate(records)
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["units"] = {g: u.to(DEVICE) for g, u in batch["units"].items()}
    torch.manual_seed(0)
    teacher = build_model(demo.TEACHER, t_tok, MAX_LENGTH).eval()
    student = build_model(demo.STUDENT, s_tok, MAX_LENGTH)
    ls, lt = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    ds, dt = student.config.hidden_size, teacher.config.hidden_size
    mta = MTALoss.auto(ls, lt, ds, dt, num_pairs=2, hra="unit")  # the loop's rule for these depths
    return batch, teacher.to(DEVICE), student.to(DEVICE), mta.to(DEVICE)


@pytest.fixture(scope="module")
def reference_curves(setup) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager oracle's loss curve in float64 and in float32."""
    return _curve(setup, fused=False, dtype=torch.float64), _curve(setup, fused=False, dtype=torch.float32)


def _curve(setup, fused: bool, dtype: torch.dtype) -> torch.Tensor:
    """The loss of each of STEPS AdamW steps from the shared initial weights."""
    from mta_kernels.distill import objective as O

    batch, teacher, student, mta = setup
    teacher, student, mta = (copy.deepcopy(m).to(dtype) for m in (teacher, student, mta))
    units = batch["units"]
    params = list(student.parameters()) + list(mta.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    with torch.no_grad():
        t_out = teacher(
            input_ids=batch["teacher_input_ids"],
            attention_mask=batch["teacher_attention_mask"],
            output_hidden_states=True,
        )
    losses = []
    for _ in range(STEPS):
        out = student(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        ce_sum, n = O.ce_sum(out.logits, batch["labels"])
        masks = (batch["attention_mask"], batch["teacher_attention_mask"])
        if fused:
            term = mta(out.hidden_states, t_out.hidden_states, units, *masks).loss
        else:
            term = reference.mta_loss(
                out.hidden_states,
                t_out.hidden_states,
                units,
                *masks,
                pairs=mta.pairs,
                projectors=list(mta.projectors),
                hra=mta.hra_level,
                gamma=mta.gamma,
            ).loss
        loss = O.Objective(LAM, BETA)(ce_sum / n, None, term)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().double())
    return torch.stack(losses)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_fused_loss_follows_the_oracle_for_dozens_of_steps(setup, reference_curves, backend):
    """``auto``: the path the ops pick (the Triton kernels on a GPU or under the interpreter, ~1 min on
    2 CPU cores); ``torch``: the torch path."""
    oracle, eager = reference_curves
    with use_backend(backend):
        fused = _curve(setup, fused=True, dtype=torch.float32)
    assert oracle[-1] < oracle[0] - 0.5, f"the models did not train: {oracle.tolist()}"
    assert_within_rule(fused, eager, oracle, floor=1e-4, what="loss curve")


def test_the_check_catches_a_slightly_different_loss(setup, reference_curves):
    """The rule is tight enough to see a fused loss that differs a little: γ = 0.11 instead of 0.1."""
    batch, teacher, student, mta = setup
    other = copy.deepcopy(mta)
    other.gamma = 0.11
    with use_backend("torch"):
        changed = _curve((batch, teacher, student, other), fused=True, dtype=torch.float32)
    with pytest.raises(AssertionError, match="fused error"):
        assert_within_rule(changed, *reference_curves[::-1], floor=1e-4, what="loss curve")
