"""Our CLIP text tower (transformers' module names, our modules) equals transformers' CLIPTextModel on the
same weights: the last state after the final norm, the penultimate state, both activations SD uses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from optimized_sd.config import TINY
from optimized_sd.errors import UserError
from optimized_sd.models.text_encoder import FrozenCLIPEmbedder, clip_config


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("penultimate", [False, True])
def test_our_clip_tower_equals_transformers(activation, penultimate):
    from transformers import CLIPTextModel

    config = dataclasses.replace(TINY.text, hidden_act=activation, penultimate=penultimate)
    torch.manual_seed(0)
    theirs = CLIPTextModel(clip_config(config)).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():  # away from the fresh norms' 1 and 0, so every term counts
            parameter.add_(torch.randn_like(parameter) * 0.05)
    ours = FrozenCLIPEmbedder(config).eval()
    state = {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in theirs.state_dict().items()}
    missing, unexpected = ours.transformer.load_state_dict(state, strict=False)
    assert missing == [] and set(unexpected) <= {"text_model.embeddings.position_ids"}
    ids = torch.randint(0, config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = theirs(input_ids=ids, output_hidden_states=True)
        expected = output.hidden_states[-2] if penultimate else output.last_hidden_state
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_an_unknown_activation_is_one_line():
    with pytest.raises(UserError, match="activation 'relu'"):
        FrozenCLIPEmbedder(dataclasses.replace(TINY.text, hidden_act="relu"))
