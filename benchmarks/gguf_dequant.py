#!/usr/bin/env python
"""How fast each GGML type dequantises (`optimized_sd.ggml_quants.dequantize`, what a layer holding GGUF bytes
runs at every forward): a 4096x4096 weight per type, best of --repeat, reported as GB/s of output written
(and of quantized bytes read). --reference also times the `gguf` package's numpy dequantizer (CPU) for scale.

    nice -n 10 python benchmarks/gguf_dequant.py                    # CPU, float32 output
    python benchmarks/gguf_dequant.py --device cuda --dtype float16  # on a GPU, fp16 compute
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized_sd.ggml_quants import GGML_TYPES, dequantize, tensor_nbytes  # noqa: E402


def random_bytes(nbytes: int, seed: int = 0) -> np.ndarray:
    """Bytes in [0x04, 0x3B]: every fp16/bf16/fp32 field they form is a finite normal number below 1 (no NaN,
    infinity or subnormal to change the timing), and every bit field of the quantized values still varies."""
    return np.random.default_rng(seed).integers(0x04, 0x3C, size=nbytes, dtype=np.uint8)


def best_seconds(run: Callable[[], object], repeat: int, sync: Callable[[], None]) -> float:
    run()  # warm-up: allocations, kernels loaded
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=4096, help="the weight is SIZE x SIZE")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--reference", action="store_true", help="also time gguf.quants.dequantize (numpy, CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape = (args.size, args.size)
    out_bytes = args.size * args.size * dtype.itemsize
    print(f"device {device}, output {args.dtype}, weight {shape[0]}x{shape[1]}, best of {args.repeat}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'type':<6} {'bytes in':>10} {'ms':>9} {'GB/s out':>9} {'GB/s in':>8}" + ("  reference ms" if args.reference else ""))
    for ggml_type in GGML_TYPES.values():
        nbytes = tensor_nbytes(ggml_type, shape[0] * shape[1])
        host = random_bytes(nbytes)
        raw = torch.from_numpy(host).to(device)
        seconds = best_seconds(lambda raw=raw, t=ggml_type: dequantize(raw, t.number, shape, dtype), args.repeat, sync)
        line = f"{ggml_type.name:<6} {nbytes / 2**20:8.1f}Mi {seconds * 1e3:9.2f} {out_bytes / seconds / 1e9:9.2f}"
        line += f" {nbytes / seconds / 1e9:8.2f}"
        if args.reference:
            import gguf

            rows, qtype = host.reshape(shape[0], -1), gguf.GGMLQuantizationType(ggml_type.number)
            reference = best_seconds(lambda r=rows, q=qtype: gguf.quants.dequantize(r, q), max(1, args.repeat // 2), lambda: None)
            line += f"  {reference * 1e3:12.2f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
