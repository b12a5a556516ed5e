"""The steps every task shares, and `run_task`, which composes them:

    prompts -> Conditioning -> (task: start latents, model wrapper) -> denoiser chain -> sampler
            -> latents -> VAE decode -> images + metadata

Each step that computes runs as a stage of `pipe.memory` (which decides where the weights are and
retries a stage after running out of memory). A task (txt2img, img2img, next inpainting) supplies
only what differs: how its request is normalised, its sampling strength, the latents the sampler
starts from and, optionally, a wrapper around the UNet call (inpainting's mask/image concat)."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from optimized_sd.attention import use_attention
from optimized_sd.errors import UserError
from optimized_sd.memory.planner import VAE_TILE_OVERLAP, Request
from optimized_sd.memory.report import StageRecord
from optimized_sd.memory.tiling import tiled_apply
from optimized_sd.models.vae import AutoencoderKL
from optimized_sd.pipelines.controlnet import control_side_network, controlnet_name
from optimized_sd.pipelines.images import image_to_tensor, tensor_to_image
from optimized_sd.pipelines.memory_session import is_out_of_memory
from optimized_sd.pipelines.networks import PromptNetworks, lora_weights, network_hashes, resolve_networks
from optimized_sd.pipelines.output import ImageParameters
from optimized_sd.pipelines.request import GenerationRequest, GenerationResult, check_request
from optimized_sd.sampling import (
    Conditioning,
    EpsFn,
    Model,
    ProgressCallback,
    SamplingPlan,
    SideNetwork,
    StepInfo,
    handover_step,
    make_plan,
    sample,
    sampler_display_name,
    schedule_display_name,
)
from optimized_sd.weights.loading import materialize

if TYPE_CHECKING:
    from optimized_sd.pipelines.diffusion import StableDiffusion

log = logging.getLogger("optimized_sd")

ConditioningPair = tuple[Conditioning, Conditioning | None]  # (cond, uncond): uncond None when guidance is off


class Task:
    """What differs between tasks; the defaults are txt2img's."""

    name = "txt2img"
    encodes_image = False  # the planner reserves room for a VAE encode
    decodes = True  # False: the call's latents are its result, no images (a hires fix's first pass before a latent upscale)

    def normalise(self, request: GenerationRequest) -> GenerationRequest:
        """The request as this task runs it (img2img: the init image's size)."""
        return request

    def strength(self, request: GenerationRequest) -> float:
        """How much of the schedule runs (1: all of it, from pure noise)."""
        return 1.0

    def start_latents(self, pipe: StableDiffusion, request: GenerationRequest, plan: SamplingPlan, noise: Tensor, tiled: bool) -> Tensor:
        """The x the sampler starts from, given per-image seeded noise (B, C, h, w) on the device."""
        raise NotImplementedError

    def wrap_model(self, model: Model) -> Model:
        """A wrapper around the UNet call, inside guidance (inpainting concatenates mask and image latents)."""
        return model

    def side_network(self, pipe: StableDiffusion, request: GenerationRequest, plan: SamplingPlan) -> SideNetwork | None:
        """A network computing side inputs for every UNet call (a ControlNet's residuals), or None. It is
        given the call's request and plan (a ControlNet's window counts the plan's steps); the default runs
        the request's ControlNets."""
        return controlnet_side_network(pipe, request, plan) if request.controlnets else None

    def step_callback(self, progress: ProgressCallback | None) -> ProgressCallback | None:
        """The sampler's per-step callback: the caller's `progress`, or a wrapper that also edits the
        state between steps (inpainting with a 4-channel UNet puts the unmasked latents back)."""
        return progress

    def finish(self, images: list[Image.Image]) -> list[Image.Image]:
        """The decoded images as the caller gets them (inpainting pastes them back into the canvas)."""
        return images

    def metadata_strength(self, request: GenerationRequest) -> float | None:
        """The `Denoising strength` written into the images' metadata, when the task has one."""
        return None


# -- prompt -> Conditioning -------------------------------------------------------------------


def encode_conditioning(
    pipe: StableDiffusion, request: GenerationRequest, networks: PromptNetworks
) -> tuple[Conditioning, Conditioning | None, dict[str, Path]]:
    """(cond, uncond, embeddings used) for the batch, uncond None when guidance is off, by the family's
    text step (`pipelines.text.PromptEncoder`: every tower with AUTOMATIC1111's emphasis and 75-token
    chunks, optimizedSD's weighted subprompts, embeddings by name, SDXL's `y` and zero negative)."""

    def work(record: StageRecord) -> tuple[Conditioning, Conditioning | None, dict[str, Path]]:
        negative = networks.negative_prompt if request.guided else None
        return pipe.text_conditioning(request, networks.prompts, negative)

    return pipe.memory.run_stage("text", work)


# -- latents ----------------------------------------------------------------------------------


def seeds_for(request: GenerationRequest) -> list[int]:
    """Image i of the batch uses seed + i; a random first seed when none is given."""
    seed = request.seed if request.seed is not None else random.randint(0, 2**32 - 1)
    return [seed + i for i in range(len(request.prompts))]


def seeded_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """(B, *shape) float32 N(0, I), image i drawn on the CPU from its own seed: the same on any device."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]).to(device)


def apply_vae(pipe: StableDiffusion, fn: Callable[[Tensor], Tensor], x: Tensor, tiled: bool, scale: float) -> Tensor:
    """Run a VAE half whole, or in overlapping tiles of `pipe.vae_tile` pixels blended together."""
    if not tiled:
        return fn(x)
    downscale = pipe.config.vae.downscale
    tile = pipe.vae_tile if scale < 1 else pipe.vae_tile // downscale
    overlap = VAE_TILE_OVERLAP if scale < 1 else VAE_TILE_OVERLAP // downscale
    return tiled_apply(fn, x, tile=tile, overlap=overlap, scale=scale)


def encode_image(pipe: StableDiffusion, image: Image.Image, batch: int, tiled: bool) -> Tensor:
    """Init image -> scaled latents (batch, C, h, w), float32, one VAE encode shared by the batch."""
    return encode_pixels(pipe, image_to_tensor(image), batch, tiled)


def encode_pixels(pipe: StableDiffusion, pixels: Tensor, batch: int, tiled: bool) -> Tensor:
    """(1, 3, H, W) pixels in [-1, 1] -> scaled latents (batch, C, h, w), float32, as the `vae_encode`
    stage; the latents are the mean of the VAE's latent distribution (no sampling: deterministic)."""
    pixels = pixels.to(pipe.device, pipe.dtype)

    def work(record: StageRecord) -> Tensor:
        vae = pipe.model.first_stage_model
        return apply_vae(pipe, vae.encode, pixels, tiled, scale=1 / pipe.config.vae.downscale).float()

    latent = pipe.config.record.latent
    latents = (pipe.memory.run_stage("vae_encode", work) - latent.shift) * pipe.config.scale_factor
    return latents.expand(batch, -1, -1, -1)


# -- sampling ---------------------------------------------------------------------------------


def unet_model(pipe: StableDiffusion, record: StageRecord) -> Model:
    """The UNet as a `Model`: x in the compute dtype, float32 out, `y` and control residuals passed only
    when the conditioning has them. Counts its calls into the stage record (`steps`: UNet evaluations)."""
    unet = pipe.model.model.diffusion_model

    def call(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        record.steps += 1
        x_in, t_in = x.to(pipe.dtype), t.to(pipe.device, torch.float32)
        extras = {} if cond.y is None else {"y": cond.y}
        if cond.control is not None:
            control = cond.control.to(pipe.device, pipe.dtype)
            extras.update(down_residuals=control.down, middle_residual=control.middle)
        return unet(x_in, t_in, cond.context, **extras).float()

    return call


def controlnet_side_network(pipe: StableDiffusion, request: GenerationRequest, plan: SamplingPlan) -> SideNetwork:
    """The request's ControlNets (placed by `pipe.use_controlnets` before the call was planned) as one side network:
    their hints encoded once, as the `controlnet` stage; a unit whose window ends before the last step leaves
    the device then (its component released for the rest of the call, noted in the report)."""
    units = pipe.controlnet_units(request.controlnets)
    width, height = request.width, request.height

    def work(record: StageRecord) -> list[Tensor]:
        return [unit.model.encode_hint(unit.hint(width, height).to(pipe.device, pipe.dtype)) for unit in units]

    hints = pipe.memory.run_stage("controlnet", work)

    def window_ended(index: int, step: int) -> None:
        pipe.memory.release_component(controlnet_name(index), f"released after step {step}")

    return control_side_network(units, plan, width, height, request.guided, pipe.dtype, hints=hints, window_ended=window_ended)


def guided_eps(
    pipe: StableDiffusion,
    task: Task,
    request: GenerationRequest,
    plan: SamplingPlan,
    record: StageRecord,
    conditioning: ConditioningPair,
    side: SideNetwork | None,
) -> EpsFn:
    """CFG(side network(prediction(task wrapper(pipe's UNet)))) over the conditioning: what the sampler calls."""
    model = plan.model_sampling.prediction(task.wrap_model(pipe.denoiser_model(record, plan)))
    return pipe.guidance(model, request, conditioning, side)


class Handover:
    """An SDXL refiner taking over the sampling from the base after `step` steps (`sampling.handover_step`).
    `take_over` runs between two steps: the refiner is planned beside the base (whose weights are released
    when the two do not both fit), placed, and its own text conditioning computed (bigG alone, aesthetic
    score), as AUTOMATIC1111 swaps the model and recomputes the conditioning mid-sampling."""

    def __init__(
        self, base: StableDiffusion, refiner: StableDiffusion, task: Task, request: GenerationRequest, prompts: PromptNetworks, step: int
    ) -> None:
        self.base, self.refiner, self.task, self.request, self.prompts, self.step = base, refiner, task, request, prompts, step
        self.taken = False  # whether the refiner ran (a switch past the last step leaves the base alone)

    def take_over(self) -> tuple[StableDiffusion, ConditioningPair]:
        refiner, request = self.refiner, self.request
        refiner.memory.prepare(replace(planner_request(refiner, self.task, request), encodes_image=False))
        cond, uncond, _ = encode_conditioning(refiner, request, self.prompts)
        self.taken = True
        return refiner, (cond, uncond)


def denoise(
    pipe: StableDiffusion,
    task: Task,
    request: GenerationRequest,
    plan: SamplingPlan,
    x: Tensor,
    conditioning: ConditioningPair,
    seeds: list[int],
    progress: ProgressCallback | None,
    handover: Handover | None = None,
    side: SideNetwork | None = None,
) -> Tensor:
    """Run the sampler over `guided_eps` as the `unet` stage. With a `handover` the one sampler run (its
    state, history and noise generators) continues after `handover.step` steps with the refiner's model
    inside the refiner's own `unet` stage: the base's stage ends first, so its streamed weights leave.
    `side` (the base's side network: ControlNets) never reaches the refiner's pass."""
    if not plan.num_steps:
        return x
    callback = task.step_callback(progress)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    if handover is not None and handover.step == 0:  # the refiner alone (an img2img that starts below the switch)
        pipe, conditioning = handover.take_over()
        handover, side = None, None
    if handover is None or handover.step >= plan.num_steps:

        def work(record: StageRecord) -> Tensor:
            return sample(plan, guided_eps(pipe, task, request, plan, record, conditioning, side), x, generators, callback)

        return pipe.memory.run_stage("unet", work)
    relay = handover
    with contextlib.ExitStack() as stage:
        eps = [guided_eps(pipe, task, request, plan, stage.enter_context(pipe.memory.stage("unet")), conditioning, side)]

        def relayed_progress(info: StepInfo) -> None:
            if callback is not None:
                callback(info)
            if info.step == relay.step:
                stage.close()  # the base's sampling stage ends here
                refiner, refined = relay.take_over()
                eps[0] = guided_eps(refiner, task, request, plan, stage.enter_context(refiner.memory.stage("unet")), refined, None)

        try:
            return sample(plan, lambda x_in, t: eps[0](x_in, t), x, generators, relayed_progress)
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            which = "the refiner" if relay.taken else "the base"
            advice = "lower the image size or use the stream memory mode"
            raise UserError(f"out of memory sampling with {which} beside a refiner; {advice}") from None


# -- latents -> images --------------------------------------------------------------------------


def check_finite(tensor: Tensor, what: str) -> None:
    """A NaN or inf would become a black image saved as a success: refuse it, naming the stage."""
    if not torch.isfinite(tensor).all():
        raise UserError(
            f"{what}: the model overflowed or its weights hold NaN; try full precision, a lower guidance scale or another "
            "checkpoint (no image was written)"
        )


class VaeDecoder:
    """Scaled latents -> pixels for one decode stage. A non-finite fp16/bf16 result is decoded again
    in float32 with a copy of the decoder built at the first overflow and shared by the rest of the
    batch; it is dropped with this object, so a long-lived pipeline holds no second decoder."""

    def __init__(self, pipe: StableDiffusion, tiled: bool) -> None:
        self.pipe = pipe
        self.tiled = tiled
        self.fp32: AutoencoderKL | None = None

    def __call__(self, latent: Tensor) -> Tensor:
        """(1, C, h, w) scaled latent -> (1, 3, H, W) pixels in about [-1, 1]."""
        pipe = self.pipe
        if pipe.fast_vae is not None and pipe.fast_vae.decoder is not None:  # a TAESD takes the UNet's latents as they are
            return pipe.fast_vae.decoder.decode(latent.to(pipe.dtype))
        z = (latent / pipe.config.scale_factor + pipe.config.record.latent.shift).to(pipe.dtype)
        pixels = apply_vae(pipe, pipe.model.first_stage_model.decode, z, self.tiled, scale=pipe.config.vae.downscale)
        if not torch.isfinite(pixels).all() and pipe.dtype != torch.float32:
            log.warning("the VAE gave NaN/inf in %s; decoding this image again in fp32", str(pipe.dtype).split(".")[-1])
            pixels = apply_vae(pipe, self.fp32_decoder().decode, z.float(), self.tiled, scale=pipe.config.vae.downscale)
        check_finite(pixels, "VAE decoding produced non-finite pixels (NaN/inf)")
        return pixels

    def fp32_decoder(self) -> AutoencoderKL:
        if self.fp32 is None:
            with torch.device("meta"):
                vae = AutoencoderKL(self.pipe.config.vae)
            for name in ("post_quant_conv", "decoder") if self.pipe.config.vae.use_quant_conv else ("decoder",):
                materialize(vae.get_submodule(name), f"first_stage_model.{name}.", self.pipe.loaded.source, self.pipe.device, torch.float32)
            self.fp32 = vae
        return self.fp32


def decode_images(pipe: StableDiffusion, latents: Tensor, tiled: bool) -> list[Image.Image]:
    """Latents (B, C, h, w) -> B images, decoded one at a time as the `vae_decode` stage."""

    def work(record: StageRecord) -> list[Image.Image]:
        decode = VaeDecoder(pipe, tiled)
        return [tensor_to_image(decode(latents[i : i + 1])) for i in range(latents.shape[0])]

    return pipe.memory.run_stage("vae_decode", work)


def image_parameters(
    pipe: StableDiffusion,
    task: Task,
    request: GenerationRequest,
    seeds: list[int],
    plan: SamplingPlan,
    loras: Mapping[Path, float],
    embeddings: Mapping[str, Path],
    refiner: StableDiffusion | None = None,
) -> list[ImageParameters]:
    """What made each image, as AUTOMATIC1111's metadata (prompts as written, LoRA tags included; the
    refiner, when it ran, as `Refiner: NAME [hash]` and `Refiner switch at`)."""
    display = sampler_display_name(request.sampler, plan.karras)
    extra = list(pipe.metadata_extras(request))
    if plan.schedule_type not in ("", "linspace"):  # linspace is diffusers' grid, which AUTOMATIC1111 has no name for
        extra.append(("Schedule type", schedule_display_name(plan.schedule_type)))
    lora_hashes = network_hashes({path.stem: path for path in loras}, lora=True)
    hashes = (("Lora hashes", lora_hashes), ("TI hashes", network_hashes(embeddings, lora=False)))
    extra += [(name, value) for name, value in hashes if value]
    extra += [(f"ControlNet {index}", line) for index, line in enumerate(pipe.controlnet_metadata(request.controlnets))]
    if refiner is not None:
        extra.append(("Refiner", f"{refiner.loaded.checkpoint.name} [{refiner.model_hash()}]"))
        extra.append(("Refiner switch at", f"{request.refiner_switch:g}"))
    return [
        ImageParameters(
            prompt=prompt,
            negative_prompt=request.negative_prompt,
            steps=request.steps,
            sampler=display,
            cfg_scale=request.scale,
            seed=seed,
            width=request.width,
            height=request.height,
            model_hash=pipe.model_hash(),
            model_name=pipe.loaded.checkpoint.name,
            strength=task.metadata_strength(request),
            vae_hash=pipe.vae_hash(),
            vae_name=pipe.vae_name(),
            extra=tuple(extra),
        )
        for prompt, seed in zip(request.prompts, seeds)
    ]


# -- the composition ----------------------------------------------------------------------------


def planner_request(pipe: StableDiffusion, task: Task, request: GenerationRequest) -> Request:
    """What the memory planner needs to know of a call."""
    return Request(
        request.height,
        request.width,
        batch=len(request.prompts),
        guidance=request.guided,
        unet_batch=request.unet_batch,
        dtype_bytes=pipe.dtype.itemsize,
        encodes_image=task.encodes_image,
        tiny_decode=pipe.fast_vae is not None,
        previews=pipe.preview_vae is not None,
    )


def run_task(pipe: StableDiffusion, task: Task, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
    """One batch: validate, plan memory, text -> start latents -> sampling -> decode -> metadata.
    An exception from `progress` (e.g. `errors.Interrupted`) leaves the running stage, which
    releases that stage's weights, and propagates."""
    request = pipe.with_defaults(task.normalise(request))
    check_request(request, pipe.config)
    plan = make_plan(
        request.sampler,
        request.steps,
        strength=task.strength(request),
        eta=request.eta,
        karras=request.karras,
        schedule_type=request.schedule,
        model_sampling=pipe.sampling_for(request),
    )
    refiner = pipe.refiner_for(request.refiner) if request.refiner is not None else None
    networks = resolve_networks(request.prompts, request.negative_prompt, lora_weights(request.loras), pipe.lora_dir)
    seeds = seeds_for(request)
    # One attention scope per call: a backend fallback is reported once per call, not per layer or per process.
    with use_attention(pipe.memory.attention):
        pipe.use_loras(networks.loras)  # before placement, so the weights are placed (and patched) once
        pipe.use_controlnets(request.controlnets)  # components of the plan: counted, then placed with the model
        # A refiner placed by a call before (a session of this one) stays only if both fit.
        tiled = pipe.memory.prepare(planner_request(pipe, task, request)).vae_tiling
        cond, uncond, embeddings = encode_conditioning(pipe, request, networks)
        conditioning = (cond, uncond)
        latent_shape = (request.latent_channels, request.height // request.downscale, request.width // request.downscale)
        noise = seeded_noise(seeds, latent_shape, pipe.device)
        x = task.start_latents(pipe, request, plan, noise, tiled)
        side = task.side_network(pipe, request, plan)
        handover = None
        if refiner is not None:
            handover = Handover(pipe, refiner, task, request, networks, handover_step(plan, request.refiner_switch))
        latents = denoise(pipe, task, request, plan, x, conditioning, seeds, progress, handover, side)
        check_finite(latents, "sampling produced non-finite latents (NaN/inf)")
        # The model that sampled last decodes (its VAE is the same SDXL VAE, and it is the one placed).
        last = refiner if handover is not None and handover.taken else pipe
        decode_tiled = last.memory.plan.vae_tiling if last.memory.plan else tiled
        images = task.finish(decode_images(last, latents, decode_tiled)) if task.decodes else []
    parameters = image_parameters(pipe, task, request, seeds, plan, networks.loras, embeddings, refiner if last is refiner else None)
    return GenerationResult(images, seeds, parameters, latents)
