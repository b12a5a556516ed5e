"""Model-family detection from key -> shape maps, and the known-extra key table."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from optimized_sd.errors import CheckpointError, UnsupportedModelError
from optimized_sd.weights.family import (
    SCHEDULE_BUFFERS,
    canonical_key,
    detect_family,
    known_extra_key,
    part_of_key,
)

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."


def sd1_shapes(width: int = 16, in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    """A tiny SD 1.x-structured shape map (real LDM key names, small widths)."""
    return {
        U + "input_blocks.0.0.weight": (8, in_channels, 3, 3),
        U + "input_blocks.0.0.bias": (8,),
        U + "input_blocks.1.1.proj_in.weight": (8, 8, 1, 1),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, width),
        U + "out.2.weight": (4, 8, 3, 3),
        "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
        "first_stage_model.decoder.conv_out.weight": (3, 8, 3, 3),
        TE + "embeddings.token_embedding.weight": (10, width),
        TE + "final_layer_norm.weight": (width,),
        TE + "embeddings.position_ids": (1, 7),
        "betas": (1000,),
        "model_ema.decay": (),
        "model_ema.diffusion_modelinput_blocks00weight": (8, in_channels, 3, 3),
    }


def real_sd1_shapes() -> dict[str, tuple[int, ...]]:
    """The telltale keys of sd-v1-4.ckpt at their real sizes."""
    return {
        U + "input_blocks.0.0.weight": (320, 4, 3, 3),
        U + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }


def sd2_shapes(in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    return {
        U + "input_blocks.0.0.weight": (320, in_channels, 3, 3),
        U + "input_blocks.1.1.proj_in.weight": (320, 320),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    }


def one_line_message(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_tiny_and_real_sd1_are_sd1() -> None:
    assert detect_family(sd1_shapes()) == "sd1"
    assert detect_family(sd1_shapes(width=32)) == "sd1"
    assert detect_family(real_sd1_shapes()) == "sd1"


def test_old_text_encoder_keys_take_the_one_canonical_form() -> None:
    """Files name the CLIP keys with or without `text_model.`; opening a checkpoint puts them all in one form."""
    old = {(k.replace("text_model.", "") if k.startswith(TE) else k): v for k, v in sd1_shapes().items()}
    assert old != sd1_shapes()
    assert {canonical_key(k): v for k, v in old.items()} == sd1_shapes()
    assert {canonical_key(k): v for k, v in sd1_shapes().items()} == sd1_shapes()
    mismatched = {canonical_key(k): v for k, v in old.items()} | {TE + "final_layer_norm.weight": (32,)}
    with pytest.raises(CheckpointError, match="do not belong together"):  # the width check sees the old form too
        detect_family(mismatched)


def test_sd1_inpainting_is_sd1() -> None:
    """sd-v1-5-inpainting: a 9-channel UNet input (latents + mask + masked-image latents) is still SD 1.x."""
    assert detect_family(sd1_shapes(in_channels=9)) == "sd1"


def test_detect_family_is_pure() -> None:
    shapes = sd1_shapes()
    frozen = MappingProxyType(dict(shapes))
    assert detect_family(frozen) == "sd1"
    assert dict(frozen) == shapes


def sdxl_shapes(in_channels: int = 4) -> dict[str, tuple[int, ...]]:
    """The telltale keys of sd_xl_base_1.0.safetensors at their real sizes."""
    return {
        U + "input_blocks.0.0.weight": (320, in_channels, 3, 3),
        U + "input_blocks.4.1.proj_in.weight": (640, 640),
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        U + "label_emb.0.0.weight": (1280, 2816),
        "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.ln_final.weight": (1280,),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    }


def refiner_shapes() -> dict[str, tuple[int, ...]]:
    return {
        U + "input_blocks.0.0.weight": (384, 4, 3, 3),
        U + "input_blocks.4.1.proj_in.weight": (768, 768),
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (768, 1280),
        U + "label_emb.0.0.weight": (1536, 2560),
        "conditioner.embedders.0.model.ln_final.weight": (1280,),
    }


def test_sd2_sdxl_and_refiner_are_recognised() -> None:
    assert detect_family(sd2_shapes()) == "sd2"
    assert detect_family(sdxl_shapes()) == "sdxl"
    assert detect_family(refiner_shapes()) == "sdxl_refiner"


@pytest.mark.parametrize(
    ("shapes", "needle"),
    [
        (sd2_shapes(in_channels=9), "SD 2.x inpainting"),
        (sdxl_shapes(in_channels=9), "SDXL inpainting"),
        ({**sd2_shapes(in_channels=5), "depth_model.model.pretrained.x": (1,)}, "SD 2.x depth"),
        (sd1_shapes(in_channels=8), "InstructPix2Pix (SD 1.x)"),
        ({**sd2_shapes(), U + "label_emb.0.0.weight": (1280, 1024), "embedder.model.x": (1,)}, "unCLIP"),
        ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,)}, "Stable Diffusion 3"),
        ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "not a whole Flux.1 transformer"),
        ({"clip_txt_mapper.weight": (2048, 1280)}, "Stable Cascade stage C"),
        ({"down_blocks.1.0.channelwise.0.weight": (1, 1)}, "Stable Cascade stage B"),
        ({"t_block.1.weight": (6912, 1152), "y_embedder.y_proj.fc1.weight": (1152, 4096)}, "PixArt"),
        ({"add_embedding.image_norm.weight": (1280,), "conv_in.weight": (384, 4, 3, 3)}, "Kandinsky"),
    ],
)
def test_other_models_are_unsupported(shapes: dict, needle: str) -> None:
    with pytest.raises(UnsupportedModelError) as exc:
        detect_family(shapes)
    message = one_line_message(exc)
    assert needle in message
    assert "optimized-sd runs SD 1.x, SD 2.x, SDXL and Flux.1" in message


def test_sd2_detected_by_linear_proj_in() -> None:
    shapes = sd1_shapes()
    shapes[U + "input_blocks.1.1.proj_in.weight"] = (8, 8)
    with pytest.raises(CheckpointError, match="SD 2.x UNet but no OpenCLIP text encoder"):
        detect_family(shapes)


def test_mismatched_sdxl_parts_are_a_checkpoint_error() -> None:
    shapes = sdxl_shapes()
    shapes["conditioner.embedders.1.model.ln_final.weight"] = (1024,)
    with pytest.raises(CheckpointError, match="context dim is 2048 but the text encoders together are 1792 wide"):
        detect_family(shapes)
    no_big_g = {k: v for k, v in sdxl_shapes().items() if ".embedders.1." not in k}
    with pytest.raises(CheckpointError, match="no OpenCLIP bigG"):
        detect_family(no_big_g)


@pytest.mark.parametrize(
    ("shapes", "needle"),
    [
        (
            {
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320, 1, 1),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4, 1, 1),
                "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": (),
            },
            "a LoRA (lora_unet_/lora_te_ keys)",
        ),
        ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}, "a LoRA"),
        (
            {
                "encoder.conv_in.weight": (128, 3, 3, 3),
                "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
                "decoder.up.0.block.0.conv1.weight": (128, 128, 3, 3),
                "quant_conv.weight": (8, 8, 1, 1),
            },
            "a VAE alone",
        ),
        ({"first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3)}, "a VAE alone"),
        ({TE + "final_layer_norm.weight": (768,)}, "a text encoder alone"),
        (
            {
                "conv_in.weight": (320, 4, 3, 3),
                "time_embedding.linear_1.weight": (1280, 320),
                "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3),
            },
            "diffusers UNet",
        ),
        (
            {"encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3),
             "decoder.up_blocks.0.resnets.0.conv1.weight": (512, 512, 3, 3)},
            "diffusers VAE",
        ),
        ({"text_model.final_layer_norm.weight": (768,)}, "diffusers text encoder"),
        ({"input_blocks.0.0.weight": (320, 4, 3, 3)}, "UNet alone"),
        ({"control_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "ControlNet"),
        ({"emb_params": (4, 768)}, "textual-inversion"),
        ({"fc.weight": (10, 4), "fc.bias": (10,), "head.weight": (2, 10), "x": (1,)},
         "no Stable Diffusion keys: first keys are fc.weight, fc.bias, head.weight (4 tensors)"),
    ],
)
def test_non_sd_files_say_what_they_look_like(shapes: dict, needle: str) -> None:
    with pytest.raises(CheckpointError) as exc:
        detect_family(shapes)
    assert not isinstance(exc.value, UnsupportedModelError)
    assert needle in one_line_message(exc)


def test_diffusers_component_message_points_to_the_folder() -> None:
    with pytest.raises(CheckpointError, match="pass the diffusers folder"):
        detect_family({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)})


def test_incomplete_or_mismatched_sd1_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="state dict is empty"):
        detect_family({})
    no_te = {k: v for k, v in sd1_shapes().items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match="no CLIP text encoder"):
        detect_family(no_te)
    no_attn = {k: v for k, v in sd1_shapes().items() if "proj_in" not in k}
    with pytest.raises(CheckpointError, match="no cross-attention"):
        detect_family(no_attn)
    mismatched = sd1_shapes()
    mismatched[TE + "final_layer_norm.weight"] = (24,)
    with pytest.raises(CheckpointError, match="context dim is 16 but the CLIP text encoder is 24"):
        detect_family(mismatched)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        *[(name, "schedule buffer") for name in sorted(SCHEDULE_BUFFERS)],
        ("model_ema.decay", "EMA"),
        ("model_ema.num_updates", "EMA"),
        ("model_ema.diffusion_modelinput_blocks00weight", "EMA"),
        ("cond_stage_model.transformer.text_model.embeddings.position_ids", "position_ids"),
        ("cond_stage_model.transformer.embeddings.position_ids", "position_ids"),
        ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", "position_ids"),
        ("cond_stage_model.model.transformer.text_model.embeddings.position_ids", "position_ids"),
        ("cond_stage_model.model.logit_scale", "logit_scale"),
        ("conditioner.embedders.1.model.logit_scale", "logit_scale"),
        ("v_pred", "v_pred marker"),
        ("first_stage_model.loss.discriminator.main.0.weight", "training loss"),
        ("global_step", "lightning"),
        ("pytorch-lightning_version", "lightning"),
        ("model.diffusion_model.input_blocks.0.0.weight", None),
        ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", None),
        ("first_stage_model.decoder.conv_out.weight", None),
        ("model.diffusion_model.betas", None),
    ],
)
def test_known_extra_key(key: str, reason: str | None) -> None:
    assert known_extra_key(key) == reason


def test_schedule_buffers_cover_compvis_names() -> None:
    assert {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
        "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
    } == SCHEDULE_BUFFERS


def test_part_of_key() -> None:
    assert part_of_key(U + "out.2.weight") == "UNet"
    assert part_of_key("first_stage_model.encoder.conv_in.weight") == "VAE"
    assert part_of_key(TE + "final_layer_norm.weight") == "text encoder"
    assert part_of_key(TE + "embeddings.position_ids") is None  # a known extra, not a weight
    assert part_of_key("model_ema.decay") is None
    assert part_of_key("something.else") is None
