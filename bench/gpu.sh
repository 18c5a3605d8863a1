#!/usr/bin/env bash
# One prepared run for a lent GPU (H200): model training chars/s, explicit cell vs cuDNN with bf16
# autocast, and carried-state generation chars/s by batch size. Needs only torch (no Ray); fits in
# about 3 minutes. Output also goes to $OUT/gpu.txt when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 bench/gpu_bench.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu.txt"
