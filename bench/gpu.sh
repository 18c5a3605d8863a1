#!/usr/bin/env bash
# One prepared run for a lent GPU (H200): model training chars/s, explicit cell vs cuDNN with bf16
# autocast, and carried-state generation chars/s by batch size (needs only torch); then, where Ray
# is installed, the job's step-time breakdown on one GPU worker against a plain loop
# (bench/step_time.py). Fits in about 6 minutes. Output also goes to $OUT/gpu.txt and
# $OUT/step_time.txt when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu.txt"
if python3 -c "import ray.train" 2>/dev/null; then
  PYTHONUNBUFFERED=1 python3 bench/step_time.py --gpu --workers 1 --steps 1500 2>&1 | tee "${OUT:-/tmp}/step_time.txt"
fi
