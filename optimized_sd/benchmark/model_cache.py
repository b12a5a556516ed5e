"""The benchmark's models: the full SD 1.5, SD 2.x (768-v) and SDXL base architectures with seeded random
weights, each written once as an fp16 single-file safetensors in the original layout (LDM keys for SD 1.x
and 2.x, SGM keys for SDXL: what diffusers' conversion scripts write and what `weights/family.py` detects),
with a stand-in tokenizer and a diffusers config folder so diffusers' `from_single_file` opens the same
file offline.

Memory and speed do not depend on the weights' values, only on their shapes. The modules' default
initialisation keeps activations in a range fp16 holds (checked on a small fp32 forward pass where the
fp32 model fits in memory).

The file is written module by module: the header is laid out from the shapes of a model built on the meta
device, then each module that owns tensors is materialised on the CPU in fp32, initialised, its tensors
cast to fp16 and appended, and the module returned to the meta device. The peak is one module (SDXL's
largest is bigG's token embedding, 0.25 GB in fp32), whatever the model's size (SDXL's UNet alone is
10 GB in fp32)."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from optimized_sd.errors import UserError
from optimized_sd.weights.family import canonical_key

FORMAT_TAG = "optimized-sd random benchmark model"
FORMAT_VERSION = "1"
DISK_MARGIN = 64 * 2**20
DEFAULT_CACHE = Path("~/.cache/optimized-sd/bench")
# Benchmark model name -> its config preset: the full-size families, and tiny ones of the same structure
# for tests and for checking the scripts quickly.
MODELS = ("sd15", "sd2", "sdxl", "tiny", "tiny-sd2", "tiny-sdxl")
FAMILY_MODELS = {"sd15": ("sd15", "tiny"), "sd2": ("sd2", "tiny-sd2"), "sdxl": ("sdxl", "tiny-sdxl")}
"""`--family` -> (full-size model, tiny model of that family)."""
FLUX_MODEL = "flux-dev"  # Flux.1 dev in BFL + separate files (`flux_model`), for the scripts that run it by name
RANGE_CHECK_MAX_BYTES = 4 * 2**30  # the fp32 forward-pass range check builds the whole model: skipped above this


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
    parts: tuple[Path, ...] = ()  # Flux: the text encoders' and the VAE's files beside the transformer (`checkpoint`)
    t5_tokenizer: Path | None = None


def tiny_family_configs():  # -> dict[str, ModelConfig]
    """SD 2.x (v) and SDXL at toy widths, every kind of block of the full ones: linear projections, 64-wide
    heads, OpenCLIP towers (SDXL: CLIP ViT-L beside bigG, `label_emb`, a level without attention, two
    transformer layers per block)."""
    from dataclasses import replace

    from optimized_sd.config import SD21_V, SDXL_BASE, TINY, OpenCLIPConfig, TextEncoderConfig, UNetConfig

    tower = OpenCLIPConfig(vocab_size=1000, width=64, heads=1, layers=2, intermediate_size=128)
    sd2 = replace(
        SD21_V,
        unet=replace(
            TINY.unet, num_head_channels=64, use_linear_in_transformer=True, context_dim=64, channel_mult=(1, 2), model_channels=64
        ),
        vae=TINY.vae,
        open_clip=tower,
    )
    sdxl = replace(
        SDXL_BASE,
        unet=UNetConfig(
            model_channels=32,
            attention_resolutions=(2,),
            num_res_blocks=1,
            channel_mult=(1, 2),
            num_head_channels=64,
            use_linear_in_transformer=True,
            transformer_depth=(0, 2),
            context_dim=32 + 64,
            adm_in_channels=64 + 6 * 256,
        ),
        vae=TINY.vae,
        # CLIP ViT-L narrower than bigG, as in the real model: diffusers tells the towers apart by width
        text=TextEncoderConfig(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1, penultimate=True
        ),
        open_clip=replace(tower, layers=3, penultimate=True, projection_dim=64),
    )
    return {"tiny-sd2": sd2, "tiny-sdxl": sdxl}


def model_config(name: str):  # -> optimized_sd.config.ModelConfig
    from optimized_sd.config import SD15, SD21_V, SDXL_BASE, TINY

    if name not in MODELS:
        raise UserError(f"unknown benchmark model {name!r}; choose {', '.join(MODELS)}")
    presets = {"sd15": SD15, "sd2": SD21_V, "sdxl": SDXL_BASE, "tiny": TINY}
    return presets[name] if name in presets else tiny_family_configs()[name]


def meta_model(config):  # -> LatentDiffusion on the meta device
    import torch

    from optimized_sd.models.sd import LatentDiffusion

    with torch.device("meta"):
        return LatentDiffusion(config)


def owned_tensors(model) -> list[tuple[str, list[str]]]:
    """(module path, its own state-dict names) for each module that owns tensors, in state-dict order
    (a module's own tensors come before its children's, so these groups follow the file order)."""
    groups: list[tuple[str, list[str]]] = []
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            raise AssertionError(f"unexpected non-float tensor {key}")
        owner, _, name = key.rpartition(".")
        if groups and groups[-1][0] == owner:
            groups[-1][1].append(name)
        else:
            groups.append((owner, [name]))
    return groups


def planned_tensors(config) -> list[tuple[str, str, tuple[int, ...]]]:
    """(model key, checkpoint key, shape) of every tensor, in file order, from a model built on the meta device."""
    return [(key, canonical_key(key), tuple(value.shape)) for key, value in meta_model(config).state_dict().items()]


def initialise(module) -> None:
    """PyTorch's default initialisation of one module's own tensors: op-layer Linear/Conv2d skip theirs
    (they are filled from checkpoints), so it is asked for; a module with no rule of its own (OpenCLIP's
    fused attention, positional embedding, projection) gets open_clip's kind: N(0, 0.02) matrices, zero vectors."""
    from torch import nn

    from optimized_sd.models import ops

    if isinstance(module, ops.Linear):
        nn.Linear.reset_parameters(module)
    elif isinstance(module, ops.Conv2d):
        nn.Conv2d.reset_parameters(module)
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()
    else:
        for parameter in module.parameters(recurse=False):
            if parameter.dim() >= 2:
                nn.init.normal_(parameter, std=0.02)
            else:
                nn.init.zeros_(parameter)


def seeded_tensors(config, seed: int):  # -> Iterator[tuple[str, Tensor]]
    """(model key, fp32 tensor) of every tensor in file order, one owning module at a time: each is
    materialised on the CPU, initialised from one seeded generator, yielded, and returned to the meta device."""
    import torch

    model = meta_model(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for owner, names in owned_tensors(model):
            module = model.get_submodule(owner)
            module.to_empty(device="cpu", recurse=False)
            initialise(module)
            tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
            for name in names:
                yield f"{owner}.{name}" if owner else name, tensors[name].detach()
            module.to_empty(device="meta", recurse=False)


def file_metadata(config, seed: int) -> dict[str, str]:
    """The header's metadata: our tag and seed, and the prediction type (which `--prediction auto` reads)."""
    meta = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "seed": str(seed), "dtype": "float16"}
    if config.prediction_type != "epsilon":
        meta["prediction_type"] = config.prediction_type
    return meta


def header_for(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, int]:
    """The safetensors header (length prefix included, padded to 8 bytes) and the data size."""
    header: dict[str, object] = {"__metadata__": metadata}
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


def is_valid(path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bool:
    """A quick check of a cached file (its header validated by the loader's own reader): our tag, seed and
    prediction type, every expected key and shape, full length."""
    import torch

    from optimized_sd.errors import CheckpointError
    from optimized_sd.weights.sources import SafetensorsSource

    try:
        source = SafetensorsSource(path)
    except CheckpointError:
        return False
    meta = source.metadata
    source.close()
    if meta != metadata:
        return False
    if set(source.keys()) != {key for _, key, _ in entries}:
        return False
    if any(source.shape(key) != shape or source.dtype(key) != torch.float16 for _, key, shape in entries):
        return False
    return path.stat().st_size == source.data_end


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


def write_checkpoint(path: Path, config, seed: int, entries, metadata: dict[str, str]) -> None:
    """Stream the fp16 tensors into `path` (through a temporary file, renamed when complete)."""
    import torch

    header, data_size = header_for(entries, metadata)
    partial = path.with_name(path.name + ".partial")
    written = 0
    with open(partial, "wb") as handle:
        handle.write(header)
        for (key, _, shape), (built_key, tensor) in zip(entries, seeded_tensors(config, seed), strict=True):
            if built_key != key or tuple(tensor.shape) != shape:
                raise AssertionError(f"built {built_key} {tuple(tensor.shape)}, planned {key} {shape}")
            half = tensor.to(torch.float16).contiguous()
            handle.write(half.view(torch.uint8).numpy().tobytes())
            written += half.numel() * 2
    if written != data_size:
        raise AssertionError(f"wrote {written} bytes of tensor data, planned {data_size}")
    os.replace(partial, path)


def unet_diffusers_config(config) -> dict:
    """diffusers' UNet2DConditionModel config for our LDM UNet config. diffusers stores head counts as
    `attention_head_dim` (SD 1.x: a fixed 8; SD 2.x and SDXL: channels / 64 per level); attention at the
    levels whose downscale is listed; SDXL's `label_emb` is its "text_time" added embedding."""
    unet = config.unet
    levels = range(len(unet.channel_mult))
    channels = [unet.model_channels * m for m in unet.channel_mult]
    depths = [unet.depth(level) for level in levels]
    attention = [depth > 0 for depth in depths]
    layout = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": [unet.heads(c) for c in channels] if unet.num_head_channels > 0 else unet.num_heads,
        "block_out_channels": channels,
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
        "sample_size": config.default_size // config.vae.downscale,
        # diffusers' mid block takes the last level's depth, as ours does unless told otherwise
        "transformer_layers_per_block": unet.transformer_depth if isinstance(unet.transformer_depth, int) else [max(d, 1) for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "use_linear_projection": unet.use_linear_in_transformer,
    }
    if unet.middle_depth() != (depths[-1] or 1):
        raise ValueError(f"diffusers' mid block cannot take depth {unet.middle_depth()} beside a last level of depth {depths[-1]}")
    if unet.adm_in_channels is not None:
        from optimized_sd.models.conditioner import SIZE_EMBEDDING_DIM

        layout.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=SIZE_EMBEDDING_DIM,
            projection_class_embeddings_input_dim=unet.adm_in_channels,
        )
    return layout


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
        "sample_size": config.default_size,
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
        "prediction_type": config.prediction_type,
    }


def open_clip_diffusers_config(tower) -> dict:
    """transformers' CLIPTextConfig for an OpenCLIP tower, as diffusers' SD 2.x / SDXL folders hold it
    (exact GELU; the special tokens where `special_token_ids` places them)."""
    from transformers import CLIPTextConfig

    from optimized_sd.models.text_encoder import special_token_ids

    return CLIPTextConfig(
        vocab_size=tower.vocab_size,
        hidden_size=tower.width,
        intermediate_size=tower.intermediate_size,
        num_hidden_layers=tower.layers,
        num_attention_heads=tower.heads,
        max_position_embeddings=tower.context_length,
        hidden_act="gelu",
        projection_dim=tower.projection_dim or tower.width,
        **special_token_ids(tower.vocab_size),
    ).to_dict()


def text_components(config) -> list[tuple[str, str, dict, bool]]:
    """(folder suffix, transformers class, config, pads with "!") of each text tower in diffusers' order:
    SD 1.x CLIP; SD 2.x OpenCLIP ViT-H (no projection); SDXL CLIP ViT-L then bigG with its projection."""
    from optimized_sd.models.text_encoder import clip_config

    towers = []
    if config.text is not None:
        towers.append(("CLIPTextModel", clip_config(config.text).to_dict(), False))
    if config.open_clip is not None:
        kind = "CLIPTextModelWithProjection" if config.open_clip.projection_dim else "CLIPTextModel"
        towers.append((kind, open_clip_diffusers_config(config.open_clip), True))
    return [("" if index == 0 else f"_{index + 1}", kind, layout, bang) for index, (kind, layout, bang) in enumerate(towers)]


def write_diffusers_config(folder: Path, config) -> Path:
    """A local diffusers model folder without weights: what `from_single_file(config=...)` reads instead
    of fetching the configs from the hub (model_index.json, each part's config, the tokenizers)."""
    from optimized_sd.models.text_encoder import write_byte_tokenizer

    sdxl = config.unet.adm_in_channels is not None
    index: dict[str, object] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False, safety_checker=[None, None])
    files = {
        "unet/config.json": unet_diffusers_config(config),
        "vae/config.json": vae_diffusers_config(config),
        "scheduler/scheduler_config.json": scheduler_config(config),
    }
    for suffix, kind, layout, pads_with_bang in text_components(config):
        index[f"text_encoder{suffix}"] = ["transformers", kind]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        files[f"text_encoder{suffix}/config.json"] = {**layout, "architectures": [kind]}
        tokenizer = write_byte_tokenizer(folder / f"tokenizer{suffix}", layout["vocab_size"])
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        tokenizer_config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            **special,
            "pad_token": "!" if pads_with_bang else "<|endoftext|>",  # open_clip pads with "!" (id 0)
        }
        (tokenizer / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    files["model_index.json"] = index
    for name, content in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(content, indent=2, default=str))
    return folder


def ensure_model(cache_dir: Path | str | None = None, name: str = "sd15", seed: int = 0) -> CachedModel:
    """The cached benchmark model `name` (one of MODELS, or `flux-dev`: `flux_model`), built when missing or
    invalid. Raises UserError when the cache folder lacks room for it."""
    import time

    if name == FLUX_MODEL:
        from optimized_sd.benchmark.flux_model import ensure_flux_model

        return ensure_flux_model((Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / f"{name}-seed{seed}", seed)
    config = model_config(name)
    folder = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / f"{name}-seed{seed}"
    checkpoint = folder / f"{name}-random-fp16.safetensors"
    entries = planned_tensors(config)
    metadata = file_metadata(config, seed)
    start = time.perf_counter()
    built = False
    if not (checkpoint.is_file() and is_valid(checkpoint, entries, metadata)):
        header, data_size = header_for(entries, metadata)
        existing = checkpoint.stat().st_size if checkpoint.is_file() else 0
        check_disk_space(folder, len(header) + data_size - existing)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_checkpoint(checkpoint, config, seed, entries, metadata)
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


def seeded_model(config, seed: int = 0):  # -> LatentDiffusion in fp32 on the CPU
    """The whole model with the values `ensure_model` writes (before their cast to fp16)."""
    import torch

    model = meta_model(config).to_empty(device="cpu")
    targets = model.state_dict(keep_vars=True)  # key -> the parameter or buffer itself
    with torch.no_grad():
        for key, tensor in seeded_tensors(config, seed):
            targets[key].copy_(tensor)
    return model.eval()


def activation_ranges(config, size: int = 64, seed: int = 0) -> dict[str, float] | None:
    """Largest |value| out of each network in an fp32 forward pass at `size` pixels, for the fp16
    range check (65504 is fp16's largest finite value); None when the fp32 model would not fit in
    RANGE_CHECK_MAX_BYTES (SDXL: a run's `finite` flag checks its outputs instead)."""
    import torch

    from optimized_sd.models.conditioner import size_conditioning, text_towers

    if sum(4 * math.prod(shape) for _, _, shape in planned_tensors(config)) > RANGE_CHECK_MAX_BYTES:
        return None
    model = seeded_model(config, seed)
    ranges: dict[str, float] = {}
    with torch.no_grad():
        towers = text_towers(model.get_submodule(model.text_root))
        ids = torch.randint(0, 200, (2, 77), generator=torch.Generator().manual_seed(0))
        context, pooled = model.encode_text([ids] * len(towers))
        ranges["text"] = context.abs().max().item()
        y = size_conditioning(pooled, [size, size, 0, 0, size, size]) if config.unet.adm_in_channels else None
        unet = model.model.diffusion_model
        peak = [0.0]

        def track(module, args, output):
            if torch.is_tensor(output):
                peak[0] = max(peak[0], output.abs().max().item())

        handles = [m.register_forward_hook(track) for m in unet.modules()]
        x = torch.randn(2, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
        eps = unet(x, torch.tensor([999.0, 1.0]), context, y=y)
        for handle in handles:
            handle.remove()
        ranges["unet"] = eps.abs().max().item()
        ranges["unet_inner"] = peak[0]
        vae = model.first_stage_model
        ranges["vae_decode"] = vae.decode(x[:1] / config.scale_factor).abs().max().item()
        ranges["vae_encode"] = vae.encode(torch.rand(1, 3, size, size) * 2 - 1).abs().max().item()
    return ranges
