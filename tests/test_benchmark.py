"""The benchmark harness: scenario selection, one-line errors, the cached random model, the report,
and one end-to-end run of ours and diffusers on the tiny model (for keeping it working, not timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from optimized_sd.benchmark import model_cache, report
from optimized_sd.benchmark.results import (
    Bandwidth,
    BenchModel,
    BenchRecord,
    Footprint,
    Machine,
    ScenarioResult,
    Settings,
    StageFigures,
)
from optimized_sd.benchmark.runner import BenchOptions, select
from optimized_sd.benchmark.scenarios import PEERS, Scenario, select_scenarios
from optimized_sd.benchmark.worker import PROMPT
from optimized_sd.errors import UserError
from tests.bench_runs import run_tiny_bench

ROOT = Path(__file__).resolve().parents[1]


def names(selection) -> list[str]:
    return [s.name for s in selection.scenarios]


def selection(**overrides):
    flags = dict(kinds="txt2img", sizes="512", batches="1", steps=2, modes="full,stream", peers="all", device_type="cuda")
    flags.update(overrides)
    return select_scenarios(**flags)


# --------------------------------------------------------------------------- scenario selection
def test_quick_preset_is_full_stream_and_diffusers_at_256() -> None:
    chosen = select(BenchOptions(quick=True), "cpu")
    assert names(chosen) == ["txt2img-256-b1-full", "txt2img-256-b1-stream", "txt2img-256-b1-diffusers"]
    assert {s.steps for s in chosen.scenarios} == {2}


def test_cross_product_of_kinds_sizes_batches_modes_and_peers() -> None:
    chosen = selection(kinds="txt2img,img2img", sizes="512,768", batches="1,4", peers="diffusers")
    assert len(chosen.scenarios) == 2 * 2 * 2 * 3
    assert "img2img-768-b4-stream" in names(chosen)
    assert all(s.engine == ("diffusers" if s.mode == "diffusers" else "ours") for s in chosen.scenarios)


def test_cuda_only_peers_are_skipped_on_cpu_with_a_note() -> None:
    on_gpu = selection(modes="none")
    assert {s.mode for s in on_gpu.scenarios} == {name for name, peer in PEERS.items() if "cuda" in peer.devices}
    assert {note.split(":")[0] for note in on_gpu.notes} == {"sdcpp", "openvino"}
    assert all("needs a CPU device, skipped on cuda" in note for note in on_gpu.notes)
    on_cpu = selection(modes="none", device_type="cpu")
    assert {s.mode for s in on_cpu.scenarios} == {"diffusers", "diffusers-attention-slicing", "diffusers-vae-slicing", "sdcpp", "openvino"}
    cuda_only = [name for name, peer in PEERS.items() if peer.cuda_only]
    assert "diffusers-group-offload-leaf" in cuda_only and len(cuda_only) == 4
    assert len(on_cpu.notes) == len(cuda_only) and all("needs a CUDA device" in note for note in on_cpu.notes)


def test_without_diffusers_ours_run_alone_and_it_is_said() -> None:
    chosen = selection(diffusers_available=False)
    assert names(chosen) == ["txt2img-512-b1-full", "txt2img-512-b1-stream"]
    assert any("diffusers is not installed: ran ours alone" in note for note in chosen.notes)


def test_accelerate_missing_skips_the_offload_peers() -> None:
    chosen = selection(modes="none", accelerate_available=False)
    assert "diffusers-model-offload" not in {s.mode for s in chosen.scenarios}
    assert "diffusers-group-offload" in {s.mode for s in chosen.scenarios}


def test_budget_adds_an_auto_run_per_work_item_and_only_filters_by_glob() -> None:
    chosen = selection(sizes="512,768", peers="none", budget="2GB")
    assert "txt2img-768-b1-auto-budget2GB" in names(chosen)
    both = names(selection(sizes="512", peers="none", budget="1GB,2GB"))
    assert "txt2img-512-b1-auto-budget1GB" in both and "txt2img-512-b1-auto-budget2GB" in both
    filtered = selection(sizes="512,768", peers="diffusers", only="*-768-*,txt2img-512-b1-diffusers")
    assert names(filtered) == ["txt2img-512-b1-diffusers", "txt2img-768-b1-full", "txt2img-768-b1-stream", "txt2img-768-b1-diffusers"]


def test_scenario_round_trips_through_its_dict() -> None:
    scenario = Scenario("img2img", 768, 512, 4, 10, "auto", "1.5GB")
    assert Scenario.from_dict(json.loads(json.dumps(scenario.to_dict()))) == scenario
    assert scenario.name == "img2img-512x768-b4-auto-budget1.5GB"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"modes": "full,fast"}, "unknown memory mode 'fast'"),
        ({"peers": "comfyui"}, "unknown peer 'comfyui'"),
        ({"kinds": "inpaint"}, "unknown kind 'inpaint'"),
        ({"sizes": "500"}, "multiple of 8"),
        ({"sizes": "big"}, "cannot read the size"),
        ({"batches": "0"}, "must be at least 1"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"only": "nothing-*"}, "no scenario named 'nothing-*'"),
        ({"budget": "lots"}, "cannot read the memory size"),
        ({"budget": "1GB,lots"}, "cannot read the memory size"),
        ({"budget": ","}, "--budget is empty"),
        ({"modes": "none", "peers": "none"}, "no scenario to run"),
    ],
)
def test_bad_inputs_are_one_line_user_errors(overrides, message) -> None:
    with pytest.raises(UserError) as caught:
        selection(**overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_prints_bad_names_as_one_line_and_exits_1(capsys) -> None:
    from optimized_sd.cli import main

    for argv in (["bench", "--modes", "fast"], ["bench", "--peers", "nope"], ["bench", "--only", "zzz"], ["bench", "--model", "sd3"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err


def test_cli_list_prints_scenario_names(capsys) -> None:
    from optimized_sd.cli import main

    main(["bench", "--quick", "--device", "cpu", "--list"])
    assert capsys.readouterr().out.split() == ["txt2img-256-b1-full", "txt2img-256-b1-stream", "txt2img-256-b1-diffusers"]


def test_bench_command_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, optimized_sd.cli, optimized_sd.benchmark.command, optimized_sd.benchmark.runner; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'matplotlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- the cached model
def test_tiny_model_is_built_once_valid_and_loads_strictly(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    from optimized_sd.weights.loading import prepare_model

    first = model_cache.ensure_model(tmp_path, "tiny")
    assert first.built and first.checkpoint.is_file()
    assert (first.tokenizer / "vocab.json").is_file() and (first.diffusers_config / "unet" / "config.json").is_file()
    assert not model_cache.ensure_model(tmp_path, "tiny").built  # reused
    loaded = prepare_model(first.checkpoint)  # the engine's strict loader accepts every key
    assert loaded.report.ok
    with safe_open(str(first.checkpoint), "pt") as handle:
        keys = list(handle.keys())
        assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)  # the real LDM layout
        stored = handle.get_tensor("model.diffusion_model.out.2.weight")
    seeded = dict(model_cache.seeded_tensors(model_cache.model_config("tiny"), 0))
    assert stored.dtype == torch.float16
    assert torch.equal(stored, seeded["model.diffusion_model.out.2.weight"].half())  # the seeded weights, cast to fp16
    assert seeded["model.diffusion_model.out.2.weight"].std() > 0  # initialised, not left empty
    with open(first.checkpoint, "r+b") as handle:  # a truncated file is rebuilt
        handle.truncate(first.checkpoint.stat().st_size - 10)
    assert model_cache.ensure_model(tmp_path, "tiny").built


@pytest.mark.parametrize(("name", "family", "prediction", "pipeline"), [
    ("tiny-sd2", "sd2", "v_prediction", "StableDiffusionPipeline"),
    ("tiny-sdxl", "sdxl", "epsilon", "StableDiffusionXLPipeline"),
])  # fmt: skip
def test_family_model_is_detected_and_loads_in_both_engines_alike(tmp_path: Path, name, family, prediction, pipeline) -> None:
    """The file is in the layout `weights/family.py` detects and our strict loader loads (prediction type from
    the file's metadata), and diffusers' `from_single_file` with the written config folder builds the same UNet."""
    import torch
    from safetensors import safe_open

    import optimized_sd
    from optimized_sd.benchmark.worker import diffusers_pipeline_name
    from optimized_sd.models.conditioner import size_conditioning
    from optimized_sd.pipelines.diffusion import GenerationRequest
    from optimized_sd.weights.family import detect_family
    from optimized_sd.weights.loading import prepare_model

    cached = model_cache.ensure_model(tmp_path, name)
    with safe_open(str(cached.checkpoint), "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        assert all(handle.get_slice(key).get_dtype() == "F16" for key in handle.keys())
    assert detect_family(shapes) == family
    assert prepare_model(cached.checkpoint).report.ok
    ours = optimized_sd.load(str(cached.checkpoint), device="cpu", memory="stream", precision="full", tokenizer=str(cached.tokenizer))
    assert ours.config.family == family and ours.config.prediction_type == prediction
    assert diffusers_pipeline_name(str(cached.diffusers_config), img2img=False) == pipeline

    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel.from_single_file(
        str(cached.checkpoint), config=str(cached.diffusers_config), subfolder="unet", local_files_only=True, torch_dtype=torch.float32
    )
    assert not any(parameter.is_meta for parameter in unet.parameters())  # every weight found in the file
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([500.0, 20.0])
    context = torch.randn(2, 77, ours.config.unet.context_dim, generator=generator)
    y, added = None, {}
    if family == "sdxl":
        sizes = [64, 64, 0, 0, 64, 64]
        pooled = torch.randn(2, ours.config.open_clip.projection_dim, generator=generator)
        y = size_conditioning(pooled, sizes)
        added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": torch.tensor([sizes] * 2, dtype=torch.float32)}}
    ours.prepare(GenerationRequest(prompts=["a"], steps=1, sampler="ddim", seed=0, height=64, width=64))
    with torch.no_grad(), ours.memory.stage("unet"):
        mine = ours.model.model.diffusion_model(x, t, context, y=y)
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=context, **added).sample
    assert torch.allclose(mine, theirs, atol=1e-4)
    ours.close()


def test_family_files_would_hold_the_full_architectures() -> None:
    sizes = {}
    for name in ("sd15", "sd2", "sdxl"):
        config = model_cache.model_config(name)
        entries = model_cache.planned_tensors(config)
        header, data = model_cache.header_for(entries, model_cache.file_metadata(config, 0))
        assert len(header) % 8 == 0
        sizes[name] = data // 2  # fp16: parameters
    assert 1_066_000_000 < sizes["sd15"] < 1_067_000_000  # 1.07 B parameters
    assert 1_289_000_000 < sizes["sd2"] < 1_291_000_000  # UNet 0.87 B + ViT-H run to 23 layers + VAE
    assert 3_468_000_000 < sizes["sdxl"] < 3_470_000_000  # UNet 2.57 B + CLIP ViT-L + bigG + VAE
    assert model_cache.file_metadata(model_cache.model_config("sd2"), 0)["prediction_type"] == "v_prediction"
    assert "prediction_type" not in model_cache.file_metadata(model_cache.model_config("sdxl"), 0)


def test_module_by_module_build_never_holds_more_than_one_module(monkeypatch) -> None:
    """While a module's tensors are yielded, it is the only one materialised; then it goes back to meta."""
    import torch

    config = model_cache.model_config("tiny-sdxl")
    built = []
    make = model_cache.meta_model
    monkeypatch.setattr(model_cache, "meta_model", lambda c: built.append(make(c)) or built[-1])
    owners = set()
    for key, tensor in model_cache.seeded_tensors(config, 0):
        owner = key.rpartition(".")[0]
        owners.add(owner)
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
        on_cpu = {name.rpartition(".")[0] for name, value in built[0].state_dict().items() if not value.is_meta}
        assert on_cpu == {owner}
    assert all(value.is_meta for value in built[0].state_dict().values())
    assert len(owners) == len(model_cache.owned_tensors(make(config)))


def test_range_check_is_skipped_when_the_fp32_model_would_not_fit(monkeypatch) -> None:
    monkeypatch.setattr(model_cache, "RANGE_CHECK_MAX_BYTES", 1000)
    assert model_cache.activation_ranges(model_cache.model_config("tiny")) is None


def test_unknown_benchmark_model_is_one_line() -> None:
    with pytest.raises(UserError, match="unknown benchmark model 'sd3'; choose sd15, sd2, sdxl, tiny, tiny-sd2, tiny-sdxl"):
        model_cache.model_config("sd3")


def test_cpu_rss_family_option_picks_the_model_and_target(capsys) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cpu_rss
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert cpu_rss.model_name(cpu_rss.parse_args([])) == "sd15"  # the default and its figures are unchanged
    assert cpu_rss.model_name(cpu_rss.parse_args(["--family", "sdxl"])) == "sdxl"
    assert cpu_rss.model_name(cpu_rss.parse_args(["--family", "sd2", "--tiny"])) == "tiny-sd2"
    assert cpu_rss.RSS_TARGETS["sdxl"] == 0.15 and cpu_rss.RSS_TARGETS["sd15"] == 0.25 and cpu_rss.RSS_MOONSHOTS["sdxl"] == 0.10
    with pytest.raises(SystemExit) as caught:
        cpu_rss.parse_args(["--family", "sd3"])
    assert caught.value.code == 2 and "invalid choice: 'sd3'" in capsys.readouterr().err
    gib = 2**30
    assert cpu_rss.needed_mib(7 * gib, "diffusers") == (14 * gib + cpu_rss.MEMORY_MARGIN) / 2**20  # the fp32 model
    assert cpu_rss.needed_mib(7 * gib, "stream") < 3 * 1024


def test_no_room_in_the_cache_folder_is_one_line_with_size_and_place(tmp_path: Path, monkeypatch) -> None:
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(model_cache.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(UserError) as caught:
        model_cache.ensure_model(tmp_path / "cache", "tiny")
    message = str(caught.value)
    assert "needs" in message and str(tmp_path / "cache") in message and "GB free" in message and "\n" not in message


# --------------------------------------------------------------------------- report
def fake_result(mode: str, alloc: float, per_step: float) -> ScenarioResult:
    scenario = Scenario("txt2img", 512, 512, 1, 10, mode)
    stages = {
        "text": StageFigures(0.1, 0, 300.0, 320.0, 900.0),
        "unet": StageFigures(per_step * 10, 10, alloc, alloc + 50, 900.0),
        "vae_decode": StageFigures(0.2, 0, 400.0, 500.0, 900.0),
    }
    result = ScenarioResult(
        scenario,
        ok=True,
        mode_used=mode,
        load_seconds=2.0,
        total_seconds=per_step * 10 + 0.3,
        stages=stages,
        peak_rss_mib=3000.0,
        host_load=[0.5, 0.7],
    ).with_stage_totals()
    if scenario.engine == "ours":
        gib = 2**30
        result.footprint = Footprint(
            dtype_bytes=2,
            text_encoder=int(0.23 * gib),
            unet=int(1.6 * gib),
            unet_halves=[int(0.8 * gib), int(0.8 * gib)],
            largest_block_pair=int(0.1 * gib),
            vae_encoder=int(0.06 * gib),
            vae_decoder=int(0.09 * gib),
            total=int(1.98 * gib),
        )
    return result


def cuda_record() -> BenchRecord:
    timed_out = Scenario("txt2img", 512, 512, 1, 10, "diffusers-sequential-offload")
    return BenchRecord(
        command="optimized-sd bench",
        date="2026-01-01",
        started="2026-01-01 10:00:00 UTC",
        wall_seconds=60.0,
        machine=Machine("cuda", "cuda", gpu="NVIDIA H100 80GB HBM3", cpu="x", bandwidth=Bandwidth(2**30, 50.0, 49.0)),
        model=BenchModel("m.safetensors", "tok", "cfg", built=False, seconds=0.1, file_bytes=2 * 2**30, description="m"),
        settings=Settings(PROMPT, 42, 7.5, 0.75, "ddim", 10, "autocast", "fp16", "sdpa", 1, 1, 100.0),
        notes=["a note"],
        results=[
            fake_result("full", 2600.0, 0.030),
            fake_result("turbo", 2000.0, 0.031),
            fake_result("stream", 700.0, 0.045),
            fake_result("diffusers", 3000.0, 0.030),
            fake_result("diffusers-group-offload", 900.0, 0.090),
            ScenarioResult(timed_out, ok=False, error="timed out after 100 s (killed)"),
        ],
    )


def test_report_compares_each_mode_with_the_baseline_and_its_closest_peer() -> None:
    record = cuda_record()
    rows = {(r.ours, r.peer): r for r in report.comparison_rows(record)}
    assert set(rows) == {("full", "diffusers"), ("turbo", "diffusers"), ("stream", "diffusers"), ("stream", "diffusers-group-offload")}
    assert rows[("stream", "diffusers-group-offload")].memory_mib == (700.0, 900.0)
    text = report.render_markdown(record)
    assert "| txt2img-512-b1 | stream | diffusers-group-offload | 700 | 900 | 0.78x |" in text
    assert "failed: timed out after 100 s" in text
    assert "## GPU memory and speed targets" in text and "## Streaming against its bound" in text
    assert "| txt2img-512-b1 | stream | peak allocated <= 0.8 GB | 0.68 GB | met |" in text
    assert "| txt2img-512-b1 | turbo | s/step <= 1.05x full | 1.03x | met |" in text
    # 1.6 GiB moved per step at 50 GB/s takes 0.0344 s, more than the 0.030 s of compute: that is the bound
    assert "| txt2img-512-b1 | stream | 0.0450 | 0.0300 | 1.60 | 0.0344 | 0.0344 | 1.31x | **missed** |" in text


def test_calibration_subtracts_resident_weights_per_mode() -> None:
    rows = {(r.mode, r.stage): r for r in report.calibration_rows(cuda_record())}
    turbo = rows[("turbo", "unet")]
    assert turbo.resident_weights_mib == pytest.approx(1.6 * 1024, rel=1e-6)
    expected = (2000.0 * 2**20 - int(1.6 * 2**30)) / 2 / (64 * 64 * 2)  # fp16, 64x64 latents, CFG batch 2
    assert turbo.elements_per_pixel == pytest.approx(expected)
    assert rows[("full", "vae_decode")].resident_weights_mib == pytest.approx(1.98 * 1024, rel=1e-6)  # everything resident
    assert rows[("stream", "unet")].resident_weights_mib == pytest.approx(0.1 * 1024, rel=1e-6)


def test_calibration_compares_with_the_family_constants() -> None:
    """An SDXL run is held against SDXL's constants (its stream figure times SDXL's chunked share), an
    SD 1.5 run against SD 1.x's."""
    from optimized_sd.memory import planner

    record = cuda_record()
    sd1 = {(r.mode, r.stage): r for r in report.calibration_rows(record)}
    assert sd1[("stream", "unet")].family == "sd1"
    assert report.planner_constant(sd1[("stream", "unet")]) == pytest.approx(14_000 * 0.65)
    for result in record.results:
        if result.footprint is not None:
            result.footprint = replace(result.footprint, family="sdxl")
    sdxl = {(r.mode, r.stage): r for r in report.calibration_rows(record)}
    assert report.planner_constant(sdxl[("stream", "unet")]) == pytest.approx(planner.UNET_ACTIVATIONS["sdxl"].per_latent_pixel * 0.60)
    assert report.planner_constant(sdxl[("full", "vae_decode")]) == planner.VAE_DECODE_ELEMENTS_PER_PIXEL  # 64x64: small
    assert "| 5,520 |" in report.render_markdown(record)  # 9,200 x 0.60 in the calibration table


def test_outputs_and_chart_note_without_matplotlib(tmp_path: Path, without_matplotlib) -> None:
    written = report.write_outputs(cuda_record(), tmp_path)
    assert [p.name for p in written] == ["results.md", "results.json"]
    assert "matplotlib is not installed" in (tmp_path / "results.md").read_text()


COMMITTED_RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*/results.json"))


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("path", COMMITTED_RESULTS, ids=lambda p: p.parent.name)
def test_committed_results_load_round_trip_and_render_as_committed(path: Path) -> None:
    record = BenchRecord.from_json(json.loads(path.read_text()))
    assert record.results and all(isinstance(r, ScenarioResult) and isinstance(r.scenario, Scenario) for r in record.results)
    assert BenchRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    markdown = report.render_markdown(record)
    committed = (path.parent / "results.md").read_text()
    for title in ("Runs", "Per stage"):  # the same tables as when the run was written
        assert section(markdown, title) == section(committed, title)
    assert "issue" not in markdown.lower()


def test_render_rebuilds_a_folder_and_refuses_a_foreign_json(tmp_path: Path) -> None:
    from optimized_sd.benchmark.runner import render

    source = next(p for p in COMMITTED_RESULTS if "quick" in p.parent.name)
    (tmp_path / "results.json").write_text(source.read_text())
    written = render(tmp_path)
    assert {p.name for p in written} >= {"results.md", "results.json"}
    assert BenchRecord.from_json(json.loads((tmp_path / "results.json").read_text())).results
    (tmp_path / "results.json").write_text('{"results": []}')
    with pytest.raises(UserError, match="not an optimized-sd bench results.json"):
        render(tmp_path)


def test_a_failed_row_keeps_its_reason_through_the_file() -> None:
    failed = ScenarioResult(Scenario("img2img", 64, 64, 1, 1, "stream"), ok=False, user_error="no room", peak_rss_mib=12.0)
    again = ScenarioResult.from_json(json.loads(json.dumps(failed.to_json())))
    assert again == failed and again.failure == "no room"


def test_marked_stages_are_measured_like_with_stages() -> None:
    """The bench worker marks diffusers' stage boundaries with hooks; the meter measures them as it measures ours."""
    import time

    import torch

    from optimized_sd.benchmark.worker import stage_figures
    from optimized_sd.memory.report import MemoryMeter

    meter = MemoryMeter(torch.device("cpu"))
    with pytest.raises(RuntimeError):
        meter.mark("text")
    with meter.stage("text"):
        time.sleep(0.01)
    with meter.marked():
        time.sleep(0.01)
        meter.mark("unet", steps=3)
        time.sleep(0.01)
        meter.mark("unet", steps=2)
    figures = stage_figures(meter)
    assert [r.stage for r in meter.records] == ["text", "unet", "unet"]
    assert figures["unet"].steps == 5 and figures["unet"].seconds >= 0.02 and figures["text"].seconds >= 0.01
    assert all(r.peak_rss_mib > 0 and r.peak_allocated_mib == 0.0 for r in meter.records)


def test_device_labels_make_folder_names() -> None:
    assert report.device_label(Machine("cuda", "cuda", gpu="NVIDIA H100 80GB HBM3")) == "nvidia-h100-80gb-hbm3"
    intel = Machine("cpu", "cpu", cpu="Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz")
    assert report.device_label(intel) == "cpu-intel-xeon-platinum-8375c"


def test_worker_rejects_a_bad_payload() -> None:
    done = subprocess.run([sys.executable, "-m", "optimized_sd.benchmark.worker", "not json"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "usage" in done.stderr


# --------------------------------------------------------------------------- end to end
def test_harness_runs_ours_and_diffusers_on_the_tiny_model(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    folder, record, lines = run_tiny_bench(tmp_path, steps=1, kinds="txt2img", modes="stream", peers="diffusers", label="test")
    saved = json.loads((folder / "results.json").read_text())
    assert saved["results"][0]["scenario"]["name"] == "txt2img-64-b1-stream"  # the file reads on its own
    by_mode = {r.scenario.mode: r for r in record.results}
    assert set(by_mode) == {"stream", "diffusers"}
    for result in by_mode.values():
        assert result.ok, result
        assert result.unet_steps == 1 and result.peak_rss_mib > 0 and result.finite
        assert set(result.stages) >= {"text", "unet", "vae_decode"}
        assert all(figures.seconds > 0 and figures.peak_rss_mib > 0 for figures in result.stages.values())
        assert result.stages["unet"].steps == 1  # the diffusers hooks count UNet calls too
    assert by_mode["stream"].mode_used == "stream" and by_mode["stream"].footprint is not None
    markdown = (folder / "results.md").read_text()
    assert "| txt2img-64-b1 | stream | diffusers |" in markdown
    assert sum(line.startswith("[") for line in lines) == 2  # a progress line per scenario


def test_update_replaces_rerun_rows_in_place_and_says_so() -> None:
    from optimized_sd.benchmark.runner import merged

    earlier = replace(cuda_record(), started="then", wall_seconds=10.0)
    again = fake_result("stream", 650.0, 0.040)
    command = "optimized-sd bench --only '*stream' --update"
    record = replace(earlier, command=command, started="now", wall_seconds=5.0, notes=[], results=[again])
    out = merged(record, earlier, ["txt2img-512-b1-stream"])
    modes = [r.scenario.mode for r in out.results]
    assert modes == [r.scenario.mode for r in earlier.results]  # same rows, same order
    assert out.results[modes.index("stream")].peak_allocated_mib == 650.0
    assert "a note" in out.notes and any("re-measured on now" in n and "txt2img-512-b1-stream" in n for n in out.notes)
    assert out.wall_seconds == 15.0 and out.command == "optimized-sd bench" and out.started == "then"


def test_stream_floor_and_its_schedule_simulation():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import stream_floor
    finally:
        sys.path.pop(0)
    # Block i+1's copy overlaps block i's compute; the first block's copy overlaps the last block.
    cases = [
        ([4.0, 1.0, 1.0], [1.0, 3.0, 1.0], 6.0),
        ([1.0, 1.0], [5.0, 0.5], 6.0),
        ([0.5, 2.0, 0.1, 1.0], [0.2, 0.3, 2.5, 0.4], 0.5 + 2.5 + 0.4 + 1.0),
    ]
    for compute, copy, floor in cases:
        assert stream_floor.one_block_lookahead_seconds(compute, copy) == floor
        sizes = [1] * len(compute)
        # No room beyond the next block: the simulated schedule is that floor.
        assert stream_floor.simulated_step_seconds(compute, copy, sizes, 0) == pytest.approx(floor)
        # Room for everything: copies and compute overlap fully, max(compute, copy) per step.
        unlimited = stream_floor.simulated_step_seconds(compute, copy, sizes, float("inf"), steps=8)
        assert unlimited == pytest.approx(max(sum(compute), sum(copy)))
    assert len(stream_floor.block_bytes()) == 27


def test_bench_stores_our_weights_in_8_bits_and_says_so(tmp_path: Path) -> None:
    """`bench --weights int8` runs our engine with 8-bit storage, names the folder after it and states
    it in the header; the SDXL and SD 2.x benchmark models take the diffusers peers too."""
    folder, record, _ = run_tiny_bench(tmp_path, steps=1, kinds="txt2img", modes="stream", peers="none", label="test", weights="int8")
    assert folder.name.endswith("-test-tiny-int8")
    assert record.settings.weights == "int8" and not record.results[0].error
    assert "stores its weights as int8" in (folder / "results.md").read_text()
    for model in ("tiny-sdxl", "tiny-sd2", "sdxl"):
        chosen = select_scenarios(
            kinds="txt2img", sizes="64", batches="1", steps=1, modes="stream", peers="diffusers", device_type="cpu", model=model
        )
        names = [s.name for s in chosen.scenarios]
        assert names == ["txt2img-64-b1-stream", "txt2img-64-b1-diffusers"]
