"""txt2img and img2img: one pipeline, one generation path. The only module that puts the parts
(weights, models, memory engine, samplers) together."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from optimized_sd.attention import check_backend
from optimized_sd.config import ModelConfig
from optimized_sd.errors import UserError
from optimized_sd.memory.device import compute_dtype, resolve_device
from optimized_sd.memory.offload import OffloadEngine
from optimized_sd.memory.planner import VAE_TILE, VAE_TILE_OVERLAP, Plan, Request, parse_bytes
from optimized_sd.memory.report import MemoryMeter
from optimized_sd.memory.tiling import tiled_apply
from optimized_sd.models.text_encoder import PromptTokenizer, load_tokenizer
from optimized_sd.models.vae import AutoencoderKL
from optimized_sd.pipelines.memory_session import MemorySession
from optimized_sd.pipelines.networks import (
    DEFAULT_EMBEDDINGS_DIR,
    DEFAULT_LORA_DIR,
    TextConditioning,
    clip_prompt_tokens,
    encode_prompts,
    lora_weights,
    quoted_hashes,
    resolve_networks,
)
from optimized_sd.pipelines.output import ImageParameters
from optimized_sd.sampling import make_plan, sample, sampler_display_name, scaled_linear_schedule, start_latents
from optimized_sd.sampling.plan import schedule_display_name
from optimized_sd.weights.embeddings import EmbeddingLibrary
from optimized_sd.weights.loading import LoadedModel, materialize, prepare_model
from optimized_sd.weights.lora import LoraSet

log = logging.getLogger("optimized_sd")


@dataclass
class GenerationRequest:
    """Everything one call needs; txt2img is the case without `init_image`."""

    prompts: list[str]
    negative_prompt: str = ""
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    sampler: str = "plms"
    karras: bool = False
    seed: int | None = None
    height: int = 512
    width: int = 512
    latent_channels: int = 4
    downscale: int = 8
    unet_batch: int | None = None
    init_image: Image.Image | None = None
    strength: float = 0.75
    loras: Mapping[str | Path, float] | Sequence[str] | None = None  # {file: weight} or ['FILE[:WEIGHT]']
    schedule: str | None = None  # the k-samplers' sigma grid (sampling.SCHEDULE_TYPES); None: the default


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[ImageParameters] = field(default_factory=list)
    latents: Tensor | None = None  # the sampler's output, before VAE decoding (for parity checks)


def check_size(height: int, width: int, multiple: int = 8) -> None:
    """H and W must be multiples of 8 (the VAE's downscale); say the nearest valid size."""
    for name, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            nearest = max(multiple, int(round(value / multiple)) * multiple)
            raise UserError(f"{name} {value} is not a multiple of {multiple}; the nearest valid size is {nearest}")


def load_init_image(path: Path | str, height: int | None, width: int | None) -> Image.Image:
    """Open any image PIL reads as RGB, at (W, H) when given, else its own size floored to 64."""
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"init image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"init image {path} is not a readable image: {error}") from None
    target_w = width if width is not None else image.width - image.width % 64
    target_h = height if height is not None else image.height - image.height % 64
    if target_w < 64 or target_h < 64:
        raise UserError(f"init image {path} is {image.width}x{image.height}; it must be at least 64x64")
    check_size(target_h, target_w)
    return image if image.size == (target_w, target_h) else image.resize((target_w, target_h), Image.LANCZOS)


def image_to_tensor(image: Image.Image) -> Tensor:
    """PIL RGB -> (1, 3, H, W) float in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def tensor_to_image(pixels: Tensor) -> Image.Image:
    """(1, 3, H, W) in about [-1, 1] -> PIL RGB."""
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


class StableDiffusion:
    """A loaded model: call `txt2img` / `img2img` as often as needed; the weights stay where the
    memory plan put them between calls."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str | None = None,
        precision: str = "autocast",
        memory: str = "auto",
        vram_budget: str | int | None = None,
        attention: str = "sdpa",
        vae_tiling: str = "auto",
        tokenizer: str | Path | None = None,
        lora_dir: str | Path = DEFAULT_LORA_DIR,
        embeddings_dir: str | Path = DEFAULT_EMBEDDINGS_DIR,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.config: ModelConfig = loaded.config
        self.device = resolve_device(device)
        self.dtype = compute_dtype(self.device, precision)
        check_backend(attention, self.device)
        self.vae_tile = VAE_TILE
        self.dtype_bytes = self.dtype.itemsize
        budget = parse_bytes(vram_budget) if isinstance(vram_budget, str) else vram_budget
        self.memory = MemorySession(
            self.model, loaded.source, self.device, self.dtype, mode=memory, budget=budget, vae_tiling=vae_tiling, attention=attention
        )
        tokenizer_dir = Path(tokenizer) if tokenizer else loaded.checkpoint.tokenizer_dir
        self.tokenizer: PromptTokenizer = load_tokenizer(tokenizer_dir)
        self.schedule = scaled_linear_schedule(self.config.linear_start, self.config.linear_end, self.config.timesteps)
        self._model_hash: str | None = None
        self.lora_dir = Path(lora_dir)
        self.embeddings = EmbeddingLibrary(Path(embeddings_dir))
        self.loras = LoraSet(self.config, {key: tuple(value.shape) for key, value in self.model.state_dict().items()})

    # -- memory (delegated: MemorySession owns every placement decision) ----------------------
    @property
    def engine(self) -> OffloadEngine | None:
        return self.memory.engine

    @property
    def mode(self) -> str | None:
        return self.memory.mode

    @property
    def plan(self) -> Plan | None:
        return self.memory.plan

    @property
    def meter(self) -> MemoryMeter:
        return self.memory.meter

    def planner_request(self, request: GenerationRequest) -> Request:
        """What the planner needs to know of a call."""
        return Request(
            request.height,
            request.width,
            batch=len(request.prompts),
            guidance=request.scale != 1.0,
            unet_batch=request.unet_batch,
            dtype_bytes=self.dtype_bytes,
            encodes_image=request.init_image is not None,
        )

    def prepare(self, request: GenerationRequest) -> Plan:
        """Plan the call and place the weights for it (what `generate` does first)."""
        return self.memory.prepare(self.planner_request(request))

    def close(self) -> None:
        """Release the weights' placement and the checkpoint's file maps (a long-lived server calls this)."""
        self.memory.release_engine()
        self.loaded.source.close()

    # -- stages --------------------------------------------------------------------------------
    def use_loras(self, weights: Mapping[Path, float]) -> None:
        """Make `weights` (file -> weight) the LoRAs merged into the weights as the memory engine places
        them; resident weights are placed again only when the set or a weight changed."""
        if self.loras.activate(weights):
            self.memory.set_tensor_hook(self.loras if self.loras.active else None)

    def vae_decode(self, latent: Tensor, tiled: bool) -> Tensor:
        """Scaled latent (1, 4, h, w) -> pixels; a non-finite fp16 result is decoded again in fp32."""
        vae = self.model.first_stage_model
        z = (latent / self.config.scale_factor).to(self.dtype)
        pixels = self.apply_vae(vae.decode, z, tiled, scale=self.config.vae.downscale)
        if not torch.isfinite(pixels).all() and self.dtype != torch.float32:
            log.warning("the VAE gave NaN/inf in %s; decoding this image again in fp32", str(self.dtype).split(".")[-1])
            pixels = self.apply_vae(self.fp32_decoder().decode, z.float(), tiled, scale=self.config.vae.downscale)
        return pixels

    def fp32_decoder(self) -> AutoencoderKL:
        """A float32 copy of the VAE decoder, built only when fp16 decoding overflowed."""
        with torch.device("meta"):
            vae = AutoencoderKL(self.config.vae)
        for name in ("post_quant_conv", "decoder"):
            materialize(vae.get_submodule(name), f"first_stage_model.{name}.", self.loaded.source, self.device, torch.float32)
        return vae

    def apply_vae(self, fn: Callable[[Tensor], Tensor], x: Tensor, tiled: bool, scale: float) -> Tensor:
        """Run a VAE half whole, or in overlapping tiles of `vae_tile` pixels blended together."""
        if not tiled:
            return fn(x)
        downscale = self.config.vae.downscale
        tile = self.vae_tile if scale < 1 else self.vae_tile // downscale
        overlap = VAE_TILE_OVERLAP if scale < 1 else VAE_TILE_OVERLAP // downscale
        return tiled_apply(fn, x, tile=tile, overlap=overlap, scale=scale)

    def eps_model(self, cond: Tensor, uncond: Tensor | None, scale: float, record) -> Callable[[Tensor, Tensor], Tensor]:
        """Classifier-free guidance (Ho & Salimans 2022) over the UNet: eps_u + scale * (eps_c - eps_u)."""
        unet = self.model.model.diffusion_model
        context = cond if uncond is None else torch.cat([uncond, cond])  # the same at every step

        def eps(x: Tensor, t: Tensor) -> Tensor:
            record.steps += 1
            x_in, t_in = x.to(self.dtype), t.to(self.device, torch.float32)
            if uncond is None:
                return unet(x_in, t_in, context).float()
            both = unet(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), context)
            eps_uncond, eps_cond = both.float().chunk(2)
            return eps_uncond + scale * (eps_cond - eps_uncond)

        return eps

    # -- generation ----------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, progress: Callable[[int, int], None] | None = None) -> GenerationResult:
        """One batch: text -> (image encode) -> sampling -> decode, each stage under the memory plan."""
        if not request.prompts:
            raise UserError("no prompt given")
        if request.init_image is not None:
            request = replace(request, width=request.init_image.width, height=request.init_image.height)
        check_size(request.height, request.width, request.downscale)
        if request.latent_channels != self.config.unet.in_channels:
            raise UserError(f"--C {request.latent_channels}: this model's latents have {self.config.unet.in_channels} channels")
        if request.downscale != self.config.vae.downscale:
            raise UserError(f"--f {request.downscale}: this model's VAE downscales by {self.config.vae.downscale}")
        if request.unet_batch is not None and request.unet_batch < 1:
            raise UserError("--unet_bs must be at least 1")
        strength = request.strength if request.init_image is not None else 1.0
        plan = make_plan(
            request.sampler,
            request.steps,
            strength=strength,
            eta=request.eta,
            karras=request.karras,
            schedule=self.schedule,
            schedule_type=request.schedule,
        )
        networks = resolve_networks(request.prompts, request.negative_prompt, lora_weights(request.loras), self.lora_dir)
        self.use_loras(networks.loras)
        seed = request.seed if request.seed is not None else random.randint(0, 2**32 - 1)
        seeds = [seed + i for i in range(len(request.prompts))]
        tiled = self.prepare(request).vae_tiling

        def encode_text(record) -> TextConditioning:
            negative = networks.negative_prompt if request.scale != 1.0 else None
            tokens = clip_prompt_tokens(self.tokenizer.tokenizer)
            return encode_prompts(self.model.cond_stage_model, tokens, self.embeddings, networks.prompts, negative, self.device)

        text = self.memory.run_stage("text", encode_text)
        cond = text.cond.to(self.dtype)
        uncond = None if text.uncond is None else text.uncond.to(self.dtype).expand(len(request.prompts), -1, -1)
        init_latents = None
        if request.init_image is not None:
            pixels = image_to_tensor(request.init_image).to(self.device, self.dtype)

            def encode_image(record) -> Tensor:
                vae = self.model.first_stage_model
                return self.apply_vae(vae.encode, pixels, tiled, scale=1 / self.config.vae.downscale).float()

            init_latents = self.memory.run_stage("vae_encode", encode_image) * self.config.scale_factor
            init_latents = init_latents.expand(len(seeds), -1, -1, -1)

        shape = (1, request.latent_channels, request.height // request.downscale, request.width // request.downscale)
        noise = torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])
        x = start_latents(plan, noise.to(self.device), init_latents)

        def denoise(record) -> Tensor:
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            return sample(plan, self.eps_model(cond, uncond, request.scale, record), x, generators, progress)

        latents = self.memory.run_stage("unet", denoise) if plan.num_steps else x

        def decode(record) -> list[Image.Image]:
            return [tensor_to_image(self.vae_decode(latents[i : i + 1], tiled)) for i in range(len(seeds))]

        images = self.memory.run_stage("vae_decode", decode)
        display = sampler_display_name(request.sampler, plan.karras)
        extra = []
        if plan.schedule_type not in ("", "linspace"):
            extra.append(("Schedule type", schedule_display_name(plan.schedule_type)))
        lora_hashes = quoted_hashes({path.stem: path for path in networks.loras}, lora=True)
        ti_hashes = quoted_hashes(text.embeddings, lora=False)
        extra += [(name, value) for name, value in (("Lora hashes", lora_hashes), ("TI hashes", ti_hashes)) if value]
        parameters = [
            ImageParameters(
                prompt=prompt,
                negative_prompt=request.negative_prompt,
                steps=request.steps,
                sampler=display,
                cfg_scale=request.scale,
                seed=s,
                width=request.width,
                height=request.height,
                model_hash=self.model_hash(),
                model_name=self.loaded.checkpoint.name,
                strength=strength if request.init_image is not None else None,
                extra=tuple(extra),
            )
            for prompt, s in zip(request.prompts, seeds)
        ]
        return GenerationResult(images, seeds, parameters, latents)

    def model_hash(self) -> str:
        """AUTOMATIC1111's short hash of the file (of the UNet weights for a diffusers folder)."""
        if self._model_hash is None:
            from optimized_sd.weights.hashing import sha256_short
            from optimized_sd.weights.loading import find_weight_file

            path = self.loaded.checkpoint.path
            self._model_hash = sha256_short(find_weight_file(path / "unet") if path.is_dir() else path)
        return self._model_hash

    def txt2img(self, prompt: str, *, n_samples: int = 1, **options) -> list[Image.Image]:
        """Generate `n_samples` images for a prompt; options are `GenerationRequest` fields."""
        return self.generate(GenerationRequest(prompts=repeat_prompt(prompt, n_samples), **options)).images

    def img2img(self, prompt: str, init_image: Image.Image | str | Path, *, n_samples: int = 1, **options) -> list[Image.Image]:
        """Edit an image (a PIL image or a path); `strength` in [0, 1] says how much may change."""
        prompts = repeat_prompt(prompt, n_samples)
        if not isinstance(init_image, Image.Image):
            init_image = load_init_image(init_image, options.pop("height", None), options.pop("width", None))
        return self.generate(GenerationRequest(prompts=prompts, init_image=init_image, **options)).images


def repeat_prompt(prompt: str, n_samples: int) -> list[str]:
    """The batch of one prompt, for the Python API's `n_samples`."""
    if n_samples < 1:
        raise UserError("n_samples must be at least 1")
    return [prompt] * n_samples


def load(
    checkpoint: str | Path,
    *,
    config: str | Path | ModelConfig | None = None,
    ema: bool = False,
    **options,
) -> StableDiffusion:
    """Open a checkpoint (CompVis .ckpt, single-file .safetensors or diffusers folder) for generation.
    Options: device, precision, memory, vram_budget, attention, vae_tiling, tokenizer, lora_dir, embeddings_dir."""
    if config is not None and not isinstance(config, ModelConfig):
        config = ModelConfig.from_file(Path(config))
    return StableDiffusion(prepare_model(checkpoint, config=config, ema=ema), **options)
