#!/usr/bin/env bash
# Everything the CUDA kernels need measured on a GPU, in one command, for a session that has one:
#
#     OUT=gpu_results bash benchmarks/gpu_session.sh          # logs land in $OUT (default gpu_results/)
#
# 1. the Triton tests natively (every reference case, opcheck, torch.compile, CUDA graphs, autotune),
# 2. the benchmark of docs/cuda.md: ternary with an autotuned column, int8 weights,
# 3. a sweep of tile configs at M = 1 and 16, to set kernels.choose_config's fixed defaults.
# Runs from the repository root without installing (PYTHONPATH=.); each step's exit status is kept.
set -uo pipefail
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
step tests $PY -m pytest -q -p no:cacheprovider tests/ops/test_triton_kernels.py -rs
step bench_ternary $PY benchmarks/bench_linear.py --device cuda --autotune
step bench_int8 $PY benchmarks/bench_linear.py --device cuda --weights int8
step sweep $PY benchmarks/bench_linear.py --device cuda --sweep --m 1 16
exit $status
