"""Z-Image served: the API's txt2img gives the Python API's image, without CFG (cfg_scale 0, Turbo's default) and
with it (cfg_scale as diffusers' guidance_scale), and says the model in its infotext."""

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


def test_served_images_equal_the_python_apis(tmp_path_factory):
    import optimized_sd
    from tests.zimage_models import PROMPT, SIZE, build

    tiny = build(tmp_path_factory.mktemp("zimage"))
    options = {"text_encoders": (tiny.files["qwen"],), "vae": tiny.files["vae"], "precision": "full"}
    pipe = optimized_sd.load(tiny.files["transformer"], device="cpu", tokenizer=tiny.tokenizer, **options)
    try:
        expected = {scale: pipe.generate(GenerationRequest(prompts=[PROMPT], seed=42, steps=2, scale=scale, sampler="euler",
                                                           height=SIZE[0], width=SIZE[1])).images[0].convert("RGB")
                    for scale in (0.0, 1.5)}  # fmt: skip
    finally:
        pipe.close()
    assert expected[0.0].tobytes() != expected[1.5].tobytes()
    models = tmp_path_factory.mktemp("zimage-models")
    shutil.copy(tiny.files["transformer"], models / "z_image_turbo.safetensors")
    with running_server(models, tiny.tokenizer, **options) as server:
        for scale, image in expected.items():
            body = {"prompt": PROMPT, "seed": 42, "steps": 2, "cfg_scale": scale, "sampler_name": "Euler", "height": SIZE[0],
                    "width": SIZE[1]}  # fmt: skip
            response = post(server, "txt2img", json=body)
            assert response.status_code == 200, response.text
            payload = response.json()
            served = Image.open(io.BytesIO(base64.b64decode(payload["images"][0]))).convert("RGB")
            assert served.tobytes() == image.tobytes()
            assert f"CFG scale: {scale:g}," in json.loads(payload["info"])["infotexts"][0]
