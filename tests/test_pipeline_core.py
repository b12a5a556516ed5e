"""The pipeline core on the tiny model: step callbacks, interruption, and what a long-lived process
must not have done to it (log levels, process-wide warning caches)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import optimized_sd
from optimized_sd.errors import Interrupted
from optimized_sd.models.text_encoder import load_tokenizer
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.sampling import StepInfo


def make_pipe(tiny_model, **options):
    return optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", precision="full", **options)


def request(**fields) -> GenerationRequest:
    values = dict(prompts=["a red cube", "a blue ball"], steps=4, sampler="euler", seed=3, height=64, width=64)
    values.update(fields)
    return GenerationRequest(**values)


def test_generate_reports_every_step_with_x_and_denoised(tiny_model):
    pipe = make_pipe(tiny_model, memory="full")
    seen: list[StepInfo] = []
    result = pipe.generate(request(), seen.append)
    assert [(info.step, info.total) for info in seen] == [(i, 4) for i in range(5)]
    assert seen[0].denoised is None and all(info.denoised.shape == (2, 4, 8, 8) for info in seen[1:])
    assert torch.equal(seen[-1].x.to(result.latents.dtype), result.latents)
    assert pipe.meter.summary()["unet"]["steps"] == 4  # UNet calls: one batched (uncond, cond) call per Euler step


def test_interrupted_stops_releases_the_stage_and_the_pipeline_runs_on(tiny_model):
    reference = make_pipe(tiny_model, memory="full").generate(request()).latents
    pipe = make_pipe(tiny_model, memory="stream")

    def stop_at_two(info: StepInfo) -> None:
        if info.step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        pipe.generate(request(), stop_at_two)
    assert [n for n in pipe.engine.resident_names() if n.startswith("unet")] == []  # the stage let its blocks go
    assert torch.allclose(pipe.generate(request()).latents, reference, atol=1e-5)


def test_long_prompts_are_chunked_without_warnings(tiny_model, caplog):
    """Prompts past 77 tokens are encoded in 75-token chunks (AUTOMATIC1111), so nothing is cut or warned about."""
    pipe = make_pipe(tiny_model, memory="full")
    long_prompt = "word " * 90 + "tail"
    with caplog.at_level(logging.WARNING):
        pipe.generate(request(prompts=[long_prompt] * 3, steps=1))
    assert not [r for r in caplog.records if "cut" in r.getMessage() or r.name.startswith("transformers")]


def test_tokenizer_leaves_other_libraries_log_levels_alone(tiny_model, caplog):
    transformers_logger = logging.getLogger("transformers")
    before = transformers_logger.level
    tokenizer = load_tokenizer(tiny_model.tokenizer)
    assert transformers_logger.level == before
    with caplog.at_level(logging.WARNING):
        assert "tail" in tokenizer.truncated_text("word " * 90 + "tail")
    assert not [r for r in caplog.records if r.name.startswith("transformers")]  # the length check warns nothing itself


def test_v_prediction_config_runs_the_v_adapter(tiny_model, monkeypatch):
    """A config with prediction_type = v_prediction gives different latents from eps (the adapter runs)."""
    pipe = make_pipe(tiny_model, memory="full")
    eps_latents = pipe.generate(request(sampler="ddim")).latents
    monkeypatch.setattr(pipe, "config", dataclasses.replace(pipe.config, prediction_type="v_prediction"))
    v_latents = pipe.generate(request(sampler="ddim")).latents
    assert torch.isfinite(v_latents).all() and (v_latents - eps_latents).abs().max().item() > 1e-3

