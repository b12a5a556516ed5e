#!/usr/bin/env python
"""What one ControlNet costs in `stream` on the CPU (issue 27): peak RSS and s/step of the full-size SD 1.5
CLI run with and without a full-size SD 1.5 ControlNet, side by side.

Each run is its own `python -m optimized_sd.cli txt2img` subprocess (so one run's allocator and page cache
state cannot flatter the next), the two configurations alternate for `--rounds` rounds, peak RSS is sampled
with psutil over the process and its children, and s/step is the UNet stage's seconds / steps from
`--report-json` (the ControlNet's own stage is shown beside it). The best round of each counts: the
machine is shared, the least disturbed run is the fairest. Targets: RSS ratio <= 1.15, s/step ratio <= 1.5.

    python benchmarks/controlnet_cost.py [--rounds 2] [--steps 2] [--size 512]

On a GPU (`--device cuda`, the owed checks of `optimized_sd.benchmark.scenarios.OWED_GPU_CHECKS`) each line adds the
peak allocated of each stage; `--model sdxl` runs SDXL with an SDXL ControlNet, and `--configs` picks the
configurations: `plain`, `controlnet`, and `hires` (AUTOMATIC1111's hires fix at `--hr-scale`, planned for
`--vram-budget` under `--memory auto`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]  # the CLI subprocesses import this checkout's optimized_sd
sys.path.insert(0, str(REPO))

from optimized_sd.benchmark.caps import tree_rss  # noqa: E402
from optimized_sd.benchmark.model_cache import CachedModel, ensure_model  # noqa: E402

RSS_TARGET, STEP_TARGET = 1.15, 1.5
ZERO_CONV_SCALE = 0.02


def ensure_controlnet(model: CachedModel, seed: int = 0) -> Path:
    """A full-size random-weight ControlNet of the base model's family (built from its UNet's config) in diffusers'
    folder layout, built once beside the base model; its zero convs are made non-zero so the residuals it adds are
    real work, not zeros."""
    folder = model.checkpoint.parent.parent / f"controlnet-{model.checkpoint.parent.name.split('-seed')[0]}-seed{seed}"
    if (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file():
        return folder
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet_config = json.loads((model.checkpoint.parent / "diffusers-config" / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
    controlnet = ControlNetModel.from_unet(unet)
    del unet
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            for parameter in conv.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * ZERO_CONV_SCALE)
    partial = folder.with_name(folder.name + ".partial")
    controlnet.half().save_pretrained(partial, safe_serialization=True)
    partial.rename(folder)
    return folder


def write_hint(path: Path, size: int) -> None:
    """A synthetic edge map: white rectangles, circles and lines on black, like a canny hint."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for index in range(8):
        offset = index * size // 10
        draw.rectangle((offset, offset // 2, offset + size // 5, offset // 2 + size // 4), outline="white", width=2)
        draw.ellipse((size - offset - size // 6, offset, size - offset, offset + size // 6), outline="white", width=2)
        draw.line((0, offset, size, size - offset), fill="white", width=2)
    image.save(path)


def anon_and_file(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a process in bytes from /proc (0, 0 where there is none): heap and arena memory
    apart from the mapped file pages, to tell which of the two a peak is made of."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return tuple(int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssFile"))  # type: ignore[return-value]
    except (OSError, KeyError, ValueError):
        return 0, 0


def run_once(command: list[str], report: Path) -> dict:
    """Run one CLI subprocess, sampling its tree's RSS; its peak RSS (MiB) with the main process' anonymous
    and file-backed shares at that moment, wall time, and stage records."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    process, peak, shares = psutil.Process(child.pid), [0], [(0, 0)]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = tree_rss(process)
            if rss > peak[0]:
                peak[0], shares[0] = rss, anon_and_file(child.pid)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, errors = child.communicate()
    done.set()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"run failed ({child.returncode}): {' '.join(command)}\n{errors.decode()[-2000:]}")
    stages = {}
    for record in json.loads(report.read_text())["runs"]:
        stage = stages.setdefault(record["stage"], {"seconds": 0.0, "steps": 0, "peak_rss_mib": 0.0, "peak_allocated_mib": 0.0})
        stage["seconds"] += record["seconds"]
        stage["steps"] += record.get("steps") or 0
        for key in ("peak_rss_mib", "peak_allocated_mib"):
            stage[key] = max(stage[key], record.get(key) or 0.0)
    unet = stages["unet"]
    wall = time.perf_counter() - started
    anon, file = (share / 2**20 for share in shares[0])
    return {"rss_mib": peak[0] / 2**20, "anon_mib": anon, "file_mib": file, "wall_s": wall,
            "s_per_step": unet["seconds"] / unet["steps"], "stages": stages}  # fmt: skip


def stage_line(stages: dict) -> str:
    return ", ".join(
        f"{name} {stage['seconds']:.1f}s/{stage['peak_rss_mib']:.0f}MiB"
        + (f" (allocated {stage['peak_allocated_mib']:.0f}MiB)" if stage.get("peak_allocated_mib") else "")
        for name, stage in stages.items()
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--memory", default="stream")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="sd15", choices=("sd15", "sdxl"))
    parser.add_argument("--configs", default="plain,controlnet", help="comma-separated: plain, controlnet, hires")
    parser.add_argument("--hr-scale", default="2")
    parser.add_argument("--vram-budget", help="the hires run's --vram-budget (with --memory auto)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = set(configs) - {"plain", "controlnet", "hires"}
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(sorted(unknown))}; use plain, controlnet, hires")

    model = ensure_model(name=args.model)
    controlnet = ensure_controlnet(model) if "controlnet" in configs else None
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        hint = folder / "hint.png"
        write_hint(hint, args.size)
        base = [sys.executable, "-m", "optimized_sd.cli", "txt2img", "--ckpt", str(model.checkpoint), "--tokenizer", str(model.tokenizer),
                "--prompt", "a red house", "--seed", "1", "--memory", args.memory, "--device", args.device,
                "--H", str(args.size), "--W", str(args.size), "--ddim_steps", str(args.steps), "--sampler", "euler", "--n_samples", "1",
                "--skip_grid", "--outdir", str(folder / "out")]
        extras = {
            "plain": [],
            "controlnet": ["--controlnet", str(controlnet), "--control-image", str(hint)],
            "hires": ["--hr-scale", args.hr_scale, *(["--vram-budget", args.vram_budget] if args.vram_budget else [])],
        }
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for round_index in range(args.rounds):
            for name in configs:
                extra = extras[name]
                report = folder / f"{name}-{round_index}.json"
                result = run_once([*base, *extra, "--report-json", str(report)], report)
                runs[name].append(result)
                print(f"round {round_index} {name:<10} peak RSS {result['rss_mib']:>7.0f} MiB "
                      f"(anon {result['anon_mib']:.0f}, file {result['file_mib']:.0f})  {result['s_per_step']:>6.2f} s/step  "
                      f"wall {result['wall_s']:>5.1f}s  [{stage_line(result['stages'])}]", flush=True)
    best = {name: (min(r["rss_mib"] for r in results), min(r["s_per_step"] for r in results)) for name, results in runs.items()}
    print(f"\n{args.model} {args.size}x{args.size}, {args.steps} euler steps, --memory {args.memory}, {args.device}, best of {args.rounds}")
    print(f"{'':<12} {'peak RSS MiB':>12} {'s/step':>8}")
    for name, (rss, step) in best.items():
        print(f"{name:<12} {rss:>12.0f} {step:>8.2f}")
    if not {"plain", "controlnet"} <= set(best):
        return
    rss_ratio = best["controlnet"][0] / best["plain"][0]
    step_ratio = best["controlnet"][1] / best["plain"][1]
    print(f"ratio        {rss_ratio:>12.3f} {step_ratio:>8.3f}   (targets <= {RSS_TARGET}, <= {STEP_TARGET})")
    print(f"RSS target {'met' if rss_ratio <= RSS_TARGET else 'MISSED'}, s/step target {'met' if step_ratio <= STEP_TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
