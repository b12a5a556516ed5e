"""The benchmark's model: the full SD 1.5 architecture with seeded random weights, written once as an
fp16 single-file safetensors in the LDM layout, with a stand-in tokenizer and a diffusers config folder
so diffusers' `from_single_file` can open the same file offline.

Memory and speed do not depend on the weights' values, only on their shapes. The modules' default
initialisation keeps activations in a range fp16 holds (checked on a small fp32 forward pass).

The file is written tensor by tensor: the header is laid out from the shapes of a model built on the
meta device, then each part (UNet, VAE, text encoder) is built in fp32 on the CPU, its tensors cast to
fp16 one at a time and appended, and the part dropped. The peak is one fp32 part (the UNet, ~3.4 GB),
never the whole model twice."""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from optimized_sd.errors import UserError
from optimized_sd.weights.family import TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX, canonical_key

FORMAT_TAG = "optimized-sd random benchmark model"
FORMAT_VERSION = "1"
PART_PREFIXES = (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text", TEXT_ENCODER_PREFIX))
DISK_MARGIN = 64 * 2**20
DEFAULT_CACHE = Path("~/.cache/optimized-sd/bench")
MODELS = ("sd15", "tiny")


def default_cache_dir() -> Path:
    """`$OPTIMIZED_SD_CACHE`, else ~/.cache/optimized-sd/bench."""
    return Path(os.environ.get("OPTIMIZED_SD_CACHE") or DEFAULT_CACHE).expanduser()


@dataclass(frozen=True)
class CachedModel:
    """Paths of a cached benchmark model: the LDM file, our tokenizer, diffusers' config folder."""

    checkpoint: Path
    tokenizer: Path
    diffusers_config: Path
    built: bool  # written by this call (False: reused)
    seconds: float = 0.0


def model_config(name: str):  # -> optimized_sd.config.ModelConfig
    from optimized_sd.config import SD15, TINY

    if name not in MODELS:
        raise UserError(f"unknown benchmark model {name!r}; choose {' or '.join(MODELS)}")
    return SD15 if name == "sd15" else TINY


def planned_tensors(config) -> list[tuple[str, str, tuple[int, ...]]]:
    """(part, LDM key, shape) of every tensor, in file order, from a model built on the meta device."""
    import torch

    from optimized_sd.models.sd import LatentDiffusion

    with torch.device("meta"):
        model = LatentDiffusion(config)
    entries = []
    for part, prefix in PART_PREFIXES:
        for key, value in model.state_dict().items():
            if key.startswith(prefix):
                if not value.is_floating_point():
                    raise AssertionError(f"unexpected non-float tensor {key}")
                entries.append((part, canonical_key(key), tuple(value.shape)))
    return entries


def header_for(entries: list[tuple[str, str, tuple[int, ...]]], seed: int) -> tuple[bytes, int]:
    """The safetensors header (length prefix included, padded to 8 bytes) and the data size."""
    header: dict[str, object] = {
        "__metadata__": {"format": FORMAT_TAG, "version": FORMAT_VERSION, "seed": str(seed), "dtype": "float16"}
    }
    offset = 0
    for _, key, shape in entries:
        size = 2
        for dim in shape:
            size *= dim
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def read_header(path: Path) -> tuple[dict, int]:
    """The parsed header and where the data starts; raises ValueError on anything unreadable."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError("too short")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ValueError("bad header length")
        return json.loads(handle.read(length)), 8 + length


def is_valid(path: Path, entries: list[tuple[str, str, tuple[int, ...]]], seed: int) -> bool:
    """A quick check of a cached file: our tag and seed, every expected key and shape, full length."""
    try:
        header, data_start = read_header(path)
    except (OSError, ValueError):
        return False
    meta = header.pop("__metadata__", {}) or {}
    if meta.get("format") != FORMAT_TAG or meta.get("version") != FORMAT_VERSION or meta.get("seed") != str(seed):
        return False
    if set(header) != {key for _, key, _ in entries}:
        return False
    if any(tuple(header[key]["shape"]) != shape or header[key]["dtype"] != "F16" for _, key, shape in entries):
        return False
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    return path.stat().st_size == data_start + end


def check_disk_space(folder: Path, needed: int) -> None:
    """One-line error when the cache folder cannot hold the model."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + DISK_MARGIN:
        raise UserError(
            f"the benchmark model needs {(needed + DISK_MARGIN) / 2**30:.2f} GB free in {folder}, "
            f"which has {free / 2**30:.2f} GB; free some space or pass --cache-dir (or set OPTIMIZED_SD_CACHE)"
        )


def build_part(part: str, config, seed: int):  # -> nn.Module in fp32 on the CPU
    """One network with its modules' default initialisation, seeded per part."""
    import torch

    from optimized_sd.models.ops import default_init
    from optimized_sd.models.text_encoder import FrozenCLIPEmbedder
    from optimized_sd.models.unet import UNetModel
    from optimized_sd.models.vae import AutoencoderKL

    torch.manual_seed(seed * 1000 + [p for p, _ in PART_PREFIXES].index(part))
    if part == "unet":
        return default_init(UNetModel(config.unet))  # the op layer skips initialisation: ask for it
    if part == "vae":
        return default_init(AutoencoderKL(config.vae))
    return FrozenCLIPEmbedder(config.text)


def write_checkpoint(path: Path, config, seed: int, entries) -> None:
    """Stream the fp16 tensors into `path` (through a temporary file, renamed when complete)."""
    import torch

    header, data_size = header_for(entries, seed)
    partial = path.with_name(path.name + ".partial")
    expected = {key: shape for _, key, shape in entries}
    written = 0
    with open(partial, "wb") as handle:
        handle.write(header)
        for part, prefix in PART_PREFIXES:
            module = build_part(part, config, seed)
            with torch.no_grad():
                state = module.state_dict()
                keys = [key for owner, key, _shape in entries if owner == part]  # file order of this part
                by_ldm = {canonical_key(prefix + name): tensor for name, tensor in state.items() if tensor.is_floating_point()}
                for key in keys:
                    tensor = by_ldm[key]
                    if tuple(tensor.shape) != expected[key]:
                        raise AssertionError(f"{key}: built {tuple(tensor.shape)}, planned {expected[key]}")
                    half = tensor.detach().to(torch.float16).contiguous()
                    handle.write(half.view(torch.uint8).numpy().tobytes())
                    written += half.numel() * 2
            del module, state, by_ldm
    if written != data_size:
        raise AssertionError(f"wrote {written} bytes of tensor data, planned {data_size}")
    os.replace(partial, path)


def unet_diffusers_config(config) -> dict:
    """diffusers' UNet2DConditionModel config for our LDM UNet config (SD 1.x conventions: the head
    count is stored as `attention_head_dim`; attention at levels whose downscale is listed)."""
    unet = config.unet
    levels = len(unet.channel_mult)
    attention = [2**level in unet.attention_resolutions for level in range(levels)]
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": unet.num_heads,
        "block_out_channels": [unet.model_channels * m for m in unet.channel_mult],
        "center_input_sample": False,
        "cross_attention_dim": unet.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": unet.in_channels,
        "layers_per_block": unet.num_res_blocks,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "out_channels": unet.out_channels,
        "sample_size": 64,
        "transformer_layers_per_block": unet.transformer_depth,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "use_linear_projection": False,
    }


def vae_diffusers_config(config) -> dict:
    vae = config.vae
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [vae.ch * m for m in vae.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * len(vae.ch_mult),
        "in_channels": vae.in_channels,
        "latent_channels": vae.z_channels,
        "layers_per_block": vae.num_res_blocks,
        "norm_num_groups": 32,
        "out_channels": vae.out_channels,
        "sample_size": 512,
        "scaling_factor": config.scale_factor,
        "up_block_types": ["UpDecoderBlock2D"] * len(vae.ch_mult),
    }


def scheduler_config(config) -> dict:
    """DDIM with the CompVis schedule (scaled linear betas, timesteps 1 + k * 1000/steps)."""
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": config.linear_start,
        "beta_end": config.linear_end,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": config.timesteps,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    }


def write_diffusers_config(folder: Path, config) -> Path:
    """A local diffusers model folder without weights: what `from_single_file(config=...)` reads instead
    of fetching the configs from the hub (model_index.json, each part's config, the tokenizer)."""
    from optimized_sd.models.text_encoder import clip_config, write_byte_tokenizer

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    text = clip_config(config.text).to_dict()
    text["architectures"] = ["CLIPTextModel"]
    files = {
        "model_index.json": index,
        "unet/config.json": unet_diffusers_config(config),
        "vae/config.json": vae_diffusers_config(config),
        "scheduler/scheduler_config.json": scheduler_config(config),
        "text_encoder/config.json": text,
    }
    for name, content in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(content, indent=2, default=str))
    tokenizer = write_byte_tokenizer(folder / "tokenizer", config.text.vocab_size)
    (tokenizer / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        )
    )
    return folder


def ensure_model(cache_dir: Path | str | None = None, name: str = "sd15", seed: int = 0) -> CachedModel:
    """The cached benchmark model `name` (sd15: full size; tiny: for tests), built when missing or
    invalid. Raises UserError when the cache folder lacks room for it."""
    import time

    config = model_config(name)
    folder = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / f"{name}-seed{seed}"
    checkpoint = folder / f"{name}-random-fp16.safetensors"
    entries = planned_tensors(config)
    start = time.perf_counter()
    built = False
    if not (checkpoint.is_file() and is_valid(checkpoint, entries, seed)):
        header, data_size = header_for(entries, seed)
        existing = checkpoint.stat().st_size if checkpoint.is_file() else 0
        check_disk_space(folder, len(header) + data_size - existing)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_checkpoint(checkpoint, config, seed, entries)
        except OSError as error:
            raise UserError(f"cannot write the benchmark model to {folder}: {error.strerror or error}") from None
        built = True
    try:
        write_diffusers_config(folder / "diffusers-config", config)
    except OSError as error:
        raise UserError(f"cannot write the diffusers config to {folder}: {error.strerror or error}") from None
    return CachedModel(
        checkpoint=checkpoint,
        tokenizer=folder / "diffusers-config" / "tokenizer",
        diffusers_config=folder / "diffusers-config",
        built=built,
        seconds=time.perf_counter() - start,
    )


def activation_ranges(config, size: int = 64, seed: int = 0) -> dict[str, float]:
    """Largest |value| out of each network in an fp32 forward pass at `size` pixels, for the fp16
    range check (65504 is fp16's largest finite value)."""
    import torch

    ranges: dict[str, float] = {}
    with torch.no_grad():
        text = build_part("text", config, seed)
        ids = torch.randint(0, config.text.vocab_size - 2, (2, 77), generator=torch.Generator().manual_seed(0))
        context = text(ids)
        ranges["text"] = context.abs().max().item()
        del text
        unet = build_part("unet", config, seed)
        peak = [0.0]

        def track(module, args, output):
            if torch.is_tensor(output):
                peak[0] = max(peak[0], output.abs().max().item())

        handles = [m.register_forward_hook(track) for m in unet.modules()]
        x = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
        eps = unet(x, torch.tensor([999.0, 1.0]), context)
        for handle in handles:
            handle.remove()
        ranges["unet"] = eps.abs().max().item()
        ranges["unet_inner"] = peak[0]
        del unet
        vae = build_part("vae", config, seed)
        ranges["vae_decode"] = vae.decode(x[:1] / config.scale_factor).abs().max().item()
        ranges["vae_encode"] = vae.encode(torch.rand(1, 3, size, size) * 2 - 1).abs().max().item()
    return ranges
