"""An SDXL refiner through the AUTOMATIC1111-compatible API (`refiner_checkpoint`, `refiner_switch_at`)
and the web UI's form: the same image as the Python API, and each mistake named by its field."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from optimized_sd.pipelines.diffusion import GenerationRequest
from tests.server.conftest import post, running_server

SIZE = 64
REQUEST = {"prompt": "a red cube", "seed": 5, "steps": 4, "width": SIZE, "height": SIZE, "sampler_name": "Euler", "cfg_scale": 6}


@pytest.fixture(scope="module")
def sdxl_server(tiny_sdxl, tiny_refiner, tmp_path_factory):
    """A server whose model list holds an SDXL base (loaded) and an SDXL refiner."""
    folder = tmp_path_factory.mktemp("sdxl-models")
    shutil.copy(tiny_sdxl.files["real"], folder / "a-base.safetensors")
    shutil.copy(tiny_refiner.files["real"], folder / "b-refiner.safetensors")
    with running_server(folder, tiny_sdxl.tokenizer) as running:
        yield running


def test_the_api_runs_the_refiner_as_the_python_api_does(sdxl_server, tiny_sdxl, tiny_refiner):
    import optimized_sd

    response = post(sdxl_server, "txt2img", json={**REQUEST, "refiner_checkpoint": "b-refiner.safetensors", "refiner_switch_at": 0.5})
    assert response.status_code == 200, response.text
    body = response.json()
    info = body["info"]
    assert "Refiner: b-refiner [" in info and "Refiner switch at: 0.5" in info
    stages = json.loads(info)["memory"]["stages"]
    assert {"unet", "refiner_unet", "refiner_vae_decode"} <= set(stages)  # one report for both models
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB"))
    pipe = optimized_sd.load(sdxl_server.models_dir / "a-base.safetensors", device="cpu", tokenizer=tiny_sdxl.tokenizer)
    try:
        expected = pipe.generate(
            GenerationRequest(
                prompts=["a red cube"], steps=4, scale=6.0, sampler="euler", seed=5, height=SIZE, width=SIZE,
                refiner=sdxl_server.models_dir / "b-refiner.safetensors", refiner_switch=0.5,
            )
        ).images[0]
    finally:
        pipe.close()
    assert np.array_equal(got, np.asarray(expected.convert("RGB")))
    plain = post(sdxl_server, "txt2img", json={**REQUEST, "refiner_checkpoint": "None"})
    assert plain.status_code == 200 and "Refiner" not in plain.json()["info"]


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"refiner_checkpoint": "missing.safetensors"}, "refiner_checkpoint", "not found"),
        ({"refiner_checkpoint": "b-refiner.safetensors", "refiner_switch_at": 1.5}, "refiner_switch_at", "between 0 and 1"),
    ],
)
def test_a_bad_refiner_field_is_named(sdxl_server, fields, field, words):
    response = post(sdxl_server, "txt2img", json={**REQUEST, **fields})
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", field] and words in detail["msg"]


def test_a_refiner_that_is_not_one_is_refused_and_the_server_keeps_serving(sdxl_server):
    response = post(sdxl_server, "txt2img", json={**REQUEST, "refiner_checkpoint": "a-base.safetensors"})
    assert response.status_code == 422
    detail = response.json()["detail"][0]  # the refiner field, in the API's words
    assert detail["loc"] == ["body", "refiner_checkpoint"] and "not an SDXL refiner" in detail["msg"]
    assert post(sdxl_server, "txt2img", json=REQUEST).status_code == 200


def test_the_web_form_names_the_refiner_by_its_title(sdxl_server):
    pytest.importorskip("gradio")
    from optimized_sd.errors import UserError
    from optimized_sd.server.ui import NO_REFINER, WebUI

    catalog = sdxl_server.service.backend.catalog
    values = {
        "prompt": "p", "negative_prompt": "", "sampler": "euler", "karras": False, "steps": 4, "cfg_scale": 6, "seed": 5,
        "width": SIZE, "height": SIZE, "batch_size": 1, "n_iter": 1, "memory": "server default", "vram_budget": "",
        "refiner": "b-refiner.safetensors", "refiner_switch": 0.6,
    }
    spec = WebUI.spec_from("txt2img", values, catalog)
    assert spec.refiner == Path(sdxl_server.models_dir / "b-refiner.safetensors") and spec.refiner_switch == 0.6
    assert WebUI.spec_from("txt2img", {**values, "refiner": NO_REFINER}, catalog).refiner is None
    with pytest.raises(UserError, match="not in the model list"):
        WebUI.spec_from("txt2img", {**values, "refiner": "gone.safetensors"}, catalog)
