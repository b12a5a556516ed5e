"""The hires fix through AUTOMATIC1111's API: its fields (422 naming a bad one), a small 64 -> 128 request equal
to the Python API's, and the two listings its clients read the upscaler names from."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.hires import HiresFix
from tests.server.conftest import TIMEOUT, post

GOOD = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler"}


def detail_fields(response: requests.Response) -> list[str]:
    return [entry["loc"][-1] for entry in response.json()["detail"]]


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"hr_scale": 0.5}, "hr_scale"),
        ({"hr_scale": 80}, "hr_scale"),  # 64 x 80 = 5120 pixels a side, over the server's 4096
        ({"hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
        ({"denoising_strength": 2}, "denoising_strength"),
        ({"hr_second_pass_steps": -1}, "hr_second_pass_steps"),
        ({"hr_resize_x": 100, "hr_resize_y": 128}, "hr_resize_x"),
        ({"hr_resize_x": 8192, "hr_resize_y": 8192}, "hr_resize_x"),
        ({"hr_sampler_name": "Euler z"}, "hr_sampler_name"),
    ],
)
def test_bad_hires_fields_get_422_naming_the_field(server, fields, named):
    response = post(server, "txt2img", json={**GOOD, "enable_hr": True, **fields})
    assert response.status_code == 422 and detail_fields(response) == [named], response.text


def test_a_small_hires_request_equals_the_python_api(server, reference_pipe):
    body = {**GOOD, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent (nearest)", "hr_second_pass_steps": 2,
            "denoising_strength": 0.5}  # fmt: skip
    response = post(server, "txt2img", json=body)
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert image.size == (128, 128)
    info = json.loads(response.json()["info"])
    assert info["denoising_strength"] == 0.5
    assert info["infotexts"][0].endswith("Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (nearest)")
    hires = HiresFix(scale=2, upscaler="latent-nearest", steps=2, strength=0.5)
    expected = reference_pipe.generate(GenerationRequest(prompts=["a red cube"], steps=2, scale=7.0, sampler="euler", seed=5,
                                                         height=64, width=64, hires=hires))  # fmt: skip
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.images[0]))
    ignored = post(server, "txt2img", json={**GOOD, "hr_scale": 2})  # without enable_hr, as AUTOMATIC1111
    assert Image.open(io.BytesIO(base64.b64decode(ignored.json()["images"][0]))).size == (64, 64)


def test_the_upscaler_listings(server):
    upscalers = requests.get(f"{server.url}/sdapi/v1/upscalers", timeout=TIMEOUT).json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
    assert upscalers[1] == {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    modes = requests.get(f"{server.url}/sdapi/v1/latent-upscale-modes", timeout=TIMEOUT).json()
    assert [m["name"] for m in modes] == ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                                          "Latent (nearest)", "Latent (nearest-exact)"]  # fmt: skip


def test_the_ui_has_a_small_hires_section_on_txt2img_that_makes_the_spec(server):
    pytest.importorskip("gradio")
    from optimized_sd.server.ui import WebUI

    blocks = WebUI(server.service).build()
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    assert {"txt2img-enable-hr", "txt2img-hr-upscaler", "txt2img-hr-scale", "txt2img-hr-steps", "txt2img-hr-strength"} <= ids
    assert "img2img-enable-hr" not in ids
    values = {
        "prompt": "p", "negative_prompt": "", "sampler": "euler", "karras": False, "steps": 4, "cfg_scale": 6, "seed": 5,
        "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "memory": "server default", "vram_budget": "",
        "refiner": "None", "refiner_switch": 0.8, "enable_hr": True, "hr_upscaler": "lanczos", "hr_scale": 1.5, "hr_steps": 3,
        "hr_strength": 0.4,
    }  # fmt: skip
    assert WebUI.spec_from("txt2img", values).hires == HiresFix(scale=1.5, upscaler="lanczos", steps=3, strength=0.4)
    assert WebUI.spec_from("txt2img", {**values, "enable_hr": False}).hires is None
