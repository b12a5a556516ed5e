#!/usr/bin/env python
"""Full-size Flux.1 dev on the CPU (the bench cache's `flux-dev`: random bf16 weights, BFL + separate files): our CLI
in a memory mode, or diffusers' FluxPipeline, each in a child process whose resident set (with its children's) is
sampled with psutil, under a watchdog that kills it above `--cap` or when the machine's available RAM falls under
`--min-free`, so a run that cannot fit ends as a measured failure instead of taking the machine down:

    .venv/bin/python benchmarks/flux_cpu.py ours --memory stream --size 256 --steps 1
    .venv/bin/python benchmarks/flux_cpu.py diffusers --size 256 --steps 1

Prints one JSON line: the command, how it ended (exit code or the watchdog's reason), wall seconds, peak RSS, and
for ours the stage table of `--report-json` (s/step = the sampling stage's seconds per transformer call).

On a GPU (`--device cuda`, the owed checks of `optimized_sd.benchmark.scenarios.OWED_GPU_CHECKS`): ours with `--weights`
or `--memory auto --vram-budget`, diffusers with `--offload group-leaf` (enable_group_offload at leaf level with
streams, its lowest-VRAM configuration with prefetch); the line adds the peak allocated of each stage (ours) or of
the run (diffusers), the measured pinned host-to-device rate and the link bound of a `stream` step: the bytes it
moves (the transformer's weights less the adaLN weights hoisted out of the steps, at the stored width) over that rate."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized_sd.benchmark.caps import tree_rss  # noqa: E402
from optimized_sd.benchmark.model_cache import FLUX_MODEL, ensure_model  # noqa: E402

GB = 2**30
PROMPT = "a photo of a red cube on the table"

# The child for `diffusers`: FluxPipeline from the same four files as diffusers loads single files (each part read
# the transformer through `from_single_file`, T5 through `from_pretrained` in bf16; `--offload`: then
# `enable_sequential_cpu_offload`, its lowest-memory mode); it prints the stage it reached and its RSS then.
DIFFUSERS_CHILD = r"""
import sys, time, torch
from pathlib import Path
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
from safetensors.torch import load_file
transformer_file, t5_file, clip_file, vae_file, clip_tok, t5_tok, size, steps, device, offload = sys.argv[1:11]
dtype = torch.bfloat16
import psutil
def stage(name):
    print(f"stage {name}: RSS so far {psutil.Process().memory_info().rss / 2**30:.1f} GiB", flush=True)
stage("transformer")
import json, tempfile
config = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
              attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
              guidance_embeds=True, axes_dims_rope=[16, 56, 56])
folder = Path(tempfile.mkdtemp()) / "transformer"
folder.mkdir()
(folder / "config.json").write_text(json.dumps(config))
transformer = FluxTransformer2DModel.from_single_file(transformer_file, config=str(folder.parent), subfolder="transformer",
                                                      torch_dtype=dtype)
stage("t5")
t5_folder = folder.parent / "text_encoder_2"  # T5 as diffusers' folders hold it: from_pretrained, bf16, memory-mapped
t5_folder.mkdir()
T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu", vocab_size=32128,
         architectures=["T5EncoderModel"]).save_pretrained(t5_folder)
(t5_folder / "model.safetensors").symlink_to(t5_file)
t5 = T5EncoderModel.from_pretrained(t5_folder, torch_dtype=dtype)
stage("clip")
clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
                                    hidden_act="quick_gelu")).to(dtype)
clip.load_state_dict(load_file(clip_file), strict=False)
stage("vae")
vae = AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).to(dtype)
pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae, clip,
                    CLIPTokenizer.from_pretrained(clip_tok), t5, T5TokenizerFast.from_pretrained(t5_tok), transformer)
if offload == "sequential":
    pipe.enable_sequential_cpu_offload(device=device)
elif offload == "group-leaf":  # diffusers' leaf-level group offload with CUDA streams, on both large parts
    from diffusers.hooks import apply_group_offloading
    for part in (transformer, t5):
        apply_group_offloading(part, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                               offload_type="leaf_level", use_stream=True)
    clip.to(device); vae.to(device)
elif device != "cpu":
    pipe.to(device)
stage("generate")
pipe("a photo of a red cube on the table", height=int(size), width=int(size), num_inference_steps=int(steps),
     guidance_scale=3.5, generator=torch.Generator().manual_seed(0))
if device == "cuda":
    print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", flush=True)
stage("done")
"""
HOISTED = ("time_in.", "vector_in.", "guidance_in.", "_mod.", ".modulation.", "final_layer.adaLN_modulation.")


def streamed_bytes_per_step(checkpoint: Path, fp8: bool) -> int:
    """What `stream` moves per step: every transformer weight but the hoisted adaLN ones (moved once per run), at
    the stored width (1 byte for `--weights fp8` matrices, else the file's 2)."""
    from optimized_sd.weights.loading import open_weight_file

    source = open_weight_file(checkpoint)
    try:
        total = 0
        for key, shape in source.shapes().items():
            if not any(part in key for part in HOISTED):
                count = 1
                for size in shape:
                    count *= size
                total += count * (1 if fp8 and len(shape) == 2 else 2)
        return total
    finally:
        source.close()


def pinned_h2d_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """The measured pinned host-to-device copy rate (GB/s), the best of `repeats`."""
    import torch

    host = torch.empty(megabytes * 2**20, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return host.numel() / best / 1e9


def watch(command: list[str], cap: int, min_free: int, timeout: float) -> dict:
    """Run `command`, sampling its RSS every 50 ms; kill it (and its children) past `cap`, under `min_free`
    available RAM, or after `timeout` seconds."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process = psutil.Process(child.pid)
    peak, killed = 0, None
    with tempfile.TemporaryFile("w+") as log:
        import threading

        reader = threading.Thread(target=lambda: [log.write(line) for line in child.stdout], daemon=True)  # type: ignore[union-attr]
        reader.start()
        while child.poll() is None:
            rss = tree_rss(process)
            peak = max(peak, rss)
            available = psutil.virtual_memory().available
            reason = (
                f"RSS {rss / GB:.1f} GB over the {cap / GB:.0f} GB cap" if rss > cap
                else f"available RAM {available / GB:.1f} GB under {min_free / GB:.0f} GB" if available < min_free
                else f"over {timeout:.0f} s" if time.perf_counter() - start > timeout
                else None
            )  # fmt: skip
            if reason:
                killed = reason
                for member in [*process.children(recursive=True), process]:
                    try:
                        member.kill()
                    except psutil.Error:
                        pass
                child.wait()
                break
            time.sleep(0.05)
        reader.join(timeout=5)
        log.seek(0)
        output = log.read()
    return {
        "exit": child.returncode,
        "killed": killed,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gib": round(peak / GB, 2),
        "output_tail": output[-4000:],
    }


def watched_run(command: list[str], args: argparse.Namespace, report: Path) -> dict:
    """Run `command` under `watch` with the parser's limits; for ours, add the mode, the stage table its
    `--report-json` wrote and the sampling stage's s/step."""
    result = watch(command, int(args.cap * GB), int(args.min_free * GB), args.timeout)
    result.update(runner=args.runner, size=args.size, steps=args.steps)
    if args.runner == "ours":
        result.update(memory=args.memory, precision=args.precision)
        if report.is_file():
            stages = json.loads(report.read_text())["stages"]
            result["stages"] = stages
            sampling = next((stage for stage in stages.values() if stage.get("steps")), None)
            if sampling:
                result["seconds_per_step"] = round(sampling["seconds"] / sampling["steps"], 3)
    return result


def run_parser(description: str, size: int) -> argparse.ArgumentParser:
    """The options every full-size CPU benchmark script takes (this one's and `zimage_cpu.py`'s): which runner, the
    run's size and mode, and the watchdog's limits."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runner", choices=("ours", "diffusers"))
    parser.add_argument("--memory", default="stream", help="our memory mode (default stream)")
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--precision", default="autocast", help="our --precision (default autocast: fp32 on the CPU)")
    parser.add_argument("--cap", type=float, default=20.0, help="kill the run above this many GB of RSS (default 20)")
    parser.add_argument("--min-free", type=float, default=4.0, help="kill it when available RAM falls under this (GB)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = run_parser(__doc__.splitlines()[0], size=256)
    parser.add_argument("--offload", nargs="?", const="sequential", choices=("sequential", "group-leaf"),
                        help="diffusers: enable_sequential_cpu_offload (no value), or leaf-level group offload with streams")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--weights", choices=("fp16", "bf16", "fp8", "int8"), help="ours: --weights")
    parser.add_argument("--vram-budget", help="ours: --vram-budget (with --memory auto)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    model = ensure_model(args.cache_dir, FLUX_MODEL)
    t5_file, clip_file, vae_file = model.parts
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        if args.runner == "ours":
            command = [
                sys.executable, "-m", "optimized_sd.cli", "txt2img", "--ckpt", str(model.checkpoint),
                "--text-encoder", str(clip_file), "--text-encoder", str(t5_file), "--vae", str(vae_file),
                "--tokenizer", str(model.tokenizer), "--tokenizer", str(model.t5_tokenizer), "--device", args.device,
                "--precision", args.precision, "--memory", args.memory, "--H", str(args.size), "--W", str(args.size),
                "--steps", str(args.steps), "--n_samples", "1", "--seed", "0", "--prompt", PROMPT,
                "--outdir", scratch, "--report-json", str(report),
                *(["--weights", args.weights] if args.weights else []), *(["--vram-budget", args.vram_budget] if args.vram_budget else []),
            ]  # fmt: skip
        else:
            command = [sys.executable, "-c", DIFFUSERS_CHILD, str(model.checkpoint), str(t5_file), str(clip_file), str(vae_file),
                       str(model.tokenizer), str(model.t5_tokenizer), str(args.size), str(args.steps), args.device,
                       args.offload or "none"]  # fmt: skip
        result = watched_run(command, args, report)
        if args.device == "cuda":
            rate = pinned_h2d_gbs()
            moved = streamed_bytes_per_step(model.checkpoint, args.weights == "fp8")
            result.update(h2d_gbs=round(rate, 2), stream_bytes_per_step=moved, link_bound_s_per_step=round(moved / rate / 1e9, 3))
    print(json.dumps(result))
    return 0 if result["exit"] == 0 and not result["killed"] else 1


if __name__ == "__main__":
    sys.exit(main())
