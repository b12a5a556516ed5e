"""Hardening of API requests (issue 25, third round): numbers out of range (1e308, NaN, a mask blur that
crashed Pillow) are a 422 naming the AUTOMATIC1111 field, an image PIL cannot decode too, and a model
that samples NaN answers an error instead of a black image; after each the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import math

import pytest
import requests
import torch
from PIL import Image

from tests.server.conftest import TIMEOUT, post
from tests.test_hardening_io import unknown_dds

SIZE = 64


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def inpaint_body() -> dict:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    init = Image.new("RGB", (SIZE, SIZE), (120, 60, 30))
    return {"prompt": "x", "steps": 2, "width": SIZE, "height": SIZE, "init_images": [b64_png(init)], "mask": b64_png(mask),
            "inpainting_fill": 1}  # fmt: skip


def post_raw(server, path: str, body: dict) -> requests.Response:
    """POST with Python's JSON (NaN and Infinity written as such, as some clients do)."""
    data = json.dumps(body, allow_nan=True)
    return requests.post(f"{server.url}/sdapi/v1/{path}", data=data, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)


def assert_field_error(response: requests.Response, field: str, needle: str) -> None:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert [item["loc"][-1] for item in detail] == [field], response.text
    assert needle in detail[0]["msg"], response.text


def still_serving(server) -> None:
    response = post(server, "txt2img", json={"prompt": "after", "steps": 2, "width": SIZE, "height": SIZE})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "change", "field", "needle"),
    [
        ("txt2img", {"cfg_scale": 1e308}, "cfg_scale", "cfg_scale must be from -1000 to 1000"),
        ("txt2img", {"cfg_scale": math.nan}, "cfg_scale", "cfg_scale must be a finite number"),
        ("txt2img", {"cfg_scale": math.inf}, "cfg_scale", "cfg_scale must be a finite number"),
        ("txt2img", {"steps": 10**9}, "steps", "steps must be at least 1 (at most 1000)"),
        ("txt2img", {"sampler_name": "DDIM", "eta": math.nan}, "eta", "eta must be a finite number"),
        ("img2img", {"mask_blur": 10**30}, "mask_blur", "mask_blur must be 0 or more (at most 10000)"),
        ("img2img", {"mask_blur": 3_000_000_000}, "mask_blur", "mask_blur must be 0 or more"),
        ("img2img", {"inpaint_full_res_padding": 10**9}, "inpaint_full_res_padding", "inpaint_full_res_padding must be 0 or more"),
        ("img2img", {"denoising_strength": math.nan}, "denoising_strength", "denoising_strength must be a finite number"),
        ("img2img", {"denoising_strength": 2.0}, "denoising_strength", "denoising_strength must be from 0 to 1"),
    ],
)
def test_numbers_out_of_range_are_a_422_naming_the_field(server, path, change, field, needle):
    body = inpaint_body() if path == "img2img" else {"prompt": "x", "steps": 2, "width": SIZE, "height": SIZE}
    assert_field_error(post_raw(server, path, {**body, **change}), field, needle)
    still_serving(server)


@pytest.mark.parametrize("field", ["mask", "init_images"])
def test_a_dds_image_is_a_422_naming_the_field(server, tmp_path, field):
    dds = tmp_path / "image.dds"
    unknown_dds(dds)  # PIL raises NotImplementedError decoding it
    encoded = base64.b64encode(dds.read_bytes()).decode()
    body = {**inpaint_body(), field: [encoded] if field == "init_images" else encoded}
    assert_field_error(post(server, "img2img", json=body), field, "is not an image this server can read")
    still_serving(server)


def test_a_model_that_samples_nan_answers_an_error_and_keeps_serving(server, monkeypatch):
    from optimized_sd.pipelines import core

    real = core.denoise

    def nan_latents(*args, **kwargs):
        return torch.full_like(real(*args, **kwargs), math.nan)

    monkeypatch.setattr(core, "denoise", nan_latents)
    response = post(server, "txt2img", json={"prompt": "nan", "steps": 2, "width": SIZE, "height": SIZE})
    assert response.status_code == 422, response.text
    assert "sampling produced non-finite latents (NaN/inf)" in response.json()["detail"] and "Traceback" not in response.text
    monkeypatch.undo()
    still_serving(server)
