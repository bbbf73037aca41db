#!/usr/bin/env bash
# One call on an offline GPU machine, from the repository root:
#     bash benchmarks/gpu_check.sh
# builds the package, runs the CUDA test suite, measures the device ceilings and runs every GPU benchmark,
# in this order (most important first):
#     1 install   pip install --no-deps --no-build-isolation -e .          (log: pip_install.log)
#     2 device    nvidia-smi, versions
#     3 tests     python -m pytest tests -x -q, TRITON_INTERPRET unset      (log: pytest_tests.log)
#     4 ceilings  D2D copy bandwidth and bf16 8192^3 matmul, once for the whole run
#     5 target    full MTA loss fwd+bwd, GPT-2-XL -> GPT-2, B=16, T=512, 3 pairs, all providers
#     6 sweep     saliency, structural, span_pool, full loss over the chosen shapes
#     7 saliency  the saliency issue's case: T=4096, D=2048, B=8, six stacked layers (peak memory)
#     8 step      one distillation step, eager vs fused loss: share of the step spent in MTA
#     9 summary   summary.md + plots
# Every result lands in benchmarks/results/<device>-<date>/ and, when $OUT is set, is packed into
# $OUT/results-<device>-<date>.tar.gz (refreshed after every stage, so a killed call still returns what
# finished) next to $OUT/gpu_check.log and $OUT/summary.md. Each stage is time-boxed with `timeout`
# from a total budget (MTA_GPU_CHECK_BUDGET, default 560 s: the device tool allows 600 s per call);
# a failing stage does not stop the next one; a table of the stages is printed last.
#
#     bash benchmarks/gpu_check.sh --cpu   # dry run on a CPU box: no install, tests only collected,
#                                          # every benchmark in --quick CPU mode (torch.compile left out)
set -u -o pipefail
cd "$(dirname "$0")/.."

MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
if [ -z "${PYTHON:-}" ]; then
    if [ "$MODE" = cpu ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BUDGET=${MTA_GPU_CHECK_BUDGET:-$([ "$MODE" = cpu ] && echo 1500 || echo 560)}
T0=$SECONDS
unset TRITON_INTERPRET

if [ "$MODE" = cpu ]; then
    DEV_ARGS=(--device cpu --quick --providers eager_stacked,eager,mta_kernels,no_mta)
    export MTA_BENCH_THREADS=${MTA_BENCH_THREADS:-1}
else
    DEV_ARGS=(--device cuda)
fi

# benchmarks/results/<device slug>-<UTC date>, or $MTA_BENCH_RESULTS when set.
RES=${MTA_BENCH_RESULTS:-$("$PYTHON" -c '
import sys
sys.path.insert(0, "benchmarks")
import harness
print(harness.results_dir(harness.pick_device("cpu" if sys.argv[1] == "cpu" else "cuda")))
' "$MODE")}
if [ -z "$RES" ]; then
    echo "gpu_check: could not name the results folder from the device (no GPU visible to torch?)" >&2
    RES="benchmarks/results/unknown-$(date -u +%Y-%m-%d)"
fi
mkdir -p "$RES"
export MTA_BENCH_RESULTS="$RES"
LOG="$RES/gpu_check.log"
NAME=$(basename "$RES")
: >"$LOG"
STAGES=()

say() { echo "$@" | tee -a "$LOG"; }

export_out() {  # pack the results folder into $OUT (at most 8 files come back: tarball, log, summary)
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    tar -czf "$OUT/results-$NAME.tar.gz.tmp" -C "$(dirname "$RES")" "$NAME" 2>/dev/null &&
        mv "$OUT/results-$NAME.tar.gz.tmp" "$OUT/results-$NAME.tar.gz"
    cp "$LOG" "$OUT/gpu_check.log" 2>/dev/null
    [ -f "$RES/summary.md" ] && cp "$RES/summary.md" "$OUT/summary.md"
    return 0
}

# stage NAME CAP_S RESERVE_S CMD...: run CMD with timeout min(CAP, budget left - RESERVE), output to the log.
stage() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left=$((BUDGET - (SECONDS - T0) - reserve))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        say "=== [$name] SKIPPED: no time left (budget ${BUDGET}s, reserve ${reserve}s)"
        STAGES+=("$(printf '%-16s %-10s %5s s' "$name" skipped 0)")
        return 0
    fi
    say "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*"
    local t=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; elif [ "$rc" -ne 0 ]; then status="FAILED($rc)"; fi
    say "=== [$name] $status in $((SECONDS - t))s"
    STAGES+=("$(printf '%-16s %-10s %5s s' "$name" "$status" $((SECONDS - t)))")
    export_out
}

say "gpu_check mode=$MODE python=$PYTHON results=$RES budget=${BUDGET}s out=${OUT:-<unset>}"

# Each stage's limit is min(its cap, budget left - a reserve that keeps the minimum of the later stages:
# target 120 s, sweep 40, saliency 40, step 60, summary 10). Estimates for an H100 are in
# docs/design/benchmarks.md ("Time budget").

# 1-2: build and device ------------------------------------------------------------------------------
if [ "$MODE" = gpu ]; then
    stage install 240 280 bash -c "MAX_JOBS=\${MAX_JOBS:-16} '$PYTHON' -m pip install --no-deps --no-build-isolation -e . >'$RES/pip_install.log' 2>&1; rc=\$?; tail -5 '$RES/pip_install.log'; exit \$rc"
    stage device 20 280 bash -c "nvidia-smi; '$PYTHON' -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
else
    say "=== [install] dry run: would run $PYTHON -m pip install --no-deps --no-build-isolation -e ."
    stage device 30 0 "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda available:', torch.cuda.is_available())"
fi

# 3: the CUDA test suite (spaCy-dependent tests skip themselves) ----------------------------------------
if [ "$MODE" = gpu ]; then
    stage tests 150 280 bash -c "set -o pipefail; env -u TRITON_INTERPRET '$PYTHON' -m pytest tests -x -q 2>&1 | tee '$RES/pytest_tests.log'"
else
    stage tests 120 0 bash -c "'$PYTHON' -m pytest tests --collect-only -q 2>&1 | tail -3 | tee '$RES/pytest_tests.log'"
fi

# 4-8: benchmarks ------------------------------------------------------------------------------------------
B=benchmarks
stage ceilings 40 270 "$PYTHON" $B/harness.py --ceilings --device "${DEV_ARGS[1]}" $([ "$MODE" = cpu ] && echo --quick)
stage target 150 150 "$PYTHON" $B/bench_mta_loss.py --case target "${DEV_ARGS[@]}"
# The same target under bf16 autocast (as a bf16 training step runs the loss): the fp32 HRA projector is
# predicted to dominate the run above; compile is left out here for time.
stage target-autocast 60 150 "$PYTHON" $B/bench_mta_loss.py --case target --autocast bf16 --tag autocast \
    --providers eager_stacked,eager,mta_kernels "${DEV_ARGS[@]}"

# The sweep gets what is left after reserving the saliency case, the step and the summary (130 s), split
# saliency 20%, structural 25%, span_pool 20%, full loss 35%; each script stops starting new
# measurements 15 s before its share ends (process start-up, the last measurement's overrun).
left=$((BUDGET - (SECONDS - T0) - 130))
[ "$left" -lt 0 ] && left=0
for spec in saliency:20 structural:25 span_pool:20 mta_loss:35; do
    s=${spec%%:*}
    share=$((left * ${spec##*:} / 100))
    extra=()
    if [ "$s" = saliency ] || [ "$s" = mta_loss ]; then extra=(--case sweep); fi
    stage "sweep:$s" "$share" 130 "$PYTHON" $B/bench_$s.py ${extra[@]+"${extra[@]}"} --max-seconds $((share > 25 ? share - 15 : 10)) "${DEV_ARGS[@]}"
done
stage saliency 70 80 "$PYTHON" $B/bench_saliency.py --case issue "${DEV_ARGS[@]}"
stage step 120 10 "$PYTHON" $B/bench_step.py "${DEV_ARGS[@]}"

# 9: summary --------------------------------------------------------------------------------------------
stage summary 30 0 "$PYTHON" $B/summarize.py "$RES" --plots --write "$RES/summary.md" --brief
export_out

echo
say "=== gpu_check: $((SECONDS - T0)) s of ${BUDGET} s; results in $RES${OUT:+, packed in $OUT}"
for line in "${STAGES[@]}"; do say "    $line"; done
