"""The full-size Flux.1 dev bench model (`benchmark.flux_model`) and what `stream` fetches of it: the files' headers
are the real architectures that our loader opens, tensors are written one at a time with finite bf16 values, and
the adaLN weights hoisted out of the steps are streamed a block at a time (not 6.5 GB at once)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from optimized_sd.benchmark import flux_model
from optimized_sd.families.flux import FLUX_DEV_RECORD, flux_units
from optimized_sd.models.flux import Flux, FluxConfig

GB = 1e9


def header_only(folder: Path, part: str) -> Path:
    """A file with the part's real header and its full length, sparse (no tensor data written)."""
    name, planned = flux_model.FILES[part]
    header, size = flux_model.header_for(planned(), {"part": part})
    path = folder / name
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + size)
    return path


def test_the_bench_files_are_the_real_architectures_our_loader_opens(tmp_path):
    from optimized_sd.weights.flux_loading import prepare_flux

    sizes = {part: sum(2 * math.prod(shape) for _, shape in planned()) / GB for part, (_, planned) in flux_model.FILES.items()}
    assert round(sizes["transformer"], 1) == 23.8 and round(sizes["t5"], 1) == 9.5  # flux1-dev and t5xxl_fp16 as published
    components = prepare_flux([header_only(tmp_path, part) for part in flux_model.FILES])
    assert set(components) == {"transformer", "t5", "clip_l", "vae"}
    dit = components["transformer"].model.config
    assert (dit.hidden_size, dit.depth, dit.depth_single_blocks, dit.num_heads, dit.guidance_embed) == (3072, 19, 38, 24, True)
    t5 = components["t5"].model.config
    assert (t5.d_model, t5.num_layers, t5.num_heads, t5.d_kv, t5.d_ff, t5.vocab_size) == (4096, 24, 64, 64, 10240, 32128)


def test_tensors_are_written_one_by_one_with_small_finite_bf16_values(tmp_path):
    entries = [("block.norm.scale", (64,)), ("block.linear.weight", (256, 128)), ("block.linear.bias", (256,))]
    path = tmp_path / "part.safetensors"
    flux_model.write_file(path, entries, {"part": "test"}, seed=3)
    tensors = load_file(path)
    assert all(tensor.dtype == torch.bfloat16 for tensor in tensors.values())
    assert torch.equal(tensors["block.norm.scale"], torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(tensors["block.linear.bias"], torch.zeros(256, dtype=torch.bfloat16))
    assert abs(tensors["block.linear.weight"].float().std().item() - flux_model.STD) < 0.002
    assert flux_model.is_valid(path, entries, {"part": "test"}) and not flux_model.is_valid(path, entries, {"part": "other"})


def test_stream_fetches_the_hoisted_modulation_a_block_at_a_time():
    with torch.device("meta"):
        transformer = Flux(FluxConfig())
    units = flux_units(transformer)
    hoisted = FLUX_DEV_RECORD.units.hoisted_units(transformer)
    assert hoisted == 1 + 19 + 38 + 1
    modulation = [path for unit in units[1:hoisted] for path in unit]
    assert modulation == transformer.modulation_modules()  # in the order precompute_modulation calls them
    assert units[hoisted] == ("img_in", "txt_in")  # the first unit of every step

    def weights(unit: tuple[str, ...]) -> int:
        return sum(p.numel() for path in unit for p in transformer.get_submodule(path).parameters())

    assert sum(weights(unit) for unit in units[:hoisted]) * 2 > 6 * GB  # 6.5 GB of bf16 hoisted in all ...
    assert max(weights(unit) for unit in units[:hoisted]) * 2 < 0.25 * GB  # ... none over a double block's 0.23 GB at once


def test_flux_sampling_gives_freed_tensors_back_on_the_lean_cpu_path(tmp_path, monkeypatch):
    """Full-size dev's first `stream` step kept 4.5 GB of freed heap when sampling reused freed blocks (SD's choice)."""
    from optimized_sd.memory.device import LeanHeap
    from tests.test_flux_pipeline import build, ours

    phases: list[bool] = []
    original = LeanHeap.phase

    def recorded(self, *, repeated: bool):
        phases.append(repeated)
        return original(self, repeated=repeated)

    monkeypatch.setattr(LeanHeap, "phase", recorded)
    pipe = build(tmp_path / "dev", "dev").load(memory="stream")
    try:
        ours(pipe, steps=1)
    finally:
        pipe.close()
    assert phases and not any(phases)  # text, sampling and decode all return freed tensors


# --- the owed GPU checks (issues 23 and 27): declared, and every command parses (a dry run; nothing is timed) ---


def owed_parser(script: str):
    """The argparse parser of a benchmark script, loaded from its file."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / script
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass in the script looks its module up there
    spec.loader.exec_module(module)
    return module.build_parser()


def test_owed_gpu_checks_are_declared_and_their_commands_parse():
    from optimized_sd.benchmark.command import bench as bench_command
    from optimized_sd.benchmark.scenarios import OWED_GPU_CHECKS, PEERS, main, owed_checks, select_scenarios

    names = {check.name for check in OWED_GPU_CHECKS}
    assert {"flux-dev-1024-stream", "flux-dev-1024-full", "flux-dev-1024-stream-fp8", "flux-dev-1024-diffusers-group-leaf",
            "flux-dev-1024-auto-4GB", "controlnet-sd15-512-stream", "controlnet-sdxl-1024-stream", "hires-sd15-512-to-1024-2GB",
            "sd15-512-stream-group-leaf", "zimage-turbo-1024-auto-2GB"} == names  # fmt: skip
    assert {check.issue for check in OWED_GPU_CHECKS} == {23, 24, 27} and all(check.figure for check in OWED_GPU_CHECKS)
    assert [c.tag for c in owed_checks("flux")] == ["flux"] * 5 and len(owed_checks()) == len(OWED_GPU_CHECKS)
    assert "diffusers-group-offload-leaf" in PEERS
    for check in OWED_GPU_CHECKS:
        if check.argv[0].startswith("benchmarks/"):
            options = owed_parser(check.argv[0]).parse_args(list(check.argv[1:]))
            assert options.device == "cuda"
        else:
            assert check.argv[:4] == ("-m", "optimized_sd.cli", "bench", "--device")
            params = bench_command.make_context("bench", list(check.argv[3:])).params
            selection = select_scenarios(kinds=params["kinds"], sizes=params["sizes"], batches="1", steps=params["steps"],
                                         modes=params["modes"], peers=params["peers"], device_type="cuda")  # fmt: skip
            assert {s.mode for s in selection.scenarios} == {"stream", "diffusers-group-offload-leaf"}
    flux = owed_parser("benchmarks/flux_cpu.py").parse_args(list(OWED_GPU_CHECKS[3].argv[1:]))
    assert (flux.runner, flux.offload) == ("diffusers", "group-leaf")
    assert owed_parser("benchmarks/flux_cpu.py").parse_args(["diffusers", "--offload"]).offload == "sequential"  # as before
    assert main(["owed", "sd"]) == 0


def test_device_run_has_the_wave4_group_beside_the_others():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "device_run.sh"
    text = script.read_text()
    for part in ("lease1", "lease2", "wave3", "wave4"):
        assert f"{part})" in text or f"|{part}|" in text or f"|{part})" in text
    assert "optimized_sd.benchmark.scenarios owed" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script), "nope"], capture_output=True, text=True)
    assert usage.returncode == 2 and "wave4" in usage.stderr
