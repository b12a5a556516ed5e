"""Z-Image served: the API's txt2img gives the Python API's image, without CFG (cfg_scale 0, Turbo's default) and
with it (cfg_scale as diffusers' guidance_scale), and says the model in its infotext. A request that leaves steps,
cfg_scale or the size out gets Turbo's (8 steps, no CFG, 1024 px), not AUTOMATIC1111's 50/7/512; an SD model keeps those."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
from PIL import Image

from optimized_sd.pipelines.diffusion import GenerationRequest
from tests.server.conftest import post, running_server

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.zimage_models import build

    return build(tmp_path_factory.mktemp("zimage"))


def zimage_options(tiny) -> dict:
    return {"text_encoders": (tiny.files["qwen"],), "vae": tiny.files["vae"], "precision": "full"}


@pytest.fixture(scope="module")
def zimage_server(tiny, tmp_path_factory):
    models = tmp_path_factory.mktemp("zimage-models")
    shutil.copy(tiny.files["transformer"], models / "z_image_turbo.safetensors")
    with running_server(models, tiny.tokenizer, **zimage_options(tiny)) as server:
        yield server


def served(server, **fields) -> tuple[Image.Image, dict, dict]:
    """(image, info, parameters) of a txt2img call with `fields`."""
    from tests.zimage_models import PROMPT

    response = post(server, "txt2img", json={"prompt": PROMPT, "seed": 42, "sampler_name": "Euler", **fields})
    assert response.status_code == 200, response.text
    payload = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(payload["images"][0]))).convert("RGB")
    return image, json.loads(payload["info"]), payload["parameters"]


def test_served_images_equal_the_python_apis(tiny, zimage_server):
    import optimized_sd
    from tests.zimage_models import PROMPT, SIZE

    pipe = optimized_sd.load(tiny.files["transformer"], device="cpu", tokenizer=tiny.tokenizer, **zimage_options(tiny))
    try:
        expected = {scale: pipe.generate(GenerationRequest(prompts=[PROMPT], seed=42, steps=2, scale=scale, sampler="euler",
                                                           height=SIZE[0], width=SIZE[1])).images[0].convert("RGB")
                    for scale in (0.0, 1.5)}  # fmt: skip
    finally:
        pipe.close()
    assert expected[0.0].tobytes() != expected[1.5].tobytes()
    for scale, image in expected.items():
        got, info, _ = served(zimage_server, steps=2, cfg_scale=scale, height=SIZE[0], width=SIZE[1])
        assert got.tobytes() == image.tobytes()
        assert f"CFG scale: {scale:g}," in info["infotexts"][0]


def test_left_out_steps_and_cfg_scale_are_turbos_not_automatic1111s(zimage_server):
    from tests.zimage_models import SIZE

    _, info, parameters = served(zimage_server, height=SIZE[0], width=SIZE[1])
    assert (info["steps"], info["cfg_scale"]) == (8, 0.0)
    assert "Steps: 8," in info["infotexts"][0] and "CFG scale: 0," in info["infotexts"][0]
    assert (parameters["steps"], parameters["cfg_scale"]) == (8, 0.0)  # what ran, not the request model's 50 and 7
    _, info, parameters = served(zimage_server, steps=2, cfg_scale=1.5, height=SIZE[0], width=SIZE[1])
    assert (info["steps"], info["cfg_scale"], parameters["cfg_scale"]) == (2, 1.5, 1.5)  # given: kept


def test_a_left_out_size_is_the_familys_and_sd_keeps_automatic1111s(zimage_server, server):
    from optimized_sd.server.backend import FAMILY_DEFAULTED, GenerationSpec

    every = GenerationSpec(prompt="a", defaulted=frozenset(FAMILY_DEFAULTED))
    turbo = zimage_server.service.backend.with_family_defaults(every)
    assert (turbo.steps, turbo.cfg_scale, turbo.width, turbo.height) == (8, 0.0, 1024, 1024)
    some = zimage_server.service.backend.with_family_defaults(GenerationSpec(prompt="a", width=320, defaulted=frozenset({"height"})))
    assert (some.width, some.height, some.steps, some.cfg_scale) == (320, 1024, 20, 7.0)
    assert server.service.backend.with_family_defaults(every) == every  # SD: AUTOMATIC1111's, as its clients expect


def test_the_ui_starts_at_the_loaded_familys_defaults_and_cfg_reaches_0(zimage_server, server):
    pytest.importorskip("gradio")
    from optimized_sd.server.ui import A1111_UI_DEFAULTS, WebUI

    for service, wanted in ((zimage_server.service, {"steps": 8, "cfg_scale": 0.0, "width": 1024, "height": 1024}),
                            (server.service, A1111_UI_DEFAULTS)):  # fmt: skip
        ui = WebUI(service)
        ui.build()
        assert [(name, slider.value) for name, slider in ui.defaulted_sliders] == list(wanted.items()) * 3
        assert all(slider.minimum == 0 for name, slider in ui.defaulted_sliders if name == "cfg_scale")  # Turbo's "off" is offered
        assert [update["value"] for update in ui.family_values()] == list(wanted.values()) * 3  # what a model switch sets


def test_cfg_options_are_api_fields(zimage_server):
    from tests.server.test_api import detail_fields
    from tests.zimage_models import SIZE

    _, info, _ = served(zimage_server, steps=2, cfg_scale=1.5, cfg_truncation=0.5, cfg_normalization=1.0, height=SIZE[0], width=SIZE[1])
    assert "CFG normalization: 1, CFG truncation: 0.5" in info["infotexts"][0]
    refused = post(zimage_server, "txt2img", json={"prompt": "x", "steps": 1, "height": SIZE[0], "width": SIZE[1], "cfg_truncation": 2})
    assert refused.status_code == 422 and detail_fields(refused) == ["cfg_truncation"], refused.text
