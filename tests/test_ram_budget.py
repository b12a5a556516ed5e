"""`--ram-budget`: the host-RAM planner's choice per component for pairs of RAM and VRAM budgets, its one-line
refusal naming the smallest budget that fits, the option's parsing, the memory report's RSS split and pinned
bytes, and the bounded pinned ring (on the CPU, through its seam: plain slots, events the tests complete)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import optimized_sd
from optimized_sd import cli
from optimized_sd.errors import FieldError, OutOfMemoryBudget, UserError
from optimized_sd.memory import ram, report
from optimized_sd.memory.planner import SAFETY_MARGIN, Request, parse_bytes
from optimized_sd.memory.ram import CUDA_PROCESS_OVERHEAD, HostPart, parse_ram_budget, plan_host
from optimized_sd.memory.ring import CpuTransfer, PinnedRing, RingClosed
from optimized_sd.pipelines import memory_session
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
    assert pipe.memory.ram_budget == 64 * 2**30 and pipe.load_options.ram_budget == "64GB"
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


# -- the pinned ring, on the CPU through its seam ---------------------------------------------------------------------

WAIT = 5.0  # seconds: any wait in these tests that takes longer is a hang


class FakeEvent:
    """A copy's event the test completes by hand."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def query(self) -> bool:
        return self.done.is_set()


class CountingTransfer(CpuTransfer):
    """Plain slots, counted; copies complete when the test says (`events`)."""

    def __init__(self, manual: bool = False) -> None:
        self.allocations = 0
        self.manual = manual
        self.events: list[FakeEvent] = []

    def allocate(self, nbytes: int) -> torch.Tensor:
        self.allocations += 1
        return super().allocate(nbytes)

    def to_device(self, host: torch.Tensor, device: torch.device):
        copy, done = super().to_device(host, device)
        if not self.manual:
            return copy, done
        self.events.append(FakeEvent())
        return copy, self.events[-1]


UNITS = [f"unit{i}" for i in range(5)]
SLOT = 64


def pattern(unit: str) -> torch.Tensor:
    return torch.arange(SLOT, dtype=torch.uint8) ^ UNITS.index(unit)


def make_ring(transfer, slots: int = 2, fill=None, **options) -> tuple[PinnedRing, list[str]]:
    filled: list[str] = []

    def write(unit: str, buffer: torch.Tensor) -> None:
        buffer.copy_(pattern(unit))
        filled.append(unit)

    return PinnedRing(UNITS, fill or write, slot_bytes=SLOT, slots=slots, transfer=transfer, take_timeout=WAIT, **options), filled


def take_copy(ring: PinnedRing, unit: str) -> torch.Tensor:
    slot = ring.take(unit)
    assert slot.buffer is not None
    copy, event = ring.transfer.to_device(slot.buffer, torch.device("cpu"))
    ring.give_back(slot, event)
    return copy


def test_every_unit_arrives_intact_and_in_order_within_the_bound():
    transfer = CountingTransfer()
    ring, filled = make_ring(transfer, slots=3)
    try:
        for _ in range(4):  # four steps over the five units
            for unit in UNITS:
                assert torch.equal(take_copy(ring, unit), pattern(unit))
        assert transfer.allocations <= 3 and ring.allocated_bytes <= ring.capacity == 3 * SLOT
        assert filled[: 4 * len(UNITS)] == UNITS * 4  # read once each, in the order they run
    finally:
        ring.close()
    assert not ring.reader_alive


def test_a_slot_is_reused_only_after_its_copy_completes():
    transfer = CountingTransfer(manual=True)
    ring, filled = make_ring(transfer, slots=2)
    try:
        first = ring.take("unit0")
        ring.give_back(first, first_event := FakeEvent())
        second = ring.take("unit1")
        ring.give_back(second, FakeEvent())
        time.sleep(0.05)
        assert filled == ["unit0", "unit1"]  # both slots wait on copies: nothing more is read
        ring.take_timeout = 0.1
        with pytest.raises(RingClosed, match="not read within"):
            ring.take("unit2")
        ring.take_timeout = WAIT
        first_event.done.set()
        third = ring.take("unit2")
        assert third is first and torch.equal(third.buffer, pattern("unit2"))  # the slot whose copy finished
        assert transfer.allocations == 2
    finally:
        ring.close()


def test_a_unit_asked_out_of_order_starts_the_reading_there():
    ring, filled = make_ring(CountingTransfer(), slots=2)
    try:
        assert torch.equal(take_copy(ring, "unit0"), pattern("unit0"))
        assert torch.equal(take_copy(ring, "unit3"), pattern("unit3"))  # a call cut short; the next starts elsewhere
        assert torch.equal(take_copy(ring, "unit4"), pattern("unit4"))
        assert torch.equal(take_copy(ring, "unit0"), pattern("unit0"))
    finally:
        ring.close()


def test_the_reader_stops_on_close_and_a_waiting_take_is_told():
    ring, _ = make_ring(CountingTransfer(manual=True), slots=2)
    ring.take("unit0")
    errors: list[BaseException] = []

    def wait_for_unit1_and_2() -> None:
        try:
            ring.take("unit1")
            ring.take("unit2")  # never read: both slots are held
        except RingClosed as error:
            errors.append(error)

    waiter = threading.Thread(target=wait_for_unit1_and_2)
    waiter.start()
    time.sleep(0.05)
    ring.close()
    waiter.join(WAIT)
    assert not waiter.is_alive() and not ring.reader_alive
    assert len(errors) == 1 and "closed" in str(errors[0])


def test_the_reader_stops_on_an_error_which_the_next_take_raises():
    def failing(unit: str, buffer: torch.Tensor) -> None:
        if unit == "unit2":
            raise OSError("Input/output error")
        buffer.copy_(pattern(unit))

    ring, _ = make_ring(CountingTransfer(), slots=2, fill=failing)
    try:
        take_copy(ring, "unit0")
        take_copy(ring, "unit1")
        with pytest.raises(RingClosed, match="reading unit2 ahead failed: Input/output error"):
            ring.take("unit2")
        ring._thread.join(WAIT)
        assert not ring.reader_alive
    finally:
        ring.close()


@pytest.fixture
def ring_on_the_cpu(monkeypatch):
    """The planner offers the ring on the CPU too (its copies are plain ones there), at most 3 slots' worth."""
    monkeypatch.setattr(memory_session, "RING_DEVICES", frozenset({"cuda", "cpu"}))


def test_a_ring_streamed_run_gives_full_s_images(tiny_model, ring_on_the_cpu, monkeypatch):
    options = dict(tokenizer=tiny_model.tokenizer, device="cpu", precision="full")
    asked = GenerationRequest(prompts=["a red cube", "a blue ball"], steps=3, sampler="euler", seed=7, height=64, width=64)
    full = optimized_sd.load(tiny_model.safetensors, memory="full", **options).generate(asked)
    pipe = optimized_sd.load(tiny_model.safetensors, memory="stream", ram_budget="64GB", **options)
    unit = max(pipe.memory.sizes.unet_blocks)
    monkeypatch.setattr(ram, "RING_MAX_BYTES", 3 * unit)
    result = pipe.generate(asked)
    engine = pipe.engine
    assert pipe.memory.host_plan is not None and pipe.memory.host_plan.homes["denoiser"] == "ring"
    assert engine.ring is not None and len(engine.ring.slots) <= 3
    assert engine.ring.allocated_bytes <= engine.ring.capacity
    assert (result.latents - full.latents).abs().max().item() <= 1e-5
    assert [image.tobytes() for image in result.images] == [image.tobytes() for image in full.images]
    ring_before = engine.ring
    pipe.close()
    assert not ring_before.reader_alive


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the ring's pinned slots and CUDA events need a GPU")
def test_on_cuda_the_ring_streams_the_denoiser_with_full_s_images(tiny_model):
    """The real path: pinned slots, non-blocking copies on the copy stream, slots returned by their CUDA events."""
    options = dict(tokenizer=tiny_model.tokenizer, device="cuda", precision="fp16")
    asked = GenerationRequest(prompts=["a red cube", "a blue ball"], steps=3, sampler="euler", seed=7, height=64, width=64)
    full = optimized_sd.load(tiny_model.safetensors, memory="full", **options).generate(asked)
    unit = tiny_sizes(tiny_model)["unit"]
    budget = CUDA_PROCESS_OVERHEAD + int(3 * unit / ram.PINNED_SHARE) + 1  # room for the ring only
    pipe = optimized_sd.load(tiny_model.safetensors, memory="stream", ram_budget=budget, **options)
    result = pipe.generate(asked)
    assert pipe.memory.host_plan is not None and pipe.memory.host_plan.homes["denoiser"] == "ring"
    assert pipe.engine.ring is not None and pipe.engine.ring.allocated_bytes <= 3 * unit + 3 * 128 * 64
    assert pipe.memory.meter.records[-1].pinned_mib > 0
    assert (result.latents.float() - full.latents.float()).abs().max().item() <= 1e-3
    pipe.close()
