"""`--weights`: stored weights (16-bit casts, int8 and fp8 with per-channel scales) on the tiny model:
the quantisation round trip, every memory mode equal to `full` with the same storage, the distance to
fp32 weights, the streamed bytes, the CPU int8 path, the report and the one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import optimized_sd
from optimized_sd.errors import UserError
from optimized_sd.models import ops
from optimized_sd.models.ops import cpu_int8_matmul_available
from optimized_sd.models.runtime import RunOptions, use_run_options
from optimized_sd.pipelines import memory_session
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.placement import UNET, footprint
from optimized_sd.pipelines.weight_storage import FP8, keeps_compute_dtype, plan_storage
from tests.test_cli import run

HAS_FP8 = FP8 is not None
needs_fp8 = pytest.mark.skipif(not HAS_FP8, reason="this torch build has no torch.float8_e4m3fn")
EIGHT_BIT = ["int8", pytest.param("fp8", marks=needs_fp8)]
MODES_EQUAL = 1e-6  # same stored weights, another memory mode: the same numbers
# Relative L2 distance of the final latents (3 euler steps, 64x64) to fp32 weights on the tiny model,
# about twice what was measured (int8 0.013-0.02, int8 with dynamic activations 0.05, fp8 0.065, bf16
# 0.0045, fp16 0.0005). Its random layers are 32-64 channels wide, so each per-channel scale covers
# few values; benchmarks/weights_accuracy.py measures the full-size UNet.
CLOSE_TO_FP32 = {"fp16": 1e-3, "bf16": 1e-2, "int8": 0.05, "int8+dynamic": 0.1, "fp8": 0.15}


def make_pipe(tiny_model, **options):
    options = {"device": "cpu", "precision": "full", "memory": "full", **options}
    return optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, **options)


def request() -> GenerationRequest:
    return GenerationRequest(prompts=["a red cube", "a blue ball"], steps=3, sampler="euler", seed=7, height=64, width=64)


def generate(tiny_model, **options) -> torch.Tensor:
    pipe = make_pipe(tiny_model, **options)
    try:
        return pipe.generate(request()).latents
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def fp32_latents(tiny_model) -> torch.Tensor:
    return generate(tiny_model)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- the format -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 48), (32, 16, 3, 3)])
def test_int8_round_trip_is_within_half_a_step_per_channel(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape) * torch.rand(shape[0]).view(-1, *[1] * (len(shape) - 1))  # channels of different ranges
    weight[3] = 0  # an all-zero channel
    q, scale = ops.quantize(weight, torch.int8)
    assert q.dtype == torch.int8 and scale.shape == (shape[0],) and q.abs().max() <= 127
    restored = ops.dequantize(q, scale, torch.float32)
    step = ops.channel_view(scale, weight)
    assert ((restored - weight).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(restored[3], torch.zeros_like(weight[3])) and scale[3] == 1
    # each channel's largest value is exact in magnitude: the scale puts it on +-127
    assert torch.allclose(restored.flatten(1).abs().amax(1), weight.flatten(1).abs().amax(1), rtol=1e-6)


@needs_fp8
def test_fp8_round_trip_keeps_three_mantissa_bits():
    torch.manual_seed(0)
    weight = torch.randn(40, 24, 3, 3) * torch.logspace(-4, 1, 40).view(-1, 1, 1, 1)
    q, scale = ops.quantize(weight, FP8)
    assert q.dtype == FP8 and torch.isfinite(q.float()).all()
    assert torch.allclose(q.float().flatten(1).abs().amax(1), torch.full((40,), torch.finfo(FP8).max))  # the range is used
    restored = ops.dequantize(q, scale, torch.float32)
    # e4m3: half an ulp is 2^-4 of the value for normal numbers; below 2^-6 (subnormal) it is 2^-10 absolute
    bound = torch.maximum(weight.abs() * 2**-4, ops.channel_view(scale, weight) * 2**-10)
    assert ((restored - weight).abs() <= bound * (1 + 1e-6)).all()


def test_dequantize_casts_and_scales_to_the_compute_dtype():
    q = torch.tensor([[2, -4], [127, 0]], dtype=torch.int8)
    scale = torch.tensor([0.5, 0.25])
    out = ops.dequantize(q, scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.float().tolist() == [[1.0, -2.0], [31.75, 0.0]]
    assert ops.dequantize(q, None, torch.float32).tolist() == [[2.0, -4.0], [127.0, 0.0]]


# -- the rule and the report ----------------------------------------------------------------------
def test_the_keep_16_bit_rule():
    assert keeps_compute_dtype(f"{UNET}.input_blocks.0.0") and keeps_compute_dtype(f"{UNET}.out.2")
    assert keeps_compute_dtype(f"{UNET}.time_embed.0") == "embedding"
    assert keeps_compute_dtype("first_stage_model.decoder.conv_out") and keeps_compute_dtype("first_stage_model.post_quant_conv")
    assert keeps_compute_dtype(f"{UNET}.input_blocks.1.1.transformer_blocks.0.attn1.to_q") is None
    assert keeps_compute_dtype(f"{UNET}.output_blocks.2.0.out_layers.3") is None
    assert keeps_compute_dtype("first_stage_model.decoder.up.0.block.0.conv1") is None


def test_full_size_sd15_unet_weights_halve():
    """The planner's sizes on the full-size SD 1.5 architecture (built on meta: no memory): int8 and fp8
    take at most 0.51x the UNet's 16-bit bytes (scales and the kept layers are the rest)."""
    from optimized_sd.benchmark.model_cache import model_config
    from optimized_sd.models.sd import LatentDiffusion

    with torch.device("meta"):
        model = LatentDiffusion(model_config("sd15"))
    sixteen = footprint(model, 2)
    for kind in ("int8", *(["fp8"] if HAS_FP8 else [])):
        eight = footprint(model, 2, plan_storage(model, kind, torch.float16, "cuda"))
        assert eight.unet <= 0.51 * sixteen.unet and eight.largest_block_pair <= 0.51 * sixteen.largest_block_pair
        assert eight.vae_decoder <= 0.51 * sixteen.vae_decoder
        assert eight.text_encoder == sixteen.text_encoder  # transformers' own layers: never stored otherwise


def test_inspect_reports_what_is_stored_and_what_stays(capsys, tiny_model):
    code, out, err = run(capsys, "inspect", tiny_model.safetensors, "--weights", "int8")
    assert code == 0, err
    assert "weights int8:" in out and "with per-output-channel scales" in out
    kept = (f"{UNET}.input_blocks.0.0.weight", f"{UNET}.out.2.weight", f"{UNET}.time_embed.0.weight",
            "first_stage_model.decoder.conv_in.weight")
    assert all(f"{key}  (" in out for key in kept)


@pytest.mark.parametrize("args", [["--weights", "int4"], ["--weights", "FP16"]])
def test_a_bad_weights_value_is_one_line(capsys, tiny_model, tmp_path, args):
    outdir = tmp_path / "out"
    code, out, err = run(capsys, "txt2img", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer,
                         "--outdir", outdir, "--device", "cpu", *args)
    assert code == 1 and err.strip().count("\n") == 0
    assert err.startswith("error: --weights") and "is unknown" in err and "fp16, bf16, fp8, int8" in err
    assert not outdir.exists()
    code, out, err = run(capsys, "inspect", tiny_model.safetensors, *args)
    assert code == 1 and err.startswith("error: --weights") and "is unknown" in err and out == ""
    with pytest.raises(UserError, match="weights .* is unknown"):
        make_pipe(tiny_model, weights=args[1])


# -- generation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", EIGHT_BIT)
@pytest.mark.parametrize("mode", ["turbo", "split", "stream"])
def test_every_mode_gives_the_full_output_with_8_bit_weights(tiny_model, weights, mode):
    full = generate(tiny_model, weights=weights)
    assert (generate(tiny_model, weights=weights, memory=mode) - full).abs().max().item() <= MODES_EQUAL


@pytest.mark.parametrize("label", ["fp16", "bf16", "int8", "int8+dynamic", pytest.param("fp8", marks=needs_fp8)])
def test_stored_weights_stay_close_to_fp32(tiny_model, fp32_latents, label):
    weights, dynamic = label.split("+")[0], label.endswith("+dynamic")
    latents = generate(tiny_model, weights=weights, int8_matmul=dynamic)
    assert 0 < relative(latents, fp32_latents) <= CLOSE_TO_FP32[label]


def test_without_weights_nothing_changes(tiny_model, fp32_latents):
    pipe = make_pipe(tiny_model, memory="stream")
    assert not pipe.storage.stored and not pipe.memory.int8_matmul
    assert torch.equal(pipe.generate(request()).latents, fp32_latents)
    assert not any(ops.SCALE in module._buffers for module in pipe.model.modules())
    assert pipe.engine.keep_dtype == frozenset()


def test_weights_equal_to_the_compute_dtype_store_nothing_differently(tiny_model):
    pipe = make_pipe(tiny_model, precision="bf16", weights="bf16")
    assert not pipe.storage.stored and pipe.storage.kept == {}
    pipe.close()


def unet_stage_bytes(tiny_model, weights: str) -> tuple[int, int, dict[str, int]]:
    """(bytes the engine brought in during the sampling stage, UNet calls, bytes of each UNet group)."""
    pipe = make_pipe(tiny_model, memory="stream", weights=weights)
    pipe.memory.use_mode("stream")
    engine = pipe.engine
    calls = {"unet": 0}
    before = {}
    unet = pipe.model.get_submodule(UNET)
    unet.register_forward_pre_hook(lambda module, args: calls.update(unet=calls["unet"] + 1))
    original = pipe.memory.run_stage

    def counted(name, work):
        before[name] = engine.copied_bytes
        result = original(name, work)
        before[name] = engine.copied_bytes - before[name]
        return result

    pipe.memory.run_stage = counted
    pipe.generate(request())
    # with the cross-attentions' key and value projections read only when computed, here at every call, as the
    # projections are not kept (the count is of the stored weights, not of what the kept ones save)
    groups = {name: group.bytes for name, group in [*engine.groups.items(), *engine.demanded.items()] if name.startswith("unet.")}
    pipe.close()
    return before["unet"], calls["unet"], groups


def test_stream_moves_half_the_bytes_of_the_stored_weights(tiny_model, monkeypatch):
    """The engine's own counter: every UNet call streams each block once, and with int8 the stored weights
    move in half the bytes of fp16 storage (plus one compute-dtype scale per output channel); the layers
    the rule keeps, norms and biases move as before."""
    monkeypatch.setattr(memory_session, "ContextProjections", lambda: None)
    int8_bytes, int8_calls, int8_groups = unet_stage_bytes(tiny_model, "int8")
    fp16_bytes, fp16_calls, fp16_groups = unet_stage_bytes(tiny_model, "fp16")
    assert int8_calls == fp16_calls == 3  # euler, 3 steps: one UNet call per step (guidance batched)
    assert int8_bytes == int8_calls * sum(int8_groups.values()) and fp16_bytes == fp16_calls * sum(fp16_groups.values())
    pipe = make_pipe(tiny_model, weights="int8")
    storage, unet = pipe.storage, pipe.model.get_submodule(UNET)
    stored = [(f"{UNET}.{name}", p) for name, p in unet.named_parameters() if f"{UNET}.{name}" in storage.stored_set]
    stored_numel = sum(p.numel() for _, p in stored)
    scales = sum(p.shape[0] for _, p in stored) * 4  # fp32 compute on the CPU
    pipe.close()
    assert stored_numel > 0
    # per call: fp16 - int8 = (2 - 1) bytes per stored element - the scales
    assert (fp16_bytes - int8_bytes) // int8_calls == stored_numel - scales


def test_int8_linear_layers_use_the_dynamic_path_on_the_cpu_and_forget_it_with_the_weights(tiny_model):
    if not ops.cpu_int8_matmul_available():
        pytest.skip("fbgemm's dynamic int8 Linear is not in this torch build")
    assert not make_pipe(tiny_model, weights="int8").memory.int8_matmul  # the default: dequantised (measured faster)
    pipe = make_pipe(tiny_model, weights="int8", int8_matmul=True)
    assert pipe.memory.int8_matmul
    pipe.generate(request())
    linears = [m for name, m in pipe.model.named_modules() if isinstance(m, ops.Linear) and f"{name}.weight" in pipe.storage.stored_set]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    packed = [getattr(m, "_int8_packed", None) for m in linears]
    used = [p for p in packed if p is not None]
    assert used and all(p[0]() is m.weight for p, m in zip(packed, linears) if p is not None)
    pipe.close()  # the weights are dropped: so are the packed copies
    assert all(getattr(m, "_int8_packed", None) is None for m in linears)
    streamed = make_pipe(tiny_model, weights="int8", memory="stream", int8_matmul=True)
    streamed.generate(request())
    assert all(getattr(m, "_int8_packed", None) is None for m in streamed.model.get_submodule(UNET).modules() if isinstance(m, ops.Linear))
    streamed.close()


def test_the_tensor_hook_sees_compute_dtype_tensors_and_stored_layers_patch_at_compute(tiny_model):
    """The engine's hook sees only the compute-dtype tensors; a stored layer gets the same hook as its
    `weight_patch`, applied to the dequantised copy at each call (the stored int8 weight itself unchanged),
    and the int8 matmul path is not taken while a patch is on. Removing the hook removes both."""
    pipe = make_pipe(tiny_model, weights="int8", int8_matmul=cpu_int8_matmul_available())
    pipe.memory.use_mode("full")  # everything placed: the hook is called for every tensor at once
    seen: list[tuple[str, torch.dtype]] = []

    def add_one(key: str, tensor: torch.Tensor) -> None:  # as a LoRA does: weights only (never an 8-bit weight's scales)
        seen.append((key, tensor.dtype))
        if key.endswith(".weight"):
            tensor += 1

    pipe.memory.set_tensor_hook(add_one)
    assert seen and all(dtype == torch.float32 for _, dtype in seen)
    keys = {key for key, _ in seen}
    assert not keys & pipe.storage.stored_set and f"{UNET}.out.2.weight" in keys
    name = next(key for key in pipe.storage.stored if ".attn1.to_q." in key).removesuffix(".weight")
    layer = pipe.model.get_submodule(name)
    stored = layer.weight.clone()
    plain = ops.dequantize(layer.weight, layer.weight_scale, torch.float32)
    with torch.no_grad():
        assert torch.equal(layer.compute_weight(torch.float32), plain + 1)
        x = torch.randn(3, layer.in_features)
        with use_run_options(RunOptions(int8_matmul=True)):
            assert torch.allclose(layer(x), F.linear(x, plain + 1, layer.bias), atol=1e-5)
    assert torch.equal(layer.weight, stored) and (name + ".weight", torch.float32) in seen
    pipe.memory.set_tensor_hook(None)
    assert layer.weight_patch is None and torch.equal(layer.compute_weight(torch.float32), plain)
    pipe.close()


def test_txt2img_flag(capsys, tiny_model, tmp_path):
    code, out, err = run(capsys, "txt2img", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", tmp_path,
                         "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--seed", "5", "--device", "cpu",
                         "--memory", "stream", "--weights", "int8", "--skip_grid")
    assert code == 0, err
    assert "mode stream on cpu, int8 weights" in out and len(list(tmp_path.rglob("*.png"))) == 1
