"""Shared fixtures: one tiny random SD 1.x model written in every real layout.

The model is built with diffusers' own classes (a test dependency), so the diffusers folder is the
ground truth; the LDM single-file layouts are derived from it through our key-mapping tables, which
the parity tests then prove right."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from optimized_sd.config import TINY, ModelConfig
from optimized_sd.models.text_encoder import clip_config, write_byte_tokenizer


@pytest.fixture(autouse=True, scope="session")
def _model_hashes_cached_apart(tmp_path_factory: pytest.TempPathFactory):
    """Model hashes the tests write go to a cache of their own, not the user's ~/.cache/optimized-sd/hashes.json."""
    import os

    previous = os.environ.get("OPTIMIZED_SD_HASH_CACHE")
    os.environ["OPTIMIZED_SD_HASH_CACHE"] = str(tmp_path_factory.mktemp("hashes") / "hashes.json")
    yield
    if previous is None:
        os.environ.pop("OPTIMIZED_SD_HASH_CACHE", None)
    else:
        os.environ["OPTIMIZED_SD_HASH_CACHE"] = previous


@dataclass
class TinyModel:
    folder: Path  # diffusers folder
    safetensors: Path  # LDM single file, fp32
    ckpt: Path  # CompVis-style {"state_dict": ...}
    tokenizer: Path
    unet: torch.nn.Module  # diffusers modules, for parity
    vae: torch.nn.Module
    text_encoder: torch.nn.Module


def build_diffusers_parts(seed: int = 0):
    """diffusers UNet/VAE and transformers CLIP text model with TINY's shapes and seeded weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet_cfg = TINY.unet
    widths = tuple(unet_cfg.model_channels * m for m in unet_cfg.channel_mult)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=unet_cfg.in_channels,
        out_channels=unet_cfg.out_channels,
        block_out_channels=widths,
        layers_per_block=unet_cfg.num_res_blocks,
        down_block_types=("CrossAttnDownBlock2D",) * len(widths),
        up_block_types=("CrossAttnUpBlock2D",) * len(widths),
        cross_attention_dim=unet_cfg.context_dim,
        attention_head_dim=unet_cfg.num_heads,  # diffusers' SD 1.x configs store the head count here
        norm_num_groups=32,
    )
    vae_cfg = TINY.vae
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(vae_cfg.ch * m for m in vae_cfg.ch_mult),
        down_block_types=("DownEncoderBlock2D",) * len(vae_cfg.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(vae_cfg.ch_mult),
        layers_per_block=vae_cfg.num_res_blocks,
        latent_channels=vae_cfg.z_channels,
        norm_num_groups=32,
        sample_size=64,
    )
    text = CLIPTextModel(clip_config(TINY.text))
    return perturbed(unet), perturbed(vae), perturbed(text)


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """The module with noise on every parameter (no zero-initialised layer may hide a mapping error), in eval mode."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return module.eval()


def write_model_index(folder: Path, class_name: str = "StableDiffusionPipeline") -> None:
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": class_name, "unet": ["diffusers", "UNet2DConditionModel"]})
    )


def write_ldm_files(folder: Path, safetensors_path: Path, ckpt_path: Path, config: ModelConfig = TINY) -> None:
    """LDM single-file layouts of a diffusers folder, through our own diffusers -> LDM tables."""
    from safetensors.torch import save_file

    from optimized_sd.models.sd import LatentDiffusion
    from optimized_sd.weights.loading import open_diffusers_folder

    source = open_diffusers_folder(folder).source
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LatentDiffusion(config).state_dict().items()}
    tensors = {}
    for key in source.keys():
        value = source.get(key)
        if key in shapes:  # the VAE attention projections are 1x1 convs in LDM files
            value = value.reshape(shapes[key])
        tensors[key] = value.clone().contiguous()
    save_file(tensors, str(safetensors_path))
    torch.save({"state_dict": tensors, "global_step": 1}, ckpt_path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    root = tmp_path_factory.mktemp("tiny-sd")
    unet, vae, text = build_diffusers_parts()
    folder = root / "diffusers"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    tokenizer = write_byte_tokenizer(folder / "tokenizer", TINY.text.vocab_size)
    write_model_index(folder)
    safetensors_path, ckpt_path = root / "tiny.safetensors", root / "tiny.ckpt"
    write_ldm_files(folder, safetensors_path, ckpt_path)
    return TinyModel(folder, safetensors_path, ckpt_path, tokenizer, unet, vae, text)


@pytest.fixture
def diffusers_variant(tiny_model: TinyModel, tmp_path: Path) -> Callable[..., Path]:
    """A factory: `make(name, class_name=..., unet=module, ...)` copies the tiny diffusers folder and
    replaces the named parts by the given diffusers/transformers modules (perturbed in place, then saved)."""

    def make(name: str, *, class_name: str = "StableDiffusionPipeline", **parts: torch.nn.Module) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_model.folder, folder)
        write_model_index(folder, class_name)
        for part, module in parts.items():
            shutil.rmtree(folder / part)
            perturbed(module).save_pretrained(folder / part)
        return folder

    return make


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory):
    """A tiny SD 2.x v-prediction model: diffusers folder plus "converted" and "real" single files."""
    from family_models import build_sd2

    return build_sd2(tmp_path_factory.mktemp("tiny-sd2"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory):
    """A tiny SDXL base model: diffusers folder plus "converted" and "real" single files."""
    from family_models import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_refiner(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl):
    """A tiny SDXL refiner sharing tiny_sdxl's bigG tower and VAE: diffusers folder plus a "real" single file."""
    from family_models import build_sdxl_refiner

    return build_sdxl_refiner(tmp_path_factory.mktemp("tiny-refiner"), tiny_sdxl)


@pytest.fixture
def without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing matplotlib fails, as on a machine without it (the reports fall back)."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
