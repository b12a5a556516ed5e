#!/usr/bin/env python
"""Full-size Z-Image-Turbo on the CPU: random bf16 weights in the files people download (the 6.15B transformer in its
original names, Qwen3-4B as `qwen_3_4b.safetensors`, Flux's `ae.safetensors`, a stand-in Qwen2 tokenizer with the
chat template), cached under ~/.cache/optimized-sd/bench/zimage-turbo (or --cache-dir); then our CLI in a memory mode,
or diffusers' ZImagePipeline on the same files, in a child process under `flux_cpu.watch` (peak RSS of the process
tree sampled every 50 ms, killed past --cap or when available RAM falls under --min-free):

    .venv/bin/python benchmarks/zimage_cpu.py ours --memory stream --size 512 --steps 1
    .venv/bin/python benchmarks/zimage_cpu.py diffusers --size 512 --steps 1

Each file is written tensor by tensor (`benchmark.flux_model.write_file`: the writer's peak is one tensor, Qwen3's
151936x2560 embedding) and reused while its header, seed and length are intact. Prints one JSON line: how the run
ended, wall seconds, peak RSS and, for ours, the stage table and s/step."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flux_cpu import run_parser, watched_run  # noqa: E402

from optimized_sd.benchmark import flux_model  # noqa: E402
from optimized_sd.benchmark.model_cache import check_disk_space, default_cache_dir  # noqa: E402
from optimized_sd.errors import UserError  # noqa: E402

PROMPT = "a photo of a red cube on the table"
FOLDER = "zimage-turbo"
CHAT_TEMPLATE = (  # Qwen3's template, reduced to the one user turn Z-Image sends (enable_thinking True: no think block)
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


@dataclass(frozen=True)
class BenchModel:
    transformer: Path
    qwen: Path
    vae: Path
    tokenizer: Path


def transformer_entries(config) -> list[tuple[str, tuple[int, ...]]]:
    """The transformer's keys and shapes in the original names (`z_image_turbo_bf16.safetensors`)."""
    import torch

    from optimized_sd.models.zimage import ZImageTransformer

    with torch.device("meta"):
        model = ZImageTransformer(config)
    return [(key.removeprefix("pads."), tuple(value.shape)) for key, value in model.state_dict().items()]


def qwen_entries(config) -> list[tuple[str, tuple[int, ...]]]:
    """Every layer and the final norm of Qwen3 (transformers' `model.` names), as `qwen_3_4b.safetensors` holds them."""
    import torch
    from transformers import Qwen3Model

    with torch.device("meta"):
        model = Qwen3Model(config.transformers_config(config.num_layers))
    return [("model." + key, tuple(value.shape)) for key, value in model.state_dict().items()]


def vae_entries(config) -> list[tuple[str, tuple[int, ...]]]:
    import torch

    from optimized_sd.models.vae import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(config)
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


def write_tokenizer(folder: Path) -> Path:
    """A byte-level BPE with Qwen's special tokens and the chat template, saved as a Qwen2 tokenizer folder."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    if (folder / "tokenizer_config.json").is_file():
        return folder
    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({token: len(vocab) + i for i, token in enumerate(QWEN_SPECIAL)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return folder


def ensure_files(folder: Path, transformer=None, qwen=None, vae=None, seed: int = 0) -> BenchModel:
    """The three weight files and the tokenizer in `folder`, each file written when missing or invalid (None: the
    full-size configs: Z-Image-Turbo, Qwen3-4B, Flux's VAE)."""
    from optimized_sd.config import VAEConfig
    from optimized_sd.models.qwen3 import Qwen3Config
    from optimized_sd.models.zimage import ZImageConfig

    parts = {
        "transformer": ("z_image_turbo-random-bf16.safetensors", transformer_entries(transformer or ZImageConfig())),
        "qwen": ("qwen_3_4b-random-bf16.safetensors", qwen_entries(qwen or Qwen3Config())),
        "vae": ("ae-random-bf16.safetensors", vae_entries(vae or VAEConfig(z_channels=16, embed_dim=16, use_quant_conv=False))),
    }
    paths = {}
    for index, (part, (name, entries)) in enumerate(parts.items()):
        metadata = {"format": flux_model.FORMAT_TAG, "version": flux_model.FORMAT_VERSION, "seed": str(seed), "part": f"zimage-{part}"}
        path = paths[part] = folder / name
        if path.is_file() and flux_model.is_valid(path, entries, metadata):
            continue
        header, data_size = flux_model.header_for(entries, metadata)
        folder.mkdir(parents=True, exist_ok=True)
        check_disk_space(folder, len(header) + data_size - (path.stat().st_size if path.is_file() else 0))
        try:
            flux_model.write_file(path, entries, metadata, seed * 16 + index)
        except OSError as error:
            raise UserError(f"cannot write the benchmark model to {folder}: {error.strerror or error}") from None
    return BenchModel(paths["transformer"], paths["qwen"], paths["vae"], write_tokenizer(folder / "tokenizer"))


# The child for `diffusers`: ZImagePipeline from the same files as diffusers loads them (the transformer through
# `from_single_file`, Qwen3 through `from_pretrained` in bf16, memory-mapped; the VAE built at random, as small);
# it prints the stage it reached and its RSS then.
DIFFUSERS_CHILD = r"""
import inspect, json, sys, tempfile, torch, psutil
from pathlib import Path
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model
transformer_file, qwen_file, tokenizer, size, steps = sys.argv[1:6]
dtype = torch.bfloat16
def stage(name):
    print(f"stage {name}: RSS so far {psutil.Process().memory_info().rss / 2**30:.1f} GiB", flush=True)
stage("transformer")
root = Path(tempfile.mkdtemp())
folder = root / "transformer"
folder.mkdir()
defaults = {name: p.default for name, p in inspect.signature(ZImageTransformer2DModel.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}
(folder / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel", **defaults}))
transformer = ZImageTransformer2DModel.from_single_file(transformer_file, config=str(root), subfolder="transformer", torch_dtype=dtype)
stage("text_encoder")
qwen_folder = root / "text_encoder"
qwen_folder.mkdir()
Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            architectures=["Qwen3Model"]).save_pretrained(qwen_folder)
(qwen_folder / "model.safetensors").symlink_to(qwen_file)
text_encoder = Qwen3Model.from_pretrained(qwen_folder, torch_dtype=dtype)
stage("vae")
vae = AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).to(dtype)
pipe = ZImagePipeline(FlowMatchEulerDiscreteScheduler(shift=3.0), vae, text_encoder, Qwen2Tokenizer.from_pretrained(tokenizer),
                      transformer)
if "--offload" in sys.argv:
    pipe.enable_sequential_cpu_offload(device="cpu")
stage("generate")
pipe("a photo of a red cube on the table", height=int(size), width=int(size), num_inference_steps=int(steps), guidance_scale=0.0,
     generator=torch.Generator().manual_seed(0))
stage("done")
"""


def build_parser() -> argparse.ArgumentParser:
    parser = run_parser(__doc__.splitlines()[0], size=512)
    parser.add_argument("--offload", action="store_true", help="diffusers: enable_sequential_cpu_offload")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="ours: the device (a GPU check: cuda)")
    parser.add_argument("--vram-budget", help="ours: --vram-budget (with --memory auto), e.g. 2GB for issue 24's GPU cap")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    model = ensure_files((args.cache_dir or default_cache_dir()) / FOLDER)
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        if args.runner == "ours":
            command = [
                sys.executable, "-m", "optimized_sd.cli", "txt2img", "--ckpt", str(model.transformer), "--text-encoder", str(model.qwen),
                "--vae", str(model.vae), "--tokenizer", str(model.tokenizer), "--device", args.device, "--precision", args.precision,
                "--memory", args.memory, "--H", str(args.size), "--W", str(args.size), "--steps", str(args.steps), "--n_samples", "1",
                "--seed", "0", "--prompt", PROMPT, "--outdir", scratch, "--report-json", str(report),
                *(["--vram-budget", args.vram_budget] if args.vram_budget else []),
            ]  # fmt: skip
        else:
            command = [sys.executable, "-c", DIFFUSERS_CHILD, str(model.transformer), str(model.qwen), str(model.tokenizer),
                       str(args.size), str(args.steps), *(["--offload"] if args.offload else [])]  # fmt: skip
        result = watched_run(command, args, report)
    print(json.dumps(result))
    return 0 if result["exit"] == 0 and not result["killed"] else 1


if __name__ == "__main__":
    sys.exit(main())
