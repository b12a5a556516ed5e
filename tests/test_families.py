"""SD 2.x and SDXL: family recognition of real layouts, config inference, and module parity with diffusers
(fp32, CPU) for every layout: text embeddings, pooled vector, UNet output with SDXL's size conditioning."""

from __future__ import annotations

import pytest
import torch

from optimized_sd.models.conditioner import size_conditioning
from optimized_sd.weights.loading import materialize, prepare_model

TOLERANCE = 1e-4
LAYOUTS = ("folder", "converted", "real")


def path_of(model, layout: str):
    return model.folder if layout == "folder" else model.files[layout]


def loaded_model(model, layout: str):
    loaded = prepare_model(path_of(model, layout))
    materialize(loaded.model, "", loaded.source, torch.device("cpu"), torch.float32)
    loaded.model.eval()
    return loaded


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def token_ids(batch: int, pad_id: int, seed: int = 3) -> torch.Tensor:
    """Prompts as a tokenizer gives them: start, words, end, then padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, 77), pad_id)
    for row, length in enumerate((5, 12, 30)[:batch]):
        ids[row, 0] = 998
        ids[row, 1 : length + 1] = torch.randint(1, 990, (length,), generator=generator)
        ids[row, length + 1] = 999
    return ids


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sd2_config_and_report(tiny_sd2, layout):
    loaded = loaded_model(tiny_sd2, layout)
    config = loaded.config
    assert config.family == "sd2" and config.family_name == "SD 2.x"
    assert config.open_clip is not None and config.open_clip.layers == 2 and config.text is None
    assert config.unet.use_linear_in_transformer and config.unet.heads(128) == 2
    assert loaded.report.ok
    if layout == "real":  # the tower's last block and projection are carried, never run
        assert loaded.report.known_extras == {"unused last text layer": 13, "logit_scale": 1}
    else:
        assert "unused last text layer" not in loaded.report.known_extras


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.inference_mode()
def test_sd2_modules_match_diffusers(tiny_sd2, layout):
    model = loaded_model(tiny_sd2, layout).model
    ids = token_ids(3, pad_id=0)
    context, pooled = model.encode_text([ids])
    assert pooled is None
    assert max_diff(context, tiny_sd2.text_encoders[0](input_ids=ids).last_hidden_state) <= TOLERANCE

    torch.manual_seed(1)
    x, text = torch.randn(2, 4, 16, 24), torch.randn(2, 77, 64)
    t = torch.tensor([999.0, 37.0])
    expected = tiny_sd2.unet(x, t, encoder_hidden_states=text).sample
    assert expected.abs().max() > 0.1
    assert max_diff(model.model.diffusion_model(x, t, text), expected) <= TOLERANCE


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdxl_config_and_report(tiny_sdxl, layout):
    loaded = loaded_model(tiny_sdxl, layout)
    config = loaded.config
    assert config.family == "sdxl" and config.scale_factor == 0.13025
    assert config.unet.transformer_depth == (0, 1, 2) and config.unet.middle_depth() == 2
    assert config.unet.adm_in_channels == 64 + 6 * 256 and config.unet.context_dim == 96
    assert config.text is not None and config.text.penultimate
    assert config.open_clip is not None and config.open_clip.layers == 3 and config.open_clip.projection_dim == 64
    assert loaded.report.ok


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.inference_mode()
def test_sdxl_modules_match_diffusers(tiny_sdxl, layout):
    model = loaded_model(tiny_sdxl, layout).model
    clip_l, big_g = tiny_sdxl.text_encoders
    ids_l, ids_g = token_ids(3, pad_id=999), token_ids(3, pad_id=0)
    context, pooled = model.encode_text([ids_l, ids_g])
    out_l = clip_l(input_ids=ids_l, output_hidden_states=True)
    out_g = big_g(input_ids=ids_g, output_hidden_states=True)
    expected_context = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    assert max_diff(context, expected_context) <= TOLERANCE
    assert pooled is not None and max_diff(pooled, out_g.text_embeds) <= TOLERANCE

    torch.manual_seed(1)
    x, text, pooled_in = torch.randn(2, 4, 16, 24), torch.randn(2, 77, 96), torch.randn(2, 64)
    t = torch.tensor([999.0, 37.0])
    sizes = (128.0, 192.0, 0.0, 0.0, 128.0, 192.0)  # original (h, w), crop (top, left), target (h, w)
    time_ids = torch.tensor([sizes, sizes])
    expected = tiny_sdxl.unet(
        x, t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled_in, "time_ids": time_ids}
    ).sample
    assert expected.abs().max() > 0.1
    got = model.model.diffusion_model(x, t, text, y=size_conditioning(pooled_in, sizes))
    assert max_diff(got, expected) <= TOLERANCE


def test_unet_refuses_missing_or_unexpected_y(tiny_sdxl, tiny_sd2):
    sdxl = loaded_model(tiny_sdxl, "real").model.model.diffusion_model
    with pytest.raises(ValueError, match="label_emb"):
        sdxl(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 96))
