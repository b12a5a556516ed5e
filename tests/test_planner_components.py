"""The planner weighs components, not SD stages: a side network or an extra text tower defined here, in a test
module, changes the device plan and the RAM plan through its `ComponentSize` alone (no planner field)."""

from __future__ import annotations

from torch import nn

import optimized_sd
from optimized_sd.memory.planner import (
    FIXED_OVERHEAD,
    ComponentSize,
    DecodeActivations,
    DenoiserActivations,
    EncodeActivations,
    ModelFootprint,
    Request,
    SideActivations,
    estimate_peak,
    resident_component,
)
from optimized_sd.pipelines.placement import Component

STUB_WEIGHTS, STUB_UNIT, STUB_SHARE = 10**9, 10**8, 0.3
MIB = 2**20


def stub_component(name: str, size: ComponentSize) -> Component:
    """A network of its own tree that the session plans but that no call here places."""
    return Component(name, nn.Linear(2, 2), None, lambda row: [], {size.name: size})


def stub_side() -> Component:
    units = (STUB_UNIT,) * (STUB_WEIGHTS // STUB_UNIT)
    return stub_component("stub", ComponentSize("stub", STUB_WEIGHTS, ("denoise",), units, activations=SideActivations(STUB_SHARE)))


def test_a_side_network_changes_the_plan_through_its_component(tiny_model):
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", precision="full")
    session, request = pipe.memory, Request(64, 64, dtype_bytes=4)
    alone = session.planned(request, None).estimates
    budget = alone["stream"] + 2 * STUB_UNIT  # every mode fits without the stub; with it only its streamed units do
    assert session.planned(request, budget).mode == "full"
    session.attach(stub_side())
    sized = session.planned(request, None).estimates
    # whole beside a resident or halved denoiser, one unit at a time where it streams; its activations beside the UNet's
    assert all(sized[mode] > STUB_WEIGHTS for mode in ("full", "turbo", "split"))
    assert STUB_UNIT < sized["stream"] < STUB_WEIGHTS
    assert [c.name for c in session.call_components()][-2:] == ["stub", "tiny_decoder"]
    plan = session.planned(request, budget)
    assert plan.mode == "stream"
    # the RAM planner sees it as one more host part, stepping down before the denoiser
    assert [part.name for part in session.host_parts(plan)] == ["text_encoder", "vae_encoder", "vae_decoder", "stub", "denoiser"]
    assert session.host_parts(plan)[3].unit == STUB_UNIT
    session.detach("stub")
    assert session.planned(request, None).estimates == alone
    pipe.close()


def test_an_extra_text_tower_weighs_in_the_text_stage(tiny_model):
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", precision="full")
    session, request = pipe.memory, Request(64, 64, dtype_bytes=4)
    tower = 3 * 10**9
    session.attach(stub_component("t5", ComponentSize("t5", tower, ("text",))))
    # the text stage (CLIP and the new tower) is now the peak of every mode that does not keep everything resident
    assert session.planned(request, None).estimates["stream"] == FIXED_OVERHEAD + tower + session.sizes.text_encoder
    assert session.call_sizes().text_encoder == session.sizes.text_encoder + tower
    pipe.close()


def test_the_footprint_view_plans_as_its_components():
    """The SD-shaped view (reports, figures-only tests) gives the estimates of the components it came from."""
    parts = [
        ComponentSize("denoiser", 1_600 * MIB, ("denoise",), (100 * MIB,) * 16, (800 * MIB, 800 * MIB), True, DenoiserActivations()),
        ComponentSize("vae_encoder", 70 * MIB, ("encode",), activations=EncodeActivations()),
        ComponentSize("vae_decoder", 90 * MIB, ("decode",), activations=DecodeActivations()),
        ComponentSize("text", 250 * MIB, ("text",)),
        ComponentSize("side", 700 * MIB, ("denoise",), (70 * MIB,) * 10, activations=SideActivations(0.45)),
        resident_component("tiny_decoder", 5 * MIB),
    ]
    view = ModelFootprint.of(parts)
    figures = (view.unet, view.text_encoder, view.side, view.side_unit, view.tiny_decoder)
    assert figures == (1_600 * MIB, 250 * MIB, 700 * MIB, 70 * MIB, 5 * MIB)
    requests = [Request(512, 512), Request(1024, 1024, batch=2, encodes_image=True), Request(768, 768, tiny_decode=True, previews=True)]
    for mode in ("full", "turbo", "split", "stream"):
        for request in requests:
            assert estimate_peak(mode, view, request, False) == estimate_peak(mode, parts, request, False)
