"""AUTOMATIC1111's HTTP API (`/sdapi/v1/...`) over the job queue, with its field names and response
shapes (modules/api/models.py and api.py of stable-diffusion-webui), so its clients work unchanged.

Status codes: a malformed body, an unknown sampler or any other bad field -> 422 naming the field;
a body or image over the limits -> 413; a model name not in /sdapi/v1/sd-models -> 404; a job that
fails -> 500 with the error's message (the server keeps serving)."""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import secrets
import time
import warnings
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image
from pydantic import BaseModel, ConfigDict

import optimized_sd
from optimized_sd.errors import UserError
from optimized_sd.pipelines.defaults import (
    DEFAULT_HR_SCALE,
    DEFAULT_HR_STRENGTH,
    DEFAULT_HR_UPSCALER,
    DEFAULT_REFINER_SWITCH,
    DEFAULT_STRENGTH,
)
from optimized_sd.pipelines.hires import UPSCALERS, HiresFix, upscaler_named
from optimized_sd.sampling import SAMPLERS, sampler_display_name
from optimized_sd.server.backend import (
    API_FIELDS,
    FAMILY_DEFAULTED,
    LOAD_OPTION_FIELDS,
    FieldError,
    Generated,
    GenerationSpec,
    api_error,
    resolve_sampler,
    sampler_aliases,
)
from optimized_sd.server.catalog import ModelEntry
from optimized_sd.server.controlnet_api import add_controlnet_routes, controlnet_specs
from optimized_sd.server.jobs import JobCancelled
from optimized_sd.server.service import Service

log = logging.getLogger("optimized_sd")

PREFIX = "/sdapi/v1"


class TooLarge(Exception):
    """A body or an image over the server's limits (413)."""


class Txt2ImgRequest(BaseModel):
    """AUTOMATIC1111's StableDiffusionProcessingTxt2Img fields that this server reads; the others
    that clients send with their defaults are accepted and ignored (see `UNSUPPORTED`)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    eta: float | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool | None = False
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    script_name: str | None = None
    script_args: list | None = None
    alwayson_scripts: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False
    refiner_checkpoint: str | None = None  # an SDXL refiner from the server's model list
    refiner_switch_at: float | None = None  # the share of the denoising the base runs (DEFAULT_REFINER_SWITCH when None)
    distilled_cfg_scale: float | None = None  # Forge's: Flux.1 dev's distilled guidance (None: the model's default, 3.5)
    cfg_normalization: float | None = None  # Z-Image's (diffusers' names; None: off)
    cfg_truncation: float | None = None  # Z-Image's (None: never)
    # hires fix (with enable_hr; ignored without it, as AUTOMATIC1111)
    denoising_strength: float | None = None  # DEFAULT_HR_STRENGTH when None
    hr_scale: float = DEFAULT_HR_SCALE
    hr_upscaler: str | None = None  # AUTOMATIC1111's names: /sdapi/v1/latent-upscale-modes and /sdapi/v1/upscalers
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    denoising_strength: float | None = DEFAULT_STRENGTH
    resize_mode: int | None = 0
    mask: str | None = None
    mask_blur: int | None = 4
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    include_init_images: bool | None = False


# Features of the webui this server does not have: a request may send them only at their "off" value.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "restore_faces": bool,
    "tiling": bool,
    "subseed_strength": lambda v: bool(v),
    "script_name": bool,
    "styles": bool,
    "resize_mode": lambda v: v not in (None, 0),
}


def field_error_response(field_name: str, message: str) -> JSONResponse:
    """422 in FastAPI's validation shape, so a client reads every field error the same way."""
    return JSONResponse(status_code=422, content={"detail": [{"loc": ["body", field_name], "msg": message, "type": "value_error"}]})


def error_response(status: int, error: BaseException | str, detail: str) -> JSONResponse:
    """AUTOMATIC1111's error body: {"error", "detail", "body", "errors"}."""
    name = error if isinstance(error, str) else type(error).__name__
    return JSONResponse(status_code=status, content={"error": name, "detail": detail, "body": "", "errors": detail})


def decode_image(data: str, field_name: str, service: Service) -> Image.Image:
    """A base64 image (optionally a data: URL) -> PIL; URLs are never fetched."""
    if not isinstance(data, str) or not data:
        raise FieldError(field_name, f"{field_name} must be a base64-encoded image")
    if data.startswith(("http://", "https://")):
        raise FieldError(field_name, f"{field_name}: image URLs are not fetched by this server; send the image as base64")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data)
    except (binascii.Error, ValueError):
        raise FieldError(field_name, f"{field_name} is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > service.limits.max_image_pixels:
                raise TooLarge(
                    f"{field_name}: {image.width}x{image.height} is over this server's limit of {service.limits.max_image_pixels} pixels"
                )
            image.load()
    except TooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLarge(f"{field_name}: the image is over the decompression limit") from None
    except Exception:  # noqa: BLE001 - the PIL boundary: whatever a decoder raises (NotImplementedError for DDS, struct.error, EOFError...) is a bad image
        raise FieldError(field_name, f"{field_name} is not an image this server can read (PNG, JPEG, WebP, ...)") from None
    return image


def png_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def image_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return png_base64(buffer.getvalue())


def spec_from(request: Txt2ImgRequest, service: Service, img2img: bool) -> GenerationSpec:
    """Map AUTOMATIC1111's fields onto a GenerationSpec (FieldError naming any bad one)."""
    for name, is_on in UNSUPPORTED.items():
        value = getattr(request, name, None)
        if value is not None and is_on(value):
            raise FieldError(name, f"{name} is not supported by this server; leave it at its default")
    sampler, karras = resolve_sampler(request.sampler_name or request.sampler_index or "Euler", request.scheduler)
    # `eta` is DDIM's eta here; AUTOMATIC1111 also reads it as the ancestral noise factor, which is 1 in our samplers.
    eta = request.eta if sampler == "ddim" and request.eta is not None else 0.0
    options: dict[str, Any] = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or "",
        sampler=sampler,
        karras=karras,
        steps=request.steps,
        cfg_scale=request.cfg_scale,
        seed=request.seed,
        width=request.width,
        height=request.height,
        batch_size=request.batch_size,
        n_iter=request.n_iter,
        eta=eta,
        guidance=request.distilled_cfg_scale,
        cfg_normalization=request.cfg_normalization,
        cfg_truncation=request.cfg_truncation,
        defaulted=frozenset(FAMILY_DEFAULTED) - request.model_fields_set,  # AUTOMATIC1111's 50/7/512 unless the family has its own
    )
    if request.refiner_checkpoint and request.refiner_checkpoint.strip().lower() != "none":
        refiner = service.backend.catalog.find(request.refiner_checkpoint)
        if refiner is None:
            raise FieldError("refiner_checkpoint", f"model {request.refiner_checkpoint!r} not found; see {PREFIX}/sd-models")
        options["refiner"] = refiner.path
        options["refiner_switch"] = request.refiner_switch_at if request.refiner_switch_at is not None else DEFAULT_REFINER_SWITCH
    if request.enable_hr and not img2img:
        options["hires"] = hires_from(request, options["width"], options["height"])
    if img2img:
        assert isinstance(request, Img2ImgRequest)
        if not request.init_images:
            raise FieldError("init_images", "img2img needs one image in init_images")
        options["init_image"] = decode_image(request.init_images[0], "init_images", service)
        options["strength"] = request.denoising_strength if request.denoising_strength is not None else DEFAULT_STRENGTH
        if request.mask:
            options.update(
                mask=decode_image(request.mask, "mask", service),
                mask_blur=request.mask_blur or 0,
                inpainting_fill=request.inpainting_fill if request.inpainting_fill is not None else 0,
                inpaint_full_res=bool(request.inpaint_full_res),
                inpaint_full_res_padding=request.inpaint_full_res_padding or 0,
                invert_mask=bool(request.inpainting_mask_invert),
            )
    decode = functools.partial(decode_image, service=service)
    options["controlnets"] = controlnet_specs(request.alwayson_scripts, service.backend.catalog, decode, options.get("init_image"))
    return GenerationSpec(**options)


def hires_from(request: Txt2ImgRequest, width: int, height: int) -> HiresFix:
    """AUTOMATIC1111's hires fields as our second pass: an upscaler by its name; hr_resize_x/y (0 and 0: hr_scale;
    one 0: the other side by the first pass' aspect, floored to 8); empty hires prompts: the first pass' prompts."""
    try:
        upscaler = upscaler_named(request.hr_upscaler or DEFAULT_HR_UPSCALER)
    except FieldError:
        offered = ", ".join(known.label for known in UPSCALERS.values())
        raise FieldError("hr_upscaler", f"hr_upscaler {request.hr_upscaler!r} is unknown; use one of {offered}") from None
    resize = None
    x, y = request.hr_resize_x or 0, request.hr_resize_y or 0
    if x or y:
        x = x or max(8, y * width // height // 8 * 8)
        y = y or max(8, x * height // width // 8 * 8)
        resize = (x, y)
    sampler = None
    if request.hr_sampler_name and request.hr_sampler_name.strip().lower() != "use same sampler":
        try:
            sampler = resolve_sampler(request.hr_sampler_name)[0]
        except FieldError as error:
            raise FieldError("hr_sampler_name", f"hr_sampler_name: {error}") from None
    strength = request.denoising_strength if request.denoising_strength is not None else DEFAULT_HR_STRENGTH
    return HiresFix(request.hr_scale, resize, upscaler, request.hr_second_pass_steps, strength, sampler,
                    request.hr_prompt or None, request.hr_negative_prompt or None)  # fmt: skip


def info_json(spec: GenerationSpec, made: Generated) -> str:
    """AUTOMATIC1111's `info`: the JSON of its `Processed.js()` (the keys we can fill)."""
    infotexts = [p.text() for p in made.parameters]
    all_seeds = made.seeds or [made.seed]
    info = {
        "prompt": spec.prompt,
        "all_prompts": [spec.prompt] * len(made.images),
        "negative_prompt": spec.negative_prompt,
        "all_negative_prompts": [spec.negative_prompt] * len(made.images),
        "seed": made.seed,
        "all_seeds": all_seeds,
        "subseed": made.seed,
        "all_subseeds": all_seeds,
        "subseed_strength": 0,
        "width": spec.width,
        "height": spec.height,
        "sampler_name": sampler_display_name(spec.sampler, False),
        "scheduler": "Karras" if spec.karras else "Automatic",
        "cfg_scale": spec.cfg_scale,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": made.model_name,
        "sd_model_hash": made.model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": spec.strength if spec.init_image is not None else spec.hires.strength if spec.hires else None,
        "extra_generation_params": dict(spec.hires.metadata()) if spec.hires else {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": made.inpainting_conditioning,
        "version": f"optimized-sd {optimized_sd.__version__}",
        "interrupted": made.interrupted,
        "memory": {"mode": made.mode, "stages": made.memory_stages},
    }
    return json.dumps(info)


def sd_model_item(entry: ModelEntry, service: Service) -> dict[str, Any]:
    short = service.backend.known_hash(entry)
    return {
        "title": entry.title,
        "model_name": entry.model_name,
        "hash": short,
        "sha256": None,
        "filename": str(entry.path),
        "config": None,
    }


def route_adder(app: FastAPI, prefix: str, dependencies: list) -> Callable:
    """A decorator factory: `@route(path, methods)` registers a function at prefix + path."""

    def route(path: str, methods: list[str]) -> Callable:
        def register(fn: Callable) -> Callable:
            app.add_api_route(prefix + path, fn, methods=methods, dependencies=dependencies)
            return fn

        return register

    return route


def add_api_routes(app: FastAPI, service: Service, auth: tuple[str, str] | None = None) -> None:
    """The /sdapi/v1 routes on `app` (the application gradio is mounted on), and sd-webui-controlnet's /controlnet ones."""
    dependencies = [Depends(basic_auth(auth))] if auth else []
    route = route_adder(app, PREFIX, dependencies)
    add_generation_routes(route, service)
    add_listing_routes(route, service)
    add_options_routes(route, service)
    add_progress_routes(route, service)
    add_controlnet_routes(route_adder(app, "/controlnet", dependencies), service.backend.catalog)


def failure_response(error: Exception) -> JSONResponse:
    """A generation's failure as its status: a bad field 422 (by AUTOMATIC1111's name), too large 413, cancelled 409, else 500."""
    if isinstance(error, FieldError):
        said = api_error(error)  # the request field by AUTOMATIC1111's name, a load option by its serve flag
        if error.field in LOAD_OPTION_FIELDS and error.field not in API_FIELDS:  # not in the body: how the server was started
            return error_response(422, error, str(said))
        return field_error_response(said.field, str(said))
    if isinstance(error, TooLarge):
        return error_response(413, error, str(error))
    if isinstance(error, UserError):
        return error_response(422, error, str(error))
    if isinstance(error, JobCancelled):
        return error_response(409, error, str(error))
    log.exception("generation failed", exc_info=error)
    return error_response(500, error, f"generation failed: {type(error).__name__}: {error}")


def generation_response(request: Txt2ImgRequest, service: Service, img2img: bool) -> JSONResponse | dict[str, Any]:
    """Run one txt2img/img2img request to its response (an error response for any failure; the server keeps serving)."""
    try:
        spec = spec_from(request, service, img2img)
        model = None
        override = (request.override_settings or {}).get("sd_model_checkpoint")
        if override:
            model = service.backend.catalog.find(str(override))
            if model is None:
                return error_response(404, "HTTPException", f"model {override!r} not found; see {PREFIX}/sd-models")
        job = service.submit_generation(spec, model, restore=request.override_settings_restore_afterwards is not False)
        made: Generated = job.wait()
    except Exception as error:  # a failed job: report it, keep serving
        return failure_response(error)
    ran = made.spec or spec  # with the loaded family's defaults for the fields the request left out
    parameters = request.model_dump(exclude={"init_images", "mask"} if not getattr(request, "include_init_images", False) else set())
    parameters.update({name: getattr(ran, name) for name in spec.defaulted})
    images = [png_base64(data) for data in made.pngs] if request.send_images else []
    return {"images": images, "parameters": parameters, "info": info_json(ran, made)}


def add_generation_routes(route: Callable, service: Service) -> None:
    @route("/txt2img", ["POST"])
    def txt2img(request: Txt2ImgRequest):
        return generation_response(request, service, img2img=False)

    @route("/img2img", ["POST"])
    def img2img(request: Img2ImgRequest):
        return generation_response(request, service, img2img=True)


def add_listing_routes(route: Callable, service: Service) -> None:
    """What a client lists before asking: samplers, schedulers, upscalers and models."""

    @route("/samplers", ["GET"])
    def samplers() -> list[dict[str, Any]]:
        return [{"name": sampler_display_name(s, False), "aliases": sampler_aliases(s), "options": {}} for s in SAMPLERS]

    @route("/schedulers", ["GET"])
    def schedulers() -> list[dict[str, Any]]:
        return [
            {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": None, "need_inner_model": None},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": None},
        ]

    @route("/upscalers", ["GET"])
    def upscalers() -> list[dict[str, Any]]:
        """The image upscalers, as AUTOMATIC1111 lists its built-in ones (no model files)."""
        images = [known.label for known in UPSCALERS.values() if not known.latent]
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for name in images]

    @route("/latent-upscale-modes", ["GET"])
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": known.label} for known in UPSCALERS.values() if known.latent]

    @route("/sd-models", ["GET"])
    def sd_models() -> list[dict[str, Any]]:
        return [sd_model_item(entry, service) for entry in service.backend.catalog.entries()]

    @route("/refresh-checkpoints", ["POST"])
    def refresh_checkpoints() -> None:
        return None  # the listing is read afresh on every call


def add_options_routes(route: Callable, service: Service) -> None:
    @route("/options", ["GET"])
    def get_options() -> dict[str, Any]:
        current = service.backend.current
        return {
            "sd_model_checkpoint": current.title if current else None,
            "sd_checkpoint_hash": None,
            "samples_format": "png",
        }

    @route("/options", ["POST"])
    def set_options(options: dict[str, Any]):
        name = options.get("sd_model_checkpoint")
        if name is None:
            return None  # other webui options have no meaning here
        entry = service.backend.catalog.find(str(name))
        if entry is None:
            return error_response(404, "HTTPException", f"model {name!r} not found; see {PREFIX}/sd-models")
        try:
            service.switch_model(entry).wait()
        except UserError as error:
            return error_response(422, error, str(error))
        except Exception as error:
            log.exception("model switch failed")
            return error_response(500, error, f"loading {entry.title} failed: {type(error).__name__}: {error}")
        return None


def add_progress_routes(route: Callable, service: Service) -> None:
    @route("/progress", ["GET"])
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        job = service.queue.running
        waiting = service.queue.waiting_count()
        if job is None:
            state = progress_state(None, waiting)
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        snap = job.snapshot()
        fraction = snap.fraction
        elapsed = time.time() - (job.started or time.time())
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        current = None
        if snap.latents is not None and not skip_current_image:
            current = image_base64(service.backend.preview(snap.latents))
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": progress_state(job, waiting),
            "current_image": current,
            "textinfo": None,
        }

    @route("/interrupt", ["POST"])
    def interrupt() -> dict[str, Any]:
        service.queue.interrupt()
        return {}


def progress_state(job, waiting: int) -> dict[str, Any]:
    """AUTOMATIC1111's `shared.state.dict()`; `queue_size` (jobs waiting) is ours."""
    if job is None:
        return {
            "skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0, "queue_size": waiting,
        }  # fmt: skip
    snap = job.snapshot()
    return {
        "skipped": False,
        "interrupted": job.cancel_requested.is_set(),
        "stopping_generation": False,
        "job": f"{job.kind} {job.id}",
        "job_count": snap.batches,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "job_no": snap.batch,
        "sampling_step": snap.step,
        "sampling_steps": snap.total,
        "queue_size": waiting,
    }


def basic_auth(auth: tuple[str, str]) -> Callable:
    """HTTP basic auth for the API (the UI has gradio's login page), compared in constant time."""
    security = HTTPBasic()
    user, password = auth

    def check(credentials: HTTPBasicCredentials = Depends(security)) -> None:  # noqa: B008 (FastAPI dependency)
        good_user = secrets.compare_digest(credentials.username.encode(), user.encode())
        good_password = secrets.compare_digest(credentials.password.encode(), password.encode())
        if not (good_user and good_password):
            raise HTTPException(status_code=401, detail="incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return check
