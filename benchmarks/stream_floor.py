#!/usr/bin/env python
"""The fastest step `--memory stream` can reach while it keeps its promise of at most the current and
the next UNet block on the device, set against the compute/bandwidth bound max(compute, bytes / bandwidth).

With one block of lookahead, block i+1's copy starts when block i starts computing, so block i+1
starts max(c_i, copy_{i+1}) after block i: a step takes sum_i max(c_i, copy_{i+1}) (cyclically, the
next step's first block follows the last). The bound assumes copies and compute overlap perfectly,
which needs the heavy-copy blocks (1280 channels at 8-16 px: most of the bytes, little compute) to be
fetched during the heavy-compute ones (320 channels at 64 px: few bytes), i.e. several blocks ahead.
The script also simulates that: copies in order within a window of weight bytes, which is what the
engine does when `--memory auto` picks `stream` under a budget (`memory.planner.stream_lookahead`).

On CUDA each top-level UNet block is timed with CUDA events (fp16, weights resident) and the
pinned host-to-device bandwidth is measured; elsewhere compute is split by FLOPs over a total given
with --compute-ms (default: `full` on the H100, 35 ms) and --bandwidth-gbs (default: 54.9, H100).

    python benchmarks/stream_floor.py [--size 512] [--stream-ms 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized_sd.config import SD15  # noqa: E402
from optimized_sd.models.unet import UNetModel  # noqa: E402

H100_FULL_STEP_MS = 35.0  # benchmarks/results/h100-2026-11-27-gpu: `full`, 512x512 fp16, batch 1 with CFG
H100_BANDWIDTH_GBS = 54.9  # same run, pinned 1 GiB copy, best of 5


def top_level_blocks(unet: UNetModel) -> list[tuple[str, nn.Module]]:
    """The modules `stream` moves one by one, in the order a forward pass runs them."""
    return [(name, unet.get_submodule(name)) for name in unet.block_names()]


def unet_inputs(size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    latent = size // 8
    return (
        torch.randn(2, 4, latent, latent, device=device, dtype=dtype),  # CFG batch of one image
        torch.tensor([500.0, 500.0], device=device),
        torch.randn(2, 77, SD15.unet.context_dim, device=device, dtype=dtype),
    )


def meta_unet() -> UNetModel:
    """The SD 1.5 UNet without memory or weights: shapes, parameter counts and FLOPs only."""
    with torch.device("meta"):
        return UNetModel(SD15.unet).half()


def flop_shares(size: int) -> list[float]:
    """Each block's share of the UNet's FLOPs, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = meta_unet()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        unet(*unet_inputs(size, torch.device("meta"), torch.float16))
    counts = counter.get_flop_counts()
    flops = [sum(counts.get(f"UNetModel.{name}", {}).values()) for name, _ in top_level_blocks(unet)]
    return [f / sum(flops) for f in flops]


def timed_blocks_cuda(size: int, repeats: int) -> list[float]:
    """Seconds of each block on the GPU, weights resident, median of `repeats` forward passes."""
    device = torch.device("cuda")
    with device:  # random weights made on the GPU: the values do not change the timings
        unet = UNetModel(SD15.unet).half().eval()
    blocks = top_level_blocks(unet)
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name, _ in blocks}
    for name, module in blocks:

        def before(module: nn.Module, args: object, name: str = name) -> None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            events[name].append((start, end))

        def after(module: nn.Module, args: object, output: object, name: str = name) -> None:
            events[name][-1][1].record()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
    inputs = unet_inputs(size, device, torch.float16)
    with torch.inference_mode():
        for _ in range(3 + repeats):
            unet(*inputs)
    torch.cuda.synchronize()
    seconds = []
    for name, _ in blocks:
        times = sorted(start.elapsed_time(end) / 1000 for start, end in events[name][3:])
        seconds.append(times[len(times) // 2])
    return seconds


def block_bytes() -> list[int]:
    """fp16 weight bytes of each block: what `stream` copies to the GPU for it every step."""
    return [sum(p.numel() * p.element_size() for p in module.parameters()) for _, module in top_level_blocks(meta_unet())]


def one_block_lookahead_seconds(compute: list[float], copy: list[float]) -> float:
    """Step time when block i+1's copy overlaps block i's compute and nothing further ahead."""
    count = len(compute)
    return sum(max(compute[i], copy[(i + 1) % count]) for i in range(count))


def simulated_step_seconds(compute: list[float], copy: list[float], sizes: list[int], window: float, *, steps: int = 4) -> float:
    """Steady step time of a schedule that copies blocks in order on one copy engine, each as soon as
    the blocks on the device (the one computing, the ones copied ahead) fit in `window` bytes with it
    (the next block may always come: one block of lookahead); compute runs blocks in order, each once
    its copy is done. With window 0 this is the one-block lookahead floor."""
    count = len(compute)
    total = count * steps
    copy_done: list[float] = []
    compute_end: list[float] = []
    now, copy_free = 0.0, 0.0
    while len(compute_end) < total or compute_end[-1] > now:
        finished = sum(1 for end in compute_end if end <= now)  # blocks whose memory is free again
        while len(copy_done) < total and copy_free <= now:
            j = len(copy_done)
            held = sum(sizes[m % count] for m in range(finished, j + 1))
            if j > finished + 1 and held > window:
                break
            copy_done.append(now + copy[j % count])
            copy_free = copy_done[-1]
        i = len(compute_end)
        if i < total and i < len(copy_done) and copy_done[i] <= now and (not compute_end or compute_end[-1] <= now):
            compute_end.append(now + compute[i % count])
            continue  # a compute starting frees nothing, but the loop re-checks the copies at once
        upcoming = [t for t in [copy_free, *compute_end[-1:], *copy_done[i : i + 1]] if t > now]
        if not upcoming:
            break
        now = min(upcoming)
    return compute_end[-1] - compute_end[total - count - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20, help="CUDA: timed forward passes")
    parser.add_argument("--compute-ms", type=float, default=H100_FULL_STEP_MS, help="without CUDA: UNet step with weights resident")
    parser.add_argument("--bandwidth-gbs", type=float, default=H100_BANDWIDTH_GBS, help="without CUDA: host-to-device GB/s")
    parser.add_argument("--stream-ms", type=float, help="a measured `stream` step, to set against both figures")
    args = parser.parse_args()

    names = [name for name, _ in top_level_blocks(meta_unet())]
    if torch.cuda.is_available():
        from optimized_sd.benchmark.worker import bandwidth_gbps

        compute = timed_blocks_cuda(args.size, args.repeats)
        gbs = bandwidth_gbps(torch.device("cuda"))["best_gbps"]
        source = f"{torch.cuda.get_device_name(0)}: blocks timed with CUDA events, bandwidth measured"
    else:
        compute = [share * args.compute_ms / 1000 for share in flop_shares(args.size)]
        gbs = args.bandwidth_gbs
        source = f"no CUDA: {args.compute_ms:g} ms split by FLOPs, {gbs:g} GB/s given"
    sizes = block_bytes()
    copy = [size / (gbs * 1e9) for size in sizes]
    print(f"SD 1.5 UNet, {args.size}x{args.size}, CFG batch 2, fp16 weights; {source}")
    print(f"{'block':<17}{'MiB':>8}{'compute ms':>12}{'copy ms':>9}")
    for name, size, c, k in zip(names, sizes, compute, copy):
        print(f"{name:<17}{size / 2**20:8.1f}{c * 1e3:12.2f}{k * 1e3:9.2f}")
    bound = max(sum(compute), sum(copy))
    floor = one_block_lookahead_seconds(compute, copy)
    print(f"compute {sum(compute) * 1e3:.1f} ms, copies {sum(copy) * 1e3:.1f} ms at {gbs:.1f} GB/s")
    print(f"compute/bandwidth bound max(compute, copy):   {bound * 1e3:6.1f} ms (target 1.2x: {1.2 * bound * 1e3:.1f} ms)")
    print(f"one-block lookahead floor sum max(c_i, k_i+1): {floor * 1e3:6.1f} ms = {floor / bound:.2f}x the bound")
    print("copying further ahead, within a window of weight bytes on the device (activations come on top):")
    for window_mib in (384, 512, 640, 768, 1024, 1280):
        step = simulated_step_seconds(compute, copy, sizes, window_mib * 2**20)
        print(f"  {window_mib:6d} MiB: {step * 1e3:5.1f} ms = {step / bound:.2f}x the bound")
    if args.stream_ms:
        measured = args.stream_ms / 1e3
        print(f"measured stream step {args.stream_ms:.1f} ms = {measured / bound:.2f}x the bound, {measured / floor:.2f}x the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
