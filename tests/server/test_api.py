"""The AUTOMATIC1111-compatible API through a real client library (webuiapi, from PyPI) and raw
requests for the error statuses; images compared pixel for pixel with the Python API and the CLI."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image, ImageFilter

from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.masks import InpaintOptions
from optimized_sd.pipelines.output import read_parameters
from tests.server.conftest import TIMEOUT, post

webuiapi = pytest.importorskip("webuiapi", reason="webuiapi is in the [test] extra")

SIZE = 64


def client(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host=server.host, port=server.port, sampler="Euler", steps=3)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_txt2img_through_webuiapi_equals_the_python_api(server, reference_pipe):
    result = client(server).txt2img(
        prompt="a red cube", negative_prompt="blurry", seed=7, width=SIZE, height=SIZE, cfg_scale=7, batch_size=2
    )
    assert [image.size for image in result.images] == [(SIZE, SIZE)] * 2
    assert result.info["all_seeds"] == [7, 8]
    assert result.info["sampler_name"] == "Euler"
    assert result.info["infotexts"][1].startswith(
        "a red cube\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 8, Size: 64x64"
    )
    assert result.images[0].info["parameters"] == result.info["infotexts"][0]  # the PNG carries A1111's parameters text
    expected = reference_pipe.generate(
        GenerationRequest(
            prompts=["a red cube"] * 2, negative_prompt="blurry", steps=3, scale=7.0, sampler="euler", seed=7, height=SIZE, width=SIZE
        )
    )
    for got, want in zip(result.images, expected.images, strict=True):
        assert np.array_equal(pixels(got), pixels(want))


def test_the_cli_makes_the_same_image_as_the_api(server, tiny_model, tmp_path):
    from optimized_sd.cli import main

    response = post(
        server,
        "txt2img",
        json={
            "prompt": "a blue sphere",
            "seed": 11,
            "steps": 3,
            "width": SIZE,
            "height": SIZE,
            "sampler_name": "DPM++ 2M",
            "scheduler": "Karras",
            "cfg_scale": 5,
        },
    )
    assert response.status_code == 200, response.text
    api_image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    argv = ["txt2img", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", tmp_path, "--device", "cpu"]
    argv += ["--prompt", "a blue sphere", "--seed", "11", "--steps", "3", "--H", "64", "--W", "64", "--sampler", "dpmpp_2m", "--karras"]
    argv += ["--scale", "5", "--n_samples", "1", "--skip_grid"]
    try:
        main([str(a) for a in argv])
    except SystemExit as done:  # main exits only on an error
        pytest.fail(f"the CLI exited with {done.code}")
    [written] = sorted(tmp_path.rglob("*.png"))
    assert np.array_equal(pixels(Image.open(written)), pixels(api_image))
    assert read_parameters(written) == api_image.info["parameters"]


def test_img2img_through_webuiapi_equals_the_python_api(server, reference_pipe):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    result = client(server).img2img(images=[init], prompt="a cat", seed=3, width=SIZE, height=SIZE, denoising_strength=0.5, cfg_scale=7)
    assert len(result.images) == 1 and result.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]
    expected = reference_pipe.generate(
        GenerationRequest(
            prompts=["a cat"], steps=3, scale=7.0, sampler="euler", seed=3, height=SIZE, width=SIZE, init_image=init, strength=0.5
        )
    )
    assert np.array_equal(pixels(result.images[0]), pixels(expected.images[0]))


def test_samplers_models_and_a_model_switch_by_name(server):
    api = client(server)
    names = api.util_get_sampler_names()
    assert {"Euler a", "DDIM", "PLMS", "DPM++ 2M", "DPM++ SDE"} <= set(names)
    assert api.util_get_model_names() == ["tiny.safetensors", "zoo/tiny-copy.ckpt"]
    assert api.util_get_current_model() == "tiny.safetensors"
    try:
        api.util_set_model("zoo/tiny-copy.ckpt", find_closest=False)
        assert api.util_get_current_model() == "zoo/tiny-copy.ckpt"
        assert server.service.backend.current.path.name == "tiny-copy.ckpt"
        result = api.txt2img(prompt="after a switch", seed=1, width=SIZE, height=SIZE)
        assert len(result.images) == 1
    finally:
        api.util_set_model("tiny.safetensors", find_closest=False)
    assert api.util_get_current_model() == "tiny.safetensors"


def detail_fields(response: requests.Response) -> list[str]:
    return [entry["loc"][-1] for entry in response.json()["detail"]]


def test_bad_requests_get_the_right_status_and_name_the_field(server):
    good = {"prompt": "x", "steps": 2, "width": SIZE, "height": SIZE}
    malformed = post(server, "txt2img", data=b'{"prompt": "x", "steps": ', headers={"Content-Type": "application/json"})
    assert malformed.status_code == 422 and malformed.json()["detail"][0]["type"] == "json_invalid"
    unknown = post(server, "txt2img", json={**good, "sampler_name": "Euler z"})
    assert unknown.status_code == 422 and detail_fields(unknown) == ["sampler_name"] and "Euler a" in unknown.text
    for field, value in (
        ("steps", "many"),
        ("width", 65),
        ("seed", -5),
        ("batch_size", 0),
        ("scheduler", "Exponential"),
    ):
        response = post(server, "txt2img", json={**good, field: value})
        assert response.status_code == 422 and detail_fields(response) == [field], (field, response.text)
    for payload in ({"init_images": []}, {"init_images": ["not base64!"]}, {"init_images": ["https://example.invalid/a.png"]}):
        response = post(server, "img2img", json={**good, **payload})
        assert response.status_code == 422 and detail_fields(response) == ["init_images"], response.text
    big = Image.new("RGB", (300, 300))  # over the test server's 256x256 pixel limit
    assert post(server, "img2img", json={**good, "init_images": [b64_png(big)]}).status_code == 413
    assert post(server, "txt2img", data=b" " * (3 * 2**20), headers={"Content-Type": "application/json"}).status_code == 413
    assert post(server, "options", json={"sd_model_checkpoint": "../../etc/passwd"}).status_code == 404
    assert post(server, "options", json={"sd_model_checkpoint": str(server.models_dir / "tiny.safetensors")}).status_code == 404
    override = post(server, "txt2img", json={**good, "override_settings": {"sd_model_checkpoint": "nope.safetensors"}})
    assert override.status_code == 404
    assert post(server, "txt2img", json=good).status_code == 200  # and the server still serves


def inpaint_inputs() -> tuple[Image.Image, Image.Image]:
    """A noisy picture and a mask repainting a square in its middle (white: repainted)."""
    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 20, 44, 48))
    return init, mask


@pytest.mark.parametrize(
    ("full_res", "fill", "masked_content"),
    [(False, 1, "original"), (True, 0, "fill"), (False, 2, "latent-noise"), (True, 3, "latent-nothing")],
    ids=["whole-original", "only-masked-fill", "whole-latent-noise", "only-masked-latent-nothing"],
)
def test_inpaint_through_webuiapi_equals_the_python_api(server, reference_pipe, full_res, fill, masked_content):
    init, mask = inpaint_inputs()
    result = client(server).img2img(
        images=[init],
        mask_image=mask,
        prompt="a window",
        seed=4,
        width=SIZE,
        height=SIZE,
        denoising_strength=0.8,
        cfg_scale=7,
        mask_blur=2,
        inpainting_fill=fill,
        inpaint_full_res=full_res,
        inpaint_full_res_padding=8,
    )
    options = InpaintOptions(mask=mask, mask_blur=2.0, area="masked" if full_res else "whole", padding=8, masked_content=masked_content)
    expected = reference_pipe.generate(
        GenerationRequest(
            prompts=["a window"], steps=3, scale=7.0, sampler="euler", seed=4, height=SIZE, width=SIZE, init_image=init, strength=0.8,
            inpaint=options,
        )
    )  # fmt: skip
    [got] = result.images
    assert np.array_equal(pixels(got), pixels(expected.images[0]))
    outside = np.asarray(mask.filter(ImageFilter.GaussianBlur(2))) == 0  # the blurred mask leaves these pixels alone
    assert np.array_equal(pixels(got)[outside], pixels(init)[outside])
    assert not np.array_equal(pixels(got), pixels(init))  # and the square was repainted
    assert "Denoising strength: 0.8" in result.info["infotexts"][0]
    assert result.info["is_using_inpainting_conditioning"] is False  # the tiny model is a 4-channel one


def test_the_api_the_ui_and_the_cli_inpaint_the_same_image(server, tiny_model, tmp_path):
    """One inpainting (seed, prompt, sampler, size, mask blur, strength, masked content "fill": the
    API's default) through the three front ends."""
    from optimized_sd.cli import main
    from optimized_sd.server.ui import WebUI

    init, mask = inpaint_inputs()
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    response = post(
        server,
        "img2img",
        json={
            "prompt": "a door", "seed": 13, "steps": 3, "width": SIZE, "height": SIZE, "sampler_name": "DPM++ 2M", "cfg_scale": 6,
            "denoising_strength": 0.9, "init_images": [b64_png(init)], "mask": b64_png(mask), "mask_blur": 3, "inpainting_fill": 0,
            "inpaint_full_res": False,
        },
    )  # fmt: skip
    assert response.status_code == 200, response.text
    api_image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))

    drawn = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))  # the editor's painted layer: white strokes on transparency
    drawn.paste((255, 255, 255, 255), mask=mask)
    values = {
        "prompt": "a door", "negative_prompt": "", "image": {"background": init.convert("RGBA"), "layers": [drawn], "composite": None},
        "strength": 0.9, "mask_blur": 3, "inpaint_area": "whole", "padding": 32, "invert_mask": False, "masked_content": 0,
        "sampler": "dpmpp_2m", "karras": False, "steps": 3, "cfg_scale": 6, "seed": 13, "width": SIZE, "height": SIZE,
        "batch_size": 1, "n_iter": 1, "memory": "server default", "vram_budget": "",
    }  # fmt: skip
    made = server.service.submit_generation(WebUI.spec_from("inpaint", values)).wait(TIMEOUT)

    argv = ["inpaint", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--outdir", tmp_path / "cli"]
    argv += ["--device", "cpu", "--init-img", tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--mask-blur", "3"]
    argv += ["--strength", "0.9", "--prompt", "a door", "--seed", "13", "--steps", "3", "--H", "64", "--W", "64"]
    argv += ["--sampler", "dpmpp_2m", "--scale", "6", "--n_samples", "1", "--skip_grid", "--masked-content", "fill"]
    try:
        main([str(a) for a in argv])
    except SystemExit as done:  # main exits only on an error
        pytest.fail(f"the CLI exited with {done.code}")
    [written] = sorted((tmp_path / "cli").rglob("*.png"))
    cli_image = Image.open(written)
    assert np.array_equal(pixels(made.images[0]), pixels(api_image))
    assert np.array_equal(pixels(cli_image), pixels(api_image))
    assert read_parameters(written) == api_image.info["parameters"] == made.parameters[0].text()


def test_bad_inpainting_requests_name_the_field(server, caplog):
    init, mask = inpaint_inputs()
    good = {"prompt": "x", "steps": 2, "width": SIZE, "height": SIZE, "init_images": [b64_png(init)], "mask": b64_png(mask)}
    good["inpainting_fill"] = 1
    black = Image.new("L", (SIZE, SIZE), 0)
    for change, field, needle in (
        ({"mask": base64.b64encode(b"not an image at all").decode()}, "mask", "not an image"),
        ({"mask": "%%% not base64"}, "mask", "not valid base64"),
        ({"mask": b64_png(black)}, "mask", "all black"),
        ({"mask": b64_png(Image.new("L", (SIZE, SIZE), 255)), "inpainting_mask_invert": 1}, "mask", "once inverted"),
        ({"inpainting_fill": 4}, "inpainting_fill", "use 0 (fill), 1 (original), 2 (latent-noise), 3 (latent-nothing)"),
        ({"inpainting_fill": -1}, "inpainting_fill", "inpainting_fill -1 is unknown"),
        ({"mask_blur": -1}, "mask_blur", "0 or more"),
        ({"inpaint_full_res_padding": -4}, "inpaint_full_res_padding", "0 or more"),
        ({"init_images": None}, "init_images", "img2img needs one image"),
    ):
        response = post(server, "img2img", json={**good, **change})
        assert response.status_code == 422 and detail_fields(response) == [field], (change, response.text)
        assert needle in response.json()["detail"][0]["msg"], (change, response.text)
    big = Image.new("L", (300, 300), 255)  # over the test server's 256x256 pixel limit
    assert post(server, "img2img", json={**good, "mask": b64_png(big)}).status_code == 413
    smaller = mask.resize((SIZE // 2, SIZE // 2), Image.NEAREST)  # resized to the image, with a warning
    with caplog.at_level(logging.WARNING, logger="optimized_sd"):
        resized = post(server, "img2img", json={**good, "mask": b64_png(smaller)})
    assert resized.status_code == 200, resized.text
    assert "the mask is 32x32, the image 64x64; the mask was resized to the image" in caplog.text
    assert post(server, "img2img", json=good).status_code == 200  # and the server still serves


def test_a_failed_job_is_reported_and_the_server_keeps_serving(server, monkeypatch):
    backend = server.service.backend
    real_generate = backend.generate
    calls = []

    def fail_once(spec, job):
        calls.append(spec.prompt)
        if len(calls) == 1:
            raise RuntimeError("the device fell over")
        return real_generate(spec, job)

    monkeypatch.setattr(backend, "generate", fail_once)
    failed = post(server, "txt2img", json={"prompt": "first", "steps": 2, "width": SIZE, "height": SIZE})
    assert failed.status_code == 500 and "the device fell over" in failed.json()["detail"]
    assert "Traceback" not in failed.text
    assert post(server, "txt2img", json={"prompt": "second", "steps": 2, "width": SIZE, "height": SIZE}).status_code == 200


def test_concurrent_requests_queue_and_all_complete(server):
    seeds = [21, 22, 23, 24]
    responses: dict[int, requests.Response] = {}

    def call(seed: int) -> None:
        responses[seed] = post(server, "txt2img", json={"prompt": "queue", "seed": seed, "steps": 2, "width": SIZE, "height": SIZE})

    threads = [threading.Thread(target=call, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(responses) == seeds
    for seed, response in responses.items():
        assert response.status_code == 200, response.text
        assert json.loads(response.json()["info"])["all_seeds"] == [seed]
    assert requests.get(f"{server.url}/sdapi/v1/progress", timeout=30).json()["state"]["job_count"] == 0


def test_interrupt_stops_the_running_job_early_and_the_next_one_succeeds(server):
    steps = 200
    box: dict[str, requests.Response] = {}
    worker = threading.Thread(
        target=lambda: box.setdefault(
            "r", post(server, "txt2img", json={"prompt": "long", "steps": steps, "width": SIZE, "height": SIZE, "sampler_name": "Euler a"})
        )
    )
    worker.start()
    seen = None
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:  # until the job has run a step
        state = requests.get(f"{server.url}/sdapi/v1/progress", timeout=30).json()
        if state["state"]["sampling_step"] >= 2 and state["current_image"]:  # a live preview every 2nd step
            seen = state
            break
        time.sleep(0.05)
    assert seen is not None and 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == steps
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.size == (SIZE, SIZE) and preview.mode == "RGB"
    assert post(server, "interrupt").json() == {}
    worker.join(TIMEOUT)
    response = box["r"]
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and response.json()["images"] == []
    follow_up = post(server, "txt2img", json={"prompt": "after", "steps": 2, "width": SIZE, "height": SIZE})
    assert follow_up.status_code == 200 and len(follow_up.json()["images"]) == 1


def test_api_auth(server):
    from optimized_sd.server.app import RunningServer, create_app

    guarded = RunningServer(create_app(server.service, auth=("ada", "secret"), ui=False), "127.0.0.1", 0).start()
    try:
        assert requests.get(f"{guarded.url}/sdapi/v1/samplers", timeout=30).status_code == 401
        assert requests.get(f"{guarded.url}/sdapi/v1/samplers", auth=("ada", "wrong"), timeout=30).status_code == 401
        api = webuiapi.WebUIApi(host=guarded.host, port=guarded.port, username="ada", password="secret")
        assert "Euler" in api.util_get_sampler_names()
    finally:
        guarded.stop()
