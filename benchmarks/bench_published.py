"""The whole MTA loss against the published implementation, on the CPU, same inputs.

The published code (repository ``voluyen/mta``, file ``distillm/span_utils.py``) is not part of this
repository: pass its path with ``--published PATH`` or ``MTA_PUBLISHED_SPAN_UTILS=PATH``; without it the
benchmark says so and exits 0 (nothing measured).

Setting (docs/method.md#layer-presets): GPT-2-XL -> GPT-2 widths (teacher 1600, student 768), the
``gpt2-xl->gpt2`` pairs (1 word pair + 2 phrase pairs), token-level HRA, float32, at B=8, T=512 and at
B=2, T=2048. Inputs: random hidden states, right padding, phrases of 1–6 tokens covering about three
quarters of the valid tokens (words = the tokens of the phrases, as the published ``in_phrases`` mode),
given to the published code as character offsets and to ours as :class:`~mta_kernels.layout.UnitBatch`
(built outside the timing: the collator builds it in the DataLoader worker; its time is reported apart).

Measured, per implementation: forward + backward wall time (median of ``--reps`` after one warm-up run,
the two implementations interleaved so that a shared machine loads both alike; the process CPU time is
reported too, less sensitive to other work on the machine)
and the peak of bytes allocated during forward + backward above what existed before (a dispatch mode
that counts every storage an op creates, until it is freed; see ``_LiveBytes``). The two losses are not the
same numbers (the deviations are listed in docs/method.md#deviations-from-the-published-code); both
values are printed as a sanity check.

    python benchmarks/bench_published.py --published /path/to/span_utils.py [--reps 5] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import types
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mta_kernels
from mta_kernels.layout import UnitBatch

PRESET = "gpt2-xl->gpt2"
SHAPES = ((8, 512), (2, 2048))


def load_published(path: str | None) -> types.ModuleType | None:
    """The published ``span_utils`` module from ``path``, or None when no path is given or it is absent."""
    if not path or not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("published_span_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(B: int, T: int, seed: int = 0) -> dict:
    """Hidden states, masks, units in both forms (token ranges for ours, character offsets for theirs)."""
    preset = mta_kernels.losses.PRESETS[PRESET]
    gen = torch.Generator().manual_seed(seed)
    lengths = [T - int(torch.randint(0, max(1, T // 8), (1,), generator=gen)) for _ in range(B)]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    # token t covers characters [4t, 4t + 3) (a 3-character token and a space); padding has (0, 0)
    t_idx = torch.arange(T)
    offsets = torch.stack([4 * t_idx, 4 * t_idx + 3], dim=-1).expand(B, T, 2).clone()
    offsets[mask == 0] = 0
    phrases, words = [], []  # token ranges per sequence
    for n in lengths:
        p, t = [], int(torch.randint(0, 3, (1,), generator=gen))
        while True:
            length = int(torch.randint(1, 7, (1,), generator=gen))
            if t + length > n:
                break
            p.append((t, t + length))
            t += length + int(torch.randint(0, 3, (1,), generator=gen))
        phrases.append(p)
        words.append([(i, i + 1) for a, e in p for i in range(a, e)])

    def char_spans(per_seq):
        return [[(4 * a, 4 * (e - 1) + 3) for a, e in seq] for seq in per_seq]

    def unit_batch(per_seq):
        rows = [(b * T + a, b * T + e) for b, seq in enumerate(per_seq) for a, e in seq]
        cu = torch.tensor([0, *torch.tensor([len(s) for s in per_seq]).cumsum(0).tolist()], dtype=torch.int32)
        ranges = torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)
        return UnitBatch(ranges, ranges, cu, T, T)

    t0 = time.perf_counter()
    units = {"word": unit_batch(words), "phrase": unit_batch(phrases)}
    plan_seconds = time.perf_counter() - t0
    s_layers = {ls: torch.randn(B, T, preset.student_dim, generator=gen) for ls in preset.student_layers}
    t_layers = {lt: torch.randn(B, T, preset.teacher_dim, generator=gen) for lt in preset.teacher_layers}
    dummy_s, dummy_t = torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)  # layers no pair uses
    s_states = [s_layers.get(i, dummy_s) for i in range(preset.student_num_layers + 1)]
    t_states = [t_layers.get(i, dummy_t) for i in range(preset.teacher_num_layers + 1)]
    covered = sum(e - a for seq in phrases for a, e in seq)
    return dict(
        mask=mask,
        offsets=offsets,
        phrase_spans=char_spans(phrases),
        word_spans=char_spans(words),
        units=units,
        plan_seconds=plan_seconds,
        s_states=s_states,
        t_states=t_states,
        coverage=covered / sum(lengths),
        num_units={"word": sum(map(len, words)), "phrase": sum(map(len, phrases))},
    )


def ours(inputs: dict):
    torch.manual_seed(0)
    module = mta_kernels.MTALoss.from_preset(PRESET)  # token HRA, gamma 0.1 (the published 1/10)
    students = [s.requires_grad_() if s.numel() > 1 else s for s in inputs["s_states"]]

    def step():
        out = module(students, inputs["t_states"], inputs["units"], inputs["mask"], inputs["mask"])
        out.loss.backward()
        return out.loss.item()

    return step, lambda: _zero([*students, *module.parameters()])


def published(module: types.ModuleType, inputs: dict):
    preset = mta_kernels.losses.PRESETS[PRESET]
    torch.manual_seed(0)
    projectors = nn.ModuleList(nn.Linear(preset.student_dim, preset.teacher_dim) for _ in range(3))
    args = types.SimpleNamespace(
        entropy_weight=False,
        student_layer_mapping=list(preset.student_layers),
        teacher_layer_mapping=list(preset.teacher_layers),
        split_layer_mapping=[0, preset.n_word, len(preset.student_layers)],
    )
    students = [s.requires_grad_() if s.numel() > 1 else s for s in inputs["s_states"]]

    def step():
        loss = module.compute_overall_span_loss(
            projectors,
            inputs["mask"],
            None,
            None,
            students,
            inputs["t_states"],
            inputs["offsets"],
            inputs["phrase_spans"],
            inputs["word_spans"],
            args,
        )
        loss.backward()
        return loss.item()

    return step, lambda: _zero([*students, *projectors.parameters()])


def _zero(tensors) -> None:
    for t in tensors:
        t.grad = None


class _LiveBytes(TorchDispatchMode):
    """Peak of the bytes of the CPU storages that ops create while the mode is on and that are alive at the
    same time (each storage counted once, from the op that creates it until it is freed). Outputs that
    are an input's storage (views, in-place ops) create nothing. The package's Python custom ops are run
    with the mode on, so their internal allocations count too; workspace a C++ kernel frees before it
    returns is not seen (on either side)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _custom_op_impl(func)
        if impl is not None:
            with self:
                out = impl(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = {
            a.untyped_storage().data_ptr() for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


def _custom_op_impl(func):
    if getattr(func, "namespace", None) != "mta_kernels":
        return None
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(func._schema.name)
    return None if opdef is None else (opdef._backend_fns.get("cpu") or opdef._init_fn)


def peak_bytes(step) -> int:
    """Peak live bytes allocated by ops during ``step`` (see :class:`_LiveBytes`)."""
    gc.collect()
    with _LiveBytes() as watch:
        step()
    return watch.peak


def measure(impls: dict, reps: int) -> dict:
    """``{name: (step, reset)}`` -> per name: loss, median seconds, peak bytes. The implementations run
    interleaved (A B A B ...), so a machine shared with other work loads both alike."""
    out = {}
    for name, (step, reset) in impls.items():
        reset()
        out[name] = dict(loss=step(), all_seconds=[])  # warm-up
        out[name]["all_cpu_seconds"] = []
    for _ in range(reps):
        for name, (step, reset) in impls.items():
            reset()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            out[name]["all_seconds"].append(time.perf_counter() - t0)
            out[name]["all_cpu_seconds"].append(time.process_time() - c0)
    for name, (step, reset) in impls.items():
        reset()
        out[name]["seconds"] = statistics.median(out[name]["all_seconds"])
        out[name]["cpu_seconds"] = statistics.median(out[name]["all_cpu_seconds"])
        out[name]["peak_bytes"] = peak_bytes(step)
        reset()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published", default=os.environ.get("MTA_PUBLISHED_SPAN_UTILS"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    module = load_published(args.published)
    if module is None:
        print(
            "bench_published: skipped: the published implementation was not found. Pass "
            "--published /path/to/distillm/span_utils.py (repository voluyen/mta) or set "
            "MTA_PUBLISHED_SPAN_UTILS."
        )
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = ((2, 64),) if args.quick else SHAPES
    results = []
    print(f"CPU, float32, {PRESET}, token HRA, threads={torch.get_num_threads()}, median of {args.reps}")
    print("| B | T | coverage | units (word/phrase) | impl | fwd+bwd s (wall) | CPU s | peak MB | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, T in shapes:
        inputs = make_inputs(B, T)
        row = dict(B=B, T=T, coverage=inputs["coverage"], plan_seconds=inputs["plan_seconds"])
        row.update(measure({"published": published(module, inputs), "ours": ours(inputs)}, args.reps))
        for name in ("published", "ours"):
            r = row[name]
            print(
                f"| {B} | {T} | {inputs['coverage']:.2f} | {inputs['num_units']['word']}/"
                f"{inputs['num_units']['phrase']} | {name} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | "
                f"{r['peak_bytes'] / 2**20:.0f} | {r['loss']:.4f} |"
            )
        row["speedup"] = row["published"]["seconds"] / row["ours"]["seconds"]
        row["cpu_speedup"] = row["published"]["cpu_seconds"] / row["ours"]["cpu_seconds"]
        row["peak_ratio"] = row["published"]["peak_bytes"] / max(1, row["ours"]["peak_bytes"])
        print(
            f"B={B} T={T}: {row['speedup']:.2f}x faster (CPU time {row['cpu_speedup']:.2f}x), "
            f"peak {row['peak_ratio']:.2f}x lower; "
            f"plans built in {1e3 * row['plan_seconds']:.1f} ms (outside the step)"
        )
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
