#!/usr/bin/env bash
# What the CUDA kernels need measured on a GPU, for a session that has one. Each step fits the device
# tool's 10-minute limit on its own; run them as separate calls:
#
#     OUT=gpu_results bash benchmarks/gpu_session.sh tests     # native Triton tests: reference cases,
#                                                              #   self_check, opcheck, torch.compile, CUDA graphs, autotune
#     OUT=gpu_results bash benchmarks/gpu_session.sh bench     # docs/cuda.md's table: ternary (+ autotuned column)
#     OUT=gpu_results bash benchmarks/gpu_session.sh int8      # the same with int8 weights
#     OUT=gpu_results bash benchmarks/gpu_session.sh sweep     # the autotune candidates at M = 1 and 16, to set
#                                                              #   kernels.choose_config's fixed defaults
#     OUT=gpu_results bash benchmarks/gpu_session.sh all       # all four in one go (may need ~15 minutes)
#
# Logs land in $OUT (default gpu_results/). Runs from the repository root without installing
# (PYTHONPATH=.); the exit status is non-zero if a step failed.
set -uo pipefail
what=${1:-all}
case "$what" in
    tests|bench|int8|sweep|all) ;;
    *) echo "usage: bash benchmarks/gpu_session.sh [tests|bench|int8|sweep|all]" >&2; exit 2 ;;
esac
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
step() {  # step NAME CMD...: run CMD, log to $OUT/NAME.log, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
}
{ nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
    >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
case "$what" in
    tests|all) step tests $PY -m pytest -q -p no:cacheprovider tests/ops/test_triton_kernels.py -rs ;;&
    bench|all) step bench_ternary $PY benchmarks/bench_linear.py --device cuda --autotune ;;&
    int8|all) step bench_int8 $PY benchmarks/bench_linear.py --device cuda --weights int8 ;;&
    sweep|all) step sweep $PY benchmarks/bench_linear.py --device cuda --sweep --m 1 16 ;;
esac
exit $status
