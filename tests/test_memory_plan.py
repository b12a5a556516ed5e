"""The memory mode table drives placement, the plan carries every decision, weights reach compute
through the op layer, the engine's tensor hook patches exactly the copies that compute, and a
long-lived pipeline keeps bounded state and lets everything go on close."""

from __future__ import annotations

import dataclasses
import gc
import os

import pytest
import torch
from torch import nn

import optimized_sd
from optimized_sd.memory.modes import MODE_TABLE, MODES, leaner, mode_row
from optimized_sd.memory.planner import ModelFootprint, Request, fallback, plan_memory
from optimized_sd.models import ops, slabs
from optimized_sd.models.layers import group_norm
from optimized_sd.models.runtime import RunOptions, run_options, use_run_options
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.placement import UNET, unet_blocks, unet_halves

DEVICE = os.environ.get("OPTIMIZED_SD_TEST_DEVICE", "cpu")
TOLERANCE = 1e-5
PATCHED_KEY = f"{UNET}.out.2.bias"  # the eps output: +1 moves every latent
MIB = 2**20
FOOTPRINT = ModelFootprint(235 * MIB, 1640 * MIB, (665 * MIB, 974 * MIB), (100 * MIB,) * 16, 65 * MIB, 94 * MIB)


def make_pipe(tiny_model, **options):
    options.setdefault("device", DEVICE)
    options.setdefault("precision", "full")
    return optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, **options)


def request(**fields) -> GenerationRequest:
    values = dict(prompts=["a red cube", "a blue ball"], steps=3, sampler="euler", seed=7, height=64, width=64)
    values.update(fields)
    return GenerationRequest(**values)


# -- the table drives placement -----------------------------------------------------------------
@pytest.mark.parametrize("row", MODE_TABLE, ids=lambda row: row.name)
def test_the_mode_table_drives_placement(tiny_model, row):
    pipe = make_pipe(tiny_model, memory=row.name)
    plan = pipe.prepare(request())
    engine = pipe.engine
    assert plan.row is row and pipe.mode == row.name
    assert engine.host == plan.host == row.host_for(pipe.device.type)
    assert engine.prefetch_enabled == (row.prefetch and pipe.device.type == "cuda")
    assert (pipe.memory.heap is not None) == (row.lean_heap_on_cpu and pipe.device.type == "cpu")
    assert plan.feed_forward_chunk_tokens == row.feed_forward_chunk_tokens
    specs = [group.spec for group in engine.groups.values()]
    if row.resident == "everything":
        assert [(s.name, s.release) for s in specs] == [("all", "never")]
        assert set(engine.resident_names()) == {"all"}
        return
    unet_specs = [s for s in specs if any(m.startswith(UNET) for m in s.modules)]
    others = [s for s in specs if s not in unet_specs]
    streamed_text = [s for s in others if s.release == "after_forward"]  # `blocks` streams the text towers by layer too
    assert all(s.name.startswith("text.") for s in streamed_text) and bool(streamed_text) == (row.denoiser == "blocks")
    assert {s.release for s in others if s not in streamed_text} == {"stage_end"}  # text encoder and VAE: their stage only
    assert {s.release for s in unet_specs} == {row.denoiser_release}
    expected = {
        "whole": [(UNET,)],
        "halves": list(unet_halves(pipe.model)),
        "blocks": [(block,) for block in unet_blocks(pipe.model)],
    }[row.denoiser]
    assert [s.modules for s in unet_specs] == expected
    if row.prefetch:  # each block names the next as the one to copy ahead, wrapping to the first
        chain = [s.prefetch_next for s in unet_specs]
        assert chain == [s.name for s in unet_specs[1:]] + [unet_specs[0].name]
    assert engine.resident_names() == ()  # nothing placed before a stage asks for it


def test_the_table_is_ordered_and_the_planner_reads_it():
    assert MODES == tuple(row.name for row in MODE_TABLE) == ("full", "turbo", "split", "stream")
    assert [getattr(leaner(name), "name", None) for name in MODES] == ["turbo", "split", "stream", None]
    footprint = FOOTPRINT
    for row in MODE_TABLE:
        plan = plan_memory(footprint, Request(512, 512, unet_batch=1), budget=None, mode=row.name, device_type="cpu")
        assert (plan.mode, plan.host, plan.prefetch, plan.lean_heap) == (row.name, row.host_for("cpu"), False, row.lean_heap_on_cpu)
        assert plan.unet_batch == 1 and plan.feed_forward_chunk_tokens == row.feed_forward_chunk_tokens
        on_gpu = plan_memory(footprint, Request(512, 512), budget=None, mode=row.name, device_type="cuda")
        assert (on_gpu.host, on_gpu.prefetch, on_gpu.lean_heap) == (row.host_for("cuda"), row.prefetch, False)


def test_the_fallback_ladder_is_the_table_order():
    footprint = FOOTPRINT
    plan = plan_memory(footprint, Request(512, 512), budget=None, mode="full", device_type="cpu")
    assert plan.host == "cpu"  # the resident model keeps a copy of its own on the CPU
    seen = [plan.mode]
    while (plan := fallback(plan)) is not None:
        seen.append(plan.mode)
        assert (plan.host, plan.feed_forward_chunk_tokens, plan.lean_heap) == (
            plan.row.host_for("cpu"),
            plan.row.feed_forward_chunk_tokens,
            plan.row.lean_heap_on_cpu,
        )
    assert seen == list(MODES)
    ahead = dataclasses.replace(plan_memory(footprint, Request(512, 512), budget=None, mode="stream"), lookahead=2**30)
    assert fallback(ahead).mode == "stream" and fallback(ahead).lookahead == 0


def test_run_options_are_per_call_and_nest():
    assert run_options() == RunOptions()
    with use_run_options(RunOptions(feed_forward_chunk_tokens=8)):
        with use_run_options(RunOptions(unet_micro_batch=1)):
            assert run_options() == RunOptions(unet_micro_batch=1)
        assert run_options().feed_forward_chunk_tokens == 8
    assert run_options() == RunOptions()


# -- the op layer -------------------------------------------------------------------------------
def test_op_layer_skips_init_and_every_unet_and_vae_weight_goes_through_it(tiny_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("random initialisation ran")

    with monkeypatch.context() as patched:
        patched.setattr(nn.init, "kaiming_uniform_", refuse)
        patched.setattr(nn.init, "uniform_", refuse)
        ops.Linear(4, 3), ops.Conv2d(4, 3, 3)  # built on the CPU without drawing a number
    pipe = make_pipe(tiny_model, memory="full")
    for part in (pipe.model.model, pipe.model.first_stage_model):
        plain = [name for name, m in part.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
        assert plain == []
        assert any(isinstance(m, ops.Conv2d) for m in part.modules())


def test_default_init_draws_the_torch_defaults():
    torch.manual_seed(0)
    reference = nn.Conv2d(4, 3, 3)
    torch.manual_seed(0)
    conv = ops.default_init(nn.Sequential(ops.Conv2d(4, 3, 3)))[0]
    assert torch.equal(conv.weight, reference.weight) and torch.equal(conv.bias, reference.bias)


def test_slab_bands_read_the_weight_through_the_op_layer(monkeypatch):
    monkeypatch.setattr(slabs, "SLAB_BYTES", 1)  # several bands
    torch.manual_seed(0)
    norm, conv = group_norm(32, eps=1e-6), ops.default_init(ops.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(1, 32, 20, 12)
    doubled = conv.weight.detach() * 2
    monkeypatch.setattr(conv, "compute_weight", lambda dtype=None: doubled)
    with torch.no_grad():
        expected = nn.functional.conv2d(nn.functional.silu(norm(x)), doubled, conv.bias, padding=1)
        assert (slabs.norm_silu_conv(x, norm, conv) - expected).abs().max().item() <= 1e-5
        upsampled = nn.functional.interpolate(x, scale_factor=2.0)
        expected_up = nn.functional.conv2d(upsampled, doubled, conv.bias, padding=1)
        up_conv = slabs.NearestUpConv2d(32, banded=True)
        up_conv.load_state_dict(conv.state_dict())
        monkeypatch.setattr(up_conv, "compute_weight", lambda dtype=None: doubled)
        assert (up_conv(x) - expected_up).abs().max().item() <= 1e-5


# -- the engine's tensor hook -------------------------------------------------------------------
def add_one(calls: list[str]):
    def hook(key: str, tensor: torch.Tensor) -> None:
        assert tensor.device.type == torch.device(DEVICE).type and tensor.dtype == torch.float32
        if key == PATCHED_KEY:
            calls.append(key)
            tensor.add_(1.0)

    return hook


@pytest.fixture(scope="module")
def patched_and_plain(tiny_model):
    pipe = make_pipe(tiny_model, memory="full")
    plain = pipe.generate(request()).latents
    pipe.memory.set_tensor_hook(add_one([]))
    return pipe.generate(request()).latents, plain


@pytest.mark.parametrize("mode", MODES)
def test_a_weight_patch_changes_the_output_the_same_in_every_mode(tiny_model, patched_and_plain, mode):
    patched, plain = patched_and_plain
    assert (patched - plain).abs().max().item() > 1e-3  # the patch matters
    pipe = make_pipe(tiny_model, memory=mode)
    calls: list[str] = []
    pipe.memory.set_tensor_hook(add_one(calls))
    result = pipe.generate(request())
    assert (result.latents - patched).abs().max().item() <= TOLERANCE
    streamed = mode_row(mode).streams_denoiser
    assert len(calls) == (3 if streamed else 1)  # once per UNet call when streamed, else once per placement


def test_reload_without_the_hook_restores_the_exact_output(tiny_model):
    pipe = make_pipe(tiny_model, memory="full")
    original = pipe.generate(request()).latents
    pipe.memory.set_tensor_hook(add_one([]))
    assert not torch.equal(pipe.generate(request()).latents, original)
    pipe.memory.set_tensor_hook(None)  # reloads the resident model from the file
    assert torch.equal(pipe.generate(request()).latents, original)
    engine = pipe.engine
    engine.tensor_hook = add_one([])
    engine.reload()
    assert not torch.equal(pipe.generate(request()).latents, original)
    engine.tensor_hook = None
    engine.reload()
    assert torch.equal(pipe.generate(request()).latents, original)


# -- long-lived processes -----------------------------------------------------------------------
def test_close_lets_go_of_every_tensor(tiny_model):
    pipe = make_pipe(tiny_model, memory="turbo")
    plan = pipe.prepare(request())
    pipe.memory.place(dataclasses.replace(plan, host="cpu"))  # host copies, packed per group
    engine = pipe.engine
    text = pipe.memory.run_stage("text", lambda record: pipe.text.encode("a red cube")[0])
    assert torch.isfinite(text).all()
    assert engine.held_tensors() and any(group.packed_host is not None for group in engine.groups.values())
    pipe.close()
    assert pipe.engine is None and engine.held_tensors() == [] and engine.events == []
    assert all(p.is_meta for p in pipe.model.parameters())  # the model holds placeholders, no memory
    assert not engine._hooks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_close_frees_pinned_memory(tiny_model):
    gc.collect()
    before = torch.cuda.memory_allocated()
    pipe = make_pipe(tiny_model, device="cuda", memory="stream", precision="fp16")
    result = pipe.generate(request())
    engine = pipe.engine
    assert any(t.is_pinned() for t in engine.held_tensors())
    pipe.close()
    assert engine.held_tensors() == []
    del result
    gc.collect()
    assert torch.cuda.memory_allocated() - before < 2**20  # the device copies went with the engine


def test_fifty_calls_keep_bounded_state(tiny_model):
    pipe = make_pipe(tiny_model, memory="stream")
    small = request(prompts=["x"], steps=1)

    def state() -> tuple[int, int, int]:
        gc.collect()
        return len(pipe.meter.records), len(pipe.engine.events), len(gc.get_objects())

    for _ in range(5):  # caches that fill once (kernels, tokenizer, logging) are filled here
        pipe.generate(small)
    records, events, objects = state()
    for _ in range(45):
        pipe.generate(small)
    after = state()
    assert after[:2] == (records, events) == (3, events)  # this call's stages and residency log only
    assert after[2] - objects < 1_000  # 45 calls leave (almost) nothing behind
    assert pipe.meter.calls == 50 and pipe.meter.totals["unet"]["steps"] == 50


def test_activation_estimates_follow_the_family_and_the_decode_size() -> None:
    """Each family plans with its own measured UNet constants (SDXL's are below SD 1.x's), a family not
    measured takes SD 1.x's, and the decode's per-pixel figure grows past 768x768 unless tiled."""
    from optimized_sd.memory.planner import UNET_ACTIVATIONS, decode_activation_bytes, unet_activation_bytes, unet_activations

    at_1024 = Request(1024, 1024)
    sdxl = dataclasses.replace(FOOTPRINT, family="sdxl")
    for chunked in (False, True):
        assert unet_activation_bytes(at_1024, chunked, "sdxl") < unet_activation_bytes(at_1024, chunked, "sd1")
    assert unet_activations("sdxl_refiner") == UNET_ACTIVATIONS["sd1"]
    streamed = [plan_memory(model, at_1024, budget=None, mode="stream", vae_tiling="on").estimates["stream"] for model in (sdxl, FOOTPRINT)]
    assert streamed[0] < streamed[1]
    per_pixel = {side: decode_activation_bytes(Request(side, side), False) / (side * side * 2) for side in (512, 768, 832, 1024)}
    assert per_pixel[512] == per_pixel[768] < per_pixel[832] == per_pixel[1024]
    assert decode_activation_bytes(at_1024, True) == decode_activation_bytes(Request(512, 512), False)


def test_the_footprint_names_the_model_family(tiny_sdxl) -> None:
    from optimized_sd.pipelines.placement import footprint

    pipe = optimized_sd.load(tiny_sdxl.folder, device="cpu", precision="full", memory="stream")
    assert footprint(pipe.model, 4).family == "sdxl" and pipe.memory.sizes.family == "sdxl"


@pytest.mark.parametrize(("mode", "channels_last"), [("full", True), ("turbo", True), ("split", False), ("stream", False)])
def test_the_cpu_unet_runs_channels_last_where_its_weights_stay(tiny_model, mode, channels_last):
    """Asked for (`channels_last=True`; off by default), on the CPU in fp32, where the UNet's weights stay
    placed for the sampling, its convolution weights
    are placed channels-last and its activations run so; where they are copied in every step they stay
    as stored (the permuting copy cost more than the layout saved); the VAE's never change. The latents
    match a run without the layout up to float rounding."""
    seen: dict[str, bool] = {}

    def record(name: str, conv: nn.Module) -> None:
        def layout(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, module.weight.is_contiguous(memory_format=torch.channels_last))

        conv.register_forward_pre_hook(layout)

    pipe = make_pipe(tiny_model, device="cpu", memory=mode, channels_last=True)
    plain = make_pipe(tiny_model, device="cpu", memory=mode)
    try:
        record("unet", pipe.model.model.diffusion_model.input_blocks[0][0])
        record("vae", pipe.model.first_stage_model.decoder.conv_in)
        latents = pipe.generate(request(steps=2)).latents
        expected = plain.generate(request(steps=2)).latents
    finally:
        pipe.close()
        plain.close()
    assert seen == {"unet": channels_last, "vae": False}
    assert float((latents - expected).norm() / expected.norm()) < 1e-5  # convolutions summed in another order
    assert torch.equal(latents, expected) != channels_last  # the other layout ran exactly where it applies
