"""sd-webui-controlnet's API: units in `alwayson_scripts` giving the Python API's images (txt2img, and img2img
with the init image as the control image), its three listing routes, bad unit fields 422 naming the field
(a model given as a path among them) while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from optimized_sd.pipelines.controlnet import ControlNetSpec
from optimized_sd.pipelines.diffusion import GenerationRequest
from tests.server.conftest import TIMEOUT, post
from tests.test_controlnet import control_image, write_controlnet

GOOD = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def controlnet(server, tiny_model, tmp_path_factory) -> Iterator[Path]:
    """A tiny ControlNet in the served models folder's ControlNet/ (taken out again after the module)."""
    folder = server.models_dir / "ControlNet"
    folder.mkdir()
    written = write_controlnet(tiny_model.unet, tmp_path_factory.mktemp("cn-api"), 7).original
    path = Path(shutil.copy(written, folder / "tiny-control.safetensors"))
    yield path
    shutil.rmtree(folder)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def get(server, path: str) -> requests.Response:
    return requests.get(f"{server.url}{path}", timeout=TIMEOUT)


def assert_close(got: np.ndarray, expected: Image.Image) -> None:
    """Equal but for rounding (one level: the ControlNet's residuals add in another order across memory placements)."""
    assert np.abs(got.astype(int) - np.asarray(expected, dtype=int)).max() <= 1


def image_of(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))


UNIT = {"enabled": True, "model": "tiny-control", "weight": 0.8, "guidance_start": 0.2, "guidance_end": 1.0, "module": "canny",
        "threshold_a": 50, "threshold_b": 150, "control_mode": "My prompt is more important", "resize_mode": "Just Resize",
        "processor_res": 512, "pixel_perfect": False}  # fmt: skip


def test_listings(server, controlnet):
    [title] = get(server, "/controlnet/model_list").json()["model_list"]
    assert title.startswith("tiny-control [") and len(title) == len("tiny-control [12345678]")
    assert get(server, "/controlnet/module_list").json() == {"module_list": ["none", "invert (from white bg & black line)", "canny"]}
    assert get(server, "/controlnet/version").json() == {"version": 2}
    assert "tiny-control" not in json.dumps(get(server, "/sdapi/v1/sd-models").json())  # a ControlNet is no checkpoint


def test_txt2img_with_a_unit_equals_the_python_api(server, reference_pipe, controlnet):
    hint = control_image(3)
    title = get(server, "/controlnet/model_list").json()["model_list"][0]
    skipped = {"enabled": False, "model": "gone"}
    units = [skipped, {**UNIT, "model": title, "image": b64(hint)}]
    response = post(server, "txt2img", json={**GOOD, "alwayson_scripts": {"ControlNet": {"args": units}}})
    got = image_of(response)
    spec = ControlNetSpec(controlnet, hint, 0.8, 0.2, 1.0, "prompt", "resize", "canny", 50, 150)
    request = GenerationRequest(["a red cube"], steps=2, scale=7.0, sampler="euler", seed=5, height=64, width=64, controlnets=(spec,))
    assert_close(got, reference_pipe.generate(request).images[0])
    assert not np.array_equal(got, image_of(post(server, "txt2img", json=GOOD)))  # the unit is felt
    assert 'ControlNet 0: "Module: canny, Model: ' in json.loads(response.json()["info"])["infotexts"][0]


def test_img2img_takes_the_init_image_as_the_control_image(server, reference_pipe, controlnet):
    init = control_image(4)
    unit = {"model": "tiny-control", "control_mode": 2, "resize_mode": 1}
    body = {**GOOD, "init_images": [b64(init)], "denoising_strength": 0.8, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    got = image_of(post(server, "img2img", json=body))
    spec = ControlNetSpec(controlnet, init, mode="controlnet", resize="crop")
    request = GenerationRequest(["a red cube"], steps=2, scale=7.0, sampler="euler", seed=5, height=64, width=64, init_image=init,
                                strength=0.8, controlnets=(spec,))  # fmt: skip
    assert_close(got, reference_pipe.generate(request).images[0])


def test_webuiapi_units_work_and_no_image_on_img2img_is_the_init_image(server, reference_pipe, controlnet):
    webuiapi = pytest.importorskip("webuiapi")
    init = control_image(4)
    client = webuiapi.WebUIApi(host=server.host, port=server.port, sampler="Euler", steps=2)
    unit = webuiapi.ControlNetUnit(model="tiny-control [00000000]", module="invert (from white bg & black line)", weight=0.9)
    result = client.img2img(images=[init], prompt="a red cube", seed=5, width=64, height=64, cfg_scale=7.0, denoising_strength=0.8,
                            controlnet_units=[unit])  # fmt: skip
    spec = ControlNetSpec(controlnet, init, 0.9, resize="fill", preprocessor="invert")
    request = GenerationRequest(["a red cube"], steps=2, scale=7.0, sampler="euler", seed=5, height=64, width=64, init_image=init,
                                strength=0.8, controlnets=(spec,))  # fmt: skip
    assert_close(np.asarray(result.image.convert("RGB")), reference_pipe.generate(request).images[0])


@pytest.mark.parametrize(
    "unit, named",
    [
        ({"weight": "heavy"}, "alwayson_scripts.controlnet.args[0].weight"),
        ({"weight": 11}, "alwayson_scripts.controlnet.args[0].weight"),
        ({"guidance_start": 0.9, "guidance_end": 0.5}, "alwayson_scripts.controlnet.args[0].guidance_start"),
        ({"control_mode": "Loud"}, "alwayson_scripts.controlnet.args[0].control_mode"),
        ({"resize_mode": 7}, "alwayson_scripts.controlnet.args[0].resize_mode"),
        ({"module": "depth_midas"}, "alwayson_scripts.controlnet.args[0].module"),
        ({"threshold_a": 250}, "alwayson_scripts.controlnet.args[0].threshold_a"),
        ({"model": "../ControlNet/tiny-control"}, "alwayson_scripts.controlnet.args[0].model"),
        ({"model": "ControlNet/tiny-control.safetensors"}, "alwayson_scripts.controlnet.args[0].model"),
        ({"model": "gone"}, "alwayson_scripts.controlnet.args[0].model"),
        ({"image": "not base64!"}, "alwayson_scripts.controlnet.args[0].image"),
        ({"image": None}, "alwayson_scripts.controlnet.args[0].image"),
        ({"image": ""}, "alwayson_scripts.controlnet.args[0].image"),
        ({"mask": "abc"}, "alwayson_scripts.controlnet.args[0].mask"),
    ],
)
def test_bad_unit_fields_get_422_naming_the_field(server, controlnet, unit, named):
    body = {**GOOD, "alwayson_scripts": {"controlnet": {"args": [{**UNIT, "image": b64(control_image(3)), **unit}]}}}
    response = post(server, "txt2img", json=body)
    assert response.status_code == 422, response.text
    assert [entry["loc"][-1] for entry in response.json()["detail"]] == [named]
    assert get(server, "/controlnet/version").status_code == 200  # still serving


@pytest.mark.parametrize(
    "scripts, named",
    [
        ({"ADetailer": {"args": []}}, "alwayson_scripts.ADetailer"),
        ({"controlnet": {"args": "x"}}, "alwayson_scripts.controlnet.args"),
        ({"controlnet": {"args": [3]}}, "alwayson_scripts.controlnet.args[0]"),
    ],
)
def test_other_scripts_and_malformed_args_are_refused(server, scripts, named):
    response = post(server, "txt2img", json={**GOOD, "alwayson_scripts": scripts})
    assert response.status_code == 422 and [entry["loc"][-1] for entry in response.json()["detail"]] == [named], response.text


def test_each_ui_tab_has_a_controlnet_section_that_makes_the_unit(server, controlnet):
    pytest.importorskip("gradio")
    from optimized_sd.errors import UserError
    from optimized_sd.server.ui import WebUI

    blocks = WebUI(server.service).build()
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    parts = ("controlnet", "control-image", "control-model", "control-weight", "control-start", "control-end", "control-mode",
             "control-preprocessor")  # fmt: skip
    assert {f"{task}-{part}" for task in ("txt2img", "img2img", "inpaint") for part in parts} <= ids
    [picker] = [block for block in blocks.blocks.values() if getattr(block, "elem_id", None) == "txt2img-control-model"]
    assert [choice[1] for choice in picker.choices] == ["None", "tiny-control"]
    hint, init = control_image(3), control_image(4)
    values = {
        "prompt": "p", "negative_prompt": "", "sampler": "euler", "karras": False, "steps": 4, "cfg_scale": 6, "seed": 5,
        "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "memory": "server default", "vram_budget": "",
        "control_image": hint, "control_model": "tiny-control", "control_weight": 0.7, "control_start": 0.1, "control_end": 0.9,
        "control_mode": "prompt", "control_preprocessor": "canny",
    }  # fmt: skip
    catalog = server.service.backend.catalog
    spec = WebUI.spec_from("txt2img", values, catalog)
    assert spec.controlnets == (ControlNetSpec(controlnet, hint, 0.7, 0.1, 0.9, "prompt", preprocessor="canny"),)
    assert WebUI.spec_from("txt2img", {**values, "control_model": "None"}, catalog).controlnets == ()
    from_init = WebUI.spec_from("img2img", {**values, "control_image": None, "image": init}, catalog)
    assert from_init.controlnets[0].image is init
    with pytest.raises(UserError, match="ControlNet needs a control image"):
        WebUI.spec_from("txt2img", {**values, "control_image": None}, catalog)
    with pytest.raises(UserError, match="'gone' is not in the ControlNet folder"):
        WebUI.spec_from("txt2img", {**values, "control_model": "gone"}, catalog)
