"""Memory engine on the tiny model: every mode gives the `full` output, the hooks keep the residency
the plan promises, the planner picks modes from fake budgets, out-of-memory falls back."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
import torch

import optimized_sd
from optimized_sd.errors import UserError
from optimized_sd.memory import planner
from optimized_sd.memory.device import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, RETURN_FREED, REUSE_FREED, LeanHeap
from optimized_sd.memory.modes import mode_row
from optimized_sd.memory.planner import (
    FIXED_OVERHEAD,
    MIN_UNET_MICRO_BATCH,
    MODES,
    UNET_ACTIVATION_ELEMENTS_PER_LATENT_PIXEL,
    UNET_FULL_BATCH_ELEMENTS_PER_LATENT_PIXEL,
    ModelFootprint,
    Request,
    estimate_peak,
    lower_mode,
    parse_bytes,
    plan_memory,
    stream_lookahead,
    unet_activation_bytes,
)
from optimized_sd.models.layers import FeedForward
from optimized_sd.models.runtime import run_options
from optimized_sd.pipelines import memory_session
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.placement import UNET, unet_blocks

TOLERANCE = 1e-5
MIB = 2**20


DEVICE = os.environ.get("OPTIMIZED_SD_TEST_DEVICE", "cpu")  # cuda: the same checks with prefetch on a GPU


def make_pipe(tiny_model, **options):
    options.setdefault("device", DEVICE)
    options.setdefault("precision", "full")
    return optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, **options)


def request(**fields) -> GenerationRequest:
    values = dict(prompts=["a red cube", "a blue ball"], steps=3, sampler="euler", seed=7, height=64, width=64)
    values.update(fields)
    return GenerationRequest(**values)


@pytest.fixture(scope="module")
def full_result(tiny_model):
    return make_pipe(tiny_model, memory="full").generate(request())


@pytest.mark.parametrize("mode", ["turbo", "split", "stream"])
def test_every_mode_gives_the_full_output(tiny_model, full_result, mode):
    pipe = make_pipe(tiny_model, memory=mode)
    result = pipe.generate(request())
    assert pipe.mode == mode
    assert (result.latents - full_result.latents).abs().max().item() <= TOLERANCE
    assert [img.tobytes() for img in result.images] == [img.tobytes() for img in full_result.images]


@pytest.mark.parametrize("mode", ["full", "turbo", "split", "stream"])
def test_img2img_same_in_every_mode(tiny_model, mode):
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 40, 90))
    reference = make_pipe(tiny_model, memory="full").generate(request(init_image=image, strength=0.6))
    result = make_pipe(tiny_model, memory=mode).generate(request(init_image=image, strength=0.6))
    assert (result.latents - reference.latents).abs().max().item() <= TOLERANCE


def unet_groups(names) -> list[str]:
    return [n for n in names if n.startswith("unet")]


def test_stream_keeps_at_most_current_and_next_block(tiny_model):
    pipe = make_pipe(tiny_model, memory="stream")
    pipe.generate(request())
    runs = [(group, resident) for action, group, resident in pipe.engine.events if action == "run" and group.startswith("unet")]
    assert len(runs) == 3 * len(unet_blocks(pipe.model))  # euler: one UNet call per step
    # On the CPU each cross-attention's key and value projections are read when computed: at the first step
    # only (the sampling stage keeps their outputs), three steps or not; on CUDA they stay in their blocks.
    demanded = [group for action, group, _ in pipe.engine.events if action == "demand"]
    cross_attentions = [m for m in pipe.model.modules() if getattr(m, "projects_context", False)]
    assert len(demanded) == (len(cross_attentions) if DEVICE == "cpu" else 0) and len(set(demanded)) == len(demanded)
    for group, resident in runs:
        assert group in resident
        assert len(unet_groups(resident)) <= 2
    # after the run nothing of the UNet stays, and its parameters are placeholders again
    assert unet_groups(pipe.engine.resident_names()) == []
    parameters = list(pipe.model.get_submodule(UNET).parameters())
    assert not any(p.device.type == "cuda" for p in parameters)
    assert DEVICE != "cpu" or all(p.is_meta for p in parameters)  # the CPU path keeps nothing: the file is the home
    # The log covers the last call only: a long-lived pipeline does not accumulate one.
    logged = len(pipe.engine.events)
    pipe.generate(request())
    assert len(pipe.engine.events) == logged


@pytest.mark.parametrize("lookahead_blocks", [0, 3])
def test_stream_copies_ahead_only_within_its_window(tiny_model, full_result, monkeypatch, lookahead_blocks):
    """The copy-ahead schedule, run synchronously where there is no copy stream (the CPU)."""
    pipe = make_pipe(tiny_model, memory="stream")
    pipe.memory.use_mode("stream")
    engine = pipe.engine
    engine.prefetch_enabled = True  # on CUDA it is; on the CPU the same schedule runs without a side stream
    weights = {name: group.bytes for name, group in engine.groups.items()}  # bytes as placed
    blocks = [name for name in engine.groups if name.startswith("unet.")]
    window = sum(sorted(weights[name] for name in blocks)[-lookahead_blocks:]) if lookahead_blocks else 0
    planned = pipe.memory.plan_for
    monkeypatch.setattr(
        pipe.memory, "plan_for", lambda request: dataclasses.replace(planned(request), lookahead=window)
    )
    result = pipe.generate(request())
    assert engine.lookahead_bytes == window
    assert (result.latents - full_result.latents).abs().max().item() <= TOLERANCE
    most, running = 0, None
    for action, group, resident in engine.events:  # residency after each load, prefetch, run and release
        running = group if action == "run" and group in blocks else running
        if running is None:
            continue
        streamed = unet_groups(resident)
        following = engine.groups[running].spec.prefetch_next
        assert sum(weights[name] for name in streamed) <= max(window, weights[running] + weights[following])
        most = max(most, len(streamed))
    assert most == 2 if lookahead_blocks == 0 else most >= 3  # the running block and the next, or more ahead


def test_split_runs_one_half_at_a_time_and_turbo_keeps_the_unet(tiny_model):
    split = make_pipe(tiny_model, memory="split")
    split.generate(request())
    for action, group, resident in split.engine.events:
        assert len(unet_groups(resident)) <= 1
        if action == "run" and group == "text_encoder":
            assert unet_groups(resident) == []
    turbo = make_pipe(tiny_model, memory="turbo")
    turbo.generate(request())
    loads = [g for action, g, _ in turbo.engine.events if action == "load" and g == "unet"]
    assert loads == ["unet"]  # loaded once for the whole sampling run, not per step
    text_runs = [res for action, g, res in turbo.engine.events if action == "run" and g == "text_encoder"]
    assert all("unet" not in res for res in text_runs)


@pytest.mark.parametrize("mode", ["full", "turbo", "split", "stream"])
def test_file_pages_are_handed_back_as_they_are_copied(tiny_model, mode, monkeypatch):
    """A group read from the file releases its tensors' file pages as their copies are made, a batch of at most
    RELEASE_BATCH_BYTES at a time (past it, with the tensor that crossed it), so the pages held beside the copies
    never exceed that (before, a group's pages stayed until the whole group was read: SD 1.5 `turbo` on the CPU
    peaked at 5.3 GB RSS, 4.1 GB after); batching `stream`'s releases cut its own per-step work on the tiny SDXL."""
    from optimized_sd.memory import offload

    monkeypatch.setattr(offload, "RELEASE_BATCH_BYTES", 4096)  # the tiny model's tensors: a few per batch
    pipe = make_pipe(tiny_model, memory=mode)
    pipe.prepare(request())
    source = pipe.engine.source
    held: dict[str, int] = {}
    most, largest = [0], [0]
    real_get, real_release = source.get, source.release

    def get(key: str):
        tensor = real_get(key)
        held[key] = tensor.nbytes
        most[0] = max(most[0], sum(held.values()))
        largest[0] = max(largest[0], tensor.nbytes)
        return tensor

    def release(keys) -> None:
        keys = list(keys)
        for key in keys:
            held.pop(key, None)
        real_release(keys)

    monkeypatch.setattr(source, "get", get)
    monkeypatch.setattr(source, "release", release)
    pipe.engine.reload()  # every group placed again through the recording source
    pipe.generate(request())
    assert 0 < most[0] <= 4096 + largest[0] and not held
    pipe.close()


def test_a_cpu_budget_keeps_the_safety_margin_and_a_cuda_budget_is_exact(tiny_model):
    """An RSS cap also holds what no estimate models, so CPU plans keep SAFETY_MARGIN of `--vram-budget`;
    a CUDA budget caps the allocator, which the estimates are calibrated on."""
    from optimized_sd.memory.planner import SAFETY_MARGIN

    pipe = make_pipe(tiny_model, device="cpu", vram_budget=1000 * MIB)
    assert pipe.memory.budget_for() == int(1000 * MIB * SAFETY_MARGIN)
    assert pipe.memory.budget_for(taken=100 * MIB) == int(900 * MIB * SAFETY_MARGIN)
    pipe.memory.device = torch.device("cuda")  # the rule only; nothing is placed
    assert pipe.memory.budget_for(taken=100 * MIB) == 900 * MIB


def test_unet_micro_batches_give_the_same_output(tiny_model, full_result):
    """Smaller batches pick other kernels, so equality is to rounding relative to the latents' scale
    (about 25 after 3 Euler steps on random weights), not bit-exact: float32 on the CPU; on CUDA,
    PyTorch's default TF32 convolutions (10-bit mantissa) make that about 1e-3 (measured 3e-3 max
    on an H100)."""
    result = make_pipe(tiny_model, memory="stream").generate(request(unet_batch=1))
    scale = full_result.latents.abs().max().item()
    relative = TOLERANCE if DEVICE == "cpu" else 1e-2
    assert (result.latents - full_result.latents).abs().max().item() <= relative * scale


def fail_first_unet_call(pipe, monkeypatch) -> None:
    """The UNet's first forward raises CUDA's out-of-memory error; later ones run."""
    unet = pipe.model.get_submodule(UNET)
    original = type(unet).forward
    failures = []

    def flaky_forward(self, *args, **kwargs):
        if not failures:
            failures.append(True)
            raise torch.OutOfMemoryError("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(unet), "forward", flaky_forward)


def test_out_of_memory_falls_back_to_a_leaner_mode(tiny_model, full_result, monkeypatch, caplog):
    pipe = make_pipe(tiny_model, memory="turbo")
    fail_first_unet_call(pipe, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="optimized_sd"):
        result = pipe.generate(request())
    assert pipe.mode == "split"
    assert "out of memory during unet in turbo mode; retrying the stage in split mode" in caplog.text
    assert (result.latents - full_result.latents).abs().max().item() <= TOLERANCE


def test_out_of_memory_fallback_into_stream_chunks_the_feed_forward(tiny_model, full_result, monkeypatch):
    pipe = make_pipe(tiny_model, memory="split")
    seen: list[int | None] = []
    original = FeedForward.forward
    monkeypatch.setattr(FeedForward, "forward", lambda self, x: seen.append(run_options().feed_forward_chunk_tokens) or original(self, x))
    fail_first_unet_call(pipe, monkeypatch)
    result = pipe.generate(request())
    assert pipe.mode == "stream" and pipe.plan.mode == "stream"
    assert pipe.plan.feed_forward_chunk_tokens == mode_row("stream").feed_forward_chunk_tokens is not None
    assert set(seen) == {mode_row("stream").feed_forward_chunk_tokens}  # every feed-forward of the retried stage
    assert not any(vars(m).get("chunk_tokens") for m in pipe.model.modules())  # no memory knob on the model
    assert (result.latents - full_result.latents).abs().max().item() <= TOLERANCE


def test_out_of_memory_copying_ahead_retries_one_block_ahead(tiny_model, full_result, monkeypatch, caplog):
    pipe = make_pipe(tiny_model, memory="stream")
    planned = pipe.memory.plan_for
    monkeypatch.setattr(
        pipe.memory, "plan_for", lambda request: dataclasses.replace(planned(request), lookahead=10 * MIB)
    )
    fail_first_unet_call(pipe, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="optimized_sd"):
        result = pipe.generate(request())
    assert pipe.mode == "stream" and pipe.engine.lookahead_bytes == 0
    assert "out of memory during unet copying blocks ahead; retrying the stage one block ahead" in caplog.text
    assert (result.latents - full_result.latents).abs().max().item() <= TOLERANCE


def test_bf16_vae_overflow_is_decoded_again_in_fp32(tiny_model, monkeypatch, caplog):
    pipe = make_pipe(tiny_model, memory="turbo", precision="bf16")
    vae = pipe.model.first_stage_model
    monkeypatch.setattr(vae, "decode", lambda z: torch.full((1, 3, 64, 64), float("nan"), dtype=z.dtype))
    with caplog.at_level(logging.WARNING, logger="optimized_sd"):
        result = pipe.generate(request(prompts=["x"]))
    assert "decoding this image again in fp32" in caplog.text
    assert any(low < high for low, high in result.images[0].getextrema())  # a real image, not a NaN-filled one


def test_tiled_vae_is_close_to_untiled_at_512(tiny_model):
    """Decoding a 512x512 image in 256-pixel tiles (64-pixel overlap) against one pass. The VAE's
    middle attention sees the whole latent, so tiles cannot be exact; on this random-weight model
    the mean pixel difference is about 0.024 (1.2% of the [-1, 1] range)."""
    pipe = make_pipe(tiny_model, memory="full")
    pipe.memory.use_mode("full")
    pipe.vae_tile = 256
    latent = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(pipe.device)
    with torch.inference_mode():
        whole = pipe.vae_decode(latent, tiled=False)
        tiled = pipe.vae_decode(latent, tiled=True)
    assert tiled.shape == whole.shape == (1, 3, 512, 512)
    assert (tiled - whole).abs().mean().item() < 0.03
    assert (tiled - whole).abs().max().item() < 0.5


def test_report_json_has_every_stage(tiny_model, tmp_path):
    pipe = make_pipe(tiny_model, memory="stream")
    pipe.generate(request())
    pipe.meter.write_json(tmp_path / "report.json")
    stages = json.loads((tmp_path / "report.json").read_text())["stages"]
    assert set(stages) == {"text", "unet", "vae_decode"}
    assert stages["unet"]["steps"] == 3
    assert stages["unet"]["peak_rss_mib"] > 0


class FakeLibc:
    """Records the glibc calls LeanHeap makes."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim",))
        return 1


def test_lean_heap_reuses_in_the_sampling_loop_and_returns_elsewhere():
    heap = LeanHeap()
    heap.libc = FakeLibc()
    reuse = [("mallopt", M_MMAP_THRESHOLD, REUSE_FREED.mmap_threshold), ("mallopt", M_TRIM_THRESHOLD, REUSE_FREED.trim_threshold)]
    give_back = [("mallopt", M_MMAP_THRESHOLD, RETURN_FREED.mmap_threshold), ("mallopt", M_TRIM_THRESHOLD, RETURN_FREED.trim_threshold)]
    with heap.phase(repeated=True):
        assert heap.libc.calls == reuse
    assert heap.libc.calls == reuse + [("trim",)] + reuse
    heap.libc.calls.clear()
    with pytest.raises(RuntimeError), heap.phase(repeated=False):
        raise RuntimeError("a failing stage still hands its memory back")
    assert heap.libc.calls == give_back + [("trim",)] + reuse
    heap.libc = None  # not glibc: nothing to tune, stages still run
    with heap.phase(repeated=True):
        pass


@pytest.mark.skipif(DEVICE != "cpu", reason="the RAM-lean heap is the CPU stream path's")
def test_cpu_stream_tunes_the_heap_per_stage(tiny_model, monkeypatch):
    phases: list[bool] = []
    original = LeanHeap.phase

    def spy(self, *, repeated):
        phases.append(repeated)
        return original(self, repeated=repeated)

    monkeypatch.setattr(LeanHeap, "phase", spy)
    make_pipe(tiny_model, memory="stream").generate(request())
    assert phases == [False, True, False]  # text, unet, vae_decode
    phases.clear()
    make_pipe(tiny_model, memory="full").generate(request())
    assert phases == []


# -- planner, with fake budgets -------------------------------------------------------------------
SD15_FP16 = ModelFootprint(
    text_encoder=235 * MIB,
    unet=1640 * MIB,
    unet_halves=(665 * MIB, 974 * MIB),
    unet_blocks=(4, 0, 9, 9, 2, 30, 33, 7, 113, 126, 28, 59, 59, 185, 94, 94, 122, 160, 160, 173, 50, 42, 45, 13, 11, 11, 0),
    vae_encoder=65 * MIB,
    vae_decoder=94 * MIB,
)
SD15_FP16 = ModelFootprint(**{**SD15_FP16.__dict__, "unet_blocks": tuple(b * MIB for b in SD15_FP16.unet_blocks)})
R512 = Request(512, 512)


def test_estimates_are_ordered_fastest_mode_heaviest():
    peaks = [estimate_peak(mode, SD15_FP16, R512, False) for mode in MODES]
    assert peaks == sorted(peaks, reverse=True)


@pytest.mark.parametrize("mode", MODES)
def test_auto_picks_the_fastest_mode_that_fits(mode):
    budget = estimate_peak(mode, SD15_FP16, R512, False)
    assert plan_memory(SD15_FP16, R512, budget=budget).mode == mode
    faster = MODES[: MODES.index(mode)]
    assert all(estimate_peak(m, SD15_FP16, R512, False) > budget for m in faster)


def test_no_budget_means_full_and_a_tiny_budget_is_refused():
    assert plan_memory(SD15_FP16, R512, budget=None).mode == "full"
    with pytest.raises(UserError, match=r"below the smallest plan: stream needs about"):
        plan_memory(SD15_FP16, R512, budget=100 * MIB)


def test_stream_picked_by_auto_copies_ahead_within_the_budget():
    stream, split = estimate_peak("stream", SD15_FP16, R512, False), estimate_peak("split", SD15_FP16, R512, False)
    budget = split - 1
    plan = plan_memory(SD15_FP16, R512, budget=budget)
    assert plan.mode == "stream"
    activations = unet_activation_bytes(R512, chunked=True)
    assert plan.lookahead == budget - activations - FIXED_OVERHEAD > SD15_FP16.largest_block_pair
    # At 512 the VAE decode sets stream's peak, so even the smallest budget leaves the UNet stage room.
    assert plan_memory(SD15_FP16, R512, budget=stream).lookahead > SD15_FP16.largest_block_pair
    # No room beyond the running block and the next: one block ahead.
    assert stream_lookahead(SD15_FP16, R512, SD15_FP16.largest_block_pair + activations + FIXED_OVERHEAD) == 0
    # Asked for by name, stream is the lowest-memory mode whatever the budget.
    assert plan_memory(SD15_FP16, R512, budget=split - 1, mode="stream").lookahead == 0
    assert plan_memory(SD15_FP16, R512, budget=None, mode="stream").lookahead == 0
    # Never more than the whole UNet.
    assert stream_lookahead(SD15_FP16, R512, 100 * 2**30) == SD15_FP16.unet


SEED_WORKLOAD = Request(512, 512, batch=10)  # optimizedSD's --n_samples 10: a CFG batch of 20 through the UNet


def test_a_micro_batch_costs_the_running_slice_plus_what_the_rest_of_the_batch_holds():
    whole = unet_activation_bytes(SEED_WORKLOAD, chunked=False)
    assert unet_activation_bytes(dataclasses.replace(SEED_WORKLOAD, unet_batch=20), chunked=False) == whole
    latent_pixels = 64 * 64
    for micro in (1, 4, 19):
        asked = dataclasses.replace(SEED_WORKLOAD, unet_batch=micro)
        elements = UNET_ACTIVATION_ELEMENTS_PER_LATENT_PIXEL * micro + UNET_FULL_BATCH_ELEMENTS_PER_LATENT_PIXEL * (20 - micro)
        expected = elements * latent_pixels * 2
        assert unet_activation_bytes(asked, chunked=False) == expected < whole


def largest_fitting_micro_batch(mode: str, budget: int) -> int | None:
    def peak(micro: int) -> int:
        return estimate_peak(mode, SD15_FP16, dataclasses.replace(SEED_WORKLOAD, unet_batch=micro), False)

    fitting = [m for m in range(MIN_UNET_MICRO_BATCH, 20) if peak(m) <= budget]
    return max(fitting, default=None)


@pytest.mark.parametrize("context_mib", [0, 300])
def test_the_seed_workload_on_a_capped_card_gets_the_largest_micro_batch_that_fits(context_mib):
    """--n_samples 10 --turbo on a fake 6 GiB card capped at 2.4 GB: with no context counted (as --vram-budget 2.4GB
    says) turbo is kept by micro-batching the UNet; with a 300 MiB CUDA context counted, no micro-batch of at least a
    CFG pair keeps turbo, and split is chosen with the largest micro-batch that fits it."""
    from optimized_sd.benchmark.caps import cuda_cap

    budget = cuda_cap(int(2.4 * 2**30), device_total=6 * 2**30, context=context_mib * MIB).allocatable_bytes
    assert estimate_peak("turbo", SD15_FP16, SEED_WORKLOAD, False) > budget  # the whole batch does not fit
    expected_mode = "turbo" if largest_fitting_micro_batch("turbo", budget) else "split"
    assert expected_mode == ("turbo" if context_mib == 0 else "split")
    micro = largest_fitting_micro_batch(expected_mode, budget)
    plan = plan_memory(SD15_FP16, SEED_WORKLOAD, budget=budget, mode="turbo")
    assert (plan.mode, plan.unet_batch) == (expected_mode, micro) and micro is not None
    micro_batched = dataclasses.replace(SEED_WORKLOAD, unet_batch=micro)
    assert plan.estimates[expected_mode] == estimate_peak(expected_mode, SD15_FP16, micro_batched, False)
    assert plan.reason.endswith(f"with the UNet running {micro} of its 20 images at a time")
    assert ("turbo needs about" in plan.reason) == (expected_mode != "turbo")
    assert (plan_memory(SD15_FP16, SEED_WORKLOAD, budget=budget).mode, plan.unet_batch) == (expected_mode, micro)  # auto agrees


def test_a_users_micro_batch_is_kept_and_one_image_is_never_split_below_a_cfg_pair():
    budget = 2 * 2**30
    users = plan_memory(SD15_FP16, dataclasses.replace(SEED_WORKLOAD, unet_batch=20), budget=budget, mode="turbo")
    assert users.unet_batch == 20 and users.mode != "turbo"
    assert plan_memory(SD15_FP16, R512, budget=estimate_peak("split", SD15_FP16, R512, False)).unet_batch is None


def test_a_planned_micro_batch_reaches_the_model_and_changes_no_number(tiny_model, monkeypatch):
    """The planner's micro-batch is what the UNet's blocks read (RunOptions) and the images are those of the whole batch."""
    from optimized_sd.models import unet as unet_module

    seen: list[int | None] = []
    real = unet_module.TimestepEmbedSequential.forward

    def spy(self, x, emb, context):
        seen.append(run_options().unet_micro_batch)
        return real(self, x, emb, context)

    whole = make_pipe(tiny_model, memory="turbo").generate(request(prompts=["a", "b", "c"]))
    pipe = make_pipe(tiny_model, memory="turbo")
    real_plan = planner.plan_memory

    def plan_with_micro_batch(*args, **kwargs):
        return dataclasses.replace(real_plan(*args, **kwargs), unet_batch=2)

    monkeypatch.setattr(memory_session, "plan_memory", plan_with_micro_batch)
    monkeypatch.setattr(unet_module.TimestepEmbedSequential, "forward", spy)
    sliced = pipe.generate(request(prompts=["a", "b", "c"]))
    assert seen and set(seen) == {2}
    scale = whole.latents.abs().max().item()  # equal to rounding at the latents' scale, as any micro-batch
    relative = TOLERANCE if DEVICE == "cpu" else 1e-2
    assert (sliced.latents - whole.latents).abs().max().item() <= relative * scale


def test_forced_mode_that_does_not_fit_says_what_was_chosen():
    budget = estimate_peak("split", SD15_FP16, R512, False)
    plan = plan_memory(SD15_FP16, R512, budget=budget, mode="full")
    assert plan.mode == "split"
    assert "full needs about" in plan.reason and "split was chosen instead" in plan.reason


def test_vae_tiling_turns_on_only_when_the_untiled_decode_does_not_fit():
    big = Request(2048, 2048)
    untiled, tiled = (estimate_peak("stream", SD15_FP16, big, t) for t in (False, True))
    assert tiled < untiled
    assert plan_memory(SD15_FP16, big, budget=untiled, mode="stream").vae_tiling is False
    assert plan_memory(SD15_FP16, big, budget=(tiled + untiled) // 2, mode="stream").vae_tiling is True
    assert plan_memory(SD15_FP16, big, budget=None, vae_tiling="on").vae_tiling is True


def test_bad_mode_and_tiling_names():
    with pytest.raises(UserError, match="unknown memory mode 'fast'"):
        plan_memory(SD15_FP16, R512, budget=None, mode="fast")
    with pytest.raises(UserError, match="vae_tiling must be auto, on or off"):
        plan_memory(SD15_FP16, R512, budget=None, vae_tiling="maybe")


@pytest.mark.parametrize(
    "text, expected",
    [("1.5GB", int(1.5 * 2**30)), ("800MB", 800 * MIB), ("2g", 2 * 2**30), ("1024", 1024), ("512 MiB", 512 * MIB)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "1.5XB", "-1GB", "0GB"])
def test_parse_bytes_refuses(text):
    with pytest.raises(UserError):
        parse_bytes(text)


def test_lower_mode_chain():
    assert [lower_mode(m) for m in MODES] == ["turbo", "split", "stream", None]


def test_engines_sharing_an_arena_reuse_one_buffer_and_never_overwrite_a_group_in_use():
    """Two engines on one `SharedArena` (a ControlNet's and its UNet's): one buffer of the larger reservation serves
    both, each model computes as with its own, and a group cannot be filled over another one still resident."""
    from torch import nn

    from optimized_sd.memory.offload import GroupSpec, OffloadEngine, SharedArena
    from optimized_sd.weights.sources import DictSource

    def engine(width: int, arena: SharedArena) -> tuple[OffloadEngine, nn.Sequential, nn.Sequential]:
        reference = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))
        specs = [GroupSpec(str(i), (str(i),), "after_forward") for i in range(2)]
        source = DictSource(reference.state_dict())
        return OffloadEngine(model, source, specs, torch.device("cpu"), torch.float32, host="source", arena=arena), model, reference

    arena = SharedArena()
    small, small_model, small_reference = engine(4, arena)
    large, large_model, large_reference = engine(8, arena)
    assert large.arena is small.arena and arena.length == max(g.pack_layout() for g in large.groups.values())
    with torch.inference_mode(), small.stage(), large.stage():
        for model, reference, width in ((small_model, small_reference, 4), (large_model, large_reference, 8)):
            x = torch.randn(2, width)
            torch.testing.assert_close(model(x), reference(x))
        assert arena.generation == 1  # one buffer for both engines
        small.load("0")
        with pytest.raises(RuntimeError, match="would overwrite 0"):
            large.load("1")
    assert arena.current is None  # dropped at the stage's end
