#!/usr/bin/env bash
# The GPU check, whole or in two parts so each fits one device call:
#   checks: the CUDA test run of the memory engine and the samplers (prefetch and copy-ahead on a side
#           stream, fp16, every mode) and the per-block timing behind the streaming floor
#           (benchmarks/stream_floor.py);                      about 4 minutes
#   bench:  benchmarks/gpu_check.sh (figures against diffusers); about 6 minutes
#   run(command="bash benchmarks/device_run.sh checks", carry=[".whl"], timeout_s=300)
#   run(command="bash benchmarks/device_run.sh bench", carry=[".whl"], timeout_s=420)
# With no argument both run, one after the other (over the 10-minute limit of one call on a cold machine).
set -u
PART=${1:-all}
case "$PART" in checks|bench|all) ;; *) echo "usage: bash benchmarks/device_run.sh [checks|bench|all]" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/device-run-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
source benchmarks/carried_wheels.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$PART" != bench ]; then
  echo "== CUDA tests (memory engine with prefetch and copy-ahead, every sampler in every mode, fp16)"
  OPTIMIZED_SD_TEST_DEVICE=cuda timeout -k 5 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_memory.py tests/test_samplers_pipeline.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
  echo "== stream floor (per-block compute and copy times; one block ahead and wider windows)"
  timeout -k 5 90 $PY benchmarks/stream_floor.py --repeats 20 2>&1 | tee "$OUT/stream_floor.txt" | tail -12
fi
if [ "$PART" != checks ]; then
  echo "== figures"
  OUT="$OUT" bash benchmarks/gpu_check.sh
fi
