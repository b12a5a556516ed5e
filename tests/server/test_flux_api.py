"""Flux.1 dev served: Forge's `distilled_cfg_scale` in the API reaches the pipeline as the request's `guidance`
(the image equals the Python API's), a bad value is a 422 naming that field, and the UI's "Distilled CFG scale"
slider is shown for dev only and sent only then. Batch lines take `guidance` and `max_sequence_length`."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from optimized_sd.batch.jobs import read_jobs
from optimized_sd.errors import UserError
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.job import Job, OutputPolicy
from tests.server.conftest import post, running_server
from tests.server.test_api import detail_fields

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")

PROMPT = "a cat on a dog"
SIZE = (64, 48)  # (H, W) as tests/test_flux_pipeline.py
T5_LENGTH = 12


@pytest.fixture(scope="module")
def tiny_dev(tmp_path_factory):
    from tests.test_flux_pipeline import build

    return build(tmp_path_factory.mktemp("flux") / "dev", "dev")


def flux_options(model) -> dict:
    """The load options that open the tiny dev from its separate files (the server's and the Python API's)."""
    files = model.files
    return {"text_encoders": (files["clip"], files["t5"]), "vae": files["vae"], "precision": "full"}


@pytest.fixture(scope="module")
def flux_server(tiny_dev, tmp_path_factory):
    import shutil

    models = tmp_path_factory.mktemp("flux-models")
    shutil.copy(tiny_dev.files["transformer"], models / "flux1-dev.safetensors")
    with running_server(models, (tiny_dev.clip_tokenizer, tiny_dev.t5_tokenizer), **flux_options(tiny_dev)) as running:
        yield running


def api_image(server, **fields) -> tuple[Image.Image, dict]:
    body = {"prompt": PROMPT, "seed": 42, "steps": 2, "cfg_scale": 1, "sampler_name": "Euler", "height": SIZE[0], "width": SIZE[1],
            **fields}  # fmt: skip
    response = post(server, "txt2img", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    return Image.open(io.BytesIO(base64.b64decode(payload["images"][0]))).convert("RGB"), json.loads(payload["info"])


def test_distilled_cfg_scale_gives_the_python_apis_image(flux_server, tiny_dev):
    import optimized_sd

    pipe = optimized_sd.load(tiny_dev.files["transformer"], device="cpu", tokenizer=(tiny_dev.clip_tokenizer, tiny_dev.t5_tokenizer),
                             **flux_options(tiny_dev))  # fmt: skip
    try:
        request = GenerationRequest(prompts=[PROMPT], seed=42, steps=2, scale=1.0, sampler="euler", height=SIZE[0], width=SIZE[1])
        expected = {guidance: pipe.generate(GenerationRequest(**{**request.__dict__, "guidance": guidance})).images[0].convert("RGB")
                    for guidance in (2.0, 3.5)}  # fmt: skip
    finally:
        pipe.close()
    assert expected[2.0].tobytes() != expected[3.5].tobytes()  # the value shows in the image
    served, info = api_image(flux_server, distilled_cfg_scale=2.0)
    assert served.tobytes() == expected[2.0].tobytes()
    assert "Distilled CFG Scale: 2," in info["infotexts"][0]
    default, _ = api_image(flux_server)  # no field: dev's default, 3.5
    assert default.tobytes() == expected[3.5].tobytes()


@pytest.mark.parametrize("value", [-1.0, 1e9])
def test_a_bad_distilled_cfg_scale_is_a_422_naming_it(flux_server, value):
    response = post(flux_server, "txt2img", json={"prompt": PROMPT, "steps": 1, "height": SIZE[0], "width": SIZE[1],
                                                  "distilled_cfg_scale": value})  # fmt: skip
    assert response.status_code == 422 and detail_fields(response) == ["distilled_cfg_scale"], response.text
    assert response.json()["detail"][0]["msg"].startswith("distilled_cfg_scale must be")


def test_the_ui_shows_and_sends_the_distilled_cfg_scale_for_dev_only(flux_server, server):
    pytest.importorskip("gradio")
    from optimized_sd.server.ui import UI_CONTROLS, WebUI

    assert UI_CONTROLS["guidance"] == "Distilled CFG scale"
    assert flux_server.service.backend.distilled_guidance and not server.service.backend.distilled_guidance
    values = {"prompt": PROMPT, "negative_prompt": "", "sampler": "euler", "karras": False, "steps": 2, "cfg_scale": 1, "seed": 1,
              "width": 48, "height": 64, "batch_size": 1, "n_iter": 1, "memory": None, "vram_budget": "",
              "distilled_cfg_scale": 2.5}  # fmt: skip
    assert WebUI.spec_from("txt2img", values, distilled=True).guidance == 2.5
    assert WebUI.spec_from("txt2img", values, distilled=False).guidance is None
    for service, shown in ((flux_server.service, True), (server.service, False)):
        ui = WebUI(service)
        ui.build()
        assert [slider.visible for slider in ui.distilled_sliders] == [shown] * 3
        assert [update["visible"] for update in ui.distilled_visibility()] == [shown] * 3


def test_batch_lines_take_guidance_and_max_sequence_length(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "guidance": 2.5, "max_sequence_length": 64}) + "\n" + json.dumps({"prompt": "b"}))
    first, second = (batch.job for batch in read_jobs(path, Job(output=OutputPolicy(tmp_path))))
    assert (first.guidance, first.max_sequence_length) == (2.5, 64)
    assert (second.guidance, second.max_sequence_length) == (None, None)
    path.write_text(json.dumps({"prompt": "a", "max_sequence_length": 0}))
    with pytest.raises(UserError, match=r"line 1: .*max_sequence_length"):
        read_jobs(path, Job(output=OutputPolicy(tmp_path)))
