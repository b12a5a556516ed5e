#!/usr/bin/env bash
# The GPU runs, in parts so each fits one device call (at most 10 minutes; a task has 15 minutes of device
# time in all, so run what the issue at hand needs, most important first):
#   checks:    the CUDA test run of the memory engine and the samplers, the per-block timing behind the
#              streaming floor with the small-card model's validation (stream_floor.py --cards), and the
#              upsample convs as phase convs against upsample-then-conv (phase_conv.py)          ~4 min
#   frontier1: the frontier (SD 1.5 512x512, 10 DDIM steps): ours `auto` and every diffusers configuration
#              under hard caps of none, 4GB and 3GB                                               ~6-8 min (estimate)
#   frontier2: the same at 2GB and 1.5GB (merged into the same folder with --update)             ~5-7 min (estimate)
#   frontier3: the same at 1GB, 0.8GB and 0.6GB; configurations that ran out of memory at a
#              larger budget in an earlier part are not run again                                ~3-5 min (estimate)
#   seed:      the seed workload (--n_samples 10 --n_iter 2 --turbo) under a 2.4GB cap against
#              uncapped `full` at batch 10                                                        ~2 min (estimate)
#   bench:     benchmarks/gpu_check.sh (every mode against diffusers, uncapped)                   ~6 min
# A task's 15 minutes hold one machine start and about 13 minutes of runs, so two parts bundle what is
# owed, most important first, each step cut to the time left (LEASE_SECONDS) so the call ends on time:
#   lease1:    SDXL 1024 (issue 12): ours stream, turbo, auto uncapped and under 4GB against diffusers'
#              model, sequential and group offload; SDXL stream with fp8 weights; SD 2.x 768-v stream;
#              SD 1.5 stream with fp16, fp8 and int8 weights; the seed workload              ~8 min
#   wave3:     GGUF dequantisation bandwidth per type on the card (the other third-wave GPU figures need
#              ControlNet and Flux bench scenarios that are not built yet)                       ~1 min (estimate)
#   wave4:     the owed Flux, ControlNet and hires-fix figures (issues 23 and 27), declared as data in
#              optimized_sd/benchmark/scenarios.py (OWED_GPU_CHECKS: each command, its target, its time cap), most
#              important first; WAVE4_TAG=flux runs only the Flux.1 dev ones (their first run writes the 33 GB bench
#              model: give them a lease of their own), WAVE4_TAG=sd the SD ones, WAVE4_TAG=zimage Z-Image (writes its 20 GB model first)              ~8 min per tag (estimate)
#   run(command="WAVE4_TAG=sd LEASE_SECONDS=470 bash benchmarks/device_run.sh wave4", carry=[".whl"], timeout_s=500)
#   lease2:    phase_conv.py at 1024 (seconds); the SD 1.5 frontier at none, 2GB, 1GB and 0.6GB (FRONTIER_BUDGETS) against diffusers, model, group and
#              sequential offload (call at once after lease1: the warm machine keeps the models)  ~5 min
#   run(command="LEASE_SECONDS=470 bash benchmarks/device_run.sh lease1", carry=[".whl"], timeout_s=500)
#   ring:      the bounded pinned ring (issue 26): its CUDA test, then SDXL 1024 `stream` (4 steps) fully pinned
#              against --ram-budget ${RING_RAM_BUDGET:-3GB} (the ring): host RSS per stage (anonymous, file-backed,
#              pinned), s/step ratio, loading (benchmarks/ring_check.py says each goal met or missed)    ~5 min (estimate)
#   run(command="bash benchmarks/device_run.sh ring", carry=[".whl"], timeout_s=420)
# The lease parts write every results folder under /tmp/device-results and pack them as
# $OUT/<part>-results.tgz (what comes back from a call is limited to 8 files).
#   run(command="bash benchmarks/device_run.sh frontier1", carry=[".whl"], timeout_s=540)
# Results land in $OUT/<card>-<date>-frontier/, $OUT/<card>-<date>-seed-workload/ and $OUT/*.txt|log: copy
# them into benchmarks/results/ and commit. With no argument every part runs, one after the other (over
# the limit of one call; for a machine of your own).
# Check the plumbing on the CPU (tiny model): DEVICE_RUN_TINY=1 PYTHON=.venv/bin/python OUT=/tmp/dr bash benchmarks/device_run.sh frontier3
set -u
PART=${1:-all}
case "$PART" in checks|frontier1|frontier2|frontier3|seed|bench|lease1|lease2|wave3|ring|wave4|all) ;;
  *) echo "usage: bash benchmarks/device_run.sh [checks|frontier1|frontier2|frontier3|seed|bench|lease1|lease2|wave3|ring|wave4|all]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/device-run-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
source benchmarks/carried_wheels.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CACHE=/tmp/optimized-sd-cache  # the benchmark model is built once per machine (about a minute)
if [ "${DEVICE_RUN_TINY:-0}" = 1 ]; then  # the plumbing checked on the CPU: tiny models, 64x64, one or two steps
  BENCH=(-m optimized_sd.cli bench --model tiny --device cpu --sizes 64 --steps 1 --timeout 300 --cache-dir /tmp/optimized-sd-tiny-cache --out "$OUT")
  SD15=(--model tiny) SDXL=(--model tiny-sdxl) SD2=(--model tiny-sd2) BIG=64 V768=64 S512=64 LEASE_BENCH=(-m optimized_sd.cli bench --device cpu --steps 2 --timeout 300 --cache-dir /tmp/optimized-sd-tiny-cache)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  BENCH=(-m optimized_sd.cli bench --device cuda --sizes 512 --steps 10 --warmup 1 --timeout 120 --cache-dir "$CACHE" --out "$OUT")
  SD15=(--model sd15) SDXL=(--model sdxl) SD2=(--model sd2) BIG=1024 V768=768 S512=512 LEASE_BENCH=(-m optimized_sd.cli bench --device cuda --warmup 1 --timeout 150 --cache-dir "$CACHE")
fi
wants() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }

if wants checks; then
  echo "== CUDA tests (memory engine with prefetch and copy-ahead, every sampler in every mode, fp16)"
  OPTIMIZED_SD_TEST_DEVICE=cuda timeout -k 5 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_memory.py tests/test_samplers_pipeline.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
  echo "== stream floor and the small-card model, validated on this card"
  timeout -k 5 120 $PY benchmarks/stream_floor.py --repeats 20 --cards 2>&1 | tee "$OUT/stream_floor.txt" | tail -30
  echo "== the upsample convs as phase convs against upsample-then-conv (whether CUDA joins PHASE_CONV_DEVICES)"
  timeout -k 5 60 $PY benchmarks/phase_conv.py --device cuda --size 1024 2>&1 | tee "$OUT/phase_conv.txt"
fi
frontier_part() {  # $1: the part's budgets; later parts merge into the first's folder
  echo "== frontier at $1"
  timeout -k 10 "${FRONTIER_SECONDS:-500}" $PY "${BENCH[@]}" --budget "$1" --peers all --label frontier --update \
    2>&1 | tee -a "$OUT/frontier.log"
  local folder; folder=$(ls -d "$OUT"/*-frontier* 2>/dev/null | head -1)
  if [ -n "$folder" ] && [ ! -f "$folder/results.md" -o "$folder/results.json" -nt "$folder/results.md" ]; then
    $PY -m optimized_sd.cli bench --render "$folder" >/dev/null || echo "warning: could not render $folder"
  fi
  [ -n "$folder" ] && sed -n '/^## Frontier/,/^## optimized-sd against/p' "$folder/results.md" | head -60
}
wants frontier1 && frontier_part "none,4GB,3GB"
wants frontier2 && frontier_part "2GB,1.5GB"
wants frontier3 && frontier_part "1GB,0.8GB,0.6GB"
if wants seed; then
  echo "== seed workload: --n_samples 10 --n_iter 2 --turbo under 2.4GB against uncapped full"
  timeout -k 10 300 $PY "${BENCH[@]}" --seed-workload 2>&1 | tee "$OUT/seed_workload.log" | tail -8
  folder=$(ls -d "$OUT"/*-seed-workload* 2>/dev/null | head -1)
  [ -n "$folder" ] && sed -n '/^## Capped runs/,/^## /p' "$folder/results.md"
fi
if wants bench; then
  echo "== figures"
  OUT="$OUT" bash benchmarks/gpu_check.sh
fi

# --------------------------------------------------------------------------- the lease parts
LEASE_END=$(( $(date +%s) + ${LEASE_SECONDS:-470} ))
RESULTS=/tmp/device-results
within() {  # within SECONDS COMMAND...: run it for at most SECONDS, or less when the lease ends sooner
  local cap=$1 left=$(( LEASE_END - $(date +%s) - 20 )); shift
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 30 ]; then echo "== skipped, $cap s left: $*"; return 0; fi
  timeout -k 5 "$cap" "$@"
}
lease_bench() {  # lease_bench SECONDS FLAGS...: one bench run into $RESULTS, its log appended to the part's
  local cap=$1; shift
  echo "== bench $* ($(( LEASE_END - $(date +%s) )) s of the lease left)"
  within "$cap" $PY "${LEASE_BENCH[@]}" --kinds txt2img --label gpu --update --out "$RESULTS" "$@" 2>&1 | tee -a "$OUT/$PART.log"
}
pack() { mkdir -p "$RESULTS"; tar czf "$OUT/$PART-results.tgz" -C "$RESULTS" . && echo "== packed $(ls "$RESULTS" | wc -l) results folder(s) into $OUT/$PART-results.tgz"; }
if [ "$PART" = lease1 ]; then
  trap pack EXIT
  lease_bench 240 "${SDXL[@]}" --sizes $BIG --steps 4 --modes stream,turbo --budget none,4GB \
    --peers diffusers-model-offload,diffusers-sequential-offload,diffusers-group-offload \
    --only '*-stream,*-turbo,*-auto,*-auto-budget4GB,*-model-offload,*-sequential-offload,*-group-offload'
  lease_bench 60 "${SDXL[@]}" --sizes $BIG --steps 4 --modes stream --peers none --weights fp8
  lease_bench 70 "${SD2[@]}" --sizes $V768 --steps 4 --modes stream,full --peers diffusers
  for weights in fp16 fp8 int8; do lease_bench 40 "${SD15[@]}" --sizes $S512 --steps 10 --modes stream --peers none --weights $weights; done
  echo "== seed workload"
  within 90 $PY "${BENCH[@]}" --seed-workload --out "$RESULTS" 2>&1 | tee -a "$OUT/$PART.log" | tail -8
fi
if [ "$PART" = lease2 ]; then
  trap pack EXIT
  mkdir -p "$RESULTS/phase-conv" && within 40 $PY benchmarks/phase_conv.py --device cuda --size 1024 2>&1 | tee "$RESULTS/phase-conv/phase_conv.txt"
  lease_bench 400 "${SD15[@]}" --sizes $S512 --steps 10 --budget "${FRONTIER_BUDGETS:-none,2GB,1GB,0.6GB}" \
    --peers diffusers,diffusers-model-offload,diffusers-group-offload,diffusers-sequential-offload --label frontier
fi
if wants wave3; then
  echo "== GGUF dequantisation on the GPU (GB/s of fp16 output per type; the goal is >= 80% of the card's bandwidth)"
  timeout -k 5 90 $PY benchmarks/gguf_dequant.py --device cuda --dtype float16 2>&1 | tee "$OUT/gguf_dequant.txt"
fi
if wants ring; then
  echo "== the pinned ring on CUDA: pinned slots, non-blocking copies, slots back by their events (tiny model)"
  timeout -k 5 90 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_ram_budget.py -k "cuda or ring" 2>&1 | tee "$OUT/ring_tests.log" | tail -5
  RING_BENCH=(-m optimized_sd.cli bench "${SDXL[@]}" --device "${RING_DEVICE:-cuda}" --kinds txt2img --sizes $BIG --steps 4 --modes stream
              --peers none --warmup 1 --timeout 200 --cache-dir "$CACHE" --out "$OUT" --label ring)
  [ "${DEVICE_RUN_TINY:-0}" = 1 ] && RING_BENCH=(-m optimized_sd.cli bench "${SDXL[@]}" --device cpu --kinds txt2img --sizes 64 --steps 1
              --modes stream --peers none --timeout 200 --cache-dir /tmp/optimized-sd-tiny-cache --out "$OUT" --label ring)
  echo "== SDXL $BIG stream, fully pinned"
  timeout -k 10 220 $PY "${RING_BENCH[@]}" 2>&1 | tee "$OUT/ring.log" | tail -4
  echo "== SDXL $BIG stream, --ram-budget ${RING_RAM_BUDGET:-3GB}"
  timeout -k 10 220 $PY "${RING_BENCH[@]}" --ram-budget "${RING_RAM_BUDGET:-3GB}" 2>&1 | tee -a "$OUT/ring.log" | tail -4
  pinned=$(ls -d "$OUT"/*-ring-* 2>/dev/null | grep -v -- "-ram" | head -1); ringed=$(ls -d "$OUT"/*-ring-*-ram* 2>/dev/null | head -1)
  [ -n "$pinned" ] && [ -n "$ringed" ] && $PY benchmarks/ring_check.py "$pinned" "$ringed" 2>&1 | tee "$OUT/ring_check.txt"
fi
if [ "$PART" = wave4 ]; then
  trap pack EXIT
  $PY -m optimized_sd.benchmark.scenarios owed "${WAVE4_TAG:-all}" > "$OUT/wave4-checks.txt" || exit 2
  while read -r seconds name argv; do
    echo "== $name ($(( LEASE_END - $(date +%s) )) s of the lease left)" | tee -a "$OUT/wave4.log"
    eval "set -- $argv"  # the argv as scenarios.py quoted it
    within "$seconds" $PY "$@" < /dev/null 2>&1 | tee -a "$OUT/wave4.log" | tail -20
  done < "$OUT/wave4-checks.txt"
fi
