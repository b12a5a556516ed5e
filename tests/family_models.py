"""Tiny SD 2.x (v-prediction) and SDXL models built with diffusers' and transformers' own classes, written
as diffusers folders and as single files in the original layouts.

The single files follow the rules of diffusers' conversion scripts (`convert_diffusers_to_original_stable_diffusion.py`,
`convert_diffusers_to_original_sdxl.py`), re-implemented here for the text towers so the loader's own
tables are not used to write what they must read: OpenCLIP towers get open_clip names with q, k, v fused
into `in_proj_*`. Two layouts per family:
  "converted"  what the scripts write: SD 2.x keeps diffusers' 2 (of 3) blocks and no projection; SDXL's
               bigG keeps the Linear `text_projection.weight`;
  "real"       what Stability's own files hold: SD 2.x carries the tower's last block (never run) and
               `text_projection`; SDXL's projection is open_clip's (width, proj) matrix; both carry `logit_scale`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from optimized_sd.models.text_encoder import write_byte_tokenizer

VOCAB = 1000
SIZE_EMBEDDING = 256  # SDXL's per-number Fourier embedding width, fixed by the architecture


@dataclass
class FamilyModel:
    family: str
    folder: Path  # diffusers folder
    files: dict[str, Path]  # layout name -> single .safetensors file
    tokenizer: Path
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module] = field(default_factory=list)


def randomise(*modules: nn.Module) -> None:
    """Perturb every parameter so no zero-initialised layer hides a mapping error."""
    for module in modules:
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
        module.eval()


def tiny_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        scaling_factor=scaling_factor,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def clip_text(width: int, layers: int, act: str, projection: int | None = None):
    """A CLIP text tower; head width 64 as every SD tower (one head at these widths)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=VOCAB - 2,
        eos_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 1,
        projection_dim=projection or width,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def write_tokenizer(folder: Path, pad_with_bang: bool) -> Path:
    """The byte-level stand-in tokenizer; OpenCLIP towers' tokenizers pad with "!" (id 0), as SD 2.x's and
    SDXL's `tokenizer_2` do."""
    write_byte_tokenizer(folder, VOCAB)
    if pad_with_bang:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["pad_token"] = "!"
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


# -- the conversion scripts' rules, for the text towers ---------------------------------------------
OPENCLIP_NAMES = (
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    (".fc1.", ".c_fc."),
    (".fc2.", ".c_proj."),
    (".self_attn", ".attn"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
)


def hub_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text state dict with the `text_model.` prefix hub files have (newer transformers drop it)."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}


def openclip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text state dict in open_clip names, q/k/v fused into in_proj (q, k, v order)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in hub_names(state).items():
        if "position_ids" in key:
            continue
        for code in "qkv":
            marker = f".self_attn.{code}_proj."
            if marker in key:
                layer, leaf = key.split(marker)
                fused.setdefault(layer, {}).setdefault(leaf, {})[code] = value
                break
        else:
            for old, new in OPENCLIP_NAMES:
                key = key.replace(old, new)
            out[key] = value
    for layer, leaves in fused.items():
        for old, new in OPENCLIP_NAMES:
            layer = layer.replace(old, new)
        for leaf, parts in leaves.items():
            out[f"{layer}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def unet_and_vae_ldm(folder: Path) -> dict[str, torch.Tensor]:
    """UNet and VAE of a diffusers folder in LDM names (through the loader's UNet/VAE tables, which the
    UNet and VAE parity tests prove right)."""
    from optimized_sd.weights.loading import open_diffusers_folder

    source = open_diffusers_folder(folder).source
    tensors = {}
    for key in source.keys():
        if key.startswith(("model.diffusion_model.", "first_stage_model.")):
            value = source.get(key)
            if ".mid.attn_1." in key and key.endswith("weight") and value.dim() == 2:
                value = value[:, :, None, None]  # the scripts' reshape of the VAE attention to 1x1 convs
            tensors[key] = value.clone().contiguous()
    return tensors


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_model_index(folder: Path, pipeline: str, **extra) -> None:
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **extra}))


def write_scheduler(folder: Path, prediction_type: str) -> None:
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    config = {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": prediction_type,
        "num_train_timesteps": 1000,
    }
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))


# -- SD 2.x ------------------------------------------------------------------------------------------
def build_sd2(root: Path, seed: int = 0) -> FamilyModel:
    """A v-prediction SD 2.x: linear projections, 64-wide heads, an exact-GELU OpenCLIP-style tower of
    which diffusers keeps 2 blocks (the real tower has 3; SD 2.x never runs the last)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(1, 2),  # diffusers' SD 2.x configs store head counts here (channels / 64)
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = tiny_vae()
    text = clip_text(64, 2, "gelu")
    last_block = clip_text(64, 1, "gelu")  # stands for the tower's 3rd block, which SD 2.x never runs
    randomise(unet, vae, text, last_block)

    folder = root / "sd2"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    tokenizer = write_tokenizer(folder / "tokenizer", pad_with_bang=True)
    write_scheduler(folder, "v_prediction")
    write_model_index(folder, "StableDiffusionPipeline")

    base = unet_and_vae_ldm(folder)
    converted = {"cond_stage_model.model." + k: v for k, v in openclip_state_dict(text.state_dict()).items()}
    extra_block = {
        "cond_stage_model.model." + k.replace("resblocks.0.", "resblocks.2."): v
        for k, v in openclip_state_dict(last_block.state_dict()).items()
        if "resblocks.0." in k
    }
    real = {
        **converted,
        **extra_block,
        "cond_stage_model.model.text_projection": torch.randn(64, 64) * 0.02,
        "cond_stage_model.model.logit_scale": torch.tensor(4.6052),
    }
    files = {
        "converted": save({**base, **converted}, root / "sd2-converted.safetensors"),
        "real": save({**base, **real}, root / "sd2-real.safetensors"),
    }
    return FamilyModel("sd2", folder, files, tokenizer, unet, vae, [text])


# -- SDXL --------------------------------------------------------------------------------------------
def build_sdxl(root: Path, seed: int = 0) -> FamilyModel:
    """An SDXL base: no attention at level 0, transformer depths (1, 2) below, a CLIP ViT-L-style tower
    (32 wide) and a bigG-style tower (64 wide, projection 64): context 96, adm 64 + 6 * 256."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    clip_l, big_g = clip_text(32, 2, "quick_gelu"), clip_text(64, 3, "gelu", projection=64)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=96,
        attention_head_dim=(1, 1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SIZE_EMBEDDING,
        projection_class_embeddings_input_dim=64 + 6 * SIZE_EMBEDDING,
        norm_num_groups=32,
    )
    vae = tiny_vae(scaling_factor=0.13025)  # SDXL's VAE config states its latent scale
    randomise(unet, vae, clip_l, big_g)

    folder = root / "sdxl"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    clip_l.save_pretrained(folder / "text_encoder")
    big_g.save_pretrained(folder / "text_encoder_2")
    tokenizer = write_tokenizer(folder / "tokenizer", pad_with_bang=False)
    write_tokenizer(folder / "tokenizer_2", pad_with_bang=True)
    write_scheduler(folder, "epsilon")
    write_model_index(folder, "StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True)

    base = unet_and_vae_ldm(folder)
    first = {"conditioner.embedders.0.transformer." + k: v for k, v in hub_names(clip_l.state_dict()).items()}
    second = {"conditioner.embedders.1.model." + k: v for k, v in openclip_state_dict(big_g.state_dict()).items()}
    real_second = {k: v for k, v in second.items() if not k.endswith("text_projection.weight")}
    real_second["conditioner.embedders.1.model.text_projection"] = big_g.text_projection.weight.t().contiguous()
    real_second["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    files = {
        "converted": save({**base, **first, **second}, root / "sdxl-converted.safetensors"),
        "real": save({**base, **first, **real_second}, root / "sdxl-real.safetensors"),
    }
    return FamilyModel("sdxl", folder, files, tokenizer, unet, vae, [clip_l, big_g])


# -- SDXL refiner ------------------------------------------------------------------------------------
def build_sdxl_refiner(root: Path, base: FamilyModel, seed: int = 1) -> FamilyModel:
    """An SDXL refiner for the tiny SDXL `base`: the base's bigG tower and VAE (as the real refiner shares
    them), its own UNet with attention at levels 1 and 2 of four (as SGM's sd_xl_refiner.yaml) and the
    aesthetic-score vector: pooled 64 + 5 * 256 (original size, crop, aesthetic score)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    big_g = base.text_encoders[1]
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2,
        cross_attention_dim=64,
        attention_head_dim=(1, 1, 1, 1),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SIZE_EMBEDDING,
        projection_class_embeddings_input_dim=64 + 5 * SIZE_EMBEDDING,
        norm_num_groups=32,
    )
    randomise(unet)

    folder = root / "sdxl-refiner"
    unet.save_pretrained(folder / "unet")
    base.vae.save_pretrained(folder / "vae")
    big_g.save_pretrained(folder / "text_encoder_2")
    tokenizer = write_tokenizer(folder / "tokenizer_2", pad_with_bang=True)
    write_scheduler(folder, "epsilon")
    write_model_index(folder, "StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)

    tensors = unet_and_vae_ldm(folder)
    tower = {"conditioner.embedders.0.model." + k: v for k, v in openclip_state_dict(big_g.state_dict()).items()}
    tower = {k: v for k, v in tower.items() if not k.endswith("text_projection.weight")}
    tower["conditioner.embedders.0.model.text_projection"] = big_g.text_projection.weight.t().contiguous()
    tower["conditioner.embedders.0.model.logit_scale"] = torch.tensor(4.6052)
    files = {"real": save({**tensors, **tower}, root / "sdxl-refiner.safetensors")}
    return FamilyModel("sdxl_refiner", folder, files, tokenizer, unet, base.vae, [big_g])
