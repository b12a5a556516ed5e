"""The full-size Z-Image-Turbo bench model (`benchmarks/zimage_cpu.py`): its planned files are the published sizes
(6.15B transformer, Qwen3-4B), and the writer's files, at a tiny config, are what our loader opens and runs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

from optimized_sd.pipelines.diffusion import GenerationRequest, load

ROOT = Path(__file__).resolve().parents[1]


def bench_module():
    spec = importlib.util.spec_from_file_location("zimage_cpu", ROOT / "benchmarks" / "zimage_cpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_full_size_files_are_the_published_sizes():
    from optimized_sd.models.qwen3 import Qwen3Config
    from optimized_sd.models.zimage import ZImageConfig

    bench = bench_module()
    transformer = sum(math.prod(shape) for _, shape in bench.transformer_entries(ZImageConfig()))
    qwen = sum(math.prod(shape) for _, shape in bench.qwen_entries(Qwen3Config()))
    assert round(transformer / 1e9, 2) == 6.15 and round(qwen / 1e9, 2) == 4.02


def test_the_writer_gives_files_our_loader_runs(tmp_path):
    from optimized_sd.config import VAEConfig
    from optimized_sd.models.qwen3 import Qwen3Config
    from optimized_sd.models.zimage import ZImageConfig

    bench = bench_module()
    transformer = ZImageConfig(dim=64, num_heads=4, num_layers=2, num_refiner_layers=1, ffn_hidden=96, cap_feat_dim=32, adaln_dim=64,
                               time_hidden=64)  # fmt: skip
    qwen = Qwen3Config(vocab_size=300, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=48)
    vae = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16, embed_dim=16, use_quant_conv=False)
    files = bench.ensure_files(tmp_path, transformer, qwen, vae)
    stamp = files.transformer.stat().st_mtime_ns
    assert bench.ensure_files(tmp_path, transformer, qwen, vae).transformer.stat().st_mtime_ns == stamp  # reused, not rewritten
    pipe = load(files.transformer, text_encoders=(files.qwen,), vae=files.vae, tokenizer=files.tokenizer, device="cpu",
                precision="full", memory="stream")  # fmt: skip
    result = pipe.generate(GenerationRequest(prompts=[bench.PROMPT], seed=0, steps=1, height=32, width=32))
    assert result.latents.shape == (1, 16, 4, 4) and torch.isfinite(result.latents).all()
    assert pipe.loaded.report.known_extras == {"Qwen3 final norm (unused)": 1, "Qwen3 layer past the last one read": 11}
