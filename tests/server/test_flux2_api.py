"""Flux.2 klein served: the API's txt2img gives the Python API's image (the base model with CFG, told from the file's
name in the models folder) and its infotext says the model's CFG scale; a hires fix is a 422 naming enable_hr; the UI's page loads
for it."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
import requests
from PIL import Image

from optimized_sd.pipelines.diffusion import GenerationRequest
from tests.server.conftest import post, running_server
from tests.server.test_api import detail_fields

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")


def test_txt2img_gives_the_python_apis_image(tmp_path_factory):
    import optimized_sd
    from tests.test_flux2_pipeline import PROMPT, SIZE, klein_model

    klein = klein_model(tmp_path_factory.mktemp("klein"))
    models = tmp_path_factory.mktemp("klein-models")
    checkpoint = shutil.copy(klein.files["transformer"], models / "flux-2-klein-base-tiny.safetensors")
    options = {"text_encoders": (klein.files["qwen3"],), "vae": klein.files["vae"], "precision": "full"}
    pipe = optimized_sd.load(checkpoint, device="cpu", tokenizer=klein.tokenizer, **options)
    try:
        request = GenerationRequest(prompts=[PROMPT], seed=42, steps=2, scale=2.0, sampler="euler", height=SIZE[0], width=SIZE[1])
        expected = pipe.generate(request).images[0].convert("RGB")
    finally:
        pipe.close()
    with running_server(models, klein.tokenizer, **options) as server:
        body = {"prompt": PROMPT, "seed": 42, "steps": 2, "cfg_scale": 2, "sampler_name": "Euler", "height": SIZE[0], "width": SIZE[1]}
        response = post(server, "txt2img", json=body)
        assert response.status_code == 200, response.text
        payload = response.json()
        served = Image.open(io.BytesIO(base64.b64decode(payload["images"][0]))).convert("RGB")
        assert served.tobytes() == expected.tobytes()
        assert "CFG scale: 2," in json.loads(payload["info"])["infotexts"][0]
        refused = post(server, "txt2img", json={**body, "enable_hr": True})  # klein has no img2img: said up front, by its field
        assert refused.status_code == 422 and detail_fields(refused) == ["enable_hr"], refused.text
        assert "no img2img" in refused.json()["detail"][0]["msg"]
        page = requests.get(server.url + "/", timeout=60)
        assert page.status_code == 200 and "<html" in page.text.lower()
