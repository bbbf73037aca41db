"""The full MTA loss (saliency + pooling + DSA + HRA over all layer pairs), forward + backward.

Providers:
    eager_stacked  the published formulation: ``mta_kernels.reference.mta_loss(..., stacked=True)``,
                   reference saliency and pooling per pair, DSA as one (ΣU)×(ΣU) matrix per side with
                   cross-sequence pairs masked (structural_loss_stacked);
    eager          ``mta_kernels.reference.mta_loss``: the same with the block-diagonal reference DSA;
    compile        torch.compile of ``eager``;
    mta_kernels    ``mta_kernels.losses.MTALoss`` (stacked pairs, fused ops).
All four share the MTALoss module's settings and HRA projectors, so they compute the same number (the
harness checks loss and gradients against ``eager``).

    python benchmarks/bench_mta_loss.py --quick --device cpu
    python benchmarks/bench_mta_loss.py --case target        # GPT-2-XL -> GPT-2, B=16, T=512, 3 pairs
    python benchmarks/bench_mta_loss.py --case sweep --max-seconds 120
    python benchmarks/bench_mta_loss.py --print-floors         # floors of the cases, no run

Floor (per pair k with units of its granularity; e bytes per hidden element, C_k covered tokens):
    bytes = B·T·(2·Ds + Dt)·e                 read H_s, H_t; write dH_s (dense)
    FLOPs = 2·B·T²·(Ds + Dt)                  saliency, student and teacher: the useful Gram H·Hᵀ once
                                               (the kernel's two passes compute it twice; see bench_saliency)
          + DSA fwd+bwd floor                 (bench_structural.structural_floor_by_rate)
          + 6·M_k·Ds·Dt                        HRA projector fwd + bwd (dX, dW); M_k = C_k covered tokens
                                               (token level) or U_k units (unit level)
    fp32 inputs: all FLOPs at the fp32 rate; 16-bit: tensor-core rate except the DSA gradient's fp32 part
    and the projector (fp32 weights), which moves to the tensor cores only under autocast.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import harness
import registry
import torch
from bench_structural import structural_floor_by_rate

BENCH = registry.get("mta_loss")  # the cases and providers


def layout_inputs(p: dict[str, Any], device: torch.device, seed: int) -> dict[str, Any]:
    """Layer pairs, HRA level and synthetic units of a case (what the floor needs; no hidden states)."""
    pre = harness.PRESETS[p["preset"]]
    B, T = p["B"], p["T"]
    units = {
        g: harness.synth_unit_batch(B, T, g, pre.same_tokenizer, seed + i, device)
        for i, g in enumerate(("word", "phrase"))
    }
    return {
        "pairs": list(zip(pre.student_layers, pre.teacher_layers, pre.granularities())),
        "hra_level": "token" if pre.same_tokenizer else "unit",
        "units": units,
    }


def build_inputs(p: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Hidden-state tuples (only the mapped layers are distinct tensors), units, masks, the MTALoss."""
    from mta_kernels.losses import MTALoss

    pre = harness.PRESETS[p["preset"]]
    B, T = p["B"], p["T"]
    lay = layout_inputs(p, device, seed)
    pairs, hra_level, units = lay["pairs"], lay["hra_level"], lay["units"]
    torch.manual_seed(seed)
    module = MTALoss(pairs, pre.d_student, pre.d_teacher, hra=hra_level).to(device)
    s_filler = torch.zeros(B, T, pre.d_student, dtype=dtype, device=device)
    t_filler = torch.zeros(B, T, pre.d_teacher, dtype=dtype, device=device)
    s_states: list[torch.Tensor] = [s_filler] * (max(pre.student_layers) + 1)
    t_states: list[torch.Tensor] = [t_filler] * (max(pre.teacher_layers) + 1)
    leaves = []
    for k, (ls, lt, _) in enumerate(pairs):
        s_states[ls] = harness.random_hidden((B, T, pre.d_student), dtype, device, seed + 10 + k)
        s_states[ls].requires_grad_()
        t_states[lt] = harness.random_hidden((B, T, pre.d_teacher), dtype, device, seed + 100 + k)
        leaves.append(s_states[ls])
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    return {
        "module": module,
        "pairs": pairs,
        "hra_level": hra_level,
        "s_states": tuple(s_states),
        "t_states": tuple(t_states),
        "units": units,
        "mask": mask,
        "grad_leaves": leaves + list(module.parameters()),
        "element_size": s_filler.element_size(),
    }


def make_loss_fn(provider: str, x: dict[str, Any], compiled_cache: dict[str, Any] | None = None):
    """A zero-argument callable returning the scalar loss of ``provider`` on inputs ``x`` (no backward)."""
    from mta_kernels import reference

    module = x["module"]
    if provider == "mta_kernels":
        return lambda: module(x["s_states"], x["t_states"], x["units"], x["mask"], x["mask"]).loss
    # The eager providers: the package's oracle of the whole loss with the module's settings.
    kwargs = dict(
        pairs=x["pairs"],
        projectors=list(module.projectors),
        pooling=module.pooling,
        weighted=module.weighted,
        hra=x["hra_level"],
        gamma=module.gamma,
        stacked=provider == "eager_stacked",
    )
    if provider in ("eager", "eager_stacked"):
        f = reference.mta_loss
    elif provider == "compile":
        cache = compiled_cache if compiled_cache is not None else {}
        if "f" not in cache:
            cache["f"] = torch.compile(reference.mta_loss)
        f = cache["f"]
    else:
        raise ValueError(provider)
    return lambda: f(x["s_states"], x["t_states"], x["units"], x["mask"], x["mask"], **kwargs).loss


def mta_floor(p: dict[str, Any], x: dict[str, Any]) -> tuple[float, float, float]:
    """(bytes, FLOPs at the tensor-core rate, FLOPs at the fp32 rate) of one forward + backward.

    fp32 hidden states: every FLOP at the fp32 rate. 16-bit: saliency and the DSA Grams on the tensor
    cores, the DSA gradient's fp32 part at the fp32 rate (``structural_floor_by_rate``); the projector
    (fp32 weights) at the fp32 rate, on the tensor cores under autocast (``x["autocast"]``).
    """
    pre = harness.PRESETS[p["preset"]]
    B, T, Ds, Dt, e = p["B"], p["T"], pre.d_student, pre.d_teacher, x["element_size"]
    autocast = bool(x.get("autocast", False))
    total_bytes, flops16, flops32 = 0.0, 0.0, 0.0
    for _, _, g in x["pairs"]:
        ub = x["units"][g]
        counts = (ub.cu_units[1:] - ub.cu_units[:-1]).tolist()
        covered = int((ub.student_ranges[:, 1] - ub.student_ranges[:, 0]).sum())
        m = covered if x["hra_level"] == "token" else ub.num_units
        saliency = 2.0 * B * T * T * (Ds + Dt)  # the useful Gram H·Hᵀ of both sides
        projector = 6.0 * m * Ds * Dt
        dsa_bytes, dsa16, dsa32 = structural_floor_by_rate("fwd+bwd", 1, counts, Ds, Dt, e)
        total_bytes += B * T * (2 * Ds + Dt) * e
        if e >= 4:
            flops32 += saliency + dsa16 + dsa32 + (0.0 if autocast else projector)
            flops16 += projector if autocast else 0.0
        else:
            flops16 += saliency + dsa16 + (projector if autocast else 0.0)
            flops32 += dsa32 + (0.0 if autocast else projector)
    return total_bytes, flops16, flops32


def make_spec(args: argparse.Namespace) -> harness.BenchSpec:
    device = harness.pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    cache: dict[str, Any] = {}

    def make_fn(provider: str, p: dict[str, Any], x: dict[str, Any]):
        loss_fn = make_loss_fn(provider, x, cache)

        def fwd_bwd():
            loss = loss_fn()
            loss.backward()
            return loss

        if args.autocast == "off":
            return fwd_bwd

        def fwd_bwd_autocast():
            # As in a bf16 training step: the HRA projectors (fp32 weights, shared by every provider)
            # run in bf16, which the fp32 default leaves as the dominant cost (benchmarks/NOTES.md).
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
            return loss

        return fwd_bwd_autocast

    autocast = args.autocast != "off"
    build = functools.partial(_build, device=device, dtype=dtype, seed=args.seed, autocast=autocast)
    return harness.BenchSpec("mta_loss", build, make_fn, mta_floor, BENCH.providers)


def _build(
    p: dict[str, Any], *, device: torch.device, dtype: torch.dtype, seed: int, autocast: bool = False
) -> dict[str, Any]:
    return {**build_inputs(p, device, dtype, seed), "autocast": autocast}


def print_floors(args: argparse.Namespace) -> None:
    """Floors of the cases on the CPU (no GPU needed): bytes, FLOPs and times at the H100 ceilings
    (3.0 TB/s, 800 TFLOP/s bf16, 50 TFLOP/s fp32; benchmarks/NOTES.md, "Denominators")."""
    harness.apply_unit_overrides(args)
    e = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    h100 = {"bandwidth_GBps": 3000.0, "matmul_TFLOPs": 800.0, "matmul_fp32_TFLOPs": 50.0}
    print(f"unit statistics: {harness.UNIT_STATS_SOURCE}: {harness.UNITS_PER_TOKEN} {harness.TOKEN_COVERAGE}")
    print("| case | preset | B | T | K | bytes (MB) | GFLOP bf16 | GFLOP fp32 | floor at H100 rates (µs) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for which in ("target", "sweep"):
        for p in BENCH.cases(which, args.quick):
            x = {**layout_inputs(p, torch.device("cpu"), args.seed), "element_size": e}
            b, f16, f32 = mta_floor(p, x)
            rec: dict[str, Any] = {}
            harness._add_floor(rec, (b, f16, f32), h100)
            print(
                f"| {p['case']} | {p['preset']} | {p['B']} | {p['T']} | {p['K']} |"
                f" {b / 1e6:.1f} | {f16 / 1e9:.1f} | {f32 / 1e9:.1f} | {rec['floor_ms'] * 1e3:.1f} |"
            )


def add_args(parser: argparse.ArgumentParser) -> None:
    """This bench's own options (``harness.bench_args`` adds them)."""
    parser.add_argument(
        "--autocast",
        default="off",
        choices=["off", "bf16"],
        help="run every provider under torch.autocast(bf16), as in a bf16 training step (use with --tag)",
    )
    parser.add_argument("--print-floors", action="store_true")


def main(argv: list[str] | None = None) -> None:
    args = harness.bench_args(BENCH, __doc__.splitlines()[0], argv)
    if args.print_floors:
        print_floors(args)
        return
    harness.run_registered(BENCH, args)


if __name__ == "__main__":
    main()
