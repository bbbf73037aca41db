#!/usr/bin/env bash
# One call on an offline GPU machine, from the repository root:
#     bash benchmarks/gpu_check.sh          # run every stage (make gpu-check)
#     bash benchmarks/gpu_check.sh --cpu    # dry run: print the stage plan and its time boxes, run nothing
#
# Stages, most important first; each runs under its own `timeout` (its box, then SIGKILL 1 s later), a
# failing or hanging stage is recorded and the next one starts (a failure list, not a stop):
#     results          name the results folder benchmarks/results/<device>-<date>/
#     install          pip install --no-deps --no-build-isolation -e . (builds the extension with nvcc)
#     device           nvidia-smi and versions
#     kernels          the CUDA-relevant test files only (saliency, span_pool, structural, outliers,
#                      losses, layout), TRITON_INTERPRET unset, no -x: the kernel verdict, failures listed
#                      in failures.txt
#     ceilings         D2D copy bandwidth and a bf16 matmul (the floors' rates)
#     target           full MTA loss fwd+bwd at the target shape, without torch.compile
#     target-autocast  the same under bf16 autocast (as a bf16 training step runs the loss)
#     saliency         the saliency case: T=4096, D=2048, B=8, six stacked layers (peak memory)
#     step             one distillation step, eager vs fused loss: share of the step spent in MTA
#     sweep:*          saliency, structural, span_pool and the full loss over the sweep shapes
#     compile          the torch.compile providers of the target shape (minutes of compilation: last)
#     summary          summary.md and plots
# The boxes add up to less than 9 minutes including the kill grace and the packing after each stage, so
# the script ends in time even if every stage hangs (the device tool allows 10 minutes per call).
# Results land in benchmarks/results/<device>-<date>/ with gpu_check.log (appended line by line, so it
# survives a timeout) and failures.txt; when $OUT is set, the folder is packed into
# $OUT/results-<device>-<date>.tar.gz after every stage, next to $OUT/gpu_check.log and $OUT/summary.md.
set -u -o pipefail
cd "$(dirname "$0")/.."

MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
PYTHON=${PYTHON:-python3}
KILL_GRACE=1    # seconds between timeout's TERM and KILL
EXPORT_BOX=2    # seconds allowed to pack the results after each stage
LIMIT=540       # the whole script, worst case (9 minutes)
B=benchmarks
KERNEL_TESTS="tests/test_saliency.py tests/test_span_pool.py tests/test_structural.py tests/test_outliers.py tests/test_losses.py tests/test_fused_hra.py tests/test_host_syncs.py tests/test_layout.py"
TARGET_PROVIDERS=eager_stacked,eager,mta_kernels

# name|box seconds|command (run with bash -c; $RES is the results folder, $PYTHON the interpreter)
PLAN=(
    "results|10|true"
    "install|130|MAX_JOBS=\${MAX_JOBS:-16} \$PYTHON -m pip install --no-deps --no-build-isolation -e . >\$RES/pip_install.log 2>&1; rc=\$?; tail -5 \$RES/pip_install.log; exit \$rc"
    "device|5|nvidia-smi; \$PYTHON -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
    "kernels|110|env -u TRITON_INTERPRET \$PYTHON -m pytest $KERNEL_TESTS -q -rf -p no:cacheprovider 2>&1 | tee \$RES/pytest_kernels.log; rc=\$?; grep -E '^(FAILED|ERROR)' \$RES/pytest_kernels.log >>\$RES/failures.txt; exit \$rc"
    "ceilings|10|\$PYTHON $B/harness.py --ceilings --device cuda"
    "target|40|\$PYTHON $B/bench_mta_loss.py --case target --providers $TARGET_PROVIDERS --device cuda"
    "target-autocast|30|\$PYTHON $B/bench_mta_loss.py --case target --autocast bf16 --tag autocast --providers $TARGET_PROVIDERS --device cuda"
    "saliency|30|\$PYTHON $B/bench_saliency.py --case issue --device cuda"
    "step|30|\$PYTHON $B/bench_step.py --device cuda"
    "fsdp|27|\$PYTHON -m accelerate.commands.launch --use_fsdp --num_processes 1 --fsdp_sharding_strategy FULL_SHARD $B/fsdp_check.py --out \$RES/fsdp_check"
    "sweep:saliency|10|\$PYTHON $B/bench_saliency.py --case sweep --max-seconds 6 --device cuda"
    "sweep:structural|10|\$PYTHON $B/bench_structural.py --max-seconds 6 --device cuda"
    "sweep:span_pool|10|\$PYTHON $B/bench_span_pool.py --max-seconds 6 --device cuda"
    "sweep:mta_loss|10|\$PYTHON $B/bench_mta_loss.py --case sweep --providers $TARGET_PROVIDERS --max-seconds 6 --device cuda"
    "compile|20|\$PYTHON $B/bench_mta_loss.py --case target --providers compile --tag compile --device cuda"
    "summary|10|\$PYTHON $B/summarize.py \$RES --plots --write \$RES/summary.md --brief"
)

worst_case() {  # every stage runs to its box, is killed after the grace, then packed
    local total=0 entry rest box
    for entry in "${PLAN[@]}"; do
        rest=${entry#*|}
        box=${rest%%|*}
        total=$((total + box + KILL_GRACE + EXPORT_BOX))
    done
    echo "$total"
}

if [ "$MODE" = cpu ]; then
    echo "gpu_check plan (dry run, nothing is executed)"
    printf '%-3s %-16s %5s  %s\n' "#" stage box command
    i=0
    for entry in "${PLAN[@]}"; do
        i=$((i + 1))
        name=${entry%%|*}
        rest=${entry#*|}
        printf '%-3s %-16s %4ss  %s\n' "$i" "$name" "${rest%%|*}" "${rest#*|}"
    done
    total=$(worst_case)
    echo "worst case: ${total} s (boxes + ${KILL_GRACE} s kill grace + ${EXPORT_BOX} s packing per stage), limit ${LIMIT} s"
    missing=0
    for f in $B/harness.py $B/bench_mta_loss.py $B/bench_saliency.py $B/bench_step.py $B/bench_structural.py $B/fsdp_check.py \
        $B/bench_span_pool.py $B/summarize.py $KERNEL_TESTS; do
        [ -f "$f" ] || { echo "missing: $f"; missing=1; }
    done
    [ "$total" -le "$LIMIT" ] && [ "$missing" -eq 0 ]
    exit $?
fi

T0=$SECONDS
unset TRITON_INTERPRET
RES=${MTA_BENCH_RESULTS:-$(timeout -k "$KILL_GRACE" 10 "$PYTHON" -c '
import sys
sys.path.insert(0, "benchmarks")
import harness
print(harness.results_dir(harness.pick_device("cuda")))
' 2>/dev/null)}
[ -n "$RES" ] || RES="benchmarks/results/unknown-$(date -u +%Y-%m-%d)"
mkdir -p "$RES"
export RES PYTHON MTA_BENCH_RESULTS="$RES"
LOG="$RES/gpu_check.log"
NAME=$(basename "$RES")
: >"$LOG"
: >"$RES/failures.txt"
STAGES=()
FAILED=()

say() { echo "$@" | tee -a "$LOG"; }

export_out() {  # pack the results into $OUT (at most 8 files come back: tarball, log, summary)
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    timeout -k 1 "$EXPORT_BOX" tar -czf "$OUT/results-$NAME.tar.gz.tmp" -C "$(dirname "$RES")" "$NAME" 2>/dev/null &&
        mv "$OUT/results-$NAME.tar.gz.tmp" "$OUT/results-$NAME.tar.gz"
    cp "$LOG" "$OUT/gpu_check.log" 2>/dev/null
    [ -f "$RES/summary.md" ] && cp "$RES/summary.md" "$OUT/summary.md"
    return 0
}

say "gpu_check python=$PYTHON results=$RES worst case $(worst_case) s out=${OUT:-<unset>}"
for entry in "${PLAN[@]}"; do
    name=${entry%%|*}
    rest=${entry#*|}
    box=${rest%%|*}
    cmd=${rest#*|}
    [ "$name" = results ] && continue  # done above, under its own box
    say "=== [$name] $(date -u +%H:%M:%S) box ${box}s: $cmd"
    t=$SECONDS
    timeout -k "$KILL_GRACE" "$box" bash -c "set -o pipefail; $cmd" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; elif [ "$rc" -ne 0 ]; then status="FAILED($rc)"; fi
    [ "$status" = ok ] || { FAILED+=("$name $status"); echo "stage $name $status" >>"$RES/failures.txt"; }
    say "=== [$name] $status in $((SECONDS - t))s"
    STAGES+=("$(printf '%-16s %-10s %4s s of %4s s' "$name" "$status" $((SECONDS - t)) "$box")")
    export_out
done

echo
say "=== gpu_check: $((SECONDS - T0)) s; results in $RES${OUT:+, packed in $OUT}"
for line in "${STAGES[@]}"; do say "    $line"; done
if [ "${#FAILED[@]}" -gt 0 ]; then
    say "=== failures (${#FAILED[@]} stages; failing tests in $RES/failures.txt):"
    for line in "${FAILED[@]}"; do say "    $line"; done
fi
export_out
[ "${#FAILED[@]}" -eq 0 ]
