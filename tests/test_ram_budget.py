"""`--ram-budget`: the host-RAM planner's choice per component for pairs of RAM and VRAM budgets, its one-line
refusal naming the smallest budget that fits, the option's parsing, and the memory report's RSS split and pinned bytes."""

from __future__ import annotations

import pytest
import torch

import optimized_sd
from optimized_sd import cli
from optimized_sd.errors import FieldError, OutOfMemoryBudget, UserError
from optimized_sd.memory import ram, report
from optimized_sd.memory.planner import SAFETY_MARGIN, Request, parse_bytes
from optimized_sd.memory.ram import CUDA_PROCESS_OVERHEAD, HostPart, parse_ram_budget, plan_host
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.memory_session import MemorySession
from optimized_sd.weights.loading import prepare_model

MIB = 2**20


def session_on(tiny_model, device: str, *, vram: int | None, ram_budget: int | None, mode: str = "auto") -> MemorySession:
    """A memory session of the tiny model planned as on `device` (no such device is needed: the plans are arithmetic)."""
    loaded = prepare_model(tiny_model.safetensors)
    return MemorySession(
        loaded.model, loaded.source, torch.device(device), torch.float16 if device == "cuda" else torch.float32,
        mode=mode, budget=vram, ram_budget=ram_budget,
    )  # fmt: skip


SMALL = Request(64, 64)


def homes_for(session: MemorySession, request: Request = SMALL) -> dict[str, str]:
    plan = session.plan_for(request)
    host = session.plan_host(plan)
    assert host is not None
    return {"mode": plan.mode, **host.homes, "ring": host.ring_bytes}


def tiny_sizes(tiny_model) -> dict[str, int]:
    sizes = session_on(tiny_model, "cuda", vram=None, ram_budget=None).sizes
    return {"text": sizes.text_encoder, "unet": sizes.unet, "unit": max(sizes.unet_blocks), "vae": sizes.vae_encoder + sizes.vae_decoder}


def test_a_roomy_ram_budget_keeps_the_packed_pinned_copy(tiny_model):
    session = session_on(tiny_model, "cuda", vram=2**30, ram_budget=64 * 2**30, mode="stream")
    assert homes_for(session) == {
        "mode": "stream", "text_encoder": "pinned", "vae_encoder": "pinned", "vae_decoder": "pinned", "denoiser": "pinned", "ring": 0,
    }  # fmt: skip


def test_pairs_of_budgets_step_the_parts_down_text_and_vae_first(tiny_model):
    sizes = tiny_sizes(tiny_model)
    everything = sizes["text"] + sizes["unet"] + sizes["vae"]
    # The VRAM budget picks the mode; the RAM budget, what waits where. Room for all but the pins' share: the
    # parts used once per call go pageable, the denoiser keeps its pins.
    tight_pins = CUDA_PROCESS_OVERHEAD + int(everything / ram.PINNED_SHARE) - 1
    homes = homes_for(session_on(tiny_model, "cuda", vram=2**30, ram_budget=tight_pins, mode="stream"))
    assert homes["denoiser"] == "pinned" and "pageable" in (homes["text_encoder"], homes["vae_encoder"], homes["vae_decoder"])
    # Room for the denoiser's ring only: everything else memory-mapped, the ring whole slots of its largest unit.
    ring_only = CUDA_PROCESS_OVERHEAD + int(2 * sizes["unit"] / ram.PINNED_SHARE) + 1
    homes = homes_for(session_on(tiny_model, "cuda", vram=2**30, ram_budget=ring_only, mode="stream"))
    assert (homes["text_encoder"], homes["vae_encoder"], homes["vae_decoder"], homes["denoiser"]) == ("mapped",) * 3 + ("ring",)
    assert homes["ring"] >= 2 * sizes["unit"] and homes["ring"] % sizes["unit"] == 0
    assert homes["ring"] <= ring_only - CUDA_PROCESS_OVERHEAD
    # The same RAM with the VRAM for `turbo` (no streamed blocks, no ring): the denoiser is read from the file.
    homes = homes_for(session_on(tiny_model, "cuda", vram=2**30, ram_budget=ring_only, mode="turbo"))
    assert (homes["mode"], homes["denoiser"], homes["ring"]) == ("turbo", "mapped", 0)
    # `full` keeps everything on the device: nothing waits on the host.
    homes = homes_for(session_on(tiny_model, "cuda", vram=2**30, ram_budget=CUDA_PROCESS_OVERHEAD, mode="full"))
    assert homes == {"mode": "full", "ring": 0}


def test_the_ring_is_never_above_its_ceiling():
    huge = HostPart("denoiser", 40 * 2**30, 700 * MIB, ("pinned", "ring", "pageable", "mapped"))
    plan = plan_host([huge], 16 * 2**30, base=CUDA_PROCESS_OVERHEAD)
    assert plan.homes == {"denoiser": "ring"}
    assert plan.ring_bytes == (ram.RING_MAX_BYTES // (700 * MIB)) * 700 * MIB
    small = plan_host([huge], CUDA_PROCESS_OVERHEAD + 1500 * MIB, base=CUDA_PROCESS_OVERHEAD)  # pins within 75% of it
    assert (small.homes, small.ring_bytes) == ({"denoiser": "mapped"}, 0)  # two 700 MB slots would pass the pins' share


def test_a_budget_nothing_fits_is_refused_naming_the_smallest_that_fits(tiny_model):
    with pytest.raises(OutOfMemoryBudget) as refused:
        homes_for(session_on(tiny_model, "cuda", vram=2**30, ram_budget=512 * MIB, mode="stream"))
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        "a RAM budget of 512 MB is below the smallest plan for stream: it needs about 1.00 GB of host RAM with every "
        "weight memory-mapped; --ram-budget 1.00GB would fit"
    )
    suggested = parse_bytes(message.rsplit("--ram-budget ", 1)[1].split()[0])
    homes_for(session_on(tiny_model, "cuda", vram=2**30, ram_budget=suggested, mode="stream"))  # and it does


def test_on_the_cpu_the_pair_is_refused_with_the_ram_budget_that_fits(tiny_model):
    session = session_on(tiny_model, "cpu", vram=None, ram_budget=MIB)
    with pytest.raises(OutOfMemoryBudget) as refused:
        session.plan_for(Request(64, 64))
    message = str(refused.value)
    assert message.startswith("a RAM budget of 1 MB is below the smallest plan for stream") and "\n" not in message
    suggested = parse_bytes(message.rsplit("--ram-budget ", 1)[1].split()[0])
    fits = session_on(tiny_model, "cpu", vram=None, ram_budget=suggested)
    plan = fits.plan_for(Request(64, 64))
    assert fits.plan_host(plan) is not None  # stream or a faster mode: the suggestion fits


def test_on_the_cpu_the_ram_budget_caps_the_device_plan_too(tiny_model):
    roomy = session_on(tiny_model, "cpu", vram=None, ram_budget=64 * 2**30)
    assert roomy.plan_for(Request(64, 64)).mode == "full"
    estimates = roomy.plan_for(Request(64, 64)).estimates
    between = int((estimates["full"] + estimates["stream"]) / 2 / SAFETY_MARGIN)  # the CPU keeps a margin of any cap
    assert session_on(tiny_model, "cpu", vram=None, ram_budget=between).plan_for(Request(64, 64)).mode != "full"
    assert session_on(tiny_model, "cpu", vram=between, ram_budget=64 * 2**30).plan_for(Request(64, 64)).mode != "full"


@pytest.mark.parametrize("text", ["nan", "NaN GB", "-1GB", "lots", "0", "", "inf"])
def test_a_ram_budget_that_is_no_size_is_a_one_line_field_error(text):
    with pytest.raises(FieldError) as refused:
        parse_ram_budget(text)
    assert refused.value.field == "ram_budget" and "\n" not in str(refused.value)
    assert cli.flag_words(refused.value).startswith("--ram-budget must be a size or auto: ")


def test_auto_is_the_memory_available_now(monkeypatch):
    monkeypatch.setattr(ram, "available_ram", lambda: 12 * 2**30)
    assert parse_ram_budget("auto") == parse_ram_budget(" AUTO ") == 12 * 2**30
    assert parse_ram_budget("1.5GB") == parse_bytes("1.5GB") and parse_ram_budget(None) is None


def test_the_cli_refuses_a_bad_ram_budget_in_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        cli.main(["txt2img", "--ckpt", str(tmp_path / "never-loaded.ckpt"), "--outdir", str(tmp_path / "out"), "--ram-budget", "nan"])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_load_takes_the_ram_budget(tiny_model):
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", precision="full", ram_budget="64GB")
    assert pipe.memory.ram_budget == 64 * 2**30 and pipe.load_options["ram_budget"] == "64GB"
    with pytest.raises(UserError):
        optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", ram_budget="-2GB")


# -- the memory report: anonymous and file-backed RSS, pinned bytes ------------------------------------------------


@pytest.mark.skipif(not report.PROC_STATUS.exists(), reason="RssAnon/RssFile are Linux's")
def test_file_backed_rss_grows_when_weights_are_memory_mapped(tmp_path):
    from safetensors.torch import save_file

    from optimized_sd.weights.sources import SafetensorsSource

    path = tmp_path / "weights.safetensors"
    save_file({f"w{i}": torch.full((4, 2**20), float(i)) for i in range(4)}, str(path))  # 64 MiB
    anon_before, file_before = report.rss_split()
    source = SafetensorsSource(path)
    sums = [source.get(key).sum().item() for key in source.keys()]  # every page read through the mapping
    anon_after, file_after = report.rss_split()
    assert sums == [0.0, 4 * 2**20, 8 * 2**20, 12 * 2**20]
    assert file_after - file_before > 48 * MIB  # the weights' pages are file-backed...
    assert anon_after - anon_before < 16 * MIB  # ...not anonymous copies
    source.release(source.keys())
    assert report.rss_split()[1] < file_after - 32 * MIB  # and handed back
    source.close()


def test_the_report_has_the_new_columns_per_stage(tiny_model):
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", precision="full", memory="stream")
    pipe.generate(GenerationRequest(prompts=["a red cube"], steps=2, sampler="euler", seed=1, height=64, width=64))
    payload = pipe.memory.meter.as_dict()
    for record in payload["runs"]:
        assert {"peak_rss_anon_mib", "peak_rss_file_mib", "pinned_mib"} <= set(record)
        assert record["pinned_mib"] == 0.0  # nothing is page-locked on the CPU
        if report.PROC_STATUS.exists():
            assert 0 < record["peak_rss_anon_mib"] <= record["peak_rss_mib"] + 1
            assert 0 < record["peak_rss_file_mib"] <= record["peak_rss_mib"] + 1
    assert {"peak_rss_anon_mib", "peak_rss_file_mib", "pinned_mib"} <= set(payload["stages"]["unet"])
    header = pipe.memory.meter.format_table().splitlines()[0]
    assert header.split()[-6:] == ["anon", "MiB", "file", "MiB", "pinned", "MiB"]
