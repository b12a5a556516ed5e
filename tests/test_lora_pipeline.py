"""LoRAs and embeddings through the whole pipeline: the same latents as diffusers' own loaders in
every memory mode, stacking, exact restore, and the CLI's flags, metadata and errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lora_files import kohya_lora, peft_lora, save

import optimized_sd
from optimized_sd.pipelines.diffusion import GenerationRequest

TOLERANCE = 1e-4
PROMPT, NEGATIVE = "a red cube", "blurry"
# stream (merged into each block's copy as it arrives) and full (merged once, restored by reload) run by
# default; turbo and split take the same two paths and run with the slow tests
MODES = ("stream", "full", pytest.param("turbo", marks=pytest.mark.slow), pytest.param("split", marks=pytest.mark.slow))


def request(**options) -> GenerationRequest:
    common = dict(negative_prompt=NEGATIVE, steps=3, scale=7.5, sampler="ddim", seed=42, height=64, width=64)
    return GenerationRequest(prompts=[PROMPT], **common, **options)


def diffusers_latents(tiny_model, loras: list[tuple[Path, float]]) -> torch.Tensor:
    """diffusers on copies of the modules: one file by load_lora_weights + fuse_lora(lora_scale=w); several
    by its documented stacking, set_adapters(names, weights) then fuse_lora (fusing them one after another
    with different scales does not stack in diffusers 0.42)."""
    from test_parity import diffusers_pipeline

    pipe = diffusers_pipeline(tiny_model)
    pipe.unet, pipe.text_encoder = copy.deepcopy(tiny_model.unet), copy.deepcopy(tiny_model.text_encoder)
    names = [f"lora{index}" for index in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if len(loras) == 1:
        pipe.fuse_lora(lora_scale=loras[0][1])
    elif loras:
        pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
        pipe.fuse_lora(adapter_names=names)
    return pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=3, guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(42), output_type="latent").images  # fmt: skip


@pytest.fixture(scope="module")
def lora_files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        "kohya": save(kohya_lora(tiny_model.unet, tiny_model.text_encoder, rank=4, alpha=2.0, seed=5), folder / "kohya_style.safetensors"),
        "peft": save(peft_lora(tiny_model.unet, tiny_model.text_encoder, rank=3, seed=6), folder / "peft_style.safetensors"),
    }


@pytest.fixture(scope="module")
def references(tiny_model, lora_files) -> dict[str, torch.Tensor]:
    return {
        "kohya": diffusers_latents(tiny_model, [(lora_files["kohya"], 0.8)]),
        "peft": diffusers_latents(tiny_model, [(lora_files["peft"], 0.6)]),
        "both": diffusers_latents(tiny_model, [(lora_files["kohya"], 0.5), (lora_files["peft"], -0.7)]),
    }


@pytest.mark.parametrize("mode", MODES)
def test_lora_latents_equal_diffusers_fuse_lora_in_every_mode(tiny_model, lora_files, references, mode: str) -> None:
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory=mode)
    try:
        plain = pipe.generate(request()).latents
        kohya = pipe.generate(request(loras={lora_files["kohya"]: 0.8}))
        assert (kohya.latents - references["kohya"]).abs().max() <= TOLERANCE
        assert (kohya.latents - plain).abs().max() > 100 * TOLERANCE  # the LoRA did something
        # the set changes without reloading the model: the peft file alone, then both stacked
        peft = pipe.generate(request(loras={lora_files["peft"]: 0.6})).latents
        assert (peft - references["peft"]).abs().max() <= TOLERANCE
        both = pipe.generate(request(loras={lora_files["kohya"]: 0.5, lora_files["peft"]: -0.7})).latents
        assert (both - references["both"]).abs().max() <= TOLERANCE
        # and without LoRAs the original weights are back exactly
        assert torch.equal(pipe.generate(request()).latents, plain)
        assert 'Lora hashes: "kohya_style: ' in kohya.parameters[0].text()
    finally:
        pipe.close()


@pytest.mark.parametrize(("weights", "mode"), [("fp16", "stream"), ("int8", "full"), ("int8", "stream")])
def test_loras_on_stored_weights(tiny_model, lora_files, references, weights: str, mode: str) -> None:
    """`--weights` with a LoRA: each stored layer adds the LoRA to its dequantised weight at every call, the
    other layers (text encoder, first/last convs) merge it as they are placed. The LoRA moves the stored run
    as far as it moves diffusers' (what is left is the storage's rounding, measured without a LoRA), and
    without it the stored run is back exactly."""
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory=mode, weights=weights)
    try:
        plain = pipe.generate(request()).latents
        kohya = pipe.generate(request(loras={lora_files["kohya"]: 0.8})).latents
        assert torch.equal(pipe.generate(request()).latents, plain)
    finally:
        pipe.close()
    reference_plain = diffusers_latents(tiny_model, [])
    storage_error = (plain - reference_plain).norm().item()
    effect = (references["kohya"] - reference_plain).norm().item()
    assert effect > 10 * storage_error  # the LoRA's effect dwarfs the storage's rounding
    assert (kohya - references["kohya"]).norm().item() <= 3 * storage_error + 1e-6


def test_prompt_tags_and_embeddings(tiny_model, lora_files, references, tmp_path) -> None:
    """<lora:NAME:W> from --lora-dir equals the explicit file; an embedding file is used by its name."""
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}}, embeddings / "shiny.pt")
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="stream",
                             lora_dir=lora_files["kohya"].parent, embeddings_dir=embeddings)  # fmt: skip
    try:
        tagged = pipe.generate(replace_prompt(request(), f"{PROMPT} <lora:kohya_style:0.8>"))
        assert (tagged.latents - references["kohya"]).abs().max() <= TOLERANCE
        assert tagged.parameters[0].prompt.endswith("<lora:kohya_style:0.8>")  # metadata keeps the prompt as written
        shiny = pipe.generate(replace_prompt(request(), "a shiny cube"))
        assert 'TI hashes: "shiny: ' in shiny.parameters[0].text()
        plain = pipe.generate(replace_prompt(request(), "a shinyx cube"))
        assert "TI hashes" not in plain.parameters[0].text()
    finally:
        pipe.close()


def replace_prompt(base: GenerationRequest, prompt: str) -> GenerationRequest:
    from dataclasses import replace

    return replace(base, prompts=[prompt])


def test_cli_lora_schedule_and_errors(capsys, tiny_model, lora_files, tmp_path) -> None:
    from test_cli import run

    from optimized_sd.pipelines.output import read_parameters

    base = ["--ckpt", str(tiny_model.safetensors), "--tokenizer", str(tiny_model.tokenizer), "--device", "cpu", "--H", "64", "--W", "64",
            "--ddim_steps", "2", "--n_samples", "1", "--seed", "1", "--outdir", str(tmp_path / "out"), "--skip_grid"]  # fmt: skip
    code, _, err = run(capsys, "txt2img", *base, "--lora", f"{lora_files['peft']}:0.5", "--sampler", "euler", "--schedule", "exponential",
                       "--prompt", "a cube <lora:kohya_style>", "--lora-dir", str(lora_files["kohya"].parent))  # fmt: skip
    assert code == 0, err
    (image,) = sorted((tmp_path / "out").rglob("*.png"))
    text = read_parameters(image)
    assert "Schedule type: Exponential" in text and "peft_style: " in text and "kohya_style: " in text
    for args, message in [
        (["--prompt", "a <lora:kohya_styel>"], "nearest: kohya_style"),
        (["--prompt", "a <lora:kohya_style:abc>"], "'abc' is not a number"),
        (["--lora", str(tmp_path / "missing.safetensors")], "no such file"),
        (["--schedule", "cosine"], "--schedule 'cosine' is unknown"),
    ]:
        lora_dir = str(lora_files["kohya"].parent)
        code, _, err = run(capsys, "txt2img", *base, "--lora-dir", lora_dir, "--outdir", str(tmp_path / "bad"), *args)
        assert code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("*.png"))
