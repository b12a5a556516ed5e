"""ControlNet through the request: the CLI (txt2img, img2img, inpaint) against the Python-level parity path of
tests/test_controlnet.py, every memory mode against `full`, a window that ends early releasing its ControlNet,
sd-webui-controlnet's metadata line, and bad inputs refused in one line before anything is written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import run_cli
from PIL import Image
from test_controlnet import control_image, write_controlnet

import optimized_sd
from optimized_sd.errors import FieldError
from optimized_sd.memory.modes import mode_row
from optimized_sd.memory.offload import OffloadEngine
from optimized_sd.pipelines import core, placement
from optimized_sd.pipelines.controlnet import ControlNetSpec, control_side_network, control_specs, controlnet_groups
from optimized_sd.pipelines.diffusion import GenerationRequest, task_for
from optimized_sd.pipelines.masks import InpaintOptions
from optimized_sd.weights.controlnet import load_controlnet


@pytest.fixture(scope="module")
def controlnet_file(tiny_model, tmp_path_factory) -> Path:
    return write_controlnet(tiny_model.unet, tmp_path_factory.mktemp("cn-pipeline"), 7).original


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    paths = {name: tmp_path / f"{name}.png" for name in ("hint", "init", "mask")}
    control_image(3).save(paths["hint"])
    control_image(4).save(paths["init"])
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(paths["mask"])
    return paths


def written(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix == ".png") if folder.exists() else []


def parity_task(task: core.Task, units: list) -> core.Task:
    """`task` with the side network built from materialised units (tests/test_controlnet.py's path), not the request."""

    class Controlled(type(task)):  # type: ignore[misc, valid-type]
        def side_network(self, pipe, request, plan):
            return control_side_network(units, plan, request.width, request.height, request.guided, pipe.dtype)

    controlled = Controlled.__new__(Controlled)
    controlled.__dict__.update(task.__dict__)
    return controlled


COMMANDS = {
    "txt2img": [],
    "img2img": ["--init-img", "{init}", "--strength", "0.8"],
    "inpaint": ["--init-img", "{init}", "--mask", "{mask}", "--strength", "0.9"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_equals_the_parity_path(capsys, tiny_model, controlnet_file, inputs, tmp_path, command):
    flags = [e.format(**inputs) for e in COMMANDS[command]]
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, command, "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", out, "--prompt", "a red cube",
        "--H", 64, "--W", 64, "--ddim_steps", 4, "--sampler", "ddim", "--n_samples", 1, "--seed", 5, "--device", "cpu", "--memory", "full",
        "--skip_grid", "--controlnet", f"{controlnet_file}:0.8", "--control-image", inputs["hint"], "--control-start", "0.2", *flags,
    )  # fmt: skip
    assert code == 0, err
    [image] = written(out)
    spec = ControlNetSpec(controlnet_file, Image.open(inputs["hint"]).convert("RGB"), 0.8, start=0.2)
    unit = spec.unit(load_controlnet(controlnet_file, "sd1"), spec.image)
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="full")
    init = Image.open(inputs["init"]).convert("RGB") if command != "txt2img" else None
    inpaint = InpaintOptions(inputs["mask"]) if command == "inpaint" else None
    strength = {"txt2img": 1.0, "img2img": 0.8, "inpaint": 0.9}[command]
    request = GenerationRequest(["a red cube"], steps=4, sampler="ddim", seed=5, height=64, width=64, init_image=init,
                                strength=strength, inpaint=inpaint)  # fmt: skip
    plain = pipe.generate(request).images[0]
    reference = core.run_task(pipe, parity_task(task_for(request), [unit]), request).images[0]
    got, expected = np.asarray(Image.open(image).convert("RGB"), dtype=int), np.asarray(reference, dtype=int)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(np.asarray(plain, dtype=int) - expected).max() > 8  # the ControlNet is felt
    text = Image.open(image).text["parameters"]
    assert 'ControlNet 0: "Module: none, Model: control [' in text and "Guidance Start: 0.2" in text


@pytest.fixture(scope="module")
def specs(controlnet_file) -> tuple[ControlNetSpec, ...]:
    return control_specs([f"{controlnet_file}:0.9"], [control_image(5)], end=[0.5], preprocessor=["canny"], threshold_a=[50])


def controlled_request(specs) -> GenerationRequest:
    return GenerationRequest(["a red cube"], steps=4, sampler="euler", seed=3, height=64, width=64, controlnets=specs)


@pytest.fixture(scope="module")
def full_latents(tiny_model, specs) -> torch.Tensor:
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="full")
    plain = pipe.generate(replace(controlled_request(specs), controlnets=())).latents
    latents = pipe.generate(controlled_request(specs)).latents
    assert (latents - plain).abs().max() > 1e-3
    return latents


@pytest.mark.parametrize("mode", ["full", "turbo", "split", "stream"])
def test_every_memory_mode_equals_full_and_an_ended_window_releases_the_controlnet(tiny_model, specs, full_latents, mode):
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory=mode)
    component = None
    placed_during: list[bool] = []

    def progress(info) -> None:
        placed_during.append(component is not None and component.engine is not None)

    pipe.use_controlnets(specs)
    component = pipe.memory.components["controlnet.0"]
    result = pipe.generate(controlled_request(specs), progress)
    assert (result.latents - full_latents).abs().max() <= 1e-5
    # Window [0, 0.5] of 4 steps: steps 0 and 1 run the ControlNet; it leaves before step 2.
    assert component.released == ["released after step 1"] and component.engine is None
    assert placed_during[:2] == [True, True] and placed_during[-1] is False
    stages = [record.stage for record in pipe.meter.records]
    assert stages.index("controlnet") < stages.index("unet")
    # The next call places it again (and the plan counts it).
    assert pipe.memory.call_sizes().side > 0
    again = pipe.generate(controlled_request(specs)).latents
    assert (again - full_latents).abs().max() <= 1e-5


def test_turbo_holds_the_controlnet_only_while_sampling(tiny_model, specs):
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="turbo")
    whole = (replace(specs[0], end=1.0),)
    pipe.use_controlnets(whole)
    component = pipe.memory.components["controlnet.0"]
    pipe.generate(controlled_request(whole))
    loads = [(action, group) for action, group, _ in component.engine.events if action in ("load", "release")]
    assert loads == [("load", "hint"), ("release", "hint"), ("load", "controlnet"), ("release", "controlnet")]
    assert component.released == []


def test_metadata_line(tiny_model, specs, controlnet_file):
    from optimized_sd.weights.hashing import sha256_short

    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="full")
    spec = replace(specs[0], weight=0.8, end=1.0)
    text = pipe.generate(controlled_request((spec,))).parameters[0].text()
    line = (f'ControlNet 0: "Module: canny, Model: control [{sha256_short(controlnet_file)}], Weight: 0.8, '
            'Resize Mode: Crop and Resize, Guidance Start: 0, Guidance End: 1, Control Mode: Balanced"')  # fmt: skip
    assert line in text


def test_report_json_names_the_released_controlnet(capsys, tiny_model, controlnet_file, inputs, tmp_path):
    report = tmp_path / "report.json"
    code, _, err = run_cli(
        capsys, "txt2img", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", tmp_path / "out",
        "--H", 64, "--W", 64, "--ddim_steps", 4, "--n_samples", 1, "--seed", 1, "--device", "cpu", "--memory", "turbo",
        "--controlnet", controlnet_file, "--control-image", inputs["hint"], "--control-end", "0.5", "--report-json", report,
    )  # fmt: skip
    assert code == 0, err
    payload = json.loads(report.read_text())
    assert payload["components"] == {"controlnet.0": {"released": ["released after step 1"]}}
    assert "controlnet" in payload["stages"]


def test_settings_repeat_in_order_or_apply_to_all(controlnet_file):
    two = control_specs([controlnet_file, f"{controlnet_file}:0.5"], ["a.png", "b.png"], start=[0.1], end=[0.9, 0.7])
    assert [(s.weight, s.start, s.end) for s in two] == [(1.0, 0.1, 0.9), (0.5, 0.1, 0.7)]
    with pytest.raises(FieldError, match="3 values of mode for 2"):
        control_specs([controlnet_file] * 2, ["a.png"] * 2, mode=["balanced"] * 3)


@pytest.fixture(scope="module")
def sd2_controlnet(tiny_sd2, tmp_path_factory) -> Path:
    return write_controlnet(tiny_sd2.unet, tmp_path_factory.mktemp("cn-sd2"), 8).original


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--controlnet", "{cn}", "--controlnet", "{cn}", "--control-image", "{hint}"], "2 ControlNet(s) and 1 control image(s)"),
        (["--control-image", "{hint}"], "0 ControlNet(s) and 1 control image(s)"),
        (["--controlnet", "{cn}", "--control-image", "{hint}", "--control-start", "0.8", "--control-end", "0.2"],
         "start 0.8 is after end 0.2"),
        (["--controlnet", "{cn}", "--control-image", "{hint}", "--control-end", "1.5"], "end 1.5 is outside [0, 1]"),
        (["--controlnet", "{cn}", "--control-image", "{hint}", "--control-preprocessor", "hed"], "preprocessor 'hed' is unknown"),
        (["--controlnet", "{cn}", "--control-image", "{hint}", "--control-mode", "loud"], "mode 'loud' is unknown"),
        (["--controlnet", "{cn}:nan", "--control-image", "{hint}"], "weight nan is not a finite number"),
        (["--controlnet", "{cn}:50", "--control-image", "{hint}"], "weight 50 is outside"),
        (["--controlnet", "{cn}", "--control-image", "{missing}"], "no such control image"),
        (["--controlnet", "{sd2}", "--control-image", "{hint}"], "for SD 2.x models but the model loaded is SD 1.x"),
        (["--controlnet", "{model}", "--control-image", "{hint}"], "is a Stable Diffusion checkpoint, not a ControlNet"),
    ],
)
def test_bad_inputs_are_one_line_errors(capsys, tiny_model, controlnet_file, sd2_controlnet, inputs, tmp_path, extra, needle):
    paths = {"cn": controlnet_file, "sd2": sd2_controlnet, "model": tiny_model.safetensors, "hint": inputs["hint"],
             "missing": tmp_path / "none.png"}  # fmt: skip
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "txt2img", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", out,
        "--H", 64, "--W", 64, "--ddim_steps", 2, "--n_samples", 1, "--device", "cpu", *[e.format(**paths) for e in extra],
    )  # fmt: skip
    assert code == 1, err
    assert err.startswith("error: --controlnet ") and needle in err and len(err.strip().splitlines()) == 1, err
    assert written(out) == []


def test_stream_moves_the_controlnet_one_unit_at_a_time(tiny_model, specs):
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="stream")
    whole = (replace(specs[0], end=1.0),)
    pipe.use_controlnets(whole)
    component = pipe.memory.components["controlnet.0"]
    pipe.generate(controlled_request(whole))
    runs = [(group, resident) for action, group, resident in component.engine.events if action == "run"]
    assert {group for group, _ in runs} >= {"time_embed", "input_blocks.0", "input_blocks.1", "middle_block"}
    assert all(resident == (group,) for group, resident in runs)  # on the CPU nothing is copied ahead
    assert component.engine.resident_names() == ()


def test_stream_lands_the_controlnet_in_the_unets_arena(tiny_model, specs, monkeypatch):
    """On the CPU the ControlNet's streamed units go into the buffer the UNet's reuse (they never run at once):
    with one buffer each the ControlNet's largest unit stayed beside the UNet's all through sampling (issue 27)."""
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="stream")
    whole = (replace(specs[0], end=1.0),)
    pipe.use_controlnets(whole)
    filled: list[tuple[OffloadEngine, int, int]] = []  # (engine, its arena, that arena's buffer)
    fill = OffloadEngine._fill_arena

    def recording(engine: OffloadEngine, group) -> None:
        fill(engine, group)
        filled.append((engine, id(engine.arena), engine.arena.generation))

    monkeypatch.setattr(OffloadEngine, "_fill_arena", recording)
    pipe.generate(controlled_request(whole))
    component = pipe.memory.components["controlnet.0"].engine
    buffers = {engine: {(arena, generation) for other, arena, generation in filled if other is engine} for engine, _, _ in filled}
    assert set(buffers) == {pipe.memory.engine, component}
    assert buffers[component] <= buffers[pipe.memory.engine]


def test_stream_splits_a_large_controlnet_block_as_the_unets(tiny_model, specs, full_latents, monkeypatch):
    """A ControlNet block above the unit limit streams in its parts, its zero conv with the last part, so its largest
    unit is no larger than the UNet's (SD 1.5's middle block: 376 MiB in fp32 whole, 133 MiB in parts)."""
    monkeypatch.setattr(placement, "STREAM_UNIT_PARAMS", 1000)
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="stream")
    pipe.use_controlnets(specs)
    model = pipe.memory.components["controlnet.0"].model
    units = {group.name: group.modules for group in controlnet_groups(mode_row("stream"), model)}
    assert units["middle_block.0"] == ("middle_block.0",) and units["middle_block.2"] == ("middle_block.2", "middle_block_out")
    assert (pipe.generate(controlled_request(specs)).latents - full_latents).abs().max() <= 1e-5


def test_the_planner_counts_the_controlnet(tiny_model, specs):
    from optimized_sd.memory.planner import Request, estimate_peak

    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory="turbo")
    alone = pipe.memory.call_sizes()
    pipe.use_controlnets(specs)
    sizes = pipe.memory.call_sizes()
    assert sizes.side > sizes.side_unit > 0 and sizes.side_activation_share == pytest.approx(0.45)
    assert sizes.total == alone.total + sizes.side
    # A UNet large enough that the sampling stage is the peak: the ControlNet adds to it in every mode, whole
    # beside a whole or halved UNet, its largest unit in `stream`.
    big = dict(unet=10**9, unet_halves=(5 * 10**8, 5 * 10**8), unet_blocks=(10**8,) * 10)
    alone, sizes = replace(alone, **big), replace(sizes, **big)
    request = Request(64, 64, dtype_bytes=4)
    modes = ("full", "turbo", "split", "stream")
    added = {mode: estimate_peak(mode, sizes, request, False) - estimate_peak(mode, alone, request, False) for mode in modes}
    assert added["turbo"] == added["split"] > added["stream"] > 0 and added["full"] >= sizes.side
    pipe.use_controlnets(())
    assert pipe.memory.sides() == [] and pipe.memory.call_sizes().side == 0


def test_the_refiners_pass_gets_no_controlnet(tiny_sdxl, tiny_refiner, tmp_path):
    """4 Euler steps switched at 0.5: the SDXL ControlNet runs on the base's 2 steps only (one call each), never
    inside the refiner's, and the metadata names both."""
    from test_refiner import load, refined

    controlnet = write_controlnet(tiny_sdxl.unet, tmp_path, 9).original
    pipe = load(tiny_sdxl)
    request = replace(refined("euler", refiner=tiny_refiner.folder), controlnets=control_specs([controlnet], [control_image(2)]))
    pipe.use_controlnets(request.controlnets)
    calls = []
    pipe.controlnets[0].model.middle_block_out.register_forward_hook(lambda *args: calls.append(1))
    result = pipe.generate(request)
    assert len(calls) == 2
    text = result.parameters[0].text()
    assert "ControlNet 0: " in text and "Refiner: " in text
    assert [r.stage for r in pipe.meter.records] == ["text", "controlnet", "unet", "refiner_text", "refiner_unet", "refiner_vae_decode"]
