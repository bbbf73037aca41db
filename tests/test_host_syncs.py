"""Host synchronisations and launches of the whole loss, counted on the Triton path (the path a GPU runs).

Under ``TRITON_INTERPRET=1`` every tensor lives on the CPU, so a device sync cannot be observed directly.
:class:`Counter` counts what WOULD be one on a GPU:

- calls that bring device data to the host: ``Tensor.tolist/.item/.numpy/.cpu/__bool__/__int__/
  __float__/__index__``, and ``torch.tensor``/``torch.as_tensor`` of host data (a blocking
  host-to-device copy);
- aten ops whose output size or value is data-dependent (``nonzero``, ``masked_select``, ``unique``,
  ``equal``, ``_local_scalar_dense``, indexing with a boolean mask), and the extension ops that copy to
  the host on CUDA (``validate_layout``, ``block_diagonal_work_list``, ``unit_to_seq`` without a count);

and launches: non-view aten ops that compute something (allocations, views and metadata excluded), one
per extension op, one per Triton kernel launch. Inside a Python custom op of the package the counter
runs the op's implementation with itself on, so the ops' own glue is counted too; the Triton
interpreter's own host copies are not.

The counters are shown to catch a planted sync and planted launches (tests that the counter can fail).
On a GPU the loss also runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter as _Tally
from collections.abc import Iterator

import pytest
import torch
from helpers import _python_custom_op_impl
from torch.utils._python_dispatch import TorchDispatchMode

import mta_kernels
from mta_kernels.layout import UnitBatch
from mta_kernels.losses import DSALoss, HRALoss, MTALoss

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The counts are taken on the Triton path run by the interpreter on CPU tensors; on a GPU machine the
# CUDA tests below run the loss under the sync debug mode and in a CUDA graph instead.
needs_triton_path = pytest.mark.skipif(not INTERPRETING, reason="counts under TRITON_INTERPRET=1")

# aten ops whose result needs device data on the host (size or value known only after the data is read)
_SYNC_OPS = {
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::equal",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
}
# extension ops that copy to the host on CUDA
_SYNC_EXTENSION_OPS = {"mta_kernels::validate_layout", "mta_kernels::block_diagonal_work_list"}
# ops that allocate or describe a tensor without running a kernel
_FREE_OPS = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::detach",
    "aten::alias",
    "aten::lift_fresh",
    "aten::lift_fresh_copy",
    "aten::_has_compatible_shallow_copy_type",
    "aten::is_same_size",
    "aten::sym_size",
    "aten::sym_stride",
    "aten::sym_numel",
    "aten::sym_storage_offset",
    "aten::set_",
}
_HOST_METHODS = ("tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


class Counter(TorchDispatchMode):
    """``with Counter() as c: ...`` then ``c.syncs`` / ``c.launches`` (``c.sync_sites`` says where)."""

    def __init__(self) -> None:
        super().__init__()
        self.sync_sites: _Tally[str] = _Tally()
        self.launch_sites: _Tally[str] = _Tally()
        self._in_interpreter = 0
        self._depth = 0

    @property
    def syncs(self) -> int:
        return sum(self.sync_sites.values())

    @property
    def launches(self) -> int:
        return sum(self.launch_sites.values())

    def _sync(self, what: str) -> None:
        if not self._in_interpreter:
            self.sync_sites[what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if self._in_interpreter:
            return func(*args, **kwargs)
        if name in _SYNC_OPS or name in _SYNC_EXTENSION_OPS:
            self._sync(name)
        if name in ("aten::index", "aten::index_put_", "aten::index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        ):
            self._sync(f"{name} with a boolean mask")
        impl = _python_custom_op_impl(func, args)
        if impl is not None:
            with self:
                return impl(*args, **kwargs)
        if name.startswith("mta_kernels::") or not (func.is_view or name in _FREE_OPS):
            self.launch_sites[name] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        saved = {m: getattr(torch.Tensor, m) for m in _HOST_METHODS}
        saved_tensor, saved_as_tensor = torch.tensor, torch.as_tensor
        counter = self

        def wrap(method):
            real = saved[method]

            def counted(t, *a, **k):
                counter._sync(f"Tensor.{method}")
                return real(t, *a, **k)

            return counted

        def host_data(real, what):
            def counted(data, *a, **k):
                if not isinstance(data, torch.Tensor):
                    counter._sync(what)
                return real(data, *a, **k)

            return counted

        from triton.runtime.interpreter import InterpretedFunction

        real_run = InterpretedFunction.run

        def run(fn, *a, **k):
            if not k.get("warmup"):
                counter.launch_sites[f"triton:{fn.fn.__name__}"] += 1
            counter._in_interpreter += 1
            try:
                return real_run(fn, *a, **k)
            finally:
                counter._in_interpreter -= 1

        try:
            for m in _HOST_METHODS:
                setattr(torch.Tensor, m, wrap(m))
            torch.tensor = host_data(saved_tensor, "torch.tensor(host data)")
            torch.as_tensor = host_data(saved_as_tensor, "torch.as_tensor(host data)")
            InterpretedFunction.run = run
            yield
        finally:
            for m, f in saved.items():
                setattr(torch.Tensor, m, f)
            torch.tensor, torch.as_tensor = saved_tensor, saved_as_tensor
            InterpretedFunction.run = real_run

    def __enter__(self):
        # Re-entered (``with self:``) around a custom op's implementation: patch only at the outermost
        # level, so that the inner exit does not undo the patches while the outer counting goes on.
        if self._depth == 0:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(self._patched())
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._stack.close()

    def report(self) -> str:
        return (
            f"{self.syncs} syncs {dict(self.sync_sites)}; {self.launches} launches {dict(self.launch_sites)}"
        )


# --------------------------------------------------------------------------------------------- inputs
DS, DT = 16, 24
B, T = 2, 8


def _ranges(counts: list[int], T: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    rows = []
    for b, u in enumerate(counts):
        cuts = (torch.randperm(T - 1, generator=gen)[: 2 * u] + 1).sort().values.tolist()
        rows += [(b * T + cuts[2 * k], b * T + cuts[2 * k + 1]) for k in range(u)]
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2), cu


def gpt2_inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    """The gpt2-xl -> gpt2 setting (3 pairs: 1 word, 2 phrase; shared tokenizer) at tiny widths."""
    gen = torch.Generator().manual_seed(seed)
    units = {}
    for g, counts in (("word", [3, 2]), ("phrase", [2, 1])):
        r, cu = _ranges(counts, T, gen)
        units[g] = UnitBatch(r, r, cu, T, T)
    s = tuple(torch.randn(B, T, DS, generator=gen).to(dtype).requires_grad_() for _ in range(13))
    t = tuple(torch.randn(B, T, DT, generator=gen).to(dtype) for _ in range(49))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0
    return s, t, units, mask


def _loss_module(hra: str | None) -> MTALoss:
    torch.manual_seed(0)
    return MTALoss.from_preset("gpt2-xl->gpt2", student_dim=DS, teacher_dim=DT, hra=hra)


def count_fwd_bwd(module, s, t, units, mask) -> Counter:
    with mta_kernels.use_backend("triton"), Counter() as c:
        out = module(s, t, units, mask, mask)
        out.loss.backward()
    return c


# ---------------------------------------------------------------------------------------------- tests
@needs_triton_path
def test_counter_catches_a_planted_sync_and_launches():
    x = torch.randn(8)
    with Counter() as c:
        y = (x * 2).sum()
    assert c.syncs == 0 and c.launches == 2, c.report()
    for planted in (
        lambda: y.item(),
        lambda: x.tolist(),
        lambda: x[x > 0],
        lambda: bool(y > 0),
        lambda: torch.nonzero(x),
        lambda: torch.tensor([1, 2]),
        lambda: torch.equal(x, x),
    ):
        with Counter() as c:
            planted()
        assert c.syncs >= 1, c.report()


@needs_triton_path
def test_counter_counts_a_launch_after_a_custom_op():
    """The counter is re-entered around a custom op's implementation: a Triton launch after the op (here
    the weight normalisation, outside any op) still counts as one launch, not as the interpreter's
    tensor copies."""
    from mta_kernels.ops.glue import normalised_weights

    h = torch.randn(1, 2, 8, 4)
    mask = torch.ones(2, 8, dtype=torch.long)
    with mta_kernels.use_backend("triton"), Counter() as c:
        sal = mta_kernels.token_saliency(h, mask)  # a Python custom op
        normalised_weights(sal, torch.arange(16, dtype=torch.int32))
    assert c.launch_sites["triton:_normalised_weights_kernel"] == 1, c.report()
    assert "aten::copy_" not in c.launch_sites, c.report()


@needs_triton_path
@pytest.mark.parametrize("hra", ["token", "unit", None])
def test_mta_loss_has_no_host_sync(hra):
    s, t, units, mask = gpt2_inputs()
    module = _loss_module(hra)
    c = count_fwd_bwd(module, s, t, units, mask)
    assert c.syncs == 0, c.report()


@needs_triton_path
def test_moved_unit_batch_keeps_shared_ranges_and_has_no_sync():
    s, t, units, mask = gpt2_inputs()
    moved = {g: u.to("cpu") for g, u in units.items()}
    assert all(u.teacher_ranges is u.student_ranges for u in moved.values())
    c = count_fwd_bwd(_loss_module("token"), s, t, moved, mask)
    assert c.syncs == 0, c.report()


@needs_triton_path
@pytest.mark.parametrize("level", ["token", "unit"])
def test_dsa_and_hra_modules_have_no_host_sync(level):
    s, t, units, mask = gpt2_inputs()
    student, teacher = torch.stack([s[6], s[9]]), torch.stack([t[24], t[36]])
    for module in (DSALoss(), HRALoss(DS, DT, level=level, num_pairs=2)):
        with mta_kernels.use_backend("triton"), Counter() as c:
            module(student, teacher, units["phrase"], mask, mask).sum().backward()
        assert c.syncs == 0, f"{type(module).__name__}: {c.report()}"


@needs_triton_path
def test_public_ops_with_a_plan_have_no_host_sync():
    s, t, units, mask = gpt2_inputs()
    u = units["word"]
    h = torch.stack([s[6], s[9]]).reshape(2, B * T, DS)
    with mta_kernels.use_backend("triton"), Counter() as c:
        w = mta_kernels.token_saliency(h.view(2, B, T, DS), mask).reshape(2, B * T)
        pooled = mta_kernels.span_pool(h, u.student_ranges, w, plan=u.plan.student)
        loss = mta_kernels.structural_loss(pooled, pooled.detach() * 2, u.cu_units, None, plan=u.plan)
        loss.sum().backward()
    assert c.syncs == 0, c.report()


# The 3-pair gpt2-style setting: the target, launches per forward + backward.
LAUNCH_BUDGET = 80


@needs_triton_path
@pytest.mark.parametrize("hra", ["token", "unit"])
def test_mta_loss_launch_budget(hra):
    s, t, units, mask = gpt2_inputs()
    c = count_fwd_bwd(_loss_module(hra), s, t, units, mask)
    assert c.launches <= LAUNCH_BUDGET, c.report()


@needs_triton_path
@pytest.mark.parametrize("hra", ["token", "unit", None])
def test_launches_do_not_grow_with_the_number_of_pairs(hra):
    """No per-layer Python loop: 4 pairs (2 word + 2 phrase) and 6 pairs (2 word + 4 phrase) launch the
    same kernels and ops, once per side or per granularity."""
    s, t, units, mask = gpt2_inputs()
    counts = []
    for pairs in (
        [(3, 12, "word"), (6, 24, "word"), (9, 36, "phrase"), (12, 48, "phrase")],
        [(3, 12, "word"), (6, 24, "word"), (7, 28, "phrase"), (8, 32, "phrase"), (9, 36, "phrase")]
        + [(12, 48, "phrase")],
    ):
        torch.manual_seed(0)
        module = MTALoss(pairs, DS, DT, hra=hra)
        for x in s:
            x.grad = None  # a fresh backward, not an accumulation into the previous one
        counts.append(count_fwd_bwd(module, s, t, units, mask.clone()))
    assert counts[0].syncs == counts[1].syncs == 0
    assert counts[0].launch_sites == counts[1].launch_sites, (counts[0].report(), counts[1].report())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hra", ["token", "unit"])
def test_cuda_loss_runs_under_sync_debug_error(hra):
    s, t, units, mask = gpt2_inputs()
    s = tuple(x.detach().cuda().requires_grad_() for x in s)
    t = tuple(x.cuda() for x in t)
    units = {g: u.to("cuda", non_blocking=True) for g, u in units.items()}
    module, mask = _loss_module(hra).cuda(), mask.cuda()
    module(s, t, units, mask, mask).loss.backward()  # warm-up: compile the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(s, t, units, mask, mask).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("hra", ["token", "unit"])
def test_loss_compiles_with_fullgraph(backend, hra):
    """No data-dependent Python control flow: the loss traces with ``fullgraph=True`` and matches eager
    (the plan is handed to the ops as graph inputs)."""
    if backend == "triton" and not INTERPRETING:
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1")
    s, t, units, mask = gpt2_inputs()
    module = _loss_module(hra)

    def loss(s, t, units):
        return module(s, t, units, mask, mask).loss

    with mta_kernels.use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        got = compiled(s, t, units)
        got_grads = torch.autograd.grad(got, [s[6], s[9], s[12]])
        want = loss(s, t, units)
        want_grads = torch.autograd.grad(want, [s[6], s[9], s[12]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mask_statistics_are_computed_once_and_follow_in_place_changes():
    """A mask's statistics are an explicit value (``mask_stats``): handed to the saliency they give the
    same result as the mask itself, in fewer launches; a mask changed in place is read again (nothing
    about it is kept between calls)."""
    from mta_kernels.ops.saliency import mask_stats

    h = torch.randn(1, 2, 6, 4)
    mask = torch.ones(2, 6, dtype=torch.long)
    with mta_kernels.use_backend("torch"):
        first = mta_kernels.token_saliency(h, mask)
        mask[1, 3:] = 0
        second = mta_kernels.token_saliency(h, mask)
        fresh = mta_kernels.token_saliency(h, mask.clone())
        with_stats = mta_kernels.token_saliency(h, mask, stats=mask_stats(mask))
    assert torch.equal(second, fresh) and not torch.equal(first, second)
    assert torch.equal(with_stats, second)
    assert (second[0, 1, 3:] == 0).all()
    if INTERPRETING:
        stats = mask_stats(mask)
        with mta_kernels.use_backend("triton"):
            plain = count_saliency_launches(h, mask)
            given = count_saliency_launches(h, mask, stats)
            got, want = (mta_kernels.token_saliency(h, mask, stats=x) for x in (stats, None))
            assert torch.equal(got, want)
        assert given < plain, (plain, given)


def count_saliency_launches(h, mask, stats=None) -> int:
    with Counter() as c:
        mta_kernels.token_saliency(h, mask, stats=stats)
    return c.launches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_captures_forward_and_backward():
    """With the batch's plan fixed, forward + backward capture in one CUDA graph and replay to the eager
    values (nothing is read on the host, nothing is data-dependent in Python)."""
    s, t, units, mask = gpt2_inputs()
    s = tuple(x.detach().cuda().requires_grad_() for x in s)
    t = tuple(x.cuda() for x in t)
    units = {g: u.to("cuda") for g, u in units.items()}
    module, mask = _loss_module("token").cuda(), mask.cuda()
    params = [s[6], s[9], s[12], *module.parameters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (kernel compilation, allocator)
            for p in params:
                p.grad = None
            module(s, t, units, mask, mask).loss.backward()
    torch.cuda.current_stream().wait_stream(side)
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = module(s, t, units, mask, mask).loss
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
