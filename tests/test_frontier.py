"""The frontier benchmark: the cap arithmetic on a fake device, the runner's scheduling (roomiest budget
first, a configuration that ran out of memory not run again below), peer availability, the report and
its chart (matplotlib or hand-written SVG), the CPU RSS watchdog, and the whole run on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from optimized_sd.benchmark import frontier, report
from optimized_sd.benchmark.caps import (
    CPU_RSS,
    CUDA_FRACTION,
    MIB,
    BudgetAboveDevice,
    BudgetTooSmall,
    CapFacts,
    cpu_cap,
    cuda_cap,
    largest_first,
    over_budget_mib,
    parse_budget,
    parse_budgets,
)
from optimized_sd.benchmark.results import BenchModel, BenchRecord, Machine, PlanFacts, ScenarioResult, Settings
from optimized_sd.benchmark.runner import BenchOptions, run_scenarios, select
from optimized_sd.benchmark.scenarios import PEERS, Scenario, select_scenarios
from optimized_sd.benchmark.worker import PROMPT, RESULT_PREFIX
from optimized_sd.errors import UserError
from tests.bench_runs import run_tiny_bench

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


# --------------------------------------------------------------------------- cap arithmetic
def test_cuda_cap_is_budget_less_context_over_the_device_total():
    cap = cuda_cap(2 * GIB, device_total=80 * GIB, context=500 * MIB)
    assert cap.kind == CUDA_FRACTION
    assert cap.fraction == pytest.approx((2 * GIB - 500 * MIB) / (80 * GIB))
    assert cap.allocatable_bytes == 2 * GIB - 500 * MIB
    assert (cap.budget_mib, cap.device_total_mib, cap.context_mib) == (2048.0, 80 * 1024.0, 500.0)
    # The whole card as the budget: everything but the context.
    assert cuda_cap(6 * GIB, device_total=6 * GIB, context=300 * MIB).fraction == pytest.approx(1 - 300 / 6144)


def test_cuda_cap_refuses_a_budget_the_context_fills_or_the_device_lacks():
    with pytest.raises(BudgetTooSmall, match="filled by the CUDA context alone"):
        cuda_cap(500 * MIB, device_total=80 * GIB, context=500 * MIB)
    with pytest.raises(BudgetTooSmall):
        cuda_cap(400 * MIB, device_total=80 * GIB, context=500 * MIB)
    with pytest.raises(BudgetAboveDevice, match="more than this device's 4,096 MiB"):
        cuda_cap(6 * GIB, device_total=4 * GIB, context=300 * MIB)
    with pytest.raises(ValueError):
        cuda_cap(GIB, device_total=0, context=0)


def test_cpu_cap_counts_the_interpreter_and_libraries():
    cap = cpu_cap(GIB, ram_total=24 * GIB, baseline_rss=300 * MIB)
    assert (cap.kind, cap.allocatable_mib, cap.context_mib, cap.fraction) == (CPU_RSS, 724.0, 300.0, None)
    with pytest.raises(BudgetTooSmall, match="interpreter and its libraries alone"):
        cpu_cap(200 * MIB, ram_total=24 * GIB, baseline_rss=300 * MIB)
    with pytest.raises(BudgetAboveDevice):
        cpu_cap(32 * GIB, ram_total=24 * GIB, baseline_rss=300 * MIB)


def test_over_budget_is_reserved_plus_the_grown_context_past_the_budget():
    cap = cuda_cap(2 * GIB, device_total=80 * GIB, context=500 * MIB)
    assert over_budget_mib(cap, 1500.0) == 0.0  # 1500 + 500 <= 2048
    assert over_budget_mib(replace(cap, context_after_mib=700.0), 1500.0) == pytest.approx(152.0)
    assert over_budget_mib(cpu_cap(GIB, 24 * GIB, 300 * MIB), 5000.0) == 0.0  # the CPU cap is on RSS, not the allocator


def test_budget_lists_parse_none_and_order_roomiest_first():
    assert parse_budget("none") is None and parse_budget("0.6GB") == int(0.6 * GIB)
    assert parse_budgets("0.6GB, 2GB,None,2GB") == ["0.6GB", "2GB", "none"]
    assert largest_first(["0.6GB", "none", "4GB", "1.5GB"]) == ["none", "4GB", "1.5GB", "0.6GB"]
    for bad, message in ((",", "--budget is empty"), ("lots", "cannot read the memory size"), ("0GB", "must be above zero")):
        with pytest.raises(UserError, match=message):
            parse_budgets(bad)


# --------------------------------------------------------------------------- selection and scheduling
def test_budget_runs_ours_auto_and_every_peer_under_each_cap_roomiest_first():
    options = BenchOptions(budget="0.6GB,none,2GB", peers="diffusers,diffusers-vae-slicing")
    names = [s.name for s in select(options, "cuda").scenarios]
    assert names == [
        "txt2img-512-b1-auto",  # none: uncapped, named as a plain run
        "txt2img-512-b1-diffusers",
        "txt2img-512-b1-diffusers-vae-slicing",
        "txt2img-512-b1-auto-budget2GB",
        "txt2img-512-b1-diffusers-budget2GB",
        "txt2img-512-b1-diffusers-vae-slicing-budget2GB",
        "txt2img-512-b1-auto-budget0.6GB",
        "txt2img-512-b1-diffusers-budget0.6GB",
        "txt2img-512-b1-diffusers-vae-slicing-budget0.6GB",
    ]
    with_modes = [s.name for s in select(replace(options, modes="stream", peers="none"), "cuda").scenarios]
    assert with_modes[0] == "txt2img-512-b1-stream" and len(with_modes) == 4


def result_of(scenario: Scenario, ok: bool = True, oom: bool = False, seconds: float = 1.0) -> ScenarioResult:
    return ScenarioResult(scenario, ok=ok, oom=oom, total_seconds=seconds, error=None if ok else "out of memory: x").with_stage_totals()


def test_a_configuration_out_of_memory_is_not_run_at_smaller_budgets():
    scenarios = select(BenchOptions(budget="0.6GB,1GB,2GB,none", peers="diffusers,diffusers-model-offload"), "cuda").scenarios
    ran: list[str] = []

    def run(scenario: Scenario) -> ScenarioResult:
        ran.append(scenario.name)
        fails = scenario.mode == "diffusers" and scenario.budget == "2GB"
        return result_of(scenario, ok=not fails, oom=fails)

    heard: list[tuple[int, str]] = []
    results = run_scenarios(scenarios, run, lambda index, scenario, result: heard.append((index, scenario.name)))
    assert [name for _, name in heard] == [s.name for s in scenarios] and [i for i, _ in heard] == list(range(1, 13))
    skipped = {"txt2img-512-b1-diffusers-budget1GB", "txt2img-512-b1-diffusers-budget0.6GB"}
    assert set(ran) == {s.name for s in scenarios} - skipped
    by_name = {r.scenario.name: r for r in results}
    for name in skipped:
        assert by_name[name].oom and not by_name[name].ok and by_name[name].error == "not run: does not complete at 2GB already"
    assert by_name["txt2img-512-b1-diffusers-model-offload-budget0.6GB"].ok  # other configurations go on
    assert by_name["txt2img-512-b1-auto-budget0.6GB"].ok


def test_an_uncapped_failure_skips_nothing_and_a_harness_error_is_not_oom():
    scenarios = select(BenchOptions(budget="1GB,none", peers="diffusers"), "cuda").scenarios

    def run(scenario: Scenario) -> ScenarioResult:
        return result_of(scenario, ok=scenario.budget is not None or scenario.mode != "diffusers", oom=False)

    results = run_scenarios(scenarios, run, lambda *_: None)
    assert [r.error for r in results if not r.ok] == ["out of memory: x"]  # only the uncapped diffusers failed, and was run


def test_peers_missing_a_package_are_left_out_with_a_one_line_reason():
    def installed(module: str) -> bool:
        return module not in ("stable_diffusion_cpp", "openvino")

    chosen = select_scenarios(
        kinds="txt2img", sizes="512", batches="1", steps=2, modes="none", peers="all", device_type="cpu", installed=installed
    )
    assert {s.mode for s in chosen.scenarios} == {"diffusers", "diffusers-attention-slicing", "diffusers-vae-slicing"}
    assert "sdcpp: stable-diffusion-cpp-python is not installed, skipped (pip install stable-diffusion-cpp-python)" in chosen.notes
    assert "openvino: openvino is not installed, skipped (pip install openvino)" in chosen.notes
    without_diffusers = select_scenarios(
        kinds="txt2img",
        sizes="512",
        batches="1",
        steps=2,
        modes="none",
        peers="all",
        device_type="cpu",
        installed=lambda module: module != "diffusers",
    )
    assert [s.mode for s in without_diffusers.scenarios] == ["sdcpp"]
    assert any("diffusers is not installed: ran sdcpp beside ours" in note for note in without_diffusers.notes)
    assert all("\n" not in note for note in chosen.notes + without_diffusers.notes)


def test_peer_table_says_which_devices_each_peer_runs_on():
    assert {name for name, peer in PEERS.items() if peer.devices == ("cpu",)} == {"sdcpp", "openvino"}
    assert PEERS["diffusers-group-offload"].cuda_only and not PEERS["diffusers"].cuda_only


def test_seed_workload_is_turbo_under_its_cap_beside_uncapped_full():
    chosen = select(BenchOptions(seed_workload=True), "cuda")
    assert [s.name for s in chosen.scenarios] == ["txt2img-512-b10x2-turbo-budget2.4GB", "txt2img-512-b10x2-full"]
    assert {(s.batch, s.n_iter, s.images) for s in chosen.scenarios} == {(10, 2, 20)}
    assert select(BenchOptions(seed_workload=True, budget="1GB"), "cpu").scenarios[0].budget == "1GB"
    for budget in ("1GB,2GB", "none"):
        with pytest.raises(UserError, match="--seed-workload takes one --budget"):
            select(BenchOptions(seed_workload=True, budget=budget), "cuda")
    scenario = chosen.scenarios[0]
    assert Scenario.from_dict(json.loads(json.dumps(scenario.to_dict()))) == scenario
    assert "n_iter" not in Scenario("txt2img", 64, 64, 1, 1, "full").to_dict()  # files as before when n_iter is 1


# --------------------------------------------------------------------------- report and chart
def run_at(mode: str, budget: str | None, seconds: float | None, cuda: bool = True, oom: bool = False) -> ScenarioResult:
    scenario = Scenario("txt2img", 512, 512, 1, 10, mode, budget)
    cap = CapFacts(CUDA_FRACTION, None if budget is None else float(parse_budget(budget) / MIB), 81_559.0, "mem_get_info", 520.0)
    if seconds is None:
        return ScenarioResult(scenario, ok=False, oom=oom, cap=cap, error="out of memory: CUDA out of memory" if oom else "boom")
    result = replace(result_of(scenario, seconds=seconds), cap=cap, peak_allocated_mib=400.0, peak_reserved_mib=450.0)
    if mode == "auto":
        result.mode_used = "stream" if budget else "full"
        result.plan = PlanFacts(result.mode_used, "fastest that fits", False, None, {}, unet_batch=None)
    return result


def frontier_record(results: list[ScenarioResult]) -> BenchRecord:
    return BenchRecord(
        command="optimized-sd bench --budget 0.6GB,2GB,none",
        date="2026-01-01",
        started="2026-01-01 10:00:00 UTC",
        wall_seconds=1.0,
        machine=Machine("cuda", "cuda", gpu="NVIDIA H200", cpu="x"),
        model=BenchModel("m", "t", "c", built=False, seconds=0.0, file_bytes=GIB),
        settings=Settings(PROMPT, 42, 7.5, 0.75, "ddim", 10, "autocast", "fp16", "sdpa", 1, 1, 100.0),
        budget="0.6GB,2GB,none",
        results=results,
    )


FRONTIER_RUNS = [
    run_at("auto", None, 1.0),
    run_at("diffusers", None, 1.2),
    run_at("diffusers-sequential-offload", None, 9.0),
    run_at("auto", "2GB", 1.5),
    run_at("diffusers", "2GB", None, oom=True),
    run_at("diffusers-sequential-offload", "2GB", 9.5),
    run_at("auto", "0.6GB", 2.0),
    run_at("diffusers", "0.6GB", None, oom=True),
    run_at("diffusers-sequential-offload", "0.6GB", None, oom=True),
]


def test_frontier_tables_show_oom_and_check_the_goals():
    record = frontier_record(FRONTIER_RUNS)
    (found,) = frontier.frontiers(record)
    assert found.budgets == ["0.6GB", "2GB", "none"]
    assert found.configurations == ["auto", "diffusers", "diffusers-sequential-offload"]
    text = report.render_markdown(record)
    assert "| budget | optimized-sd auto | diffusers | diffusers-sequential-offload |" in text
    assert "| 0.6GB | 2.00 | OOM | OOM |" in text and "| 2GB | 1.50 | OOM | 9.50 |" in text and "| none | 1.00 | 1.20 | 9.00 |" in text
    assert "| 0.6GB | yes | no peer completes | met |" in text
    assert "| 2GB | yes | diffusers-sequential-offload 9.50 s: 0.16x (met) | - |" in text
    assert "| none | yes | diffusers 1.20 s: 0.83x (**missed**) | - |" in text
    assert "| 0.6GB | optimized-sd auto | yes | stream | - | 2.00 | 400 | 450 | - | 81,559 | 520 | **356** |" in text
    assert "| 0.6GB | diffusers | no (OOM) | out of memory: CUDA out of memory |" in text
    assert "set_per_process_memory_fraction" in text


def test_a_record_without_capped_runs_has_no_frontier():
    plain = frontier_record([run_at("auto", None, 1.0), run_at("diffusers", None, 1.2)])
    assert frontier.frontiers(plain) == [] and "## Frontier" not in report.render_markdown(plain)


def test_frontier_chart_is_a_png_with_matplotlib(tmp_path: Path):
    pytest.importorskip("matplotlib")
    record = frontier_record(FRONTIER_RUNS)
    written = report.write_outputs(record, tmp_path)
    assert tmp_path / "frontier.png" in written and (tmp_path / "frontier.png").stat().st_size > 1000
    assert "![seconds per image against memory budget](frontier.png)" in (tmp_path / "results.md").read_text()
    saved = BenchRecord.from_json(json.loads((tmp_path / "results.json").read_text()))
    assert saved.frontier_chart == "frontier.png" and saved.results[0].cap == record.results[0].cap


def test_frontier_chart_is_a_hand_written_svg_without_matplotlib(tmp_path: Path, without_matplotlib):
    record = frontier_record(FRONTIER_RUNS)
    written = report.write_outputs(record, tmp_path)
    assert tmp_path / "frontier.svg" in written
    svg = ET.parse(tmp_path / "frontier.svg").getroot()
    namespace = "{http://www.w3.org/2000/svg}"
    lines = svg.findall(f"{namespace}polyline")
    assert len(lines) == 3  # one per configuration that completes somewhere
    points = [len(line.get("points").split()) for line in lines]
    assert points == [3, 1, 2]  # ours at every budget; diffusers uncapped only; sequential offload at 2GB and none
    labels = [t.text for t in svg.findall(f"{namespace}text")]
    assert {"0.6GB", "2GB", "none", "optimized-sd auto", "diffusers-sequential-offload"} <= set(labels)


def test_chart_places_budgets_in_gigabytes_and_none_beyond_the_largest():
    (found,) = frontier.frontiers(frontier_record(FRONTIER_RUNS))
    lines, ticks = frontier.chart_lines(found)
    assert [label for _, label in ticks] == ["0.6GB", "2GB", "none"]
    assert ticks[0][0] == pytest.approx(0.6) and ticks[1][0] == 2.0 and ticks[2][0] == pytest.approx(3.0)
    assert lines[0].points == [(pytest.approx(0.6), 2.0), (2.0, 1.5), (pytest.approx(3.0), 1.0)]


def test_capped_seed_workload_is_set_against_uncapped_full_in_images_per_second():
    capped = replace(result_of(Scenario("txt2img", 512, 512, 10, 10, "turbo", "2.4GB", n_iter=2), seconds=20.0), mode_used="split")
    capped.plan = PlanFacts("split", "turbo needs about ...", False, 1900.0, {}, unet_batch=7)
    full = result_of(Scenario("txt2img", 512, 512, 10, 10, "full", None, n_iter=2), seconds=19.0)
    assert capped.seconds_per_image == 1.0  # 20 images over 2 calls
    text = report.render_markdown(frontier_record([capped, full]))
    assert "| txt2img-512-b10x2 | turbo under 2.4GB | completes: split, UNet micro-batch 7 | 1.000 | 1.053 | 0.95x | met |" in text


# --------------------------------------------------------------------------- the CPU watchdog and the whole run
@pytest.mark.parametrize("stdout_silenced", [False, True])
def test_rss_watchdog_stops_a_run_that_passes_its_cap_with_an_oom_result(stdout_silenced: bool):
    """Also while a peer has pointed fd 1 at /dev/null (stable-diffusion-cpp-python silences its C library
    so): the result line goes through the worker's own duplicate of stdout."""
    silence = "import os; os.dup2(os.open(os.devnull, os.O_WRONLY), 1)\n" if stdout_silenced else ""
    code = (
        "import psutil, time\n"
        "from optimized_sd.benchmark.caps import cpu_cap\n"
        "from optimized_sd.benchmark.scenarios import Scenario\n"
        "from optimized_sd.benchmark.worker import ResultChannel, RssWatchdog\n"
        "ResultChannel.open()\n"
        "rss = psutil.Process().memory_info().rss\n"
        "cap = cpu_cap(rss + 64 * 2**20, 2**40, rss)\n"
        "RssWatchdog(cap, Scenario('txt2img', 64, 64, 1, 1, 'auto', '1GB')).start()\n"
        f"{silence}"
        "hog = bytearray(256 * 2**20)\n"
        "time.sleep(5)\n"
        "print('survived')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1 and "survived" not in done.stdout
    line = next(line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX))
    result = json.loads(line[len(RESULT_PREFIX) :])
    assert result["oom"] is True and result["ok"] is False and "passed the cap of" in result["error"]
    assert result["cap"]["kind"] == CPU_RSS


def test_cpu_frontier_runs_end_to_end_on_the_tiny_model(tmp_path: Path):
    """Ours uncapped, then under a budget below what the interpreter alone holds: refused as not
    completing (not an error), and the report and chart written."""
    folder, record, lines = run_tiny_bench(tmp_path, steps=1, peers="none", budget="0.1GB,none")
    assert folder.name.endswith("-frontier-tiny")
    uncapped, capped = record.results
    assert uncapped.ok and uncapped.scenario.name == "txt2img-64-b1-auto" and uncapped.cap.kind == "none"
    assert uncapped.cap.device_total_mib > 0 and uncapped.cap.context_mib > 0
    assert not capped.ok and capped.oom and "filled by the interpreter and its libraries alone" in capped.error
    assert capped.cap.kind == CPU_RSS and capped.cap.budget_mib == pytest.approx(0.1 * 1024) and capped.cap.allocatable_mib is None
    markdown = (folder / "results.md").read_text()
    assert "| 0.1GB | OOM |" in markdown and "| 0.1GB | **no** | - | - |" in markdown  # no peer run: no verdict on "only ours"
    assert record.frontier_chart in ("frontier.png", "frontier.svg") and (folder / record.frontier_chart).is_file()
    assert any("does not complete: does not fit" in line for line in lines)


@pytest.mark.slow
def test_cpu_frontier_with_a_diffusers_peer_under_a_real_rss_cap(tmp_path: Path):
    """ours and diffusers under a cap the runs fit and one they do not: the slow, fuller version."""
    pytest.importorskip("diffusers")
    _, record, _ = run_tiny_bench(tmp_path, steps=1, peers="diffusers", budget="4GB,0.1GB")
    by_name = {r.scenario.name: r for r in record.results}
    assert by_name["txt2img-64-b1-auto-budget4GB"].ok and by_name["txt2img-64-b1-diffusers-budget4GB"].ok
    assert by_name["txt2img-64-b1-auto-budget4GB"].cap.allocatable_mib < 4096
    assert by_name["txt2img-64-b1-diffusers-budget0.1GB"].oom and by_name["txt2img-64-b1-auto-budget0.1GB"].oom


# --------------------------------------------------------------------------- the small-card model
def test_card_model_arithmetic():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import stream_floor
    finally:
        sys.path.pop(0)
    link = stream_floor.PCIE_GBS["3.0 x16"] * 1e9 * stream_floor.LINK_EFFICIENCY
    card = stream_floor.Card("test card", "TEST", 4, 10.0, "3.0 x16", "made up", utilisation=0.5)
    flops, sizes = [2e12, 1e12, 2e12], [int(link * 0.1), int(link * 0.3), int(link * 0.05)]  # copies of 0.1, 0.3, 0.05 s
    predicted = stream_floor.predict_card(card, flops, sizes, estimates_gib={"full": 3.9, "stream": 0.8}, budgets_gib=(100.0,))
    compute = [0.4, 0.2, 0.4]  # flops / (10 TFLOPS x 0.5)
    assert predicted.compute == pytest.approx(1.0)
    assert predicted.split == pytest.approx(1.0 + 0.45, rel=1e-6)
    assert predicted.stream == pytest.approx(max(0.4, 0.3) + max(0.2, 0.05) + max(0.4, 0.1), rel=1e-6)
    assert predicted.budget_steps["100 GB"] == pytest.approx(max(sum(compute), 0.45), rel=1e-6)  # room for everything ahead
    assert predicted.fits == {"full": False, "stream": True}  # 4 GiB less 0.3 of context
    fp32 = stream_floor.predict_card(replace(card, weight_bytes=4), flops, sizes)
    assert fp32.split == pytest.approx(1.0 + 0.9, rel=1e-6)  # twice the bytes to copy
    table = stream_floor.card_table([predicted])
    assert "| test card | 10 | 3.0 x16 | 1.00 | 1.45 | 1.00 | 1.00 | stream |" in table
    assert {c.match for c in stream_floor.CARDS} >= {"RTX 2060", "RTX 3050 Laptop", "GTX 1650", "H100", "H200"}
    assert all(c.source for c in stream_floor.CARDS)


def test_a_continued_run_skips_what_ran_out_of_memory_before_and_only_below_that_budget():
    """--update continues a frontier in parts (as benchmarks/device_run.sh does): an earlier OOM at 2GB
    skips the same configuration at 1GB and 0.6GB, not at 3GB."""
    earlier = [result_of(Scenario("txt2img", 512, 512, 1, 10, "diffusers", "2GB"), ok=False, oom=True)]
    scenarios = select(BenchOptions(budget="3GB,1GB,0.6GB", peers="diffusers"), "cuda").scenarios
    ran: list[str] = []
    results = run_scenarios(scenarios, lambda s: ran.append(s.name) or result_of(s), lambda *_: None, earlier)
    assert "txt2img-512-b1-diffusers-budget3GB" in ran
    assert {r.scenario.name for r in results if r.error == "not run: does not complete at 2GB already"} == {
        "txt2img-512-b1-diffusers-budget1GB",
        "txt2img-512-b1-diffusers-budget0.6GB",
    }


def test_stable_diffusion_cpp_is_left_out_for_the_tiny_model_with_a_reason():
    chosen = select_scenarios(
        kinds="txt2img",
        sizes="64",
        batches="1",
        steps=1,
        modes="none",
        peers="sdcpp,openvino",
        device_type="cpu",
        model="tiny",
        installed=lambda module: True,
    )
    assert [s.mode for s in chosen.scenarios] == ["openvino"]
    assert chosen.notes == ["sdcpp: runs the sd15 model only, skipped with --model tiny"]


@pytest.mark.slow
def test_openvino_peer_runs_the_tiny_model_under_the_frontier(tmp_path: Path):
    pytest.importorskip("openvino")
    pytest.importorskip("diffusers")
    _, record, _ = run_tiny_bench(tmp_path, steps=2, peers="openvino", budget="4GB")
    peer = next(r for r in record.results if r.scenario.mode == "openvino")
    assert peer.ok and peer.finite and peer.unet_steps == 2 and set(peer.stages) == {"text", "unet", "vae_decode"}
    assert (tmp_path / "cache" / "tiny-seed0" / "openvino-64x64-b2" / "unet.xml").is_file()  # converted once, beside the checkpoint


def test_goals_say_when_no_peer_was_run_rather_than_none_completing():
    record = frontier_record([run_at("auto", "2GB", 1.5), run_at("diffusers", "2GB", None, oom=True), run_at("auto", "1GB", 2.0)])
    text = report.render_markdown(record)
    assert "| 1GB | yes | no peer run | - |" in text  # the smallest budget, its peers not run: no verdict
    assert "| 2GB | yes | no peer completes | - |" in text


def test_a_timed_out_worker_is_ended_with_its_children(monkeypatch, tmp_path: Path):
    """The runner kills the worker's whole session on a timeout: a child it started (as the OpenVINO
    peer's conversion) does not outlive it."""
    from optimized_sd.benchmark import runner

    marker = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(marker)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    real_popen = subprocess.Popen

    def popen(command, **kwargs):
        return real_popen([sys.executable, "-c", code], **kwargs)

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    result = runner.run_worker({"task": "probe"}, timeout=3)
    assert result == {"ok": False, "error": "timed out after 3 s (killed)"}
    pid = int(marker.read_text())
    for _ in range(50):  # the kill is delivered at once; reaping by init may take a moment
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the worker's child outlived the timeout")


def test_the_cuda_cap_names_the_device_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch (2.11 on the H200) refuses `set_per_process_memory_fraction(f, torch.device("cuda"))`
    without an index: every capped run of the first GPU frontier failed so. The cap passes an index."""
    import torch

    from optimized_sd.benchmark import worker

    calls: list[tuple[float, object]] = []
    monkeypatch.setattr(worker, "cuda_context_bytes", lambda device: (700 * 2**20, 140 * 2**30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device=None: calls.append((fraction, device)))
    cap, watchdog = worker.hold_to_budget(Scenario("txt2img", 512, 512, 1, 10, "auto", "2GB"), torch.device("cuda"))
    assert watchdog is None and len(calls) == 1
    fraction, index = calls[0]
    assert index == 0 and isinstance(index, int)
    assert fraction == pytest.approx(cap.fraction) and cap.allocatable_mib == pytest.approx(2048 - 700)
    worker.hold_to_budget(Scenario("txt2img", 512, 512, 1, 10, "auto", "2GB"), torch.device("cuda", 1))
    assert calls[1][1] == 1
