"""The server's parts without a server: job queue, model catalog, sampler names, previews, flags."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from optimized_sd.errors import Interrupted, UserError
from optimized_sd.server.backend import FieldError, GenerationSpec, api_error, check_spec, resolve_sampler
from optimized_sd.server.catalog import ModelCatalog
from optimized_sd.server.jobs import CANCELLED, DONE, FAILED, JobCancelled, JobQueue
from optimized_sd.server.preview import SD1_LATENT_RGB, latent_preview

WAIT = 30  # seconds; every wait below is bounded


def test_jobs_run_one_at_a_time_in_order_with_positions():
    queue = JobQueue()
    gate = threading.Event()
    order: list[str] = []

    def work(name: str):
        def run(job):
            order.append(name)
            if name == "first":
                assert gate.wait(WAIT)
            return name

        return run

    first = queue.submit("t", work("first"))
    second = queue.submit("t", work("second"))
    third = queue.submit("t", work("third"))
    for _ in range(int(WAIT / 0.01)):
        if queue.position(first) == 0:
            break
        threading.Event().wait(0.01)
    assert [queue.position(j) for j in (first, second, third)] == [0, 1, 2]
    queue.cancel(second)
    assert queue.position(third) == 1
    gate.set()
    assert third.wait(WAIT) == "third" and first.wait(WAIT) == "first"
    with pytest.raises(JobCancelled):
        second.wait(WAIT)
    assert (first.state, second.state, third.state) == (DONE, CANCELLED, DONE)
    assert order == ["first", "third"] and queue.position(first) == -1
    queue.close()


def test_a_failing_job_does_not_stop_the_worker_and_cancel_interrupts_at_the_next_step():
    queue = JobQueue(preview_every=2)
    broken = queue.submit("t", lambda job: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        broken.wait(WAIT)
    assert broken.state == FAILED
    started = threading.Event()

    def steps(job):
        for step in range(1000):
            job.report(step, 1000, torch.full((2, 4, 3, 3), float(step)))
            started.set()
            threading.Event().wait(0.001)
        return "finished"

    running = queue.submit("t", steps)
    assert started.wait(WAIT)
    assert queue.interrupt()
    with pytest.raises(Interrupted):
        running.wait(WAIT)
    snap = running.snapshot()
    assert 0 < snap.step < 999
    assert snap.latents.shape == (1, 4, 3, 3) and snap.latents_step % 2 == 0  # previews every 2nd step, first image only
    assert queue.submit("t", lambda job: "next").wait(WAIT) == "next"
    assert not queue.interrupt()  # idle
    queue.close()


def test_catalog_lists_files_and_diffusers_folders_and_finds_names_only(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.ckpt").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a model")
    folder = tmp_path / "sd-diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    catalog = ModelCatalog(tmp_path)
    assert [e.title for e in catalog.entries()] == ["a.safetensors", "sd-diffusers", "sub/b.ckpt"]
    assert catalog.find("sub/b").title == "sub/b.ckpt"
    assert catalog.find("a.safetensors [0123456789]").title == "a.safetensors"
    for outside in ("../a.safetensors", str(tmp_path / "a.safetensors"), "notes.txt", "/etc/passwd"):
        assert catalog.find(outside) is None
    assert catalog.default().title == "a.safetensors"
    with pytest.raises(UserError, match="--ckpt FILE or --models-dir"):
        ModelCatalog()


def test_catalog_lists_controlnets_apart_from_checkpoints(tmp_path):
    models = tmp_path / "Stable-diffusion"
    (models / "ControlNet" / "depth-folder").mkdir(parents=True)
    (models / "a.safetensors").write_bytes(b"x")
    (models / "ControlNet" / "canny.pth").write_bytes(b"x")
    (models / "ControlNet" / "depth-folder" / "config.json").write_text("{}")
    (models / "ControlNet" / "readme.txt").write_text("no")
    (tmp_path / "ControlNet").mkdir()
    (tmp_path / "ControlNet" / "tile.safetensors").write_bytes(b"x")  # AUTOMATIC1111's models/ControlNet beside the checkpoints
    catalog = ModelCatalog(models)
    assert [e.title for e in catalog.entries()] == ["a.safetensors"]
    assert [e.model_name for e in catalog.controlnets()] == ["canny", "depth-folder", "tile"]
    assert catalog.find_controlnet("canny [0123abcd]").path == models / "ControlNet" / "canny.pth"
    assert catalog.find_controlnet("tile.safetensors").path == tmp_path / "ControlNet" / "tile.safetensors"
    assert catalog.find_controlnet("a") is None and catalog.find_controlnet("readme") is None


def test_sampler_names_as_automatic1111_clients_send_them():
    assert resolve_sampler("Euler a") == ("euler_a", False)
    assert resolve_sampler("k_dpmpp_2m") == ("dpmpp_2m", False)
    assert resolve_sampler("DPM++ 2M Karras") == ("dpmpp_2m", True)
    assert resolve_sampler("DPM++ 2M", "Karras") == ("dpmpp_2m", True)
    assert resolve_sampler("DDIM", "automatic") == ("ddim", False)
    with pytest.raises(FieldError) as unknown:
        resolve_sampler("UniPC")
    assert unknown.value.field == "sampler_name"
    with pytest.raises(FieldError) as schedule:
        resolve_sampler("Euler", "Exponential")
    assert schedule.value.field == "scheduler"


@pytest.mark.parametrize(
    "change, field",
    [({"width": 100}, "width"), ({"steps": 0}, "steps"), ({"sampler": "plms", "karras": True}, "scheduler"), ({"memory": "fast"}, "memory"),
     ({"vram_budget": "lots"}, "vram_budget"), ({"batch_size": 99}, "batch_size"), ({"seed": 2**32}, "seed")],
)  # fmt: skip
def test_spec_checks_name_the_field(change, field):
    with pytest.raises(FieldError) as mistake:
        check_spec(GenerationSpec(**{"prompt": "x", "width": 64, "height": 64, **change}))
    assert api_error(mistake.value).field == field  # the request field, said by its AUTOMATIC1111 name


def test_inpaint_checks_name_the_field():
    image = Image.new("RGB", (64, 64), "gray")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 24, 24))
    base = {"prompt": "x", "width": 64, "height": 64, "init_image": image, "mask": mask, "inpainting_fill": 1}
    check_spec(GenerationSpec(**base))
    for change, field in (
        ({"init_image": None}, "init_images"),
        ({"mask": Image.new("L", (64, 64), 0)}, "mask"),
        ({"mask": Image.new("RGBA", (64, 64), (255, 255, 255, 0))}, "mask"),  # transparent everywhere: the alpha is the mask
        ({"mask": Image.new("L", (64, 64), 255), "invert_mask": True}, "mask"),
        ({"inpainting_fill": 4}, "inpainting_fill"),
        ({"mask_blur": -1}, "mask_blur"),
        ({"inpaint_full_res_padding": -1}, "inpaint_full_res_padding"),
    ):
        with pytest.raises(FieldError) as mistake:
            check_spec(GenerationSpec(**{**base, **change}))
        assert api_error(mistake.value).field == field, change


def test_backend_maps_automatic1111_inpaint_fields_and_sizes():
    from optimized_sd.server.backend import Backend

    image = Image.new("RGB", (96, 80), "gray")
    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (4, 4, 20, 20))
    whole = GenerationSpec(prompt="x", width=64, height=64, init_image=image, mask=mask, mask_blur=3, invert_mask=True, inpainting_fill=0)
    init, options = Backend.prepare_init_image(whole)
    assert init.size == (64, 64) and options.mask.size == (64, 64)  # resized with the image ("just resize")
    assert (options.area, options.mask_blur, options.invert_mask, options.masked_content) == ("whole", 3.0, True, "fill")
    masked = GenerationSpec(
        prompt="x", width=64, height=64, init_image=image, mask=mask, inpaint_full_res=True, inpaint_full_res_padding=12
    )
    init, options = Backend.prepare_init_image(masked)
    assert init.size == (96, 80) and options.mask.size == (96, 80)  # "only masked" keeps the image's size
    assert (options.area, options.padding) == ("masked", 12)
    assert Backend.prepare_init_image(GenerationSpec(prompt="x", width=64, height=64, init_image=image))[1] is None


def test_the_drawn_layer_is_the_mask():
    from optimized_sd.server.ui import drawn_mask, editor_image_and_mask

    stroke = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    stroke.paste((255, 255, 255, 255), (4, 4, 12, 12))
    faint = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    faint.paste((255, 0, 0, 100), (20, 20, 30, 30))  # under half opaque: not painted
    faint.paste((255, 0, 0, 200), (0, 28, 4, 32))
    mask = drawn_mask([stroke, faint], (32, 32))
    assert mask.mode == "L" and np.unique(np.asarray(mask)).tolist() == [0, 255]
    assert mask.getbbox() == (0, 4, 12, 32) and mask.getpixel((25, 25)) == 0 and mask.getpixel((2, 30)) == 255
    assert drawn_mask([], (10, 8)).size == (10, 8)
    background = Image.new("RGBA", (32, 32), (10, 20, 30, 255))
    image, mask = editor_image_and_mask({"background": background, "layers": [stroke], "composite": None}, invert=False)
    assert image.mode == "RGB" and mask.getbbox() == (4, 4, 12, 12)
    with pytest.raises(UserError, match="upload one"):
        editor_image_and_mask({"background": None, "layers": [], "composite": None}, invert=False)
    with pytest.raises(UserError, match="nothing to repaint"):
        editor_image_and_mask({"background": background, "layers": [], "composite": None}, invert=False)
    assert editor_image_and_mask({"background": background, "layers": [], "composite": None}, invert=True)[1].getbbox() is None


def test_preview_is_the_linear_latent_to_rgb_projection():
    latents = torch.zeros(2, 4, 2, 3)
    latents[0, 0] = 1.0  # channel 0 alone: its RGB row of the factor table
    image = latent_preview(latents, upscale=1)
    assert image.size == (3, 2)
    expected = tuple(round((v + 1) * 127.5) for v in SD1_LATENT_RGB[0].tolist())
    assert image.getpixel((0, 0)) == expected
    assert latent_preview(latents).size == (24, 16)  # the image's size for an 8x VAE


def test_serve_flags_are_checked_before_any_loading():
    from optimized_sd.server.app import bind_host, parse_auth

    assert bind_host(None, listen=False) == "127.0.0.1"
    assert bind_host(None, listen=True) == "0.0.0.0"
    assert bind_host("::1", listen=False) == "::1"
    with pytest.raises(UserError, match="--listen"):
        bind_host("0.0.0.0", listen=False)
    assert parse_auth("ada:s3:cret") == ("ada", "s3:cret")
    for bad in ("ada", ":x", "ada:"):
        with pytest.raises(UserError, match="USER:PASS"):
            parse_auth(bad)


def test_serve_command_reports_mistakes_as_one_line(capsys, tmp_path):
    from optimized_sd.cli import main

    for argv, message in (
        (["serve", "--ckpt", str(tmp_path / "missing.safetensors")], "checkpoint not found"),
        (["serve", "--models-dir", str(tmp_path / "nowhere")], "is not a folder"),
        (["serve", "--models-dir", str(tmp_path), "--host", "192.0.2.1"], "add --listen"),
        (["serve", "--models-dir", str(tmp_path), "--auth", "nopassword"], "USER:PASS"),
        (["serve", "--models-dir", str(tmp_path)], "no model"),
    ):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.slow
def test_serve_command_starts_and_answers(tiny_model, tmp_path):
    """`optimized-sd serve` as a user starts it: a child process on 127.0.0.1 at a free port."""
    import re
    import subprocess
    import sys
    import time

    import requests

    command = [
        sys.executable,
        "-m",
        "optimized_sd.cli",
        "serve",
        "--ckpt",
        str(tiny_model.safetensors),
        "--tokenizer",
        str(tiny_model.tokenizer),
    ]
    command += ["--device", "cpu", "--port", "0", "--auth", "ada:secret"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, "serve exited before it printed its address"
            found = re.search(r"UI at (http://127\.0\.0\.1:\d+)/", line)
            url = found.group(1) if found else None
        assert url is not None
        assert requests.get(f"{url}/sdapi/v1/sd-models", timeout=30).status_code == 401
        models = requests.get(f"{url}/sdapi/v1/sd-models", auth=("ada", "secret"), timeout=30).json()
        assert [m["title"] for m in models] == ["tiny.safetensors"]
    finally:
        child.terminate()
        child.wait(30)


def test_a_9_channel_model_inpaints_through_the_backend(tiny_model, tiny_inpainting):
    """A server whose model is an inpainting one (9-channel UNet): the mask reaches the UNet's extra
    channels, the result equals the pipeline's, and AUTOMATIC1111's info flag says so."""
    from optimized_sd.pipelines.diffusion import GenerationRequest
    from optimized_sd.pipelines.masks import InpaintOptions
    from optimized_sd.server.backend import Backend, LoadOptions
    from optimized_sd.server.service import Service

    catalog = ModelCatalog(ckpt=tiny_inpainting[1])
    backend = Backend(catalog, LoadOptions(device="cpu", tokenizer=tiny_model.tokenizer))
    backend.load(catalog.default())
    service = Service(backend)
    try:
        init = Image.fromarray(np.random.default_rng(8).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (8, 16, 40, 48))
        spec = GenerationSpec(
            prompt="a window", sampler="euler", steps=3, seed=4, width=64, height=64, init_image=init, mask=mask, mask_blur=2, strength=0.8
        )
        made = service.submit_generation(spec).wait(300)
        assert made.inpainting_conditioning
        request = GenerationRequest(
            prompts=["a window"], steps=3, scale=7.0, sampler="euler", seed=4, height=64, width=64, init_image=init, strength=0.8,
            inpaint=InpaintOptions(mask=mask, mask_blur=2.0),
        )  # fmt: skip
        expected = backend.pipe.generate(request).images[0]
        assert np.array_equal(np.asarray(made.images[0]), np.asarray(expected))
    finally:
        service.close()
