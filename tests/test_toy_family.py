"""A new model family is a record: registered here, in the test alone (no library file edited), a toy SD 1.x
variant (another latent scale factor, v-prediction, detected by a marker tensor in its file) loads through the
normal `load()` and CLI paths and generates with the record's choices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import optimized_sd
from optimized_sd import families
from optimized_sd.families.registry import V_PREDICTION
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.sampling.model_sampling import VSampling
from tests.cli_runs import run_cli

TOY = "toy_sd1_v"
MARKER = "toy_family_marker"  # an extra tensor only the toy family's files carry
TOY_SCALE = 0.13025
STEPS = 3


@pytest.fixture
def toy_family():
    """The toy record: SD 1.x's, but detected by its marker (before SD 1.x), with another latent scale and v
    as its default prediction; unregistered after the test."""
    sd1 = families.by_name("sd1")
    record = dataclasses.replace(
        sd1,
        name=TOY,
        display_name="Toy SD 1.x v",
        detect=lambda shapes: MARKER in shapes,
        priority=10,
        latent=dataclasses.replace(sd1.latent, scale_factor=TOY_SCALE),
        prediction=V_PREDICTION,
        v_capable=True,
        unused_keys=lambda shapes, config: {MARKER: "toy family marker"},
    )
    families.register(record)
    try:
        yield record
    finally:
        families.unregister(TOY)


@pytest.fixture
def toy_file(tiny_model, tmp_path: Path) -> Path:
    """The tiny SD 1.x single file plus the toy family's marker."""
    tensors = load_file(str(tiny_model.safetensors))
    tensors[MARKER] = torch.ones(1)
    path = tmp_path / "toy.safetensors"
    save_file(tensors, str(path))
    return path


def generate(pipe, decoded: list[torch.Tensor] | None = None):
    """A seeded 3-step Euler txt2img at 64x64; `decoded` collects what the VAE decoder was given."""
    if decoded is not None:
        vae = pipe.model.first_stage_model
        decode = vae.decode
        vae.decode = lambda z, *args, **kwargs: (decoded.append(z.detach().clone()), decode(z, *args, **kwargs))[1]
    return pipe.generate(
        GenerationRequest(prompts=["a toy"], steps=STEPS, sampler="euler", seed=7, height=64, width=64)
    )


def test_a_registered_family_is_detected_loaded_and_sampled_by_its_record(toy_family, toy_file, tiny_model) -> None:
    options = dict(device="cpu", precision="full", memory="full", tokenizer=tiny_model.tokenizer)
    pipe = optimized_sd.load(toy_file, **options)
    assert pipe.config.family == TOY and pipe.config.family_name == "Toy SD 1.x v"
    assert pipe.config.scale_factor == TOY_SCALE
    assert pipe.config.prediction_type == V_PREDICTION and pipe.prediction_reason == "family default"
    assert isinstance(pipe.model_sampling, VSampling)
    assert pipe.loaded.report.known_extras.get("toy family marker") == 1

    decoded: list[torch.Tensor] = []
    result = generate(pipe, decoded)
    assert len(decoded) == 1  # decode got the sampler's latents divided by the toy scale
    torch.testing.assert_close(decoded[0], result.latents[:1] / TOY_SCALE)

    # The same run computed by hand: the plain SD 1.x file with the toy's choices given explicitly.
    plain = optimized_sd.load(tiny_model.safetensors, prediction="v", **options)
    assert plain.config.family == "sd1" and plain.config.scale_factor != TOY_SCALE
    plain.loaded.config = plain.config = dataclasses.replace(plain.config, scale_factor=TOY_SCALE)
    by_hand = generate(plain)
    torch.testing.assert_close(result.latents, by_hand.latents)
    assert result.images[0].tobytes() == by_hand.images[0].tobytes()

    # ... and the record's choices mattered: SD 1.x's own (eps, 0.18215) give another image.
    sd1 = generate(optimized_sd.load(tiny_model.safetensors, **options))
    assert not torch.allclose(result.latents, sd1.latents)


def test_the_cli_runs_a_registered_family(toy_family, toy_file, tiny_model, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(
        capsys, "txt2img", "--ckpt", toy_file, "--tokenizer", tiny_model.tokenizer, "--prompt", "a toy", "--H", 64, "--W", 64,
        "--ddim_steps", STEPS, "--sampler", "euler", "--n_samples", 1, "--n_iter", 1, "--device", "cpu", "--precision", "full",
        "--outdir", tmp_path / "out", "--seed", 7,
    )  # fmt: skip
    assert code == 0, err
    assert "Toy SD 1.x v, v prediction (family default)" in out + err
    assert list((tmp_path / "out").rglob("*.png"))


def test_an_unregistered_family_is_gone(toy_file) -> None:
    """Without the record (the fixture's finally), the marker is an SD 1.x file's stray key again."""
    from optimized_sd.weights.family import detect_family

    assert families.find(TOY) is None
    assert detect_family({k: tuple(v.shape) for k, v in load_file(str(toy_file)).items()}) == "sd1"
