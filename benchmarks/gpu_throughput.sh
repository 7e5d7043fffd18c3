#!/usr/bin/env bash
# Training throughput of the dmas-1.7b preset on one NVIDIA GPU, eager and compiled: tokens/s, MFU, peak memory.
# Runs the project from this source tree (nothing installed; needs torch >= 2.11 with CUDA) in under 5 minutes.
#
#   benchmarks/gpu_throughput.sh                      # defaults: eager,compile; micro-batch 16,12,8,... the first that fits
#   benchmarks/gpu_throughput.sh --modes compile --micro-batches 8 --steps 5
#   PYTHON=.venv/bin/python benchmarks/gpu_throughput.sh --peak-flops 989e12
#
# Options are those of benchmarks/gpu_throughput.py (--help). LIMIT (seconds, default 290) bounds the whole run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# Fewer fragmentation failures near the memory limit; an explicit setting wins.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
PYTHON="${PYTHON:-python3}"
echo "$("$PYTHON" --version 2>&1), PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF, limit ${LIMIT:-290} s"
exec timeout "${LIMIT:-290}" "$PYTHON" benchmarks/gpu_throughput.py "$@"
