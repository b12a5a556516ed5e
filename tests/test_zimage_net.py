"""Z-Image and its Qwen3 text encoder against diffusers and transformers on tiny random models (fp32, CPU):
the transformer from an original-named file equals diffusers' ZImageTransformer2DModel, our key map inverts
diffusers' own single-file converter, and the Qwen3 tower's Z-Image and Flux.2 klein embeddings equal what the
pipelines' prompt encoders compute, through a tiny Qwen2 tokenizer with a Qwen3-style chat template."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from optimized_sd.errors import CheckpointError, UserError
from optimized_sd.models.zimage import ZImageConfig, padded_length, patchify, unpatchify
from optimized_sd.weights.flux_keys import COMFY_TRANSFORMER_PREFIX
from optimized_sd.weights.flux_loading import load_component
from optimized_sd.weights.sources import DictSource
from optimized_sd.weights.zimage_keys import prepare_qwen3, prepare_zimage_transformer, zimage_transformer_view

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=2, n_heads=4,
    n_kv_heads=4, cap_feat_dim=24, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64],
)


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its init (norm weights of 1, zero pad tokens), so a misplaced tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module.eval()


def tiny_diffusers_zimage(seed: int = 0):
    torch.manual_seed(seed)
    return perturbed(diffusers.ZImageTransformer2DModel(**TINY), seed)


def original_tensors(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Z-Image state dict under the original names by our map (as a file would hold them)."""
    view = zimage_transformer_view(DictSource(state))
    return {prefix + key: view.get(key).clone().contiguous() for key in view.keys()}


def saved(path, tensors: dict[str, torch.Tensor]):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def zimage_inputs(seed: int = 1, height: int = 6, width: int = 10):
    """Two samples whose captions pad to different lengths (5 -> 32, 40 -> 64) and an image of 15 patches (-> 32)."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, TINY["in_channels"], height, width, generator=generator)
    captions = [torch.randn(n, TINY["cap_feat_dim"], generator=generator) for n in (5, 40)]
    return latents, torch.tensor([0.3, 0.85]), captions


def diffusers_output(model, latents, timesteps, captions) -> torch.Tensor:
    with torch.no_grad():
        out = model(list(latents.unsqueeze(2).unbind(0)), timesteps, captions, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


@pytest.mark.parametrize("prefix", ["", COMFY_TRANSFORMER_PREFIX], ids=["original", "comfy"])
def test_transformer_from_original_file_equals_diffusers(tmp_path, prefix):
    reference = tiny_diffusers_zimage()
    state = original_tensors(reference.state_dict(), prefix)
    state[prefix + "norm_final.weight"] = torch.ones(TINY["dim"])  # carried by some files, never used
    component = prepare_zimage_transformer(saved(tmp_path / "z_image_tiny.safetensors", state))
    assert component.model.config == ZImageConfig(
        dim=64, num_heads=4, num_layers=2, num_refiner_layers=2, ffn_hidden=170, in_channels=4, cap_feat_dim=24, adaln_dim=64
    )
    assert component.model.config.axes_dim == (4, 6, 6) and ZImageConfig().axes_dim == (32, 48, 48)
    model = load_component(component)
    assert {name.split(".")[0] for name in model.block_names()} == {name for name, _ in model.named_children()}
    inputs = zimage_inputs()
    with torch.no_grad():
        ours = model(*inputs)
    expected = diffusers_output(reference, *inputs)
    assert ours.shape == expected.shape == (2, 4, 6, 10)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()
    same_length = (inputs[0], inputs[1], [inputs[2][0], inputs[2][0][:3]])  # equal padded lengths: one attention call
    with torch.no_grad():
        assert torch.allclose(model(*same_length), diffusers_output(reference, *same_length), atol=1e-4, rtol=1e-4)


def test_diffusers_folder_loads_through_the_map(tmp_path):
    """A diffusers `transformer/` folder with sharded files: q, k and v are concatenated at load time."""
    reference = tiny_diffusers_zimage(seed=3)
    folder = tmp_path / "transformer"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    keys = sorted(state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, str(folder / shard))
    index = {"weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model = load_component(prepare_zimage_transformer(folder))
    inputs = zimage_inputs(seed=4, height=8, width=8)
    with torch.no_grad():
        assert torch.allclose(model(*inputs), diffusers_output(reference, *inputs), atol=1e-4, rtol=1e-4)


def test_original_keys_convert_back_exactly_with_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    state = tiny_diffusers_zimage().state_dict()
    original = original_tensors(state, COMFY_TRANSFORMER_PREFIX)
    assert COMFY_TRANSFORMER_PREFIX + "layers.1.attention.qkv.weight" in original
    back = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(state)
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_patchify_matches_diffusers():
    reference = tiny_diffusers_zimage()
    latents = torch.randn(2, 4, 6, 10)
    tokens = patchify(latents, 2)
    expected, size, _ = reference._patchify_image(latents[1].unsqueeze(1), 2, 1)
    assert torch.equal(tokens[1], expected) and size == (1, 6, 10)
    assert torch.equal(unpatchify(tokens, 6, 10, 2), latents)
    assert [padded_length(n) for n in (1, 32, 33)] == [32, 32, 64]


def test_mis_shaped_and_foreign_files_are_refused(tmp_path):
    state = original_tensors(tiny_diffusers_zimage().state_dict())
    state["layers.1.feed_forward.w2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="mis-shaped: layers.1.feed_forward.w2.weight"):
        prepare_zimage_transformer(saved(tmp_path / "bad.safetensors", state))
    with pytest.raises(CheckpointError, match="no Z-Image transformer"):
        prepare_zimage_transformer(saved(tmp_path / "other.safetensors", {"double_blocks.0.x": torch.zeros(1)}))


# --- Qwen3 text encoder ---------------------------------------------------------------------------------

CHAT_TEMPLATE = (  # Qwen3's template, reduced to what one user turn uses
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
QWEN_LAYERS = 4


def tiny_qwen_tokenizer(folder, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE with no merges (one token per byte) and Qwen's special tokens, saved as a Qwen2 folder."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL)})
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_qwen3(causal_lm: bool, seed: int = 5, layers: int = QWEN_LAYERS):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=272, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
    )
    return perturbed((Qwen3ForCausalLM if causal_lm else Qwen3Model)(config), seed)


def test_template_reproduces_qwen3_format(tmp_path):
    tokenizer = tiny_qwen_tokenizer(tmp_path)
    turn = [{"role": "user", "content": "a cat"}]
    thinking = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert thinking == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    plain = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert plain == thinking + "<think>\n\n</think>\n\n"
    assert tokenizer("<|im_start|>a").input_ids == [257, ord("a") - ord("!")]  # a special token is one id


def test_zimage_embeddings_equal_the_pipeline(tmp_path, caplog):
    from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline

    from optimized_sd.models.qwen3 import encode_zimage, load_qwen_tokenizer

    reference = tiny_qwen3(causal_lm=False)
    hf_tokenizer = tiny_qwen_tokenizer(tmp_path / "tokenizer")
    path = saved(tmp_path / "qwen_3_tiny.safetensors", reference.state_dict())  # Qwen3Model names, no `model.`
    component = prepare_qwen3(path)
    assert component.model.layers_read == (QWEN_LAYERS - 1,) and len(component.model.transformer.layers) == QWEN_LAYERS - 1
    assert component.report.known_extras == {"Qwen3 final norm (unused)": 1, "Qwen3 layer past the last one read": 11}
    tower = load_component(component)
    prompts = ["a cat on a mat", "a dog", "x" * 60]
    for max_length in (512, 40):  # 40: the last prompt is cut, with a warning
        tokenizer = load_qwen_tokenizer(tmp_path / "tokenizer", enable_thinking=True, max_length=max_length)
        caplog.clear()
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="optimized_sd"):
            ours = encode_zimage(tower, tokenizer, prompts)
            pipe = type("Stand-in", (), {"tokenizer": hf_tokenizer, "text_encoder": reference})()
            expected = ZImagePipeline._encode_prompt(pipe, list(prompts), device="cpu", max_sequence_length=max_length)
        assert [e.shape[0] for e in ours] == [e.shape[0] for e in expected]
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, expected, strict=True))
        assert ("over 40 tokens" in caplog.text) == (max_length == 40)
    assert expected[2].shape == (40, 32)  # cut at the limit


def test_klein_embeddings_equal_the_pipeline(tmp_path):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    from optimized_sd.models.qwen3 import encode_klein, load_qwen_tokenizer

    reference = tiny_qwen3(causal_lm=True, seed=6)
    hf_tokenizer = tiny_qwen_tokenizer(tmp_path / "tokenizer")
    folder = tmp_path / "text_encoder"  # a diffusers folder: Qwen3ForCausalLM names (`model.`, `lm_head.`)
    folder.mkdir()
    saved(folder / "model.safetensors", reference.state_dict())
    layers = (1, 2, 3)  # klein reads (9, 18, 27) of 36; the tiny model has 4
    component = prepare_qwen3(folder, layers_read=layers)
    assert component.report.known_extras["Qwen3 language-model head (unused)"] == 1
    tower = load_component(component)
    tokenizer = load_qwen_tokenizer(tmp_path / "tokenizer", enable_thinking=False)
    prompts = ["a red fox", "snow"]
    with torch.no_grad():
        ours = encode_klein(tower, tokenizer, prompts)
        expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            reference, hf_tokenizer, prompts, dtype=torch.float32, device="cpu", hidden_states_layers=layers
        )
    assert ours.shape == expected.shape == (2, 512, 3 * 32)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    with pytest.raises(CheckpointError, match="has 4 layers"):
        prepare_qwen3(folder, layers_read=(9, 18, 27))


def test_tokenizer_folders_are_checked(tmp_path):
    from transformers import CLIPTokenizer

    from optimized_sd.models.qwen3 import load_qwen_tokenizer

    tiny_qwen_tokenizer(tmp_path / "plain", chat_template=None)
    with pytest.raises(UserError, match="no chat template"):
        load_qwen_tokenizer(tmp_path / "plain", enable_thinking=True)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    (clip / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(clip / "vocab.json"), str(clip / "merges.txt")).save_pretrained(str(clip))
    with pytest.raises(UserError, match="CLIPTokenizer tokenizer; this model needs a Qwen2 tokenizer"):
        load_qwen_tokenizer(clip, enable_thinking=True)
    with pytest.raises(UserError, match="must hold tokenizer_config.json or tokenizer.json"):
        load_qwen_tokenizer(tmp_path, enable_thinking=True)
