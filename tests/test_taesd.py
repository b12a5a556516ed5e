"""TAESD: the tiny autoencoder against diffusers' AutoencoderTiny (both file layouts), fast decode with
`--vae`, CLI previews, refusals of a decoder for another model, and the server's VAE-approx previews."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_cli
from safetensors.torch import save_file

from optimized_sd.config import SDXL_BASE, TINY
from optimized_sd.errors import UserError
from optimized_sd.memory.planner import ModelFootprint, Request, estimate_peak
from optimized_sd.pipelines.images import tensor_to_image
from optimized_sd.pipelines.output import read_parameters
from optimized_sd.pipelines.previews import latent_preview, taesd_preview
from optimized_sd.weights.taesd import check_taesd_fits, find_taesd_decoder, is_taesd, open_taesd


def build_autoencoder_tiny(latent_channels: int = 4, seed: int = 0):
    """diffusers' AutoencoderTiny at TAESD's real size (64 channels, ~2.4M parameters), random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(latent_channels=latent_channels).eval()
    with torch.no_grad():  # images spread around mid-grey rather than PyTorch's init's near-black
        model.decoder.layers[-1].weight.mul_(8)
        model.decoder.layers[-1].bias.fill_(0.5)
    return model


def original_halves(model) -> tuple[dict, dict]:
    """(decoder, encoder) state dicts in madebyollin's layout: the decoder's index is diffusers' plus one (Clamp at 0)."""
    decoder, encoder = {}, {}
    for key, value in model.state_dict().items():
        half, _, rest = key.partition(".layers.")
        index, _, tail = rest.partition(".")
        if half == "decoder":
            decoder[f"{int(index) + 1}.{tail}"] = value.contiguous()
        else:
            encoder[rest] = value.contiguous()
    return decoder, encoder


@pytest.fixture(scope="module")
def taesd_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("taesd")
    model = build_autoencoder_tiny()
    decoder, encoder = original_halves(model)
    files = {"model": model, "root": root}
    files["decoder"] = root / "taesd_decoder.safetensors"
    save_file(decoder, str(files["decoder"]))
    files["decoder_pth"] = root / "taesd_decoder.pth"
    torch.save(decoder, files["decoder_pth"])
    files["encoder_pth"] = root / "taesd_encoder.pth"
    torch.save(encoder, files["encoder_pth"])
    files["diffusers_folder"] = root / "taesd"
    model.save_pretrained(files["diffusers_folder"])
    files["diffusers_file"] = root / "taesd_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files["diffusers_file"]))
    files["sdxl_named"] = root / "taesdxl_decoder.safetensors"
    save_file(decoder, str(files["sdxl_named"]))
    files["flux"] = root / "taef1_decoder.safetensors"
    save_file(original_halves(build_autoencoder_tiny(latent_channels=16))[0], str(files["flux"]))
    return files


@pytest.mark.parametrize("layout", ["decoder", "decoder_pth", "diffusers_folder", "diffusers_file"])
def test_decoder_matches_diffusers_in_every_layout(taesd_files, layout):
    model = taesd_files["model"]
    latents = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1)) * 2
    tiny = open_taesd(taesd_files[layout], "--vae")
    assert tiny.decoder is not None and tiny.latent_channels == 4
    with torch.no_grad():
        expected = model.decode(latents).sample  # [-1, 1]: diffusers' x*2-1 of TAESD's [0, 1]
        ours = tiny.decoder(latents)  # the original's [0, 1]
    assert ours.shape == (2, 3, 48, 40) and expected.std() > 0.1
    torch.testing.assert_close(ours * 2 - 1, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(tiny.decoder.decode(latents), expected.clamp(-1, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["encoder_pth", "diffusers_folder"])
def test_encoder_matches_diffusers(taesd_files, layout):
    pixels = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    tiny = open_taesd(taesd_files[layout], "--vae")
    with torch.no_grad():
        expected = taesd_files["model"].encode(pixels).latents  # diffusers takes [-1, 1]; no scaling (factor 1.0)
        ours = tiny.encoder.encode(pixels)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_detection_and_strict_loading(taesd_files, tiny_model, tmp_path):
    assert is_taesd(taesd_files["decoder"]) and is_taesd(taesd_files["diffusers_folder"]) and is_taesd(taesd_files["encoder_pth"])
    assert not is_taesd(tiny_model.safetensors)
    decoder, _ = original_halves(taesd_files["model"])
    del decoder["3.conv.2.weight"]
    save_file(decoder, str(tmp_path / "taesd_decoder.safetensors"))
    with pytest.raises(UserError, match=r"--preview-decoder .* is not a TAESD decoder: 1 missing: 3.conv.2.weight"):
        open_taesd(tmp_path / "taesd_decoder.safetensors", "--preview-decoder")


def test_family_is_checked_by_width_then_name(taesd_files):
    sd = open_taesd(taesd_files["decoder"], "--vae")
    check_taesd_fits(sd, TINY, "--vae")
    wrong = r"--vae taesd_decoder.safetensors is a TAESD for SD 1.x/2.x \(taesd_\*\); this is an SDXL model: use taesdxl_decoder"
    with pytest.raises(UserError, match=wrong):
        check_taesd_fits(sd, SDXL_BASE, "--vae")
    check_taesd_fits(open_taesd(taesd_files["sdxl_named"], "--vae"), SDXL_BASE, "--vae")
    with pytest.raises(UserError, match="decodes 16-channel latents; this SD 1.x model's have 4"):
        check_taesd_fits(open_taesd(taesd_files["flux"], "--vae"), TINY, "--vae")
    with pytest.raises(UserError, match="a TAESD encoder, not a decoder"):
        check_taesd_fits(open_taesd(taesd_files["encoder_pth"], "--vae"), TINY, "--vae")


def cli_args(tiny_model, out: Path, *extra: object) -> list[object]:
    return ["txt2img", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", out, "--H", "64", "--W", "64",
            "--steps", "4", "--n_samples", "1", "--device", "cpu", "--seed", "5", "--sampler", "euler", "--skip_grid", *extra]


def test_cli_fast_decode_with_a_taesd_vae(capsys, taesd_files, tiny_model, tmp_path):
    code, out, err = run_cli(capsys, *cli_args(tiny_model, tmp_path / "out", "--vae", taesd_files["decoder"]))
    assert code == 0, err
    (image,) = sorted((tmp_path / "out").rglob("*.png"))
    text = read_parameters(image)
    assert "VAE: taesd" in text and "VAE hash" not in text


def test_taesd_decodes_the_unet_latents_and_the_checkpoint_vae_still_encodes(taesd_files, tiny_model):
    from PIL import Image

    from optimized_sd.pipelines.diffusion import GenerationRequest, load

    pipe = load(tiny_model.safetensors, vae=taesd_files["decoder_pth"], device="cpu", tokenizer=tiny_model.tokenizer, memory="split")
    plain = load(tiny_model.safetensors, device="cpu", tokenizer=tiny_model.tokenizer, memory="split")
    request = GenerationRequest(prompts=["a cat"], steps=2, seed=3, height=64, width=64, sampler="euler")
    result = pipe.generate(request)
    # The UNet's latents go in as they are: TAESD was trained on latents already times the VAE's scale factor.
    expected = tensor_to_image(taesd_files["model"].decode(result.latents.float()).sample.clamp(-1, 1).detach())
    assert np.abs(np.asarray(result.images[0], dtype=int) - np.asarray(expected, dtype=int)).max() <= 1
    torch.testing.assert_close(result.latents, plain.generate(request).latents)  # only the decode differs
    ran = {group for action, group, _ in pipe.engine.events if action == "run"}
    assert not any("decoder" in group for group in ran) and any("decoder" in g for _, g, _ in plain.engine.events)  # never placed
    assert pipe.memory.sizes.tiny_decoder == sum(p.numel() for p in pipe.fast_vae.decoder.parameters()) * 4
    init = Image.new("RGB", (64, 64), (200, 40, 90))
    edited = pipe.generate(GenerationRequest(prompts=["a cat"], steps=2, seed=3, init_image=init, strength=0.5, sampler="euler"))
    reference = plain.generate(GenerationRequest(prompts=["a cat"], steps=2, seed=3, init_image=init, strength=0.5, sampler="euler"))
    torch.testing.assert_close(edited.latents, reference.latents)  # encoded by the checkpoint's own VAE


def test_cli_writes_previews_every_n_steps(capsys, taesd_files, tiny_model, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *cli_args(tiny_model, out, "--preview-every", "2", "--preview-decoder", taesd_files["decoder"]))
    assert code == 0, err
    previews = sorted(p.name for p in (out / "previews").iterdir())
    assert previews == ["seed_5-step2_00000.png", "seed_5-step4_00000.png"]
    with __import__("PIL.Image").Image.open(out / "previews" / previews[0]) as image:
        assert image.size == (64, 64)
    code, _, err = run_cli(capsys, *cli_args(tiny_model, tmp_path / "latent", "--preview-every", "3"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "latent" / "previews").iterdir()) == ["seed_5-step3_00000.png"]  # the projection


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--vae", "sdxl_named"), "error: --vae taesdxl_decoder.safetensors is a TAESD for SDXL (taesdxl_*); this is an SD 1.x model"),
        (("--preview-every", "1", "--preview-decoder", "flux"), "error: --preview-decoder taef1_decoder.safetensors decodes 16-channel"),
        (("--preview-every", "1", "--preview", "taesd"), "error: --preview-decoder is needed for taesd previews: a TAESD decoder FILE"),
        (("--preview-every", "-1"), "error: --preview-every -1 must be 0"),
    ],
)
def test_cli_refuses_a_taesd_that_does_not_fit_in_one_line(capsys, taesd_files, tiny_model, tmp_path, extra, message):
    args = [taesd_files.get(a, a) if isinstance(a, str) else a for a in extra]
    code, _, err = run_cli(capsys, *cli_args(tiny_model, tmp_path / "out", *args))
    assert code == 1 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_planner_counts_the_tiny_decoder():
    model = ModelFootprint(text_encoder=10, unet=100, unet_halves=(50, 50), unet_blocks=(25,) * 4, vae_encoder=30, vae_decoder=10**9)
    request = Request(64, 64)
    base = estimate_peak("split", model, request, False)  # the VAE decode dominates
    tiny = ModelFootprint(**{**model.__dict__, "tiny_decoder": 5_000_000})
    assert estimate_peak("split", tiny, request, False) == base + 5_000_000
    assert estimate_peak("split", tiny, Request(64, 64, tiny_decode=True), False) < base  # the VAE decoder is never placed


def test_server_previews_use_a_taesd_from_vae_approx(taesd_files, tmp_path):
    from optimized_sd.server.catalog import ModelCatalog
    from optimized_sd.server.preview import PreviewDecoders, approx_folders

    models = tmp_path / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    (models / "m.safetensors").write_bytes(b"")
    approx = tmp_path / "models" / "VAE-approx"
    approx.mkdir()
    (approx / "taesdxl_decoder.safetensors").write_bytes(taesd_files["sdxl_named"].read_bytes())
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    previews = PreviewDecoders(approx_folders(models, None))
    assert np.array_equal(np.asarray(previews.image(latents, TINY)), np.asarray(latent_preview(latents)))  # no SD 1.x decoder: projection
    (approx / "taesd_decoder.pth").write_bytes(taesd_files["decoder_pth"].read_bytes())
    assert find_taesd_decoder(approx, "sd1") == approx / "taesd_decoder.pth"
    previews = PreviewDecoders(approx_folders(models, None))
    decoder = open_taesd(taesd_files["decoder"], "x").decoder
    assert np.array_equal(np.asarray(previews.image(latents, TINY)), np.asarray(taesd_preview(latents, decoder)))
    assert previews.image(latents, TINY).size == (32, 32)
    assert previews.image(latents.clone(), None).size == (32, 32)  # no model loaded yet: the projection
    assert [e.title for e in ModelCatalog(tmp_path / "models").entries()] == ["Stable-diffusion/m.safetensors"]
