"""Z-Image through `load()` and the CLI, against diffusers' ZImagePipeline and ZImageImg2ImgPipeline on tiny random
models (fp32, CPU): text embeddings, txt2img latents without and with CFG (its normalization and truncation),
img2img, the file layouts, memory modes, hoisting, LoRA, and the one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from optimized_sd.pipelines.diffusion import GenerationRequest, load
from tests.zimage_models import PROMPT, SIZE, TinyZImage, build

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyZImage:
    return build(tmp_path_factory.mktemp("zimage"))


def ours(pipe, **fields):
    return pipe.generate(GenerationRequest(prompts=[PROMPT], seed=42, height=SIZE[0], width=SIZE[1], **fields))


def reference_latents(model: TinyZImage, steps: int, scale: float, kind=None, **extra) -> torch.Tensor:
    pipeline = model.diffusers_pipeline(kind)
    with torch.no_grad():
        return pipeline(
            prompt=PROMPT, height=SIZE[0], width=SIZE[1], num_inference_steps=steps, guidance_scale=scale,
            generator=torch.Generator("cpu").manual_seed(42), output_type="latent", **extra,
        ).images


def close(ours_latents: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours_latents.shape == expected.shape
    assert torch.allclose(ours_latents, expected, atol=1e-4), (ours_latents - expected).abs().max()


def test_text_embeddings_equal_diffusers(tiny):
    pipe = tiny.load(memory="stream")  # the tower layer by layer, its embedding by rows
    request = pipe.with_defaults(GenerationRequest(prompts=[PROMPT, "x"], height=SIZE[0], width=SIZE[1], scale=2.0))
    pipe.prepare(request)
    cond, uncond, _ = pipe.memory.run_stage("text", lambda record: pipe.text_conditioning(request, [PROMPT, "x"], "blurry"))
    with torch.no_grad():
        expected, negative = tiny.diffusers_pipeline().encode_prompt([PROMPT, "x"], device="cpu", negative_prompt=["blurry"] * 2)
    assert cond.lengths == tuple(e.shape[0] for e in expected) and uncond.lengths == (negative[0].shape[0],) * 2
    for ours_caption, theirs in zip([*cond.captions(), *uncond.captions()], [*expected, *negative], strict=True):
        assert torch.allclose(ours_caption, theirs, atol=1e-5)


def test_txt2img_latents_equal_diffusers(tiny):
    pipe = tiny.load()
    result = ours(pipe, steps=3)
    close(result.latents, reference_latents(tiny, 3, 0.0))
    fields = result.parameters[0].text().splitlines()[-1]
    assert pipe.config.family_name == "Z-Image"
    assert "Sampler: Euler" in fields and "CFG scale: 0," in fields and "Shift: 3" in fields
    request = pipe.with_defaults(GenerationRequest(prompts=["x"]))
    assert (request.steps, request.scale, request.height, request.sampler, request.guided) == (8, 0.0, 1024, "euler", False)


@pytest.mark.parametrize(("normalization", "truncation"), [(0.0, 1.0), (1.0, 0.5)], ids=["plain", "normalized-truncated"])
def test_cfg_latents_equal_diffusers(tiny, normalization, truncation):
    """--scale s > 0 is diffusers' guidance_scale: pos + s (pos - neg) with the negative prompt (truncation 0.5 runs
    the last steps on pos alone, normalization 1 caps the guided norm at pos's)."""
    pipe = tiny.load()
    pipe.cfg_normalization, pipe.cfg_truncation = normalization, truncation
    result = ours(pipe, steps=4, scale=2.5, negative_prompt="blurry")
    expected = reference_latents(
        tiny, 4, 2.5, negative_prompt="blurry", cfg_normalization=normalization, cfg_truncation=truncation
    )
    close(result.latents, expected)


def test_cfg_options_as_request_fields_equal_diffusers_and_are_recorded(tiny):
    """cfg_normalization and cfg_truncation given per request (not as pipeline attributes) are diffusers' arguments."""
    result = ours(tiny.load(), steps=4, scale=2.5, negative_prompt="blurry", cfg_normalization=1.0, cfg_truncation=0.5)
    close(result.latents, reference_latents(tiny, 4, 2.5, negative_prompt="blurry", cfg_normalization=1.0, cfg_truncation=0.5))
    assert "CFG normalization: 1, CFG truncation: 0.5" in result.parameters[0].text()
    assert "CFG normalization" not in ours(tiny.load(), steps=1, cfg_truncation=0.5).parameters[0].text()  # no CFG: no effect


def test_cfg_options_warn_on_other_families(tiny_model, caplog):
    import optimized_sd

    pipe = optimized_sd.load(tiny_model.safetensors, device="cpu", tokenizer=tiny_model.tokenizer)
    try:
        request = pipe.with_defaults(GenerationRequest(prompts=["x"], cfg_normalization=1.0, cfg_truncation=0.5))
    finally:
        pipe.close()
    assert (request.cfg_normalization, request.cfg_truncation) == (None, None)
    said = [record.getMessage() for record in caplog.records]
    assert "--cfg-normalization has no effect on SD 1.x (Z-Image's CFG option)" in said and len(said) == 2


def test_img2img_latents_equal_diffusers(tiny, monkeypatch):
    """ZImageImg2ImgPipeline's step rounding and noising; its init latents pinned to the posterior mean (ours)."""
    import diffusers.pipelines.z_image.pipeline_z_image_img2img as img2img_module

    original = img2img_module.retrieve_latents

    def mean_latents(output, generator=None, sample_mode="sample"):
        return original(output, sample_mode="argmax")

    monkeypatch.setattr(img2img_module, "retrieve_latents", mean_latents)
    image = Image.fromarray((torch.rand(SIZE[0], SIZE[1], 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    result = ours(tiny.load(), steps=5, init_image=image, strength=0.6, scale=1.5)
    expected = reference_latents(tiny, 5, 1.5, kind=diffusers.ZImageImg2ImgPipeline, image=image, strength=0.6)
    close(result.latents, expected)


def test_layouts_give_identical_images(tiny, tmp_path):
    """Original names, ComfyUI's prefix and a diffusers folder (whose scheduler config is honoured) load the same."""
    from optimized_sd.weights.flux_keys import COMFY_TRANSFORMER_PREFIX
    from tests.family_models import save
    from tests.test_zimage_net import original_tensors

    base = ours(tiny.load(), steps=2).latents
    comfy = save(original_tensors(tiny.transformer.state_dict(), COMFY_TRANSFORMER_PREFIX), tmp_path / "z_image_comfy.safetensors")
    from_comfy = load(comfy, vae=tiny.files["vae"], text_encoders=(tiny.files["qwen"],), tokenizer=tiny.tokenizer, device="cpu",
                      precision="full", memory="full")  # fmt: skip
    assert torch.equal(ours(from_comfy, steps=2).latents, base)
    folder = tmp_path / "Z-Image-Turbo"
    tiny.diffusers_pipeline().save_pretrained(str(folder))
    from_folder = load(folder, device="cpu", precision="full", memory="full")
    assert torch.equal(ours(from_folder, steps=2).latents, base)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"shift": 3.0', '"shift": 6.0'))
    shifted = load(folder, device="cpu", precision="full", memory="full")
    assert shifted.model_sampling.shift == 6.0 and not torch.equal(ours(shifted, steps=2).latents, base)


@pytest.mark.parametrize("mode", ["stream", "turbo", "split"])
def test_memory_modes_equal_full(tiny, mode):
    """Two prompts of different lengths with CFG, truncated for the last steps (pos alone: its captions refined apart)."""
    request = GenerationRequest(prompts=[PROMPT, "x"], seed=1, height=SIZE[0], width=SIZE[1], steps=4, scale=2.0, negative_prompt="blurry")
    pipes = [tiny.load(), tiny.load(memory=mode)]
    for pipe in pipes:
        pipe.cfg_truncation = 0.5
    full, other = (pipe.generate(request) for pipe in pipes)
    assert torch.allclose(other.latents, full.latents, atol=1e-5), (other.latents - full.latents).abs().max()


@pytest.mark.parametrize("sampler", ["heun", "dpm2"])  # dpm2 also calls between the grid's sigmas
def test_hoisting_equals_per_call_and_streams_once_per_run(tiny, sampler):
    pipe = tiny.load(memory="stream")
    hoisted = ours(pipe, steps=3, sampler=sampler).latents
    events = pipe.engine.events
    loads = [group for action, group, _ in events if action == "load"]
    if sampler == "heun":  # the caption branch and adaLN weights once per run, every block once per call (5 for Heun)
        assert [loads.count(name) for name in ("unet.pads", "unet.context_refiner.0", "unet.layers.0.adaLN_modulation")] == [1, 1, 1]
        assert (loads.count("unet.x_embedder"), loads.count("unet.layers.1.attention_norm1")) == (5, 5)
    # the Qwen3 tower streams a layer at a time, its token embedding by the rows the prompt uses; no final norm
    assert ("rows", "text.text_encoders.qwen3.transformer.embed_tokens") in [(action, group) for action, group, _ in events]
    assert "text.text_encoders.qwen3.transformer.layers.2" in loads and "text.text_encoders.qwen3.transformer.layers.3" not in loads
    pipe.hoist = False
    plain = ours(pipe, steps=3, sampler=sampler).latents
    assert torch.allclose(hoisted, plain, atol=1e-5), (hoisted - plain).abs().max()


def test_stream_units_cover_every_weight_once(tiny):
    from optimized_sd.pipelines.placement import stream_units

    pipe = tiny.load()
    units = [path for unit in stream_units(pipe.model) for path in unit]
    owned = [name for path in units for name, _ in pipe.model.get_submodule(path).named_parameters(prefix=path)]
    every = [name for name, _ in pipe.model.model.diffusion_model.named_parameters(prefix="model.diffusion_model")]
    assert sorted(owned) == sorted(every)


def test_bad_files_are_one_line_errors(tiny, tmp_path):
    from optimized_sd.errors import FieldError, UserError
    from tests.family_models import save
    from tests.test_zimage_net import tiny_qwen_tokenizer

    files = tiny.files
    with pytest.raises(UserError, match="text_encoders takes .*: it holds a Qwen3 text encoder, not a Z-Image or Flux.2 klein transformer"):
        load(files["qwen"], tokenizer=tiny.tokenizer, device="cpu")
    for keys, name in (({"txt_norm.weight", "img_in.weight"}, "Qwen-Image"), ({"double_stream_blocks.0.block.x.weight"}, "HiDream-I1")):
        other = save({key: torch.zeros(2) for key in keys}, tmp_path / f"{name}.safetensors")
        with pytest.raises(UserError, match=f"is a {name} model, which this version does not run"):
            load(other, device="cpu")
    with pytest.raises(UserError, match="text_encoders must give Z-Image's Qwen3 text encoder, .*e.g. qwen_3_4b.safetensors"):
        load(files["transformer"], vae=files["vae"], tokenizer=tiny.tokenizer, device="cpu")
    with pytest.raises(UserError, match="vae must give Z-Image's Flux VAE, .*e.g. ae.safetensors"):
        load(files["transformer"], text_encoders=(files["qwen"],), tokenizer=tiny.tokenizer, device="cpu")
    with pytest.raises(FieldError, match="holds no Qwen3 text encoder"):
        load(files["transformer"], vae=files["vae"], text_encoders=(files["transformer"],), device="cpu")
    with pytest.raises(FieldError, match="no such file"):
        load(files["transformer"], vae=files["vae"], text_encoders=(tmp_path / "absent.safetensors",), device="cpu")
    with pytest.raises(FieldError, match="must name Z-Image's Qwen tokenizer"):
        tiny.load(tokenizer=None)
    with pytest.raises(FieldError, match="no chat template"):
        tiny.load(tokenizer=tiny_qwen_tokenizer(tmp_path / "plain", chat_template=None) and tmp_path / "plain")


def test_long_prompts_are_cut_with_a_warning_and_sizes_checked(tiny, caplog):
    from optimized_sd.errors import FieldError

    pipe = tiny.load()
    ours(pipe, steps=1, max_sequence_length=24)
    assert "over 24 tokens with its chat template" in caplog.text
    with pytest.raises(FieldError, match="multiple of 16"):
        pipe.generate(GenerationRequest(prompts=["x"], height=72, width=48, steps=1))


def test_cli_txt2img_and_errors(tiny, tmp_path, capsys):
    from tests.cli_runs import run_cli

    common = ("--H", 64, "--W", 48, "--steps", 2, "--n_samples", 1, "--seed", 1, "--device", "cpu", "--precision", "full", "--skip_grid")
    code, out, err = run_cli(
        capsys, "txt2img", "--ckpt", tiny.files["transformer"], "--vae", tiny.files["vae"], "--text-encoder", tiny.files["qwen"],
        "--tokenizer", tiny.tokenizer, "--prompt", PROMPT, "--outdir", tmp_path / "ok", *common,
    )
    assert code == 0, err
    assert "Z-Image" in out
    assert "Shift: 3" in Image.open(next((tmp_path / "ok").rglob("*.png"))).info["parameters"]
    code, out, err = run_cli(
        capsys, "txt2img", "--ckpt", tiny.files["transformer"], "--vae", tiny.files["vae"], "--text-encoder", tiny.files["qwen"],
        "--tokenizer", tiny.tokenizer, "--prompt", PROMPT, "--outdir", tmp_path / "cfg", *common, "--scale", 2, "--cfg-normalization", 1.5,
        "--cfg-truncation", 0.25,
    )
    assert code == 0, err
    assert "CFG normalization: 1.5, CFG truncation: 0.25" in Image.open(next((tmp_path / "cfg").rglob("*.png"))).info["parameters"]
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", tiny.files["transformer"], "--cfg-truncation", 2, "--outdir", tmp_path / "no",
                           *common)  # fmt: skip
    assert (code, err) == (1, "error: --cfg-truncation must be from 0 to 1, got 2.0\n")
    no_tokenizer = ("--ckpt", tiny.files["transformer"], "--vae", tiny.files["vae"], "--text-encoder", tiny.files["qwen"])
    for args in (("--ckpt", tiny.files["qwen"], "--tokenizer", tiny.tokenizer), no_tokenizer):
        code, out, err = run_cli(capsys, "txt2img", *args, "--outdir", tmp_path / "bad", *common)
        assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("*.png"))


def test_inspect_names_the_family_and_its_parts(tiny):
    from optimized_sd.weights.inspect import describe_checkpoint, format_info

    text = format_info(describe_checkpoint(tiny.files["transformer"], hashes=False))
    assert "Z-Image" in text and "Z-Image transformer" in text and "float32" in text
    assert "Qwen3 text encoder (--text-encoder)" in text and "Flux VAE (--vae)" in text
    qwen = format_info(describe_checkpoint(tiny.files["qwen"], hashes=False))
    assert "holds a Qwen3 text encoder" in qwen and "--text-encoder" in qwen


def test_a_lone_tokenizer_json_with_its_template_is_read(tiny, tmp_path):
    """A folder of tokenizer.json (+ chat_template.jinja) is told Qwen's by its chat tokens; a CLIP one is refused."""
    import shutil

    from optimized_sd.errors import FieldError

    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(tiny.tokenizer / name, lone / name)
    assert torch.equal(ours(tiny.load(tokenizer=lone), steps=1).latents, ours(tiny.load(), steps=1).latents)
    clip = tmp_path / "clip"  # CLIP's tokenizer.json alone: BPE too, without Qwen's chat tokens
    clip.mkdir()
    (clip / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}, "added_tokens": [{"content": "<|startoftext|>"}]}))
    with pytest.raises(FieldError, match="holds no tokenizer of a named class; this model needs a Qwen2 tokenizer"):
        tiny.load(tokenizer=clip)
