#!/usr/bin/env bash
# The whole GPU check in one call: the CUDA test run of the memory engine and the samplers
# (prefetch on a side stream, fp16, every mode), the per-block timing behind the streaming floor
# (benchmarks/stream_floor.py), then benchmarks/gpu_check.sh (figures).
#   run(command="bash benchmarks/device_run.sh", carry=[".whl"], timeout_s=540)
set -u
OUT=${OUT:-/tmp/device-run-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || echo "warning: wheel install failed"
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== CUDA tests (memory engine with prefetch, every sampler in every mode, fp16)"
OPTIMIZED_SD_TEST_DEVICE=cuda timeout -k 5 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_memory.py tests/test_samplers_pipeline.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
echo "== stream floor (per-block compute and copy times, one-block lookahead)"
timeout -k 5 90 $PY benchmarks/stream_floor.py 2>&1 | tee "$OUT/stream_floor.txt" | tail -5
echo "== figures"
OUT="$OUT" bash benchmarks/gpu_check.sh
