#!/usr/bin/env bash
# One prepared GPU run of the memory modes' targets and the planner calibration, meant for one H100 call of under 6 minutes:
#   - installs the wheels carried in .whl/ (diffusers, accelerate, anything else missing) into /tmp/site;
#   - builds the full-size SD 1.5 benchmark model (random weights, fp16 single file) in /tmp;
#   - measures host-to-device bandwidth (pinned, 1 GiB), then at 512x512 fp16, 10 DDIM steps:
#     ours txt2img in full, turbo, split and stream (auto under budgets: the frontier, benchmarks/device_run.sh);
#     ours img2img in stream;
#     the diffusers peers (no offload, model offload, sequential offload, attention slicing, group
#     offload with streams) on txt2img, and diffusers img2img without offload;
#   - writes results.md (tables, GPU memory and speed targets, streaming bound, planner calibration) and
#     results.json under $OUT/<device>-<date>-gpu/, and the log as $OUT/gpu_check.log.
# Each scenario is its own process with a time limit; a stopped run keeps the scenarios it finished.
#
# Lead:   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
# Check here on the CPU (tiny model, 64x64):
#         GPU_CHECK_TINY=1 PYTHON=.venv/bin/python OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check-out}
TINY=${GPU_CHECK_TINY:-0}
TOTAL_S=${GPU_CHECK_SECONDS:-330}   # the whole bench; the rest of the 6 minutes is install, build and printing
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
started=$(date +%s)
echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $PWD (tiny=$TINY)"

source benchmarks/carried_wheels.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== preflight"
$PY - <<'EOF' || { echo "preflight failed: see above"; exit 1; }
import importlib, sys
missing = []
for name in ("torch", "transformers", "safetensors", "PIL", "numpy", "psutil", "click", "tqdm", "diffusers", "accelerate", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(f"  {name:<13} {getattr(module, '__version__', '?')}")
    except Exception as error:  # noqa: BLE001
        print(f"  {name:<13} MISSING ({type(error).__name__}: {str(error)[:120]})")
        missing.append(name)
import torch
print(f"  cuda available: {torch.cuda.is_available()}" + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
essential = {"torch", "transformers", "safetensors", "PIL", "numpy", "psutil", "click", "tqdm"} & set(missing)
if essential:
    print(f"cannot run without: {', '.join(sorted(essential))} (carry their wheels in .whl/)")
    sys.exit(1)
for name, effect in (("diffusers", "no peers: ours alone"), ("accelerate", "no model/sequential offload peers"), ("matplotlib", "no chart (render it later with `optimized-sd bench --render DIR`)")):
    if name in missing:
        print(f"note: {name} missing: {effect}")
EOF

if [ "$TINY" = "1" ]; then
  ARGS=(--model tiny --device cpu --sizes 64 --steps 2 --timeout 120 --cache-dir /tmp/optimized-sd-gpu-check-cache)
else
  ARGS=(--device cuda --sizes 512 --steps 10 --timeout 100 --cache-dir /tmp/optimized-sd-cache)
fi
echo "== bench"
timeout -k 10 "$TOTAL_S" $PY -m optimized_sd.cli bench "${ARGS[@]}" \
  --kinds txt2img,img2img --modes full,turbo,split,stream --peers all --warmup 1 \
  --only 'txt2img-*,img2img-*-stream,img2img-*-diffusers' \
  --out "$OUT" --label gpu
status=$?
[ $status -eq 124 ] && echo "warning: the bench hit the ${TOTAL_S} s limit; keeping the scenarios that finished"

folder=$(ls -dt "$OUT"/*/ 2>/dev/null | head -1); folder=${folder%/}
if [ -n "$folder" ] && [ -f "$folder/results.json" ]; then
  if [ $status -ne 0 ] || [ ! -f "$folder/results.md" ]; then
    $PY -m optimized_sd.cli bench --render "$folder" || echo "warning: could not render $folder"
  fi
  echo "== $folder/results.md"
  # Everything but the long per-stage table (it is in the file).
  sed '/^## Per stage/,/^## Chart/{/^## Chart/!d}' "$folder/results.md"
else
  echo "no results were written"
fi
echo "== done in $(( $(date +%s) - started )) s (bench status $status)"
exit $status
