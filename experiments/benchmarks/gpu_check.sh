#!/usr/bin/env bash
# The one prepared GPU check (fits in ~8 minutes on an H200): every Pallas kernel compiled (not
# interpreted) against its pure-jnp reference, then throughput tables against XLA, cuDNN and
# the measured matmul / copy ceilings, then block-size sweeps of each kernel (at most 5 + 3
# minutes; the exit status is the correctness check's). Needs only jax (no grain). Tables go to
# stdout and, when $OUT is set (the device tool), to $OUT/kernel_bench.md.
# DeepSeek Sparse Attention and its indexer run at T = 8k and 32k only (V3.2 and V4-Flash
# shapes; their tables come before dense attention's, which a time limit cuts first; not yet
# timed on a GPU, about 2 minutes estimated). 128k does not fit the 5 minutes; by hand (what
# would not fit in memory prints "-"):
#   python experiments/benchmarks/kernel_bench.py --skip=correctness,decode,gmm,attention \
#     --sparse_shapes=1x131072 --indexer_shapes=1x131072
#   bash experiments/benchmarks/gpu_check.sh            # on the GPU machine
#   bash experiments/benchmarks/gpu_check.sh --smoke    # CPU, interpret mode, tiny shapes
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-$(mktemp -d)}"
PY=${PYTHON:-python3}
date -u +"%Y-%m-%d %H:%M UTC" | tee "$out/kernel_bench.md"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/kernel_bench.md"
fi
if [[ " $* " != *" --smoke "* ]]; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
else
  export JAX_PLATFORMS=cpu
fi
timeout "${BENCH_TIMEOUT:-300}" "$PY" experiments/benchmarks/kernel_bench.py "$@" 2>&1 | tee -a "$out/kernel_bench.md"
status=${PIPESTATUS[0]}
# Block-size sweeps, the data for tuning the GPU defaults: own time limit, never the verdict.
timeout "${SWEEP_TIMEOUT:-180}" "$PY" experiments/benchmarks/kernel_bench.py --only_sweep "$@" 2>&1 \
  | tee -a "$out/kernel_bench.md"
exit "$status"
