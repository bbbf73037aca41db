"""GPU-readiness without a GPU: compile every Triton kernel specialisation the launchers use for sm_90.

The op tests run the kernels under Triton's CPU interpreter, which accepts programs the real compiler
rejects (dtype mismatches in ``tl.where`` / loop-carried values, ``tl.dot`` shapes < 16, fp64 dots, ...).
Here every ``@triton.jit`` kernel of every module of ``mta_kernels/ops/`` goes through
the real pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for ``GPUTarget("cuda", 90, 32)`` with
exactly the signatures and constexprs that the host launchers pass on CUDA, derived here from the
launcher code (block sizes come from the launchers' own helpers).

Specialisation rule (``triton._C.libtriton.native_specialize_impl``, the same in triton 3.6 and 3.9, checked
by ``test_specialisation_rule_matches_triton``): a tensor is ``*<dtype>`` with ``tt.divisibility=16`` when
its address is 16-byte aligned; an int is ``i32``/``i64`` with ``tt.divisibility=16`` when it is a multiple
of 16, and the *constant* 1 when it equals 1 (a contiguous last stride); a float is ``fp32``. Each kernel is
compiled in the launchers' realistic contiguous case (aligned pointers, unit last stride folded in) and in
a generic case (unaligned pointers, odd strides and sizes), which are the two code paths the JIT builds.

Beyond compiling, the TTIR and PTX are checked for what the numerics rely on and the interpreter cannot
show (docs/design/gpu-readiness.md, "What is asserted"): both saliency score passes round the score with
a mul (no fma before the row-max subtraction), the row scale uses no approximate division or square root,
the structural kernel has a barrier before it reloads the gradient rows it stored, every pointer
offset of the saliency, structural, HRA and glue kernels is int64, and ptxas reports no register spills
for the HRA and glue kernels. Another triton: ``PYTHONPATH=<dir with it>``.

The compiles run in subprocesses without ``TRITON_INTERPRET`` (conftest sets it on machines without a
GPU, and then ``triton.jit`` wraps nothing that ``triton.compile`` can lower) and an empty Triton cache.
Run this file as a script (``python tests/test_triton_compile.py [--stats]``) to print the table of
docs/design/gpu-readiness.md (``--stats`` adds ptxas register/spill counts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import triton
import triton.language as tl

if __name__ == "__main__":  # as a script: this checkout's package, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ------------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Ptr:
    """A tensor argument: triton element type name, and whether its address is 16-byte aligned."""

    dtype: str
    aligned: bool = True


@dataclass
class Case:
    """One specialisation: kernel ``module.kernel`` with its positional runtime arguments (in order, as
    the launcher passes them) and constexpr keyword arguments."""

    id: str
    module: str
    kernel: str
    args: list
    constexprs: dict
    num_warps: int = 4
    options: dict = field(default_factory=dict)  # other launch options (enable_fp_fusion, ...)
    dot_16bit: bool = False  # a tl.dot on 16-bit operands: expected on the tensor cores (wgmma on sm_90)
    check_spills: bool = False  # run ptxas -v on its PTX and assert no register spills
    notes: dict = field(default_factory=dict)


_TL_NAME = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
FLOAT_DTYPES = ["float32", "bfloat16", "float16", "float64"]


def _contig_strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return strides[::-1]


def _op_module(name: str):
    """The op module itself (``mta_kernels.ops`` re-exports functions under the same names)."""
    import importlib

    return importlib.import_module(f"mta_kernels.ops.{name}")


def _saliency_cases() -> list[Case]:
    sal = _op_module("saliency")

    cases = []
    # (name, L, B, T, D, contiguous): block sizes from the launcher's _block_sizes; BM = 64 / 32 / 16
    shapes = [
        ("big", 4, 8, 2048, 768, True),  # BM = BN = BD = 64, row-scale BD 128
        ("mid", 1, 3, 20, 24, True),  # BM = 32, BD = 32 (B and T not multiples of 16)
        ("tiny", 2, 1, 9, 2, True),  # BM = 16, BD = 16, B = 1 folded into a constant
        ("strided", 3, 5, 63, 60, False),  # layers interleaved, D the slowest axis: no unit stride
    ]
    for name, L, B, T, D, contiguous in shapes:
        dtypes = FLOAT_DTYPES if name in ("big", "strided") else ["float32", "bfloat16"]
        for dt in dtypes:
            if contiguous:
                strides = _contig_strides((L, B, T, D))
            else:
                strides = [T * D + 7, 3, 3 * B, 3 * B * T]  # [L, B, T, D] view with padding
            h = Ptr(_TL_NAME[dt], aligned=contiguous)
            f32, i8, i32 = Ptr("fp32"), Ptr("i8"), Ptr("i32")
            # _saliency_triton on CUDA: triton_interpreting() is False
            dot_fp32 = dt not in ("bfloat16", "float16")
            BM, BN, BD = sal._block_sizes(T, D, dot_fp32)
            precision = "ieee" if dot_fp32 else None
            row_bd = sal._row_scale_bd(D)
            cases.append(
                Case(
                    f"saliency._row_scale_kernel-{dt}-{name}",
                    "saliency",
                    "_row_scale_kernel",
                    [h, f32, B, T, D, *strides, sal.SALIENCY_STD_EPS],
                    dict(BR=sal._ROW_SCALE_BR, BD=row_bd),
                )
            )
            common = dict(BM=BM, BN=BN, BD=BD, DOT_FP32=dot_fp32, DOT_PRECISION=precision)
            launch = dict(sal.SCORE_LAUNCH_OPTIONS)  # the launcher's options, num_warps included
            num_warps = launch.pop("num_warps")
            qk_scale = 0.05
            cases.append(
                Case(
                    f"saliency._row_stats_kernel-{dt}-{name}",
                    "saliency",
                    "_row_stats_kernel",
                    # hidden, r, valid_i8, span, n, row_max, row_lsum
                    [h, f32, i8, i32, i32, f32, f32, B, T, D, *strides, qk_scale],
                    dict(common),
                    num_warps=num_warps,
                    options=launch,
                    dot_16bit=not dot_fp32,
                )
            )
            cases.append(
                Case(
                    f"saliency._colsum_kernel-{dt}-{name}",
                    "saliency",
                    "_colsum_kernel",
                    # hidden, r, valid_i8, span, n, row_max, row_lsum, out
                    [h, f32, i8, i32, i32, f32, f32, f32, B, T, D, *strides, qk_scale],
                    dict(common),
                    num_warps=num_warps,
                    options=launch,
                    dot_16bit=not dot_fp32,
                )
            )
    return cases


def _span_pool_cases() -> list[Case]:
    sp = _op_module("span_pool")

    cases = []
    # (name, hidden dtype, weights: None | "shared" | "layers", weights dtype, L, N, D, U, covered tokens)
    variants = []
    for dt in FLOAT_DTYPES:
        for w in (None, "layers"):
            variants.append((f"{dt}-{'w' if w else 'now'}", dt, w, dt, 6, 4096, 768, 2000, 3000))
    variants += [
        # span lengths 1 / ~3 / >= 8 tokens: BT = 1, 4, 8 (BU = 32, 8, 4); small D: BD = 16
        ("bfloat16-shared-bt1", "bfloat16", "shared", "float32", 2, 1000, 96, 900, 900),
        ("bfloat16-now-bt4", "bfloat16", None, "bfloat16", 2, 1000, 768, 100, 350),
        ("float32-w-bt8-d10", "float32", "layers", "float32", 3, 1000, 10, 10, 900),
        # fp64 weights with fp32 hidden: accumulates in fp64 (accumulation_dtype)
        ("float32-w64", "float32", "layers", "float64", 2, 500, 64, 100, 200),
    ]
    for name, dt, w, wdt, L, N, D, U, covered in variants:
        acc = "float64" if "float64" in (dt, wdt if w else dt) else "float32"
        tl_acc = "tl.float64" if acc == "float64" else "tl.float32"
        BU, BT, BD = sp._fwd_blocks(covered / U, D)
        h_strides = _contig_strides((L, N, D))
        if w is None:
            w_ptr, w_strides = Ptr(_TL_NAME[dt]), [0, 0]  # hidden passed as a dummy pointer
        elif w == "shared":
            w_ptr, w_strides = Ptr(_TL_NAME[wdt]), [0, 1]  # [N].expand(L, N)
        else:
            w_ptr, w_strides = Ptr(_TL_NAME[wdt]), [N, 1]
        cases.append(
            Case(
                f"span_pool._span_pool_fwd_kernel-{name}",
                "span_pool",
                "_span_pool_fwd_kernel",
                [
                    Ptr(_TL_NAME[dt]),
                    w_ptr,
                    Ptr("i32"),
                    Ptr(_TL_NAME[dt]),
                    Ptr(_TL_NAME[acc]),
                    U,
                    D,
                    *h_strides,
                    *w_strides,
                    2,
                    1,  # ranges [U, 2] contiguous
                    *_contig_strides((L, U, D)),
                    # out [L, U, D]
                ],
                dict(
                    HAS_WEIGHTS=w is not None, ACC_DTYPE=tl_acc, BU=BU, BT=BT, BD=BD, BF16_RTNE_BY_HAND=False
                ),
                notes=dict(blocks=f"BU={BU} BT={BT} BD={BD}"),
            )
        )
        # backward: grad_out like the output, gathered into a contiguous [L, N, D] grad of hidden
        bwd_bd = min(128, max(16, 1 << (D - 1).bit_length()))
        cases.append(
            Case(
                f"span_pool._span_pool_bwd_kernel-{name}",
                "span_pool",
                "_span_pool_bwd_kernel",
                [
                    Ptr(_TL_NAME[dt]),
                    Ptr("i32"),
                    w_ptr,
                    Ptr(_TL_NAME[acc]),
                    Ptr(_TL_NAME[dt]),
                    N,
                    U,
                    D,
                    *_contig_strides((L, U, D)),
                    *w_strides,
                ],
                dict(HAS_WEIGHTS=w is not None, ACC_DTYPE=tl_acc, BT=32, BD=bwd_bd, BF16_RTNE_BY_HAND=False),
            )
        )
    # generic: unaligned sliced hidden [L, N, D] out of [B, T, Dpad], grad_out from .sum() (all strides 0)
    cases.append(
        Case(
            "span_pool._span_pool_fwd_kernel-bfloat16-w-generic",
            "span_pool",
            "_span_pool_fwd_kernel",
            [Ptr("bf16", False), Ptr("fp32", False), Ptr("i32", False), Ptr("bf16"), Ptr("fp32"), 77, 60]
            + [61 * 999, 61, 3, 999 * 2, 2, 4, 2, 77 * 60, 60, 1],
            dict(HAS_WEIGHTS=True, ACC_DTYPE="tl.float32", BU=16, BT=2, BD=64, BF16_RTNE_BY_HAND=False),
        )
    )
    cases.append(
        Case(
            "span_pool._span_pool_bwd_kernel-bfloat16-w-generic",
            "span_pool",
            "_span_pool_bwd_kernel",
            [Ptr("bf16"), Ptr("i32"), Ptr("fp32", False), Ptr("fp32"), Ptr("bf16"), 999, 77, 60]
            + [0, 0, 0, 999 * 2, 2],
            dict(HAS_WEIGHTS=True, ACC_DTYPE="tl.float32", BT=32, BD=64, BF16_RTNE_BY_HAND=False),
        )
    )
    return cases


def _structural_cases() -> list[Case]:
    import torch

    st = _op_module("structural")

    cases = []
    cuda = torch.device("cuda")
    # (name, student dtype, teacher dtype, weights: None | "shared" | "layers", weights dtype, grad, L, U)
    variants = []
    for dt in FLOAT_DTYPES:
        for w in (None, "layers"):
            for grad in (False, True):
                variants.append(
                    (
                        f"{dt}-{'w' if w else 'now'}-{'grad' if grad else 'nograd'}",
                        dt,
                        dt,
                        w,
                        dt,
                        grad,
                        4,
                        1000,
                    )
                )
    variants += [
        ("bfloat16s-float32t-shared-grad", "bfloat16", "float32", "shared", "float32", True, 2, 300),
        ("float16s-bfloat16t-now-grad", "float16", "bfloat16", None, None, True, 1, 300),
    ]
    for name, sdt, tdt, w, wdt, grad, L, U in variants:
        Ds, Dt = 1024, 2048
        acc = "float64" if "float64" in (sdt, tdt, wdt if w else sdt) else "float32"
        acc_torch = getattr(torch, acc)
        BM, BN, BD = st._block_sizes(cuda, acc_torch, getattr(torch, sdt), grad)
        native = acc == "float32"  # device is cuda, not interpreting
        if w is None:
            w_ptr, w_strides = Ptr(_TL_NAME[acc]), [0, 0]  # inv_s as the dummy pointer
        elif w == "shared":
            w_ptr, w_strides = Ptr(_TL_NAME[wdt]), [0, 1]  # [1, U]: stride_wl = 0
        else:
            w_ptr, w_strides = Ptr(_TL_NAME[wdt]), [U, 1]
        a = Ptr(_TL_NAME[acc])
        cases.append(
            Case(
                f"structural._structural_fwd_kernel-{name}",
                "structural",
                "_structural_fwd_kernel",
                [Ptr(_TL_NAME[sdt]), Ptr(_TL_NAME[tdt]), a, a, w_ptr, Ptr("i32"), Ptr("i32"), a, a]
                + [U, Ds, Dt, 37, *_contig_strides((L, U, Ds)), *_contig_strides((L, U, Dt)), *w_strides],
                dict(
                    BM=BM,
                    BN=BN,
                    BD=BD,
                    HAS_WEIGHTS=w is not None,
                    COMPUTE_GRAD=grad,
                    NATIVE_S=native and sdt in ("bfloat16", "float16"),
                    NATIVE_T=native and tdt in ("bfloat16", "float16"),
                    F32_PREC=st.F32_DOT_PRECISION,
                    ACC=f"tl.{acc}",
                    IS_FP64=acc == "float64",
                ),
                dot_16bit=native and sdt in ("bfloat16", "float16"),
                num_warps=8,  # as the launcher
                notes=dict(blocks=f"BM={BM} BN={BN} BD={BD}"),
            )
        )
    # generic: unaligned, strided student/teacher (slices of wider tensors), odd widths
    generic_bm, generic_bn, generic_bd = st._block_sizes(cuda, torch.float32, torch.bfloat16, True)
    cases.append(
        Case(
            "structural._structural_fwd_kernel-bfloat16-w-grad-generic",
            "structural",
            "_structural_fwd_kernel",
            [Ptr("bf16", False), Ptr("bf16", False), Ptr("fp32"), Ptr("fp32"), Ptr("bf16", False)]
            + [Ptr("i32"), Ptr("i32"), Ptr("fp32"), Ptr("fp32")]
            + [77, 60, 100, 5, 77 * 61, 61, 3, 77 * 101 * 2, 202, 2, 77 * 3, 3],
            dict(
                BM=generic_bm,
                BN=generic_bn,
                BD=generic_bd,
                HAS_WEIGHTS=True,
                COMPUTE_GRAD=True,
                NATIVE_S=True,
                NATIVE_T=True,
                F32_PREC=st.F32_DOT_PRECISION,
                ACC="tl.float32",
                IS_FP64=False,
            ),
            dot_16bit=True,
            num_warps=8,
        )
    )
    # row norms and zeroed gradient: (name, student dtype, teacher dtype, grad, L, U, Ds, Dt, contiguous)
    for name, sdt, tdt, grad, L, U, Ds, Dt, contiguous in [
        ("bfloat16-grad", "bfloat16", "bfloat16", True, 4, 1000, 1024, 2048, True),
        ("bfloat16-nograd", "bfloat16", "bfloat16", False, 4, 1000, 1024, 2048, True),
        ("float32-grad", "float32", "float32", True, 2, 300, 768, 1600, True),
        ("float16s-float32t-grad", "float16", "float32", True, 1, 300, 60, 100, True),
        ("float64-grad", "float64", "float64", True, 2, 300, 300, 500, True),
        ("bfloat16-grad-generic", "bfloat16", "bfloat16", True, 3, 77, 60, 100, False),
    ]:
        acc = "float64" if "float64" in (sdt, tdt) else "float32"
        BR, BD_P = st._prep_blocks(max(Ds, Dt))
        if contiguous:
            s_strides, t_strides = _contig_strides((L, U, Ds)), _contig_strides((L, U, Dt))
        else:  # slices of wider tensors, D not the fastest axis
            s_strides, t_strides = [U * 61, 61, 3], [U * 101 * 2, 202, 2]
        a = Ptr(_TL_NAME[acc])
        cases.append(
            Case(
                f"structural._structural_prep_kernel-{name}",
                "structural",
                "_structural_prep_kernel",
                [Ptr(_TL_NAME[sdt], contiguous), Ptr(_TL_NAME[tdt], contiguous), a, a, a, a, U, Ds, Dt]
                + [*s_strides, *t_strides, st.NORMALIZE_EPS],
                dict(COMPUTE_GRAD=grad, ACC=f"tl.{acc}", IS_FP64=acc == "float64", BR=BR, BD=BD_P),
                num_warps=st._PREP_NUM_WARPS,
                check_spills=True,
                notes=dict(blocks=f"BR={BR} BD={BD_P}"),
            )
        )
    # gradient epilogue: BD_E = min(1024, next_pow2(Ds)); ACC of the forward
    for dt, Ds in [("float32", 4096), ("bfloat16", 1024), ("float16", 60), ("float64", 300), ("bfloat16", 5)]:
        acc = "float64" if dt == "float64" else "float32"
        bd_e = min(1024, 1 << (Ds - 1).bit_length())
        a = Ptr(_TL_NAME[acc])
        cases.append(
            Case(
                f"structural._structural_grad_epilogue_kernel-{dt}-Ds{Ds}",
                "structural",
                "_structural_grad_epilogue_kernel",
                [a, Ptr(_TL_NAME[dt]), a, a, 1000, Ds, *_contig_strides((2, 1000, Ds)), st.NORMALIZE_EPS],
                dict(BD=bd_e, ACC=f"tl.{acc}"),
            )
        )
    return cases


def _hra_cases() -> list[Case]:
    hra = _op_module("hra")

    cases = []
    # (name, projected-row dtype P (the GEMM's mm_dtype), teacher dtype, weights dtype | None, rows, grad,
    #  L, R rows used, N rows, Dt): block sizes as _rows_triton chooses them
    variants = [
        ("bfloat16-token-w-grad", "bfloat16", "bfloat16", "float32", True, True, 3, 3000, 4096, 1024),
        ("bfloat16-token-w-nograd", "bfloat16", "bfloat16", "float32", True, False, 3, 3000, 4096, 1024),
        ("float32-unit-w-grad", "float32", "float32", "float32", False, True, 2, 2000, 2000, 768),
        ("float32-token-now-grad", "float32", "float32", None, True, True, 1, 900, 1000, 96),
        ("float16-unit-now-grad", "float16", "float16", None, False, True, 2, 500, 500, 10),
        ("float64-token-w-grad", "float64", "float64", "float64", True, True, 2, 300, 500, 300),
    ]
    for name, pdt, ydt, wdt, rows, grad, L, R, N, Dt in variants:
        acc = "float64" if "float64" in (pdt, ydt, wdt) else "float32"
        BR, BD = hra._row_blocks(Dt)
        w_ptr, w_strides = (Ptr(_TL_NAME[ydt]), [0, 0]) if wdt is None else (Ptr(_TL_NAME[wdt]), [N, 1])
        cases.append(
            Case(
                f"hra._hra_rows_kernel-{name}",
                "hra",
                "_hra_rows_kernel",
                # P, Y, WGT, ROWS, TERM, DP, R, Dt, P strides, Y strides, W strides, eps
                [Ptr(_TL_NAME[pdt]), Ptr(_TL_NAME[ydt]), w_ptr, Ptr("i32"), Ptr(_TL_NAME[acc])]
                + [Ptr(_TL_NAME[acc]), R, Dt, *_contig_strides((L, R, Dt)), *_contig_strides((L, N, Dt))]
                + [*w_strides, R, 1e-8],  # TERM row stride: R (a chunk's slice of the [L, R] terms)
                dict(
                    HAS_ROWS=rows,
                    HAS_WEIGHTS=wdt is not None,
                    COMPUTE_GRAD=grad,
                    ACC=f"tl.{acc}",
                    BR=BR,
                    BD=BD,
                ),
                num_warps=hra._ROWS_NUM_WARPS,
                check_spills=True,
                notes=dict(blocks=f"BR={BR} BD={BD}"),
            )
        )
    # generic: an unaligned strided teacher (a slice of a wider stacked tensor), odd widths, strided weights
    BR, BD = hra._row_blocks(100)
    cases.append(
        Case(
            "hra._hra_rows_kernel-bfloat16-token-w-grad-generic",
            "hra",
            "_hra_rows_kernel",
            [Ptr("bf16"), Ptr("bf16", False), Ptr("fp32", False), Ptr("i32"), Ptr("fp32"), Ptr("fp32")]
            + [77, 100, *_contig_strides((3, 77, 100)), 999 * 203, 203, 2, 3 * 999, 3, 1000, 1e-8],
            dict(HAS_ROWS=True, HAS_WEIGHTS=True, COMPUTE_GRAD=True, ACC="tl.float32", BR=BR, BD=BD),
            num_warps=hra._ROWS_NUM_WARPS,
            check_spills=True,
        )
    )
    # finishing reduction: (name, ACC, weights dtype | None, weights stride_wl (0: shared), stride_wn, R, N)
    for name, acc, wdt, stride_wl, stride_wn, R, N in [
        ("float32-w", "float32", "float32", 8192, 1, 6000, 8192),
        ("float32-w-strided", "float32", "bfloat16", 0, 3, 700, 1000),
        ("float32-now", "float32", None, 0, 0, 6000, 0),
        ("float64-w", "float64", "float64", 500, 1, 300, 500),
    ]:
        a = Ptr(_TL_NAME[acc])
        w = a if wdt is None else Ptr(_TL_NAME[wdt], stride_wn <= 1)
        cases.append(
            Case(
                f"hra._hra_finish_kernel-{name}",
                "hra",
                "_hra_finish_kernel",
                [a, w, a, a, R, N, stride_wl, stride_wn],  # TERM, WGT, LOSS, DEN, R, N, weight strides
                dict(
                    HAS_WEIGHTS=wdt is not None,
                    ACC=f"tl.{acc}",
                    IS_FP64=acc == "float64",
                    TINY=2.2250738585072014e-308 if acc == "float64" else 1.1754943508222875e-38,
                    BLK=hra._FINISH_BLK,
                ),
                num_warps=hra._FINISH_NUM_WARPS,
                check_spills=True,
            )
        )
    # backward scaling: (name, ACC, student / weight / bias output dtypes, grad_loss stride, N, Ds, Dt)
    for name, acc, odts, stride_gl, N, Ds, Dt in [
        ("float32", "float32", ("float32",) * 3, 1, 3000, 768, 1600),
        ("bfloat16-student", "float32", ("bfloat16", "float32", "float32"), 0, 1000, 96, 100),  # expanded
        ("float16", "float32", ("float16",) * 3, 1, 77, 10, 30),
        ("float64", "float64", ("float64",) * 3, 1, 300, 64, 80),
    ]:
        a = Ptr(_TL_NAME[acc])
        n_s, n_w, n_b = N * Ds, Dt * Ds, Dt
        nb_s, nb_w = (-(-n // hra._SCALE_BLK) for n in (n_s, n_w))
        cases.append(
            Case(
                f"hra._hra_scale_grads_kernel-{name}",
                "hra",
                "_hra_scale_grads_kernel",
                # GL, DEN, DS, DW, DB, OS, OW, OB, stride_gl, n_s, n_w, n_b, nb_s, nb_w
                [a, a, a, a, a, *(Ptr(_TL_NAME[d]) for d in odts), stride_gl, n_s, n_w, n_b, nb_s, nb_w],
                dict(IS_FP64=acc == "float64", RTNE_S=False, RTNE_W=False, RTNE_B=False, BLK=hra._SCALE_BLK),
                num_warps=hra._SCALE_NUM_WARPS,
                check_spills=True,
            )
        )
    return cases


def _glue_cases() -> list[Case]:
    glue = _op_module("glue")

    cases = []
    # (name, weights dtype | None, out dtype, weights stride_wl (0: one shared row), stride_wu, B sequences,
    #  FINISH: also the loss and the gradient scale from num_work numerator partials)
    for name, wdt, odt, stride_wl, stride_wu, B, finish, num_work in [
        ("float32-layers-finish", "float32", "float32", 4000, 1, 8, True, 70),
        ("float32-shared-finish", "float32", "float32", 0, 1, 3, True, 5),
        ("bfloat16-layers-finish", "bfloat16", "float32", 4000, 1, 8, True, 64),
        ("float64-layers-finish", "float64", "float64", 300, 1, 5, True, 9),
        ("none-finish", None, "float32", 0, 0, 8, True, 70),
        ("float32-layers-den", "float32", "float32", 4000, 1, 8, False, 0),
        ("float32-strided-den", "float32", "float32", 3, 7, 1, False, 0),  # B = 1 folded into a constant
    ]:
        o = Ptr(_TL_NAME[odt])
        w = o if wdt is None else Ptr(_TL_NAME[wdt], stride_wu == 1)
        cases.append(
            Case(
                f"glue._dsa_denominator_kernel-{name}",
                "glue",
                "_dsa_denominator_kernel",
                # W, CU, OUT, PARTIAL, LOSS, SCALE (the last three: OUT as the dummy without FINISH)
                [w, Ptr("i32"), o, o, o, o, B, num_work, stride_wl, stride_wu],
                dict(HAS_WEIGHTS=wdt is not None, FINISH=finish, BU=glue._DSA_BU),
                num_warps=glue._DSA_NUM_WARPS,
                check_spills=True,
            )
        )
    # (name, B, T): BT = min(1024, next_pow2(T)), at least 16
    for name, B, T in [("big", 8, 2048), ("mid", 3, 500), ("tiny", 1, 9)]:
        BT = glue._normalise_bt(T)
        cases.append(
            Case(
                f"glue._normalised_weights_kernel-{name}",
                "glue",
                "_normalised_weights_kernel",
                [Ptr("fp32"), Ptr("i32"), Ptr("fp32"), B, T],
                dict(BT=BT),
                num_warps=glue._NORMALISE_NUM_WARPS,
                check_spills=True,
                notes=dict(blocks=f"BT={BT}"),
            )
        )
    return cases


@triton.jit
def _control_small_dot_kernel(x_ptr, out_ptr, B: tl.constexpr):
    # Negative control: the interpreter runs an 8x8 tl.dot, the NVIDIA compiler rejects it (K >= 16).
    o = tl.arange(0, B)
    b_x = tl.load(x_ptr + o[:, None] * B + o[None, :])  # [B, B]
    tl.store(out_ptr + o[:, None] * B + o[None, :], tl.dot(b_x, b_x))


CONTROL = Case(
    "control-small-dot-8x8", "__control__", "_control_small_dot_kernel", [Ptr("fp16"), Ptr("fp32")], {"B": 8}
)


def all_cases() -> list[Case]:
    return _saliency_cases() + _span_pool_cases() + _structural_cases() + _hra_cases() + _glue_cases()


# ------------------------------------------------------------------------------- PTX / TTIR checks

_PTX_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+([^;{}]*);", re.M)
# instructions a score goes through between its scale (a mul) and the exp2, unchanged in rounding terms
_PASS_THROUGH = {"sub", "add", "selp", "mov", "neg", "max", "min"}
_APPROX_DIV_SQRT = re.compile(r"\b(?:div\.(?:full|approx)|sqrt\.approx|rcp\.approx|rsqrt\.approx)\.")


def score_rounding(ptx: str) -> tuple[int, int, int]:
    """Follow every ``ex2`` operand back through sub/add/selp/mov/neg/max/min to the instruction that
    rounded the score. Returns (ex2 count, ex2 fed by an fp32 ``mul``, ex2 fed by an ``fma``).

    The saliency's passes rely on S2 = (H_j·H_i)·r_j·r_i being rounded by a mul in both passes: an fma
    that merges the scale with the subtraction of the row max skips that rounding in one pass only."""
    instrs = _PTX_INSTR.findall(ptx)
    defs: dict[str, list[tuple[str, list[str]]]] = {}
    for op, operands in instrs:
        regs = [o.strip() for o in operands.split(",")]
        if regs and regs[0].startswith("%"):
            defs.setdefault(regs[0], []).append((op, regs[1:]))
    n = from_mul = from_fma = 0
    for op, operands in instrs:
        if not op.startswith("ex2."):
            continue
        n += 1
        stack, seen, mul, fma = [operands.split(",")[1].strip()], set(), False, False
        while stack:
            reg = stack.pop()
            if reg in seen or not reg.startswith("%"):
                continue
            seen.add(reg)
            for dop, srcs in defs.get(reg, []):
                base = dop.split(".")[0]
                if base == "fma" and dop.endswith(".f32"):
                    fma = True
                elif base == "mul" and dop.endswith(".f32"):
                    mul = True
                elif base in _PASS_THROUGH:
                    stack.extend(srcs[:2] if base == "selp" else srcs)
        from_mul += mul
        from_fma += fma
    return n, from_mul, from_fma


_ADDPTR = re.compile(r"tt\.addptr\s+(%[\w#.]+),\s*(%[\w#.]+)\s*:\s*.+?,\s*(tensor<[^>]*>|i\d+)\s")


def narrow_offsets(ttir: str) -> list[str]:
    """``tt.addptr`` lines whose offset is 32-bit (except scalar constants) and 32-bit products of index
    tensors: with int64 offsets everywhere, no index times a stride can wrap (a D-slowest layout past 2³¹
    elements, say)."""
    constants = set(re.findall(r"(%[\w#.]+) = arith\.constant", ttir))
    bad = []
    for line in ttir.splitlines():
        m = _ADDPTR.search(line)
        if m is None or not (m.group(3) == "i32" or m.group(3).endswith("xi32>")):
            continue
        if m.group(3) == "i32" and m.group(2) in constants:
            continue  # a small compile-time constant (the +1 of a [first, last) pair)
        bad.append(line.strip()[:160])
    # an index tensor times a stride in 32 bits wraps before any widening to the int64 offset
    narrow_product = re.compile(r"arith\.muli .*: tensor<\S*xi32>")
    bad += [line.strip()[:160] for line in ttir.splitlines() if narrow_product.search(line)]
    return bad


def barrier_before_g_reload(ttir: str) -> bool | None:
    """In the structural kernel's column loop: a ``gpu.barrier`` after the Gram tiles' loads and before
    the load of the gradient rows G that the previous column block stored. None when there is no G."""
    lines = ttir.splitlines()
    g_loads = [i for i, line in enumerate(lines) if re.search(r"%b_g\w* = tt\.load", line)]
    if not g_loads:
        return None
    tiles = [i for i, line in enumerate(lines) if re.search(r"%b_x[mn]\w* = tt\.load", line)]
    barriers = [i for i, line in enumerate(lines) if re.search(r"\b(?:gpu|ttg)\.barrier\b", line)]
    return any(max(tiles, default=-1) < b < g_loads[0] for b in barriers)


# ------------------------------------------------------------------------------------ compilation


def specialise(value):
    """``(signature type, divisible by 16)`` of one runtime argument, as the JIT specialises it at launch.
    Returns ``("constexpr", 1)`` for the int 1."""
    if isinstance(value, Ptr):
        return "*" + value.dtype, value.aligned
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return kind, value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialise {value!r}")


def _constexpr_value(v):
    """Constexpr kwargs: ``"tl.float32"`` style strings name triton dtypes; everything else is literal."""
    import triton.language as tl

    if isinstance(v, str) and v.startswith("tl."):
        return getattr(tl, v[3:])
    return v


def _jit_fn(module: str, kernel: str):
    from triton.runtime.jit import JITFunction

    fn = getattr(sys.modules[__name__] if module == "__control__" else _op_module(module), kernel)
    if not isinstance(fn, JITFunction):  # an InterpretedFunction: TRITON_INTERPRET leaked in
        raise RuntimeError(f"{module}.{kernel} is {type(fn).__name__}, not a JITFunction")
    return fn


def compile_case(case: Case, target, ptxas_stats: bool = False) -> dict:
    import triton
    from triton.compiler import ASTSource

    fn = _jit_fn(case.module, case.kernel)
    names = fn.arg_names
    runtime_names = [n for n in names if n not in case.constexprs]
    if len(runtime_names) != len(case.args):  # the kernel's signature changed: update the case
        return dict(
            ok=False,
            seconds=0.0,
            error=f"{case.id}: the test passes {len(case.args)} runtime args, the kernel takes "
            f"{len(runtime_names)}: {runtime_names}",
        )
    signature, constexprs, attrs = {}, {}, {}
    for name, value in zip(runtime_names, case.args):
        kind, spec = specialise(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif spec:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    for name, value in case.constexprs.items():
        signature[name] = "constexpr"
        constexprs[name] = _constexpr_value(value)
    signature = {n: signature[n] for n in names}
    t0 = time.perf_counter()
    try:
        k = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=target,
            options=dict(num_warps=case.num_warps, **case.options),
        )
    except Exception as e:  # noqa: BLE001 - every compiler error is a result to report
        msg = f"{type(e).__name__}: {e}"
        return dict(ok=False, error=msg[-3000:], seconds=time.perf_counter() - t0)
    ptx = k.asm.get("ptx", "")
    ttir = k.asm.get("ttir", "")
    ex2, ex2_from_mul, ex2_from_fma = score_rounding(ptx)
    res = dict(
        ok=True,
        seconds=round(time.perf_counter() - t0, 2),
        cubin_bytes=len(k.asm.get("cubin", b"")),
        ptx_entry=f".entry {case.kernel}" in ptx,
        wgmma="wgmma.mma_async" in ptx,
        mma_sync="mma.sync" in ptx,
        ptx_local=len(re.findall(r"\b(?:ld|st)\.local\b", ptx)),
        shared=k.metadata.shared,
        ttgir_dot=bool(re.search(r"ttng\.warp_group_dot|tt\.dot", k.asm.get("ttgir", ""))),
        ex2=ex2,
        ex2_from_mul=ex2_from_mul,
        ex2_from_fma=ex2_from_fma,
        approx_div_sqrt=len(_APPROX_DIV_SQRT.findall(ptx)),
        i32_offsets=narrow_offsets(ttir),
        barrier_before_g_reload=barrier_before_g_reload(ttir),
        ptx_barriers=len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx)),
    )
    if ptxas_stats or case.check_spills:
        res.update(_ptxas_stats(ptx, target.arch))
    return res


def _ptxas_path(arch: int = 90) -> str:
    """The ptxas that triton itself runs for ``arch`` (3.9 uses the CUDA 13 one, ``ptxas-blackwell``, for
    sm_90 too; 3.6 the CUDA 12 ``ptxas``)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v``, run as triton runs it."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        out = subprocess.run(
            [_ptxas_path(arch), "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return dict(
        regs=int(regs.group(1)) if regs else None,
        spill_stores=int(spill.group(1)) if spill else None,
        spill_loads=int(spill.group(2)) if spill else None,
        stack=int(stack.group(1)) if stack else None,
    )


def run_all(ptxas_stats: bool = False, shard: int = 0, num_shards: int = 1) -> dict:
    """Compile every ``num_shards``-th case from ``shard`` on (in this process: call it without
    TRITON_INTERPRET). Returns ``{id: result}``."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    results = {"__triton__": triton.__version__}
    for case in all_cases()[shard::num_shards]:
        res = compile_case(case, target, ptxas_stats)
        res["notes"] = case.notes
        res["dot_16bit"] = case.dot_16bit
        results[case.id] = res
    if shard == 0:
        results[CONTROL.id] = compile_case(CONTROL, target)
    return results


# ------------------------------------------------------------------------------------------ tests


def _infrastructure_missing() -> str | None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401

        ptxas = _ptxas_path(90)
    except Exception as e:  # noqa: BLE001
        return f"triton AOT compile API unavailable: {type(e).__name__}: {e}"
    if not hasattr(triton, "compile"):
        return "triton.compile missing"
    if not (ptxas and os.access(ptxas, os.X_OK)):
        return f"no executable ptxas for sm_90 ({ptxas!r}): the triton wheel ships none"
    return None


@pytest.fixture(scope="module")
def compiled() -> dict:
    reason = _infrastructure_missing()
    if reason:
        pytest.skip(reason)
    # Shards in parallel processes (compiling is single-threaded CPU work), each with an empty cache.
    num_shards = max(1, min(4, os.cpu_count() or 1))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        # this checkout's package first (an installed copy elsewhere would be compiled instead), then any
        # PYTHONPATH given (PYTHONPATH=<dir> selects another triton: tests for two versions)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = old default
        procs = []
        for shard in range(num_shards):
            out_path = os.path.join(tmp, f"results{shard}.json")
            cmd = [sys.executable, __file__, "--json", out_path, "--shard", f"{shard}/{num_shards}"]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append((proc, out_path))
        for proc, out_path in procs:
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"compile worker failed:\n{out[-3000:]}\n{err[-5000:]}"
            results.update(json.loads(Path(out_path).read_text()))
    return results


CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_compiles_for_sm90(compiled: dict, case: Case) -> None:
    res = compiled[case.id]
    assert res["ok"], (
        f"{case.id} does not compile for sm_90 with triton {compiled['__triton__']}:\n{res['error']}"
    )
    assert res["cubin_bytes"] > 0, f"{case.id}: empty cubin"
    assert res["ptx_entry"], f"{case.id}: no .entry {case.kernel} in the PTX"
    if case.dot_16bit:
        # a bf16/fp16 tl.dot with M >= 64 must land on Hopper's wgmma; 16x16 / 32x32 tiles may use mma.sync
        assert res["wgmma"] or res["mma_sync"], f"{case.id}: 16-bit tl.dot not on the tensor cores"
        if case.constexprs.get("BM", 0) >= 64:
            assert res["wgmma"], f"{case.id}: 64-row 16-bit tl.dot did not become wgmma"
    assert res["shared"] <= 227 * 1024, f"{case.id}: {res['shared']} B shared memory > sm_90's 227 KB"


SCORE_CASES = [c for c in CASES if c.kernel in ("_row_stats_kernel", "_colsum_kernel")]


@pytest.mark.parametrize("case", SCORE_CASES, ids=[c.id for c in SCORE_CASES])
def test_saliency_passes_round_the_score_alike(compiled: dict, case: Case) -> None:
    """No fma merges the score scale with the row-max subtraction: pass 2's S2 − m2 is exactly 0 at the
    row max only if both passes round S2 = (H_j·H_i)·r_j·r_i with the same mul."""
    res = compiled[case.id]
    assert res["ok"], res.get("error")
    assert res["ex2"] > 0 and res["ex2_from_mul"] > 0, f"{case.id}: found no scaled score feeding an exp2"
    assert res["ex2_from_fma"] == 0, (
        f"{case.id}: {res['ex2_from_fma']} of {res['ex2']} exp2 take a score rounded by an fma "
        f"(triton {compiled['__triton__']}): launch with enable_fp_fusion=False"
    )


# The saliency row scale and the HRA cosine (fp32: torch's cosine is correctly rounded).
ROW_SCALE_CASES = [c for c in CASES if c.kernel in ("_row_scale_kernel", "_hra_rows_kernel")]


@pytest.mark.parametrize("case", ROW_SCALE_CASES, ids=[c.id for c in ROW_SCALE_CASES])
def test_row_scale_is_correctly_rounded(compiled: dict, case: Case) -> None:
    """The row scale r = 1 / (std + eps) and the HRA cosine use div.rn / sqrt.rn, not div.full /
    sqrt.approx / rcp.approx."""
    res = compiled[case.id]
    assert res["ok"], res.get("error")
    assert res["approx_div_sqrt"] == 0, f"{case.id}: {res['approx_div_sqrt']} approximate div/sqrt in the PTX"


GRAD_CASES = [c for c in CASES if c.kernel == "_structural_fwd_kernel" and c.constexprs["COMPUTE_GRAD"]]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_structural_g_reload_follows_a_barrier(compiled: dict, case: Case) -> None:
    """G rows stored by one column block are reloaded by the next with another register layout (another
    warp may read what this one wrote): an explicit barrier must order the two."""
    res = compiled[case.id]
    assert res["ok"], res.get("error")
    assert res["barrier_before_g_reload"] is True, f"{case.id}: no barrier between the G store and reload"
    assert res["ptx_barriers"] > 0, f"{case.id}: the barrier did not reach the PTX"


OWN_CASES = [c for c in CASES if c.module in ("saliency", "structural", "hra", "glue")]


@pytest.mark.parametrize("case", OWN_CASES, ids=[c.id for c in OWN_CASES])
def test_offsets_are_int64(compiled: dict, case: Case) -> None:
    """Every pointer offset is int64 (index × stride cannot wrap past 2³¹ elements)."""
    res = compiled[case.id]
    assert res["ok"], res.get("error")
    assert not res["i32_offsets"], f"{case.id}: 32-bit pointer offsets:\n" + "\n".join(res["i32_offsets"])


def test_harness_rejects_what_only_the_interpreter_accepts(compiled: dict) -> None:
    """The compile path is the real one: an 8x8 tl.dot (fine under TRITON_INTERPRET) must fail."""
    res = compiled[CONTROL.id]
    assert not res["ok"], "an 8x8 tl.dot compiled for sm_90: the harness is not running the real compiler"
    assert "K >= 16" in res["error"], f"failed for another reason than the dot shape:\n{res['error']}"


def test_every_kernel_is_covered() -> None:
    """Every @triton.jit kernel of every module of ``mta_kernels/ops/`` (a function with a program id, not
    a helper) has a compile case."""
    import importlib
    import inspect
    import pkgutil

    import mta_kernels.ops

    kernels = set()
    modules = [m.name for m in pkgutil.iter_modules(mta_kernels.ops.__path__)]
    assert {"saliency", "span_pool", "structural", "hra", "glue"} <= set(modules), modules
    for module in modules:
        mod = importlib.import_module(f"mta_kernels.ops.{module}")
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)
            if fn is not None and callable(fn) and "tl.program_id" in inspect.getsource(fn):
                kernels.add(f"{module}.{name}")
    covered = {f"{c.module}.{c.kernel}" for c in CASES}
    assert kernels, "found no kernels: the discovery is broken"
    assert kernels <= covered, f"kernels without a compile case: {sorted(kernels - covered)}"


SPILL_CASES = [c for c in CASES if c.check_spills]


@pytest.mark.parametrize("case", SPILL_CASES, ids=[c.id for c in SPILL_CASES])
def test_no_register_spills(compiled: dict, case: Case) -> None:
    """The glue and HRA row kernels are small and memory-bound: ``ptxas -v`` reports no spill stores or
    loads (a spill would mean a block size chosen too large)."""
    res = compiled[case.id]
    assert res["ok"], res.get("error")
    assert res["spill_stores"] is not None, f"{case.id}: no spill line in the ptxas -v output"
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (
        f"{case.id}: {res['spill_stores']}/{res['spill_loads']} B spill stores/loads, {res['regs']} registers"
    )


def test_specialisation_rule_matches_triton() -> None:
    """``specialise`` agrees with the installed triton's launch-time specialisation."""
    import torch

    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this triton has no native_specialize_impl to compare against")
    base = torch.zeros(64, dtype=torch.bfloat16)
    samples = [
        (1, 1),
        (0, 0),
        (16, 16),
        (17, 17),
        (2**40, 2**40),
        (2.5, 2.5),
        (Ptr("bf16"), base),
        (Ptr("bf16", False), base[1:]),
        (Ptr("fp32"), torch.zeros(8)),
    ]
    for mine, value in samples:
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        ours_kind, ours_spec = specialise(mine)
        assert ours_kind == kind, f"{value!r}: {ours_kind} != triton's {kind}"
        if kind == "constexpr":
            assert ours_spec == spec
        else:
            assert ours_spec == (spec == "D"), f"{value!r}: divisibility {ours_spec} != triton's {spec!r}"


# ---------------------------------------------------------------------------------------- script


def _table(results: dict) -> str:
    rows = [
        "| case | ok | s | shared B | wgmma | mma.sync | PTX ld/st.local | regs | spill st/ld B |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cid, r in results.items():
        if cid.startswith("__"):
            continue
        if not r["ok"]:
            rows.append(f"| {cid} | **FAIL** | {r['seconds']:.1f} | | | | | | |")
            continue
        spill = f"{r.get('spill_stores')}/{r.get('spill_loads')}" if "spill_stores" in r else ""
        rows.append(
            f"| {cid} | ok | {r['seconds']} | {r['shared']} | {'yes' if r['wgmma'] else ''} | "
            f"{'yes' if r['mma_sync'] else ''} | {r['ptx_local']} | {r.get('regs', '')} | {spill} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    args = sys.argv[1:]
    t0 = time.perf_counter()
    shard, num_shards = 0, 1
    if "--shard" in args:
        shard, num_shards = map(int, args[args.index("--shard") + 1].split("/"))
    results = run_all(ptxas_stats="--stats" in args, shard=shard, num_shards=num_shards)
    if "--json" in args:
        Path(args[args.index("--json") + 1]).write_text(json.dumps(results))
    else:
        print(f"triton {results['__triton__']}, {time.perf_counter() - t0:.0f} s")
        print(_table(results))
        for cid, r in results.items():
            if not cid.startswith("__") and not r["ok"]:
                print(f"\n### {cid}\n{r['error']}")
