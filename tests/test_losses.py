"""MTALoss / DSALoss / HRALoss against the eager oracle of the whole loss, ``reference.mta_loss``.

The oracle is ``reference.mta_loss`` run in float64; the "eager" baseline of the tolerance rule
(docs/method.md#numerical-tolerance-rule) is the same function run in the input dtype. Units are built
by hand (random sorted, non-overlapping ranges per sequence, the same unit count in both tokenizations),
never by spaCy.
"""

from __future__ import annotations

import copy
import os
import zlib

import pytest
import torch
from helpers import DEVICE, assert_within_rule

import mta_kernels
from mta_kernels import reference as ref
from mta_kernels.layout import UnitBatch
from mta_kernels.losses import PRESETS, DSALoss, HRALoss, MTALoss, auto_pairs
from mta_kernels.variants import teacher_confidence

DS, DT = 17, 24  # small awkward widths; the presets' real widths are overridden in tests


@pytest.fixture(autouse=True)
def _torch_path_by_default():
    """The ops' CPU torch path (fast); test_triton_backend_matches_reference forces the Triton kernels."""
    with mta_kernels.use_backend("torch"):
        yield


# ------------------------------------------------------------------------------------- test inputs
def random_ranges(
    valid: list[tuple[int, int]], counts: list[int], T: int, gen: torch.Generator
) -> torch.Tensor:
    """int32 [U, 2] flat ranges: ``counts[b]`` sorted, non-overlapping, non-empty units inside the valid
    tokens ``[lo, hi)`` of sequence b (adjacent units and gaps both occur)."""
    rows = []
    for b, ((lo, hi), u) in enumerate(zip(valid, counts)):
        n = hi - lo
        assert u <= n
        # 2u distinct sorted cuts c in [0, n+u) -> unit k = [c_2k − k, c_2k+1 − k): non-empty, sorted, ≤ n.
        cuts = torch.randperm(n + u, generator=gen)[: 2 * u].sort().values.tolist()
        for k in range(u):
            rows.append((b * T + lo + cuts[2 * k] - k, b * T + lo + cuts[2 * k + 1] - k))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)


def make_batch(
    B: int,
    Ts: int,
    Tt: int,
    counts: list[int],
    same_tokenizer: bool,
    gen: torch.Generator,
    left_pad: bool = False,
) -> tuple[UnitBatch, torch.Tensor, torch.Tensor]:
    """A UnitBatch plus the student's and the teacher's attention masks (sequences of varied length)."""

    def valid_spans(T: int) -> list[tuple[int, int]]:
        lengths = [max(counts[b], T - (3 * b) % max(T // 2, 1)) for b in range(B)]
        return [(T - n, T) if left_pad else (0, n) for n in lengths]

    def mask_of(spans: list[tuple[int, int]], T: int) -> torch.Tensor:
        m = torch.zeros(B, T, dtype=torch.long)
        for b, (lo, hi) in enumerate(spans):
            m[b, lo:hi] = 1
        return m

    cu = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    s_spans = valid_spans(Ts)
    sr = random_ranges(s_spans, counts, Ts, gen)
    if same_tokenizer:
        return UnitBatch(sr, sr, cu, Ts, Ts), mask_of(s_spans, Ts), mask_of(s_spans, Ts)
    t_spans = valid_spans(Tt)
    tr = random_ranges(t_spans, counts, Tt, gen)
    return UnitBatch(sr, tr, cu, Ts, Tt), mask_of(s_spans, Ts), mask_of(t_spans, Tt)


def make_states(num_layers: int, B: int, T: int, D: int, gen: torch.Generator, dtype=torch.float32):
    """A fake ``hidden_states`` tuple: num_layers + 1 leaf tensors [B, T, D] that require grad."""
    return tuple(
        torch.randn(B, T, D, generator=gen).to(dtype).requires_grad_(True) for _ in range(num_layers + 1)
    )


def clone_states(states, dtype, device=None):
    """Fresh leaf copies (own .grad) in ``dtype``, on ``device`` (default: where they are)."""
    return tuple(h.detach().to(device=device or h.device, dtype=dtype).requires_grad_(True) for h in states)


def run_and_compare(
    module: MTALoss,
    s_states,
    t_states,
    units,
    s_mask,
    t_mask,
    *,
    check_grads: bool = True,
    floor: float = 1e-5,
    teacher_confidence: torch.Tensor | None = None,
) -> None:
    """Module vs ``reference.mta_loss`` in float64 under the tolerance rule (eager = ``reference.mta_loss``
    in the input dtype; docs/method.md#numerical-tolerance-rule): values, per-pair terms, and the
    gradients w.r.t. the student's layers and the projectors."""
    dtype = s_states[0].dtype
    kw = dict(pooling=module.pooling, weighted=module.weighted, hra=module.hra_level, gamma=module.gamma)

    out = module(s_states, t_states, units, s_mask, t_mask, teacher_confidence=teacher_confidence)
    results = {"fused": (out.loss, out.dsa, out.hra, s_states, getattr(module, "projectors", None))}
    for name, d in (("eager", dtype), ("oracle", torch.float64)):
        states = clone_states(s_states, d)
        teacher = tuple(h.detach().to(d) for h in t_states)
        proj = (
            copy.deepcopy(module.projectors).to(torch.float64 if d == torch.float64 else torch.float32)
            if (module.hra_level is not None)
            else None
        )
        conf = None if teacher_confidence is None else teacher_confidence.to(d)
        loss, dsa, hra = ref.mta_loss(
            states,
            teacher,
            units,
            s_mask,
            t_mask,
            pairs=module.pairs,
            projectors=proj,
            teacher_confidence=conf,
            **kw,
        )
        results[name] = (loss, dsa, hra, states, proj)

    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0 and out.loss.requires_grad
    assert out.dsa.shape == (len(module.pairs),) and not out.dsa.requires_grad
    for i, what in ((0, "loss"), (1, "dsa"), (2, "hra")):
        if results["oracle"][i] is None:
            assert results["fused"][i] is None, what
            continue
        assert_within_rule(
            results["fused"][i], results["eager"][i], results["oracle"][i], floor=floor, what=what
        )
    if not check_grads:
        return

    for name in results:
        results[name][0].backward()
    used_student = {ls for ls, _, _ in module.pairs}
    for layer in range(len(s_states)):
        grads = [results[name][3][layer].grad for name in ("fused", "eager", "oracle")]
        if layer not in used_student:
            assert grads[0] is None, f"unused student layer {layer} got a gradient"
            continue
        assert grads[0] is not None and grads[0].abs().sum() > 0, f"no gradient reached student layer {layer}"
        assert_within_rule(*grads, floor=floor, what=f"d loss / d student layer {layer}")
    if module.hra_level is not None:
        for k in range(len(module.pairs)):
            for p in ("weight", "bias"):
                grads = [getattr(results[name][4][k], p).grad for name in ("fused", "eager", "oracle")]
                assert grads[0] is not None and grads[0].abs().sum() > 0, f"no gradient to projector {k}.{p}"
                assert_within_rule(*grads, floor=floor, what=f"d loss / d projector {k}.{p}")


def preset_inputs(
    name: str, same_tokenizer: bool, seed: int, B: int = 4, Ts: int = 13, Tt: int = 19, left_pad=False
):
    """Fake hidden states with the preset's NUMBER of layers (small widths) and two UnitBatches."""
    gen = torch.Generator().manual_seed(seed)
    preset = PRESETS[name]
    if same_tokenizer:
        Tt = Ts
    # Per-sequence unit counts: 0, 1 and several units (never only powers of two).
    words = make_batch(B, Ts, Tt, [3, 0, 5, 1][:B], same_tokenizer, gen, left_pad)
    phrases = make_batch(B, Ts, Tt, [2, 1, 3, 0][:B], same_tokenizer, gen, left_pad)
    assert torch.equal(words[1], phrases[1]) and torch.equal(words[2], phrases[2])
    s_states = make_states(preset.student_num_layers, B, Ts, DS, gen)
    t_states = make_states(preset.teacher_num_layers, B, Tt, DT, gen)
    units = {"word": words[0], "phrase": phrases[0]}
    return s_states, t_states, units, words[1], words[2]


# -------------------------------------------------------------------------------------- value tests
@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("pooling", ["attention", "mean"])
@pytest.mark.parametrize("weighted", [True, False])
def test_presets_match_reference(name, pooling, weighted):
    """Every preset, both poolings, weighted and not; HRA as the preset sets it (token when the preset's
    models share a tokenizer, then student and teacher share the units; unit with different T and ranges)."""
    same = PRESETS[name].same_tokenizer
    module = MTALoss.from_preset(name, student_dim=DS, teacher_dim=DT, pooling=pooling, weighted=weighted)
    assert module.hra_level == ("token" if same else "unit")
    inputs = preset_inputs(name, same, seed=zlib.crc32(f"{name}{pooling}{weighted}".encode()) % 1000)
    run_and_compare(module, *inputs)


@pytest.mark.parametrize("hra", ["token", "unit", None])
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_hra_levels_same_tokenizer(hra, pooling):
    module = MTALoss.from_preset(
        "gpt2-xl->gpt2", student_dim=DS, teacher_dim=DT, hra=hra, pooling=pooling, gamma=0.3
    )
    inputs = preset_inputs("gpt2-xl->gpt2", True, seed=11, left_pad=True)
    run_and_compare(module, *inputs)


@pytest.mark.parametrize("hra", ["unit", None])
@pytest.mark.parametrize("weighted", [True, False])
def test_different_tokenizations(hra, weighted):
    module = MTALoss.from_preset(
        "opt-6.7b->opt-1.3b", student_dim=DS, teacher_dim=DT, hra=hra, weighted=weighted
    )
    inputs = preset_inputs("opt-6.7b->opt-1.3b", False, seed=5, Ts=21, Tt=14)
    run_and_compare(module, *inputs)


def test_auto_mapping_matches_reference():
    module = MTALoss.auto(10, 17, DS, DT, num_pairs=4, n_word=2, pooling="attention", hra="unit")
    assert module.pairs == ((5, 9, "word"), (7, 12, "word"), (8, 14, "phrase"), (10, 17, "phrase"))
    gen = torch.Generator().manual_seed(3)
    words, s_mask, t_mask = make_batch(3, 15, 11, [4, 2, 3], False, gen)
    phrases, _, _ = make_batch(3, 15, 11, [2, 2, 1], False, gen)
    s_states, t_states = make_states(10, 3, 15, DS, gen), make_states(17, 3, 11, DT, gen)
    run_and_compare(module, s_states, t_states, {"word": words, "phrase": phrases}, s_mask, t_mask)


def test_bfloat16_inputs_within_rule():
    """bf16 hidden states (float32 projectors): the tolerance rule against the float64 oracle."""
    module = MTALoss.from_preset("qwen1.5-1.8b->gpt2", student_dim=DS, teacher_dim=DT)
    s_states, t_states, units, s_mask, t_mask = preset_inputs("qwen1.5-1.8b->gpt2", False, seed=8)
    s_states, t_states = clone_states(s_states, torch.bfloat16), clone_states(t_states, torch.bfloat16)
    run_and_compare(module, s_states, t_states, units, s_mask, t_mask, floor=1e-3)


def test_interleaved_granularities_keep_pair_order():
    """Pairs of one granularity are grouped internally; .dsa/.hra still follow the order of `pairs`."""
    pairs = [(4, 6, "phrase"), (2, 3, "word"), (6, 8, "phrase"), (3, 5, "word")]
    module = MTALoss(pairs, DS, DT, hra="unit")
    gen = torch.Generator().manual_seed(4)
    words, s_mask, t_mask = make_batch(2, 12, 10, [4, 3], False, gen)
    phrases, _, _ = make_batch(2, 12, 10, [3, 2], False, gen)
    s_states, t_states = make_states(6, 2, 12, DS, gen), make_states(8, 2, 10, DT, gen)
    run_and_compare(module, s_states, t_states, {"word": words, "phrase": phrases}, s_mask, t_mask)


def test_no_units_gives_zero_loss_and_zero_grad():
    """No sequence has two units (and one granularity has none at all): 0, finite, zero gradients."""
    gen = torch.Generator().manual_seed(2)
    module = MTALoss([(1, 1, "word"), (2, 2, "phrase")], DS, DT, hra="unit")
    words, s_mask, t_mask = make_batch(3, 9, 9, [1, 0, 1], True, gen)
    phrases, _, _ = make_batch(3, 9, 9, [0, 0, 0], True, gen)
    s_states, t_states = make_states(2, 3, 9, DS, gen), make_states(2, 3, 9, DT, gen)
    out = module(s_states, t_states, {"word": words, "phrase": phrases}, s_mask, t_mask)
    assert torch.equal(out.dsa, torch.zeros(2)), out.dsa
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(s_states[1].grad).all() and torch.isfinite(s_states[2].grad).all()
    assert s_states[2].grad.abs().sum() == 0  # no phrase at all: nothing to align


# ---------------------------------------------------------------------------- gradients and structure
def test_gradients_reach_student_and_projectors_not_teacher():
    module = MTALoss.from_preset("gpt2-xl->gpt2", student_dim=DS, teacher_dim=DT, hra="token")
    s_states, t_states, units, s_mask, t_mask = preset_inputs("gpt2-xl->gpt2", True, seed=1)
    out = module(s_states, t_states, units, s_mask, t_mask)
    out.loss.backward()
    assert all(t.grad is None for t in t_states), "a gradient reached the teacher"
    for ls, _, _ in module.pairs:
        assert s_states[ls].grad is not None and s_states[ls].grad.abs().sum() > 0
    for p in module.projectors.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # DSA alone sends no gradient to the teacher either, and no gradient to the (absent) projectors.
    dsa_only = MTALoss.from_preset("gpt2-xl->gpt2", student_dim=DS, teacher_dim=DT, hra=None)
    assert not hasattr(dsa_only, "projectors") and len(list(dsa_only.parameters())) == 0
    out = dsa_only(s_states, t_states, units, s_mask, t_mask)
    assert out.hra is None and torch.allclose(out.loss, out.dsa.mean())
    out.loss.backward()
    assert all(t.grad is None for t in t_states)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_one_op_call_per_side_and_granularity(monkeypatch, backend):
    """Triton path: saliency once per side for all K pairs; pooling and DSA once per side per granularity,
    whatever K is. Torch path: each pair on views of its own layers (nothing stacked), one call each."""
    from mta_kernels import loss_terms

    calls = {"token_saliency": [], "span_pool": [], "pool_with_mass": [], "structural_loss": []}
    for name in ("token_saliency", "span_pool", "structural_loss"):
        real = getattr(loss_terms, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            key = "pool_with_mass" if kwargs.get("with_mass") else _name  # the teacher's pooling
            calls[key].append(tuple(args[0].shape))
            return _real(*args, **kwargs)

        monkeypatch.setattr(loss_terms, name, counted)
    module = MTALoss.from_preset("opt-6.7b->opt-1.3b", student_dim=DS, teacher_dim=DT, hra="unit")
    s_states, t_states, units, s_mask, t_mask = preset_inputs("opt-6.7b->opt-1.3b", False, seed=9)
    device = DEVICE if backend == "triton" else "cpu"  # the Triton path: the GPU, or the interpreter
    s_states, t_states = (tuple(h.to(device) for h in states) for states in (s_states, t_states))
    units = {g: u.to(device) for g, u in units.items()}
    with mta_kernels.use_backend(backend):
        module.to(device)(s_states, t_states, units, s_mask.to(device), t_mask.to(device))
    if backend == "triton":
        # 1 word pair + 4 phrase pairs -> two groups; 2 saliency calls over all 5 layers; per group one
        # pooling per side (student: span_pool, teacher: span_pool with its mass) and one DSA call.
        assert [s[0] for s in calls["token_saliency"]] == [5, 5]
        assert len(calls["span_pool"]) == 2 and len(calls["pool_with_mass"]) == 2
        assert len(calls["structural_loss"]) == 2
        assert {s[0] for s in calls["span_pool"]} == {1, 4}  # the stacked layer count
    else:
        assert [s[0] for s in calls["token_saliency"]] == [1] * 10
        assert len(calls["span_pool"]) == len(calls["pool_with_mass"]) == len(calls["structural_loss"]) == 5


def test_dsa_and_hra_modules_match_mta_terms():
    """DSALoss / HRALoss on one pair ([B, T, D]) and on stacked pairs ([L, B, T, D]) give MTALoss's terms."""
    module = MTALoss.from_preset("qwen1.5-1.8b->qwen1.5-0.5b", student_dim=DS, teacher_dim=DT, hra="token")
    s_states, t_states, units, s_mask, t_mask = preset_inputs("qwen1.5-1.8b->qwen1.5-0.5b", True, seed=6)
    out = module(s_states, t_states, units, s_mask, t_mask)

    dsa = DSALoss(pooling=module.pooling, weighted=module.weighted)
    hra = HRALoss(DS, DT, level="token", num_pairs=1)
    ls, lt, g = module.pairs[0]
    hra.projectors[0].load_state_dict(module.projectors[0].state_dict())
    one_dsa = dsa(s_states[ls], t_states[lt], units[g], s_mask, t_mask)
    one_hra = hra(s_states[ls], t_states[lt], units[g], s_mask, t_mask)
    assert one_dsa.dim() == 0 and one_hra.dim() == 0
    torch.testing.assert_close(one_dsa.detach(), out.dsa[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one_hra.detach(), out.hra[0], rtol=1e-5, atol=1e-6)

    phrase_pairs = module.pairs[1:]
    student = torch.stack([s_states[p[0]] for p in phrase_pairs])
    teacher = torch.stack([t_states[p[1]] for p in phrase_pairs])
    stacked_hra = HRALoss(DS, DT, level="token", num_pairs=len(phrase_pairs))
    for k in range(len(phrase_pairs)):
        stacked_hra.projectors[k].load_state_dict(module.projectors[k + 1].state_dict())
    many_dsa = dsa(student, teacher, units["phrase"], s_mask, t_mask)
    many_hra = stacked_hra(student, teacher, units["phrase"], s_mask, t_mask)
    assert many_dsa.shape == (len(phrase_pairs),)
    torch.testing.assert_close(many_dsa.detach(), out.dsa[1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many_hra.detach(), out.hra[1:], rtol=1e-5, atol=1e-6)
    (many_dsa.sum() + many_hra.sum()).backward()
    assert s_states[phrase_pairs[0][0]].grad.abs().sum() > 0

    unit_hra = HRALoss(DS, DT, level="unit", pooling="mean", weighted=False)
    value = unit_hra(s_states[ls], t_states[lt], units[g], s_mask, t_mask)
    assert value.dim() == 0 and torch.isfinite(value)


# --------------------------------------------------------------------------------- presets, mapping
def test_preset_table():
    table = {
        "gpt2-xl->gpt2": ([6, 9, 12], [24, 36, 48], 768, 1600),
        "opt-6.7b->opt-1.3b": ([16, 18, 20, 22, 24], [20, 23, 26, 29, 32], 2048, 4096),
        "qwen1.5-1.8b->qwen1.5-0.5b": ([14, 16, 18, 20, 22, 24], [14, 16, 18, 20, 22, 24], 1024, 2048),
        "qwen1.5-1.8b->gpt2": ([2, 4, 6, 8], [6, 12, 18, 24], 768, 2048),
        "mistral-7b->tinyllama": ([6, 10, 14, 18, 22], [8, 14, 20, 26, 32], 2048, 4096),
    }
    assert set(table) == set(PRESETS)
    for name, (student, teacher, ds, dt) in table.items():
        module = MTALoss.from_preset(name)
        assert [p[0] for p in module.pairs] == student and [p[1] for p in module.pairs] == teacher
        assert [p[2] for p in module.pairs] == ["word"] + ["phrase"] * (len(student) - 1)
        assert (module.student_dim, module.teacher_dim) == (ds, dt)
        assert len(module.projectors) == len(student)
        assert all(
            p.in_features == ds and p.out_features == dt and p.bias is not None for p in module.projectors
        )
    assert MTALoss.from_preset("qwen1.5-1.8b->gpt2").hra_level == "unit"
    module = MTALoss.from_preset("gpt2-xl->gpt2", gamma=0.5, pooling="mean", weighted=False, hra=None)
    assert (module.gamma, module.pooling, module.weighted, module.hra_level) == (0.5, "mean", False, None)


def test_auto_reproduces_gpt2_preset():
    assert auto_pairs(12, 48) == PRESETS["gpt2-xl->gpt2"].pairs
    module = MTALoss.auto(12, 48, 768, 1600)
    assert list(module.pairs) == PRESETS["gpt2-xl->gpt2"].pairs
    assert auto_pairs(22, 32, num_pairs=5) == [
        (11, 16, "word"),
        (14, 20, "phrase"),
        (17, 25, "phrase"),
        (19, 28, "phrase"),
        (22, 32, "phrase"),
    ]
    assert auto_pairs(24, 24, num_pairs=1) == [(24, 24, "word")]
    assert auto_pairs(12, 24, num_pairs=4, n_word=0, start_fraction=0.25) == [
        (3, 6, "phrase"),
        (6, 12, "phrase"),
        (9, 18, "phrase"),
        (12, 24, "phrase"),
    ]


# ------------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def small():
    gen = torch.Generator().manual_seed(0)
    module = MTALoss([(1, 2, "word"), (2, 3, "phrase")], DS, DT, hra="unit")
    words, s_mask, t_mask = make_batch(3, 10, 12, [2, 3, 1], False, gen)
    phrases, _, _ = make_batch(3, 10, 12, [1, 2, 2], False, gen)
    s_states, t_states = make_states(2, 3, 10, DS, gen), make_states(3, 3, 12, DT, gen)
    return module, s_states, t_states, {"word": words, "phrase": phrases}, s_mask, t_mask


def test_bad_layer_index(small):
    module, s, t, units, ms, mt = small
    with pytest.raises(
        ValueError, match=r"pair 1 \(student layer 2, teacher layer 3, 'phrase'\).*student layer 2"
    ):
        module(s[:2], t, units, ms, mt)
    with pytest.raises(ValueError, match=r"pair 1 .*teacher layer 3 is outside .*4|pair 1 .*teacher layer 3"):
        module(s, t[:3], units, ms, mt)


def test_missing_granularity(small):
    module, s, t, units, ms, mt = small
    with pytest.raises(ValueError, match=r"pair 1 .*units\['phrase'\]"):
        module(s, t, {"word": units["word"]}, ms, mt)


def test_batch_size_mismatch(small):
    module, s, t, units, ms, mt = small
    with pytest.raises(ValueError, match=r"pair 0 .*batch size 3 != teacher batch size 2"):
        module(s, tuple(h[:2] for h in t), units, ms, mt[:2])


def test_hidden_dim_mismatch(small):
    module, s, t, units, ms, mt = small
    with pytest.raises(
        ValueError, match=rf"pair 0 .*student hidden size {DS - 1} != declared student_dim {DS}"
    ):
        module(tuple(h[..., :-1] for h in s), t, units, ms, mt)
    with pytest.raises(
        ValueError, match=rf"pair 0 .*teacher hidden size {DT + 1} != declared teacher_dim {DT}"
    ):
        module(s, tuple(torch.cat([h, h[..., :1]], -1) for h in t), units, ms, mt)
    hra = HRALoss(DS + 1, DT)
    with pytest.raises(ValueError, match="student hidden size"):
        hra(s[1], t[2], units["word"], ms, mt)


def test_token_hra_needs_shared_tokenizer(small):
    _, s, t, units, ms, mt = small
    module = MTALoss([(1, 2, "word")], DS, DT, hra="token")
    with pytest.raises(ValueError, match=r"pair 0 .*share one tokenizer.*hra='unit'"):
        module(s, t, units, ms, mt)
    # Same T but different ranges is also refused.
    gen = torch.Generator().manual_seed(1)
    ub, m1, m2 = make_batch(3, 10, 10, [2, 3, 1], False, gen)
    while torch.equal(ub.student_ranges, ub.teacher_ranges):
        ub, m1, m2 = make_batch(3, 10, 10, [2, 3, 1], False, gen)
    t10 = tuple(h[:, :10] for h in t)
    with pytest.raises(ValueError, match="different ranges"):
        module(s, t10, {"word": ub}, m1, m2)
    with pytest.raises(ValueError, match="share one tokenizer"):
        HRALoss(DS, DT, level="token")(s[1], t10[2], ub, m1, m2)


def test_bad_units_metadata(small):
    module, s, t, units, ms, mt = small
    w = units["word"]
    cases = [
        (UnitBatch(w.student_ranges.long(), w.teacher_ranges, w.cu_units, 10, 12), TypeError, "int32"),
        (UnitBatch(w.student_ranges, w.teacher_ranges[:-1], w.cu_units, 10, 12), ValueError, "teacher units"),
        (UnitBatch(w.student_ranges, w.teacher_ranges, w.cu_units[:-1], 10, 12), ValueError, "B=3"),
        (UnitBatch(w.student_ranges, w.teacher_ranges, w.cu_units, 11, 12), ValueError, "seq_len_student=11"),
        (UnitBatch(w.student_ranges, w.teacher_ranges, w.cu_units, 10, 13), ValueError, "seq_len_teacher=13"),
    ]
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=rf"pair 0 .*{msg}"):
            module(s, t, {**units, "word": bad}, ms, mt)
    with pytest.raises(TypeError, match="UnitBatch"):
        module(s, t, {**units, "word": (w.student_ranges, w.cu_units)}, ms, mt)


def test_bad_masks_and_states(small):
    module, s, t, units, ms, mt = small
    with pytest.raises(ValueError, match="student_mask must have shape"):
        module(s, t, units, ms[:, :-1], mt)
    with pytest.raises(ValueError, match="teacher_mask must have shape"):
        module(s, t, units, ms, ms)
    with pytest.raises(TypeError, match="teacher_mask must be bool or 0/1"):
        module(s, t, units, ms, mt.float())
    with pytest.raises(TypeError, match="student_hidden_states must be the tuple"):
        module(torch.stack(s), t, units, ms, mt)
    with pytest.raises(TypeError, match="floating-point"):
        module(tuple(h.detach().long() for h in s), t, units, ms, mt)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="known presets: gpt2-xl->gpt2, opt-6.7b->opt-1.3b"):
        MTALoss.from_preset("llama-70b->gpt2")
    with pytest.raises(ValueError, match="pooling must be one of"):
        MTALoss([(1, 1, "word")], DS, DT, pooling="max")
    with pytest.raises(ValueError, match="hra must be one of"):
        MTALoss([(1, 1, "word")], DS, DT, hra="layer")
    with pytest.raises(ValueError, match="pooling must be one of"):
        DSALoss(pooling="sum")
    with pytest.raises(ValueError, match="level must be"):
        HRALoss(DS, DT, level=None)
    with pytest.raises(ValueError, match=r"pair 1 .*granularity"):
        MTALoss([(1, 1, "word"), (2, 2, "sentence")], DS, DT)
    with pytest.raises(ValueError, match=r"pair 0 .*student_layer >= 0"):
        MTALoss([(-1, 1, "word")], DS, DT)
    with pytest.raises(ValueError, match="at least one"):
        MTALoss([], DS, DT)
    with pytest.raises(ValueError, match="student_dim"):
        MTALoss([(1, 1, "word")], 0, DT)
    with pytest.raises(ValueError, match="repeats a layer"):
        auto_pairs(4, 8, num_pairs=5)
    with pytest.raises(ValueError, match="n_word"):
        MTALoss.auto(12, 48, DS, DT, num_pairs=3, n_word=4)


def test_stacked_module_shape_errors(small):
    _, s, t, units, ms, mt = small
    with pytest.raises(ValueError, match="both be"):
        DSALoss()(torch.stack(s[:2]), t[1], units["word"], ms, mt)
    with pytest.raises(ValueError, match="2 stacked layer pairs but 1 projectors"):
        HRALoss(DS, DT, level="unit")(torch.stack(s[:2]), torch.stack(t[:2]), units["word"], ms, mt)
    with pytest.raises(ValueError, match="3 student layers but 2 teacher layers"):
        DSALoss()(torch.stack(s), torch.stack(t[:2]), units["word"], ms, mt)


# ------------------------------------------------------------------------------- Triton interpreter
@pytest.mark.parametrize("hra", ["unit", "token"])
def test_triton_backend_matches_reference(hra):
    """The module with the ops forced onto their Triton kernels: on the GPU where there is one, else the
    interpreter on the CPU (tiny shapes)."""
    same = hra == "token"
    module = MTALoss([(1, 1, "word"), (2, 3, "phrase")], DS, DT, hra=hra).to(DEVICE)
    gen = torch.Generator().manual_seed(12)
    words, s_mask, t_mask = make_batch(2, 7, 9, [3, 2], same, gen)
    phrases, _, _ = make_batch(2, 7, 9, [2, 1], same, gen)
    s_states, t_states = make_states(2, 2, 7, DS, gen), make_states(3, 2, 7 if same else 9, DT, gen)
    s_states, t_states = (
        clone_states(s_states, torch.float32, DEVICE),
        clone_states(t_states, torch.float32, DEVICE),
    )
    units = {"word": words.to(DEVICE), "phrase": phrases.to(DEVICE)}
    if same:  # .to() copies each field: keep the one shared tensor of a shared tokenizer
        units = {g: UnitBatch(u.student_ranges, u.student_ranges, u.cu_units, 7, 7) for g, u in units.items()}
    with mta_kernels.use_backend("triton"):
        run_and_compare(module, s_states, t_states, units, s_mask.to(DEVICE), t_mask.to(DEVICE))


def test_bad_range_values_name_the_pairs(small):
    """Range values: validated against cu_units and T up front (check_units=True, the default); with
    check_units=False the ops' own bound/order checks still raise, and the error names the pairs."""
    module, s, t, units, ms, mt = small
    w = units["word"]
    overlapping = w.student_ranges.clone()
    overlapping[1, 0] = overlapping[0, 0]  # units 0 and 1 belong to sequence 0: now they overlap
    bad = UnitBatch(overlapping, w.teacher_ranges, w.cu_units, 10, 12)
    with pytest.raises(
        ValueError, match=r"pair 0 \(student layer 1, teacher layer 2, 'word'\): student units"
    ):
        module(s, t, {**units, "word": bad}, ms, mt)
    unchecked = MTALoss(module.pairs, DS, DT, check_units=False)
    with pytest.raises(ValueError, match=r"pair 0 \(1, 2, 'word'\) \('word' units\)"):
        unchecked(s, t, {**units, "word": bad}, ms, mt)
    outside = w.teacher_ranges.clone()
    outside[-1, 1] = 3 * 12 + 1  # past the teacher's B*T tokens
    bad = UnitBatch(w.student_ranges, outside, w.cu_units, 10, 12)
    with pytest.raises(ValueError, match=r"pair 0 .*teacher units"):
        module(s, t, {**units, "word": bad}, ms, mt)
    with pytest.raises(ValueError, match=r"pair 0 .*'word' units"):
        unchecked(s, t, {**units, "word": bad}, ms, mt)
    # A unit crossing from sequence 0 into sequence 1: only the up-front check can see it.
    crossing = w.student_ranges.clone()
    last_of_seq0 = int(w.cu_units[1]) - 1
    crossing[last_of_seq0, 1] = 10 + 1
    bad = UnitBatch(crossing, w.teacher_ranges, w.cu_units, 10, 12)
    with pytest.raises(ValueError, match=r"pair 0 .*student units.*sequence"):
        module(s, t, {**units, "word": bad}, ms, mt)
    with pytest.raises(ValueError, match=r"DSALoss: student units"):
        DSALoss()(s[1], t[2], bad, ms, mt)


# ------------------------------------------------------------------------ teacher-confidence weights
def confidence_of(B: int, Tt: int, seed: int, device=None) -> torch.Tensor:
    """``teacher_confidence`` of random logits (V = 11) at varied sharpness: values spread over [0, 1],
    with one exactly uniform (confidence 0) and one near one-hot position per sequence."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(B, Tt, 1, generator=gen) * 8
    logits = torch.randn(B, Tt, 11, generator=gen) * scale
    logits[:, 0] = 0.0  # all-equal logits: H = log V
    logits[:, -1, 3] = 60.0  # near one-hot
    return teacher_confidence(logits).to(device or "cpu")


@pytest.mark.parametrize("hra", ["token", "unit", None])
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_teacher_confidence_matches_reference(hra, pooling):
    """``teacher_confidence`` (the published --entropy_weight) against ``reference.mta_loss`` with the same
    option in float64: values, per-pair terms and gradients; shared tokenizer, left padding."""
    module = MTALoss.from_preset("gpt2-xl->gpt2", student_dim=DS, teacher_dim=DT, hra=hra, pooling=pooling)
    s_states, t_states, units, s_mask, t_mask = preset_inputs("gpt2-xl->gpt2", True, seed=21, left_pad=True)
    conf = confidence_of(*t_mask.shape, seed=4)
    run_and_compare(module, s_states, t_states, units, s_mask, t_mask, teacher_confidence=conf)
    # the option changes the loss (the weights are not the saliency's)
    plain = module(s_states, t_states, units, s_mask, t_mask).loss
    weighted = module(s_states, t_states, units, s_mask, t_mask, teacher_confidence=conf).loss
    assert not torch.allclose(plain, weighted, rtol=1e-4, atol=0)


def test_teacher_confidence_different_tokenizations():
    module = MTALoss.from_preset("opt-6.7b->opt-1.3b", student_dim=DS, teacher_dim=DT, hra="unit")
    s_states, t_states, units, s_mask, t_mask = preset_inputs(
        "opt-6.7b->opt-1.3b", False, seed=8, Ts=21, Tt=14
    )
    run_and_compare(
        module, s_states, t_states, units, s_mask, t_mask, teacher_confidence=confidence_of(4, 14, seed=9)
    )


def test_teacher_confidence_is_the_published_weighting():
    """Hand-written published rule on one sequence: ĉ_i = c_i / Σ_{covered} c_k, W_u = Σ_{i in u} ĉ_i; with
    the student equal to the teacher's geometry except one unit, the DSA term is the W-weighted mean of the
    squared cosine differences, so doubling the confidence of one unit's tokens moves the loss."""
    gen = torch.Generator().manual_seed(2)
    T, D = 9, 6
    ranges = torch.tensor([[0, 2], [3, 4], [5, 8]], dtype=torch.int32)
    units = UnitBatch(ranges, ranges, torch.tensor([0, 3], dtype=torch.int32), T, T)
    hs, ht = (
        torch.randn(1, T, D, generator=gen, dtype=torch.float64),
        torch.randn(1, T, D, generator=gen, dtype=torch.float64),
    )
    conf = torch.rand(1, T, generator=gen, dtype=torch.float64)
    dsa = DSALoss(pooling="mean")
    got = dsa(hs, ht, units, None, None, teacher_confidence=conf)
    covered = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0], dtype=torch.float64)
    c_hat = conf[0] * covered / (conf[0] * covered).sum()
    W = torch.stack([c_hat[a:b].sum() for a, b in ranges.tolist()])
    su = torch.stack([hs[0, a:b].mean(0) for a, b in ranges.tolist()])
    tu = torch.stack([ht[0, a:b].mean(0) for a, b in ranges.tolist()])
    cs = torch.nn.functional.normalize(su, dim=-1) @ torch.nn.functional.normalize(su, dim=-1).T
    ct = torch.nn.functional.normalize(tu, dim=-1) @ torch.nn.functional.normalize(tu, dim=-1).T
    off = ~torch.eye(3, dtype=torch.bool)
    ww = (W[:, None] * W[None, :])[off]
    want = (ww * (cs - ct)[off] ** 2).sum() / ww.sum()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # token HRA: the weights are ĉ on the covered tokens
    hra = HRALoss(D, D, level="token").double()
    got = hra(hs, ht, units, None, None, teacher_confidence=conf)
    proj = hra.projectors[0](hs[0])
    cos = torch.nn.functional.cosine_similarity(proj, ht[0], dim=-1)
    want = (c_hat * (1 - cos)).sum() / c_hat.sum()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_teacher_confidence_zero_everywhere_is_finite():
    """All-equal teacher logits give confidence 0 on every token: every weight is 0, the terms are 0
    (never 0/0) and the gradients finite."""
    module = MTALoss.from_preset("gpt2-xl->gpt2", student_dim=DS, teacher_dim=DT, hra="token")
    s_states, t_states, units, s_mask, t_mask = preset_inputs("gpt2-xl->gpt2", True, seed=3)
    conf = teacher_confidence(torch.zeros(*t_mask.shape, 7))
    assert float(conf.abs().max()) == 0.0
    out = module(s_states, t_states, units, s_mask, t_mask, teacher_confidence=conf)
    assert torch.isfinite(out.loss) and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(torch.isfinite(h.grad).all() for h in s_states if h.grad is not None)


def test_teacher_confidence_bad_inputs(small):
    module, s, t, units, ms, mt = small
    B, Tt = mt.shape
    with pytest.raises(ValueError, match=r"teacher_confidence must have shape \[B, Tt\]"):
        module(s, t, units, ms, mt, teacher_confidence=torch.ones(B, Tt + 1))
    with pytest.raises(TypeError, match="floating-point"):
        module(s, t, units, ms, mt, teacher_confidence=torch.ones(B, Tt, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        module(s, t, units, ms, mt, teacher_confidence=[[1.0] * Tt] * B)
    for bad in (-0.5, float("nan"), float("inf")):
        conf = torch.ones(B, Tt)
        conf[0, 1] = bad
        with pytest.raises(ValueError, match="finite and >= 0"):
            module(s, t, units, ms, mt, teacher_confidence=conf)
    unweighted = MTALoss(module.pairs, DS, DT, weighted=False)
    with pytest.raises(ValueError, match="weighted=False"):
        unweighted(s, t, units, ms, mt, teacher_confidence=torch.ones(B, Tt))
    with pytest.raises(ValueError, match="weighted=False"):
        DSALoss(weighted=False)(s[1], t[2], units["word"], ms, mt, teacher_confidence=torch.ones(B, Tt))
    with pytest.raises(ValueError, match="needs weighted=True"):
        ref.mta_loss(
            s,
            t,
            units,
            ms,
            mt,
            pairs=module.pairs,
            hra=None,
            weighted=False,
            teacher_confidence=torch.ones(B, Tt),
        )


def test_dsa_and_hra_modules_take_teacher_confidence():
    """DSALoss / HRALoss with the confidence give MTALoss's terms with it (one pair and stacked pairs)."""
    module = MTALoss.from_preset("qwen1.5-1.8b->qwen1.5-0.5b", student_dim=DS, teacher_dim=DT, hra="token")
    s_states, t_states, units, s_mask, t_mask = preset_inputs("qwen1.5-1.8b->qwen1.5-0.5b", True, seed=6)
    conf = confidence_of(*t_mask.shape, seed=1)
    out = module(s_states, t_states, units, s_mask, t_mask, teacher_confidence=conf)
    dsa = DSALoss(pooling=module.pooling)
    phrase_pairs = module.pairs[1:]
    student = torch.stack([s_states[p[0]] for p in phrase_pairs])
    teacher = torch.stack([t_states[p[1]] for p in phrase_pairs])
    stacked_hra = HRALoss(DS, DT, level="token", num_pairs=len(phrase_pairs))
    for k in range(len(phrase_pairs)):
        stacked_hra.projectors[k].load_state_dict(module.projectors[k + 1].state_dict())
    many_dsa = dsa(student, teacher, units["phrase"], s_mask, t_mask, teacher_confidence=conf)
    many_hra = stacked_hra(student, teacher, units["phrase"], s_mask, t_mask, teacher_confidence=conf)
    torch.testing.assert_close(many_dsa.detach(), out.dsa[1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many_hra.detach(), out.hra[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hra", ["unit", "token"])
def test_teacher_confidence_triton_backend_matches_reference(hra):
    """The confidence on the Triton path (GPU where there is one, else the interpreter)."""
    same = hra == "token"
    module = MTALoss([(1, 1, "word"), (2, 3, "phrase")], DS, DT, hra=hra).to(DEVICE)
    gen = torch.Generator().manual_seed(13)
    words, s_mask, t_mask = make_batch(2, 7, 9, [3, 2], same, gen)
    phrases, _, _ = make_batch(2, 7, 9, [2, 1], same, gen)
    Tt = 7 if same else 9
    s_states, t_states = make_states(2, 2, 7, DS, gen), make_states(3, 2, Tt, DT, gen)
    s_states, t_states = (
        clone_states(s_states, torch.float32, DEVICE),
        clone_states(t_states, torch.float32, DEVICE),
    )
    units = {"word": words.to(DEVICE), "phrase": phrases.to(DEVICE)}
    if same:
        units = {g: UnitBatch(u.student_ranges, u.student_ranges, u.cu_units, 7, 7) for g, u in units.items()}
    conf = confidence_of(2, Tt, seed=5, device=DEVICE)
    with mta_kernels.use_backend("triton"):
        run_and_compare(
            module, s_states, t_states, units, s_mask.to(DEVICE), t_mask.to(DEVICE), teacher_confidence=conf
        )


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="counts under TRITON_INTERPRET=1"
)
@pytest.mark.parametrize("hra", ["token", "unit"])
def test_teacher_confidence_has_no_host_sync(hra):
    """The confidence adds no host sync on the Triton path (counted as in tests/test_host_syncs.py)."""
    from test_host_syncs import B as HB
    from test_host_syncs import Counter as SyncCounter
    from test_host_syncs import T as HT
    from test_host_syncs import _loss_module, gpt2_inputs

    s, t, units, mask = gpt2_inputs()
    conf, module = confidence_of(HB, HT, seed=0), _loss_module(hra)
    with mta_kernels.use_backend("triton"), SyncCounter() as c:
        module(s, t, units, mask, mask, teacher_confidence=conf).loss.backward()
    assert c.syncs == 0, c.report()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_teacher_confidence_compiles_with_fullgraph(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1")
    from test_host_syncs import B as HB
    from test_host_syncs import T as HT
    from test_host_syncs import _loss_module, gpt2_inputs

    s, t, units, mask = gpt2_inputs()
    conf = confidence_of(HB, HT, seed=0)
    module = _loss_module("token")

    def loss(s, t, units, conf):
        return module(s, t, units, mask, mask, teacher_confidence=conf).loss

    with mta_kernels.use_backend(backend):
        got = torch.compile(loss, fullgraph=True, backend="aot_eager")(s, t, units, conf)
        got_grads = torch.autograd.grad(got, [s[6], s[12]])
        want = loss(s, t, units, conf)
        want_grads = torch.autograd.grad(want, [s[6], s[12]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
