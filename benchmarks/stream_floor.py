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
    python benchmarks/stream_floor.py --cards    # "what to expect on your card" (the README's table)

`--cards` predicts s/step per mode on small cards from their published dense FP16 throughput and PCIe
link (the `CARDS` table, with the sources of each figure): compute = UNet FLOPs / (peak x utilisation),
copies = bytes / (link x the link efficiency measured on the H100). On CUDA it also validates the model
on the device at hand: the measured per-block compute gives that card's utilisation, set against the one
assumed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized_sd.config import SD15  # noqa: E402
from optimized_sd.models.unet import UNetModel  # noqa: E402

H100_FULL_STEP_MS = 35.0  # benchmarks/results/h100-2026-11-27-gpu: `full`, 512x512 fp16, batch 1 with CFG
H100_BANDWIDTH_GBS = 54.9  # same run, pinned 1 GiB copy, best of 5
PCIE_GBS = {"3.0 x16": 15.75, "4.0 x8": 15.75, "4.0 x16": 31.5, "5.0 x16": 63.0}  # per direction, after 128b/130b encoding
LINK_EFFICIENCY = H100_BANDWIDTH_GBS / PCIE_GBS["5.0 x16"]  # pinned copies reach 0.87 of the link (measured on the H100)
# Share of the dense FP16 peak that one SD 1.5 UNet step at 512x512 (CFG batch 2) reaches on a small card: an
# assumption (large convolutions and 4096-token attention fill a small GPU), checked by the validation on a lent
# device. The H100 reaches far less at this batch (4.6%: 1.61 TFLOP in 35 ms of its 989 TFLOPS): too little work
# for 132 SMs, which a small card does not suffer.
SMALL_CARD_UTILISATION = 0.40
CONTEXT_GIB = 0.3  # CUDA context and libraries on a consumer card, outside what the planner may use (assumed)


@dataclass(frozen=True)
class Card:
    """A GPU's published figures: dense FP16 multiply-add throughput as PyTorch's fp16 matmuls use it
    (FP32 accumulate: half the FP16-accumulate tensor rate on GeForce cards), its memory and its PCIe link."""

    name: str
    match: str  # in torch.cuda.get_device_name() of this card
    vram_gib: float
    fp16_tflops: float  # of the compute dtype: FP32 for a card run in fp32 (weight_bytes 4)
    link: str
    source: str
    utilisation: float = SMALL_CARD_UTILISATION
    note: str = ""
    weight_bytes: int = 2

    @property
    def link_gbs(self) -> float:
        return PCIE_GBS[self.link]


CARDS: tuple[Card, ...] = (
    Card(
        "RTX 2060 (6 GB)", "RTX 2060", 6, 25.8, "3.0 x16",
        "TU106: 240 tensor cores x 64 FP16 FMA/clock x 2 x 1.68 GHz boost = 51.6 TFLOPS FP16-accumulate, half with FP32 "
        "accumulate on GeForce (NVIDIA Turing architecture whitepaper; boost clock and core count from NVIDIA's spec page)",
    ),
    Card(
        "RTX 3050 Laptop (4 GB)", "RTX 3050 Laptop", 4, 14.25, "4.0 x8",
        "GA107, 80 W variant: 64 tensor cores at 1.74 GHz boost = 28.5 TFLOPS FP16-accumulate, 14.25 with FP32 accumulate "
        "(NVIDIA Ampere GA102 whitepaper per-SM rates; clocks vary 1.06-1.74 GHz with the laptop's power limit, 35-80 W)",
    ),
    Card(
        "GTX 1650 (4 GB)", "GTX 1650", 4, 5.97, "3.0 x16",
        "TU117: no tensor cores; 896 CUDA cores x 2 (FMA) x 1.665 GHz = 2.98 TFLOPS FP32, FP16 at twice that rate "
        "(NVIDIA's spec page; Turing whitepaper for the FP16 rate)",
        note="GTX 16xx cards are known to give NaN images in fp16 with SD 1.5, hence the fp32 row (--precision full)",
    ),
    Card(
        "GTX 1650 (4 GB), fp32", "GTX 1650", 4, 2.98, "3.0 x16", "the row above at its FP32 rate, weights in 4 bytes", weight_bytes=4,
    ),
    Card("H100 SXM (80 GB)", "H100", 80, 989.4, "5.0 x16", "NVIDIA H100 datasheet: 989.4 TFLOPS dense FP16 tensor", utilisation=0.0464),
    Card(
        "H200 SXM (141 GB)", "H200", 141, 989.4, "5.0 x16", "NVIDIA H200 datasheet: 989.4 TFLOPS dense FP16 tensor (the H100's compute)",
        utilisation=0.0464,
    ),
)


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


def block_flops(size: int) -> list[int]:
    """Each block's FLOPs in one UNet call (CFG batch 2), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = meta_unet()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        unet(*unet_inputs(size, torch.device("meta"), torch.float16))
    counts = counter.get_flop_counts()
    return [sum(counts.get(f"UNetModel.{name}", {}).values()) for name, _ in top_level_blocks(unet)]


def flop_shares(size: int) -> list[float]:
    """Each block's share of the UNet's FLOPs."""
    flops = block_flops(size)
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


@dataclass(frozen=True)
class CardPrediction:
    """Predicted seconds per UNet step (512x512, CFG batch 2) per mode on one card, and whether each
    mode's planned peak fits the card (what `auto` would pick without a budget)."""

    card: Card
    compute: float  # weights resident: full and turbo
    split: float  # both halves copied each call, no overlap
    stream: float  # one block ahead
    budget_steps: dict[str, float]  # `auto` under a budget (GiB label): stream copying ahead within it
    fits: dict[str, bool]


def predict_card(
    card: Card,
    flops: list[int],
    sizes: list[int],
    *,
    estimates_gib: dict[str, float] | None = None,
    budgets_gib: tuple[float, ...] = (),
    activation_gib: float = 0.0,
) -> CardPrediction:
    """The card model: block i computes in flops_i / (peak x utilisation) and copies in bytes_i /
    (link x LINK_EFFICIENCY); `split` adds every copy to the compute, `stream` overlaps the next block's
    copy (`one_block_lookahead_seconds`), and `auto` under a budget copies ahead within what the budget
    leaves beside `activation_gib` (`simulated_step_seconds`). `sizes` are fp16 bytes: a card run in
    fp32 (`weight_bytes` 4) copies twice as many."""
    rate = card.fp16_tflops * 1e12 * card.utilisation
    compute = [f / rate for f in flops]
    scale = card.weight_bytes / 2
    copy = [b * scale / (card.link_gbs * 1e9 * LINK_EFFICIENCY) for b in sizes]
    budget_steps = {}
    for budget in budgets_gib:
        window = (budget - CONTEXT_GIB - activation_gib) * 2**30
        budget_steps[f"{budget:g} GB"] = simulated_step_seconds(compute, copy, [int(b * scale) for b in sizes], max(window, 0.0))
    usable = card.vram_gib - CONTEXT_GIB
    return CardPrediction(
        card=card,
        compute=sum(compute),
        split=sum(compute) + sum(copy),
        stream=one_block_lookahead_seconds(compute, copy),
        budget_steps=budget_steps,
        fits={mode: peak <= usable for mode, peak in (estimates_gib or {}).items()},
    )


def card_table(predictions: list[CardPrediction]) -> str:
    """The README's "what to expect on your card" table (markdown)."""
    budgets = list(predictions[0].budget_steps) if predictions else []
    header = ["card", "peak TFLOPS", "PCIe", "full / turbo s/step", "split s/step", "stream s/step"]
    header += [f"stream ahead in {b} s/step" for b in budgets] + ["modes that fit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for p in predictions:
        fits = ", ".join(mode for mode, ok in p.fits.items() if ok) or "-"
        row = [p.card.name, f"{p.card.fp16_tflops:g}", p.card.link, f"{p.compute:.2f}", f"{p.split:.2f}", f"{p.stream:.2f}"]
        row += [f"{p.budget_steps[b]:.2f}" for b in budgets] + [fits]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def planner_estimates_gib(size: int, dtype_bytes: int = 2) -> tuple[dict[str, float], float]:
    """Each mode's planned peak for SD 1.5 at `size` (batch 1, weights and activations of `dtype_bytes`)
    from the planner, and the UNet stage's activations under `stream` (GiB)."""
    from optimized_sd.memory.planner import ModelFootprint, Request, estimate_peak, unet_activation_bytes

    unet = meta_unet()
    blocks = tuple(block_bytes())
    half = len(blocks) // 2
    # Text encoder and VAE: fp16 bytes of SD 1.5's CLIP ViT-L/14 text model and its VAE's two halves.
    k = dtype_bytes // 2
    model = ModelFootprint(
        text_encoder=246_144_000 * k, unet=sum(p.numel() * dtype_bytes for p in unet.parameters()),
        unet_halves=(sum(blocks[:half]) * k, sum(blocks[half:]) * k), unet_blocks=tuple(b * k for b in blocks),
        vae_encoder=68_339_000 * k, vae_decoder=98_993_000 * k,
    )
    request = Request(size, size, dtype_bytes=dtype_bytes)
    from optimized_sd.memory.modes import MODES

    estimates = {mode: estimate_peak(mode, model, request, False) / 2**30 for mode in MODES}
    return estimates, unet_activation_bytes(request, chunked=True) / 2**30


def print_cards(size: int, measured: tuple[str, list[float], float] | None) -> None:
    """The card table, its sources, and (on CUDA) the validation against the device at hand."""
    flops, sizes = block_flops(size), block_bytes()
    planned = {b: planner_estimates_gib(size, b) for b in (2, 4)}
    cards = [c for c in CARDS if c.vram_gib < 16]
    predictions = [
        predict_card(
            c, flops, sizes, estimates_gib=planned[c.weight_bytes][0], budgets_gib=(1.0, 2.0), activation_gib=planned[c.weight_bytes][1]
        )
        for c in cards
    ]
    print(f"\nWhat to expect on your card: SD 1.5 at {size}x{size}, one image with CFG, {sum(flops) / 1e12:.2f} TFLOP per step;")
    print(f"utilisation {SMALL_CARD_UTILISATION:.0%} of the FP16 peak assumed, copies at {LINK_EFFICIENCY:.0%} of the PCIe link, "
          f"{CONTEXT_GIB} GB of CUDA context.\n")
    print(card_table(predictions))
    print("\nSources:")
    for card in CARDS:
        print(f"- {card.name}: {card.source}" + (f". Note: {card.note}" if card.note else ""))
    if measured is None:
        return
    name, compute, gbs = measured
    known = next((c for c in CARDS if c.match in name), None)
    rate = sum(flops) / sum(compute) / 1e12
    print(f"\nValidation on {name}: measured compute {sum(compute) * 1e3:.1f} ms/step = {rate:.1f} TFLOPS achieved, "
          f"copies at {gbs:.1f} GB/s")
    if known is not None:
        predicted = predict_card(known, flops, sizes)
        floor_here = one_block_lookahead_seconds(compute, [b / (gbs * 1e9) for b in sizes])
        utilisation = rate / known.fp16_tflops
        print(f"  {known.name}: {known.fp16_tflops:g} TFLOPS peak, so utilisation {utilisation:.1%} (assumed {known.utilisation:.1%}); "
              f"link efficiency {gbs / known.link_gbs:.0%} (assumed {LINK_EFFICIENCY:.0%})")
        print(f"  predicted full {predicted.compute * 1e3:.1f} ms, stream {predicted.stream * 1e3:.1f} ms; "
              f"measured full {sum(compute) * 1e3:.1f} ms, one-block stream floor {floor_here * 1e3:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20, help="CUDA: timed forward passes")
    parser.add_argument("--compute-ms", type=float, default=H100_FULL_STEP_MS, help="without CUDA: UNet step with weights resident")
    parser.add_argument("--bandwidth-gbs", type=float, default=H100_BANDWIDTH_GBS, help="without CUDA: host-to-device GB/s")
    parser.add_argument("--stream-ms", type=float, help="a measured `stream` step, to set against both figures")
    parser.add_argument("--cards", action="store_true", help="also print the small-card table (and validate it on CUDA)")
    args = parser.parse_args()

    names = [name for name, _ in top_level_blocks(meta_unet())]
    if torch.cuda.is_available():
        from optimized_sd.benchmark.worker import bandwidth_gbps

        compute = timed_blocks_cuda(args.size, args.repeats)
        gbs = bandwidth_gbps(torch.device("cuda")).best_gbps
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
    if args.cards:
        print_cards(args.size, (torch.cuda.get_device_name(0), compute, gbs) if torch.cuda.is_available() else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
