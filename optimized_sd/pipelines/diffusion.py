"""`StableDiffusion`: a loaded model and its public API (`generate`, `txt2img`, `img2img`). What a
call computes is composed in `core` from shared steps and a task module (`txt2img`, `img2img`);
where it computes is `memory_session`'s business."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from PIL import Image
from torch import Tensor

from optimized_sd.attention import check_backend
from optimized_sd.config import FAMILY_NAMES, ModelConfig
from optimized_sd.errors import CheckpointError, CheckpointFieldError, FieldError, UserError
from optimized_sd.families import claiming
from optimized_sd.memory.device import compute_dtype, resolve_device
from optimized_sd.memory.offload import OffloadEngine
from optimized_sd.memory.planner import VAE_TILE, Plan, parse_bytes
from optimized_sd.memory.ram import parse_ram_budget
from optimized_sd.memory.report import MemoryMeter
from optimized_sd.models.ops import computed_shapes
from optimized_sd.models.text_encoder import PromptTokenizer
from optimized_sd.pipelines import core
from optimized_sd.pipelines.controlnet import (
    ControlNetSpec,
    ControlNetUnit,
    LoadedControlNet,
    control_image,
    controlnet_component,
    controlnet_name,
)
from optimized_sd.pipelines.core import Task
from optimized_sd.pipelines.hires import run_hires
from optimized_sd.pipelines.images import image_to_tensor, load_init_image, open_image, tensor_to_image
from optimized_sd.pipelines.img2img import IMG2IMG
from optimized_sd.pipelines.inpaint import Inpaint
from optimized_sd.pipelines.load_options import LoadOptions
from optimized_sd.pipelines.masks import InpaintOptions
from optimized_sd.pipelines.memory_session import TINY_DECODER, MemorySession
from optimized_sd.pipelines.networks import DEFAULT_EMBEDDINGS_DIR, DEFAULT_LORA_DIR
from optimized_sd.pipelines.previews import latent_preview, taesd_preview
from optimized_sd.pipelines.request import GenerationRequest, GenerationResult, check_size
from optimized_sd.pipelines.text import PromptEncoder, load_tower_tokenizers
from optimized_sd.pipelines.txt2img import TXT2IMG
from optimized_sd.pipelines.weight_storage import check_weight_kind, hold_gguf_weights, plan_storage
from optimized_sd.sampling import ModelSampling, ProgressCallback, classifier_free_guidance, discrete_sampling, scaled_linear_schedule
from optimized_sd.weights.embeddings import EmbeddingLibrary
from optimized_sd.weights.family import detect_family
from optimized_sd.weights.loading import LoadedModel, open_checkpoint, prepare_model, source_metadata
from optimized_sd.weights.lora import LoraSet
from optimized_sd.weights.prediction import resolve_prediction
from optimized_sd.weights.taesd import TinyAutoencoder, check_taesd_fits, is_taesd, open_taesd

__all__ = [  # the names callers have imported from here
    "GenerationRequest",
    "GenerationResult",
    "InpaintOptions",
    "StableDiffusion",
    "check_size",
    "image_to_tensor",
    "load",
    "load_init_image",
    "tensor_to_image",
]
log = logging.getLogger("optimized_sd")

FAMILY_LOAD_OPTIONS = ("distilled", "parts_from")  # load options a family with its own loader takes if its `Loader.options` say
REFINER = "refiner"  # the refiner's component in the base's session: its stages are reported as refiner_text, refiner_unet, ...


def task_for(request: GenerationRequest) -> Task:
    """The one place a request picks its task (inpainting: a fresh object per call, holding what the call prepared)."""
    if request.inpaint is not None:
        return Inpaint()
    return IMG2IMG if request.init_image is not None else TXT2IMG


class StableDiffusion:
    """A loaded model: call `txt2img` / `img2img` as often as needed; the weights stay where the
    memory plan put them between calls."""

    takes_init_image = True  # whether it can start from an image (img2img, inpainting, the hires fix's second pass)
    cfg_options = ("cfg_normalization", "cfg_truncation")  # request fields of a family's own CFG rule; warned of unless read
    reads_cfg_options = False  # whether its `guidance` reads them (Z-Image)

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str | None = None,
        precision: str = "autocast",
        memory: str = "auto",
        vram_budget: str | int | None = None,
        ram_budget: str | int | None = None,
        attention: str = "sdpa",
        vae_tiling: str = "auto",
        tokenizer: str | Path | None = None,
        lora_dir: str | Path = DEFAULT_LORA_DIR,
        embeddings_dir: str | Path = DEFAULT_EMBEDDINGS_DIR,
        weights: str | None = None,
        int8_matmul: bool = False,
        channels_last: bool = False,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.config: ModelConfig = loaded.config
        self.device = resolve_device(device)
        self.dtype = compute_dtype(self.device, precision)
        check_backend(attention, self.device)
        self.vae_tile = VAE_TILE
        budget = parse_bytes(vram_budget) if isinstance(vram_budget, str) else vram_budget
        host_budget = parse_ram_budget(ram_budget)
        gguf = hold_gguf_weights(self.model, loaded.source)  # a GGUF file's quantized blocks stay so in every mode
        self.storage = plan_storage(self.model, weights, self.dtype, self.device.type, loaded.source, gguf)
        self.memory = MemorySession(
            self.model, loaded.source, self.device, self.dtype, mode=memory, budget=budget, vae_tiling=vae_tiling, attention=attention,
            storage=self.storage, int8_matmul=int8_matmul, channels_last=channels_last, ram_budget=host_budget,
        )
        self.embeddings = EmbeddingLibrary(Path(embeddings_dir))
        self.setup_text(tokenizer_folders(tokenizer))
        self.schedule = scaled_linear_schedule(self.config.linear_start, self.config.linear_end, self.config.timesteps)
        self._model_hash: str | None = None
        self.prediction_reason = "family default"  # where the prediction type came from (set by `load`)
        self.vae_file: Path | None = None  # `--vae FILE` (set by `load`)
        self._vae_hash: str | None = None
        self.fast_vae: TinyAutoencoder | None = None  # `--vae` with a TAESD: decodes the images (set by `load`)
        self.preview_vae: TinyAutoencoder | None = None  # `--preview-decoder` (set by `load`)
        self.lora_dir = Path(lora_dir)
        # How `load` opened this model (device, precision, memory...), so a refiner opens the same way.
        self.load_options = LoadOptions(device=device, precision=precision, memory=memory, vram_budget=vram_budget, ram_budget=ram_budget,
                                        attention=attention,
                                        vae_tiling=vae_tiling, tokenizer=tokenizer, weights=weights, int8_matmul=int8_matmul,
                                        channels_last=channels_last)  # fmt: skip
        self.refiner: StableDiffusion | None = None  # the last `--refiner` a call used, kept for the next
        self.controlnets: list[LoadedControlNet] = []  # the last call's ControlNets by unit, kept for the next
        self.loras = self.lora_set()

    def lora_set(self) -> LoraSet:
        """The LoRAs this model can take (all of its family's tables)."""
        return LoraSet(self.config, computed_shapes(self.model))

    def setup_text(self, tokenizers: tuple[Path, ...]) -> None:
        """The tokenizers (`--tokenizer`: one folder serves every SD tower) and the prompt encoder."""
        if len(tokenizers) > 1:
            raise FieldError.about("tokenizer", f"gives {len(tokenizers)} folders; {self.config.family_name} takes one")
        folder = self.loaded.checkpoint.path if self.loaded.checkpoint.path.is_dir() else None
        towers = load_tower_tokenizers(self.config, folder, tokenizers[0] if tokenizers else None)
        self.tokenizer: PromptTokenizer = towers[0]
        self.text = PromptEncoder(self.model, towers, self.device, self.dtype, self.embeddings)

    @property
    def model_sampling(self) -> ModelSampling:
        """How this model is sampled, by its parameterisation (the resolved `prediction_type`: eps or v)."""
        return discrete_sampling(self.config.prediction_type, self.schedule)

    # -- what a family's pipeline class may say differently (`families.registry.Loader.pipeline`) ---------
    def with_defaults(self, request: GenerationRequest) -> GenerationRequest:
        """The request with every field it left to the model filled in: size, steps, scale and sampler from the
        family record's defaults, the latent channels from the VAE."""
        defaults = self.config.record.defaults
        size = self.config.default_size
        if not self.reads_cfg_options:
            for name in self.cfg_options:
                if getattr(request, name) is not None:
                    flag = "--" + name.replace("_", "-")
                    log.warning("%s has no effect on %s (Z-Image's CFG option)", flag, self.config.family_name)
            request = replace(request, **dict.fromkeys(self.cfg_options))
        return replace(
            request,
            height=request.height or size,
            width=request.width or size,
            steps=defaults.steps if request.steps is None else request.steps,
            scale=defaults.scale if request.scale is None else request.scale,
            sampler=request.sampler or defaults.sampler,
            latent_channels=request.latent_channels or self.config.vae.latent_channels,
        )

    def sampling_for(self, request: GenerationRequest) -> ModelSampling:
        """How this call is sampled (a flow model's shift may depend on the image size)."""
        return self.model_sampling

    def text_conditioning(self, request: GenerationRequest, prompts: list[str], negative: str | None):
        """(cond, uncond or None, embeddings used) for the batch's prompts (LoRA tags already taken out)."""
        return self.text.batch(prompts, negative, request.height, request.width)

    def denoiser_model(self, record, plan) -> core.Model:
        """The denoiser as a sampling `Model` (x, t, cond) -> raw output, counting its calls into `record`."""
        return core.unet_model(self, record)

    def guidance(self, model: core.Model, request: GenerationRequest, conditioning: core.ConditioningPair, side) -> core.EpsFn:
        """Classifier-free guidance over the prediction `model` (a family with its own rule overrides this)."""
        return classifier_free_guidance(model, *conditioning, request.scale, side_network=side)

    def metadata_extras(self, request: GenerationRequest) -> tuple[tuple[str, str], ...]:
        """Family-specific `name: value` pairs for the images' metadata."""
        return ()

    @property
    def dtype_bytes(self) -> int:
        return self.dtype.itemsize

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

    def prepare(self, request: GenerationRequest) -> Plan:
        """Plan the call and place the weights for it (what `generate` does first; a benchmark
        calls it alone to time loading apart from generating)."""
        task = task_for(request)
        return self.memory.prepare(core.planner_request(self, task, self.with_defaults(task.normalise(request))))

    def use_loras(self, weights: Mapping[Path, float]) -> None:
        """Make `weights` (file -> weight) the LoRAs merged into the weights as the memory engine places
        them; resident weights are placed again only when the set or a weight changed."""
        if self.loras.activate(weights):
            self.memory.set_tensor_hook(self.loras if self.loras.active else None)

    def use_controlnets(self, specs: Sequence[ControlNetSpec]) -> None:
        """Make the request's ControlNets components of the memory session (before the call is planned, so the
        plan counts them); a unit whose file is unchanged keeps its ControlNet and placement."""
        for index, spec in enumerate(specs):
            path = Path(spec.file)
            if index < len(self.controlnets) and self.controlnets[index].path == path:
                continue
            loaded = LoadedControlNet.open(path, index, self.config.family)
            self.memory.attach(controlnet_component(controlnet_name(index), loaded.model, loaded.opened.source, self.dtype.itemsize))
            if index < len(self.controlnets):
                self.controlnets[index].opened.source.close()
                self.controlnets[index] = loaded
            else:
                self.controlnets.append(loaded)
        for index in range(len(specs), len(self.controlnets)):
            self.memory.detach(controlnet_name(index))
            self.controlnets[index].opened.source.close()
        del self.controlnets[len(specs) :]

    def controlnet_units(self, specs: Sequence[ControlNetSpec]) -> list[ControlNetUnit]:
        """The units of `specs` on the ControlNets `use_controlnets` placed."""
        return [spec.unit(loaded.model, control_image(spec, index)) for index, (spec, loaded) in enumerate(zip(specs, self.controlnets))]

    def controlnet_metadata(self, specs: Sequence[ControlNetSpec]) -> list[str]:
        """sd-webui-controlnet's `ControlNet N` values for the request's units."""
        return [spec.metadata(loaded.opened.name, loaded.short_hash()) for spec, loaded in zip(specs, self.controlnets)]

    def close(self) -> None:
        """Release the weights' placement and the checkpoint's file maps (a long-lived server calls this)."""
        self.close_refiner()
        self.use_controlnets(())
        self.memory.release_engine()
        self.loaded.source.close()

    def close_refiner(self) -> None:
        if self.refiner is not None:
            self.memory.detach(REFINER)
            self.refiner.close()
            self.refiner = None

    def refiner_for(self, path: str | Path) -> StableDiffusion:
        """The SDXL refiner at `path`, opened as this model was (kept until a call asks for another). A base
        that is not SDXL, or a file that is not an SDXL refiner, is refused naming what it is."""
        path = Path(path)
        refiner_family = self.config.record.refiner  # the family that may take over this one's sampling
        if refiner_family is None:
            raise FieldError.about(
                "refiner", f"runs after an SDXL base model; {self.loaded.checkpoint.name} is an {self.config.family_name} model"
            )
        if self.refiner is not None and self.refiner.loaded.checkpoint.path == path:
            return self.refiner
        self.close_refiner()
        family = checkpoint_family(path, "refiner")
        if family != refiner_family:
            wanted = FAMILY_NAMES.get(refiner_family, refiner_family)
            raise FieldError.about("refiner", f"{path} is an {FAMILY_NAMES.get(family, family)} model, not an {wanted}")
        options = replace(self.load_options, vae=self.vae_file, lora_dir=self.lora_dir, embeddings_dir=self.embeddings.folder)
        base_tokenizer = self.loaded.checkpoint.path / "tokenizer_2"
        if not options.tokenizer and path.is_file() and base_tokenizer.is_dir():
            # a single-file refiner has no tokenizer; bigG's is the base folder's second
            options = replace(options, tokenizer=base_tokenizer)
        self.refiner = load(path, options)
        self.memory.attach(self.refiner.memory.as_component(REFINER))
        return self.refiner

    # -- generation ----------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, progress: ProgressCallback | None = None) -> GenerationResult:
        """One batch through its task (txt2img, or img2img with `init_image`). `progress(StepInfo)` is
        called before the first sampling step and after each; raising `errors.Interrupted` from it
        stops the call (the stage's memory is released) and re-raises it. With `hires` the call is two
        passes, each planned for its own size (`pipelines.hires`)."""
        if request.hires is not None:
            return run_hires(self, request, progress)
        return core.run_task(self, task_for(request), request, progress)

    def use_tiny_decoders(self, fast: TinyAutoencoder | None, preview: TinyAutoencoder | None) -> None:
        """Check the TAESD decoders (`--vae` with a TAESD, `--preview-decoder`) against the model and place
        them on the device for good: a few MB, counted by the memory plan as resident beside every stage.
        Images are still encoded (img2img, inpainting) by the checkpoint's own VAE; a TAESD encoder is dropped."""
        placed: dict[int, TinyAutoencoder] = {}
        for tiny, field in ((fast, "vae"), (preview, "preview_decoder")):
            if tiny is not None:
                check_taesd_fits(tiny, self.config, field)
                tiny.encoder = None
                placed[id(tiny)] = tiny.place(self.device, self.dtype)
        weights = sum(tiny.weight_bytes(self.dtype.itemsize) for tiny in placed.values())
        self.memory.place_for_good(TINY_DECODER, weights)
        self.fast_vae, self.preview_vae = fast, preview

    def preview(self, latents: Tensor) -> Image.Image:
        """The first image of a sampling step's latents as a picture: by a TAESD when one is loaded, else
        by the latent projection."""
        tiny = self.preview_vae or self.fast_vae
        if tiny is None or tiny.decoder is None:
            latent = self.config.record.latent
            return latent_preview(latents, upscale=latent.downscale, latent_format=latent)
        return taesd_preview(latents, tiny.decoder)

    def vae_decode(self, latent: Tensor, tiled: bool) -> Tensor:
        """Scaled latent (1, 4, h, w) -> pixels, as the decode stage does it (fp32 retry included)."""
        return core.VaeDecoder(self, tiled)(latent)

    def vae_hash(self) -> str | None:
        """AUTOMATIC1111's short hash of the `--vae` file, when one replaced the checkpoint's VAE (a TAESD has none)."""
        if self.vae_file is None or self.fast_vae is not None:
            return None
        if self._vae_hash is None:
            from optimized_sd.weights.hashing import cached_model_hash

            self._vae_hash = cached_model_hash(self.vae_file)
        return self._vae_hash

    def vae_name(self) -> str | None:
        """The metadata's `VAE`: the `--vae` file's name, or `taesd` for a tiny decoder (AUTOMATIC1111's VAE type)."""
        if self.fast_vae is not None:
            return "taesd"
        return self.vae_file.name if self.vae_file is not None else None

    def model_hash(self) -> str:
        """AUTOMATIC1111's short hash of the file (of the UNet weights for a diffusers folder)."""
        if self._model_hash is None:
            from optimized_sd.weights.hashing import cached_model_hash
            from optimized_sd.weights.loading import find_weight_file

            path = self.loaded.checkpoint.path
            self._model_hash = cached_model_hash(find_weight_file(path / "unet") if path.is_dir() else path)
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

    def inpaint(
        self,
        prompt: str,
        image: Image.Image | str | Path,
        mask: Image.Image | str | Path | None,
        *,
        n_samples: int = 1,
        invert_mask: bool = False,
        mask_blur: float = 4.0,
        inpaint_area: str = "whole",
        padding: int = 32,
        outpaint: tuple[int, int, int, int] | None = None,
        masked_content: str = "original",
        **options,
    ) -> list[Image.Image]:
        """Repaint where `mask` is white (any mode PIL reads; see `pipelines.masks`), or grow the
        canvas by `outpaint` = (left, right, top, bottom) pixels and paint the border. The images
        have the input's size (outpainting: the grown canvas); `height`/`width` set the generation
        size (default: the image's floored to 64; 512 for inpaint_area="masked"). Options are
        `GenerationRequest` fields; `strength` defaults to 1 (diffusers' default for inpainting).
        `masked_content` (below 1 only): "original", "fill", "latent-noise" or "latent-nothing"."""
        if not isinstance(image, Image.Image):
            image = open_image(image)
        inpaint = InpaintOptions(mask, invert_mask, mask_blur, inpaint_area, padding, tuple(outpaint) if outpaint else None, masked_content)
        inpaint.check()
        width, height = inpaint.generation_size(image.size)
        options = {"strength": 1.0, "width": width, "height": height, **{k: v for k, v in options.items() if v is not None}}
        request = GenerationRequest(prompts=repeat_prompt(prompt, n_samples), init_image=image, inpaint=inpaint, **options)
        return self.generate(request).images


def tokenizer_folders(tokenizer: str | Path | tuple | list | None) -> tuple[Path, ...]:
    """`--tokenizer` as given: none, one folder, or several (repeated)."""
    if tokenizer is None or tokenizer == "":
        return ()
    if isinstance(tokenizer, (tuple, list)):
        return tuple(Path(folder) for folder in tokenizer)
    return (Path(tokenizer),)


def checkpoint_family(path: Path, field: str) -> str:
    """The family of the checkpoint at `path` (its shapes only, nothing loaded); what is wrong with it, as the
    request field `field` that gave it."""
    try:
        checkpoint = open_checkpoint(path)
        try:
            return detect_family(checkpoint.source.shapes())
        finally:
            checkpoint.source.close()
    except CheckpointError as error:
        raise CheckpointFieldError.about(field, f"{path}: {error}") from None


def repeat_prompt(prompt: str, n_samples: int) -> list[str]:
    """The batch of one prompt, for the Python API's `n_samples`."""
    if n_samples < 1:
        raise UserError("n_samples must be at least 1")
    return [prompt] * n_samples


def load(checkpoint: str | Path, options: LoadOptions | None = None, /, **fields) -> StableDiffusion:
    """Open a checkpoint (CompVis .ckpt, single-file .safetensors or diffusers folder) for generation, as
    `options` say, with any `LoadOptions` field given as a keyword over them (every default is LoadOptions'):
    `vae`: a separate VAE file replacing the checkpoint's, or a TAESD decoder decoding the images in its place
    (the checkpoint's VAE still encodes); `preview_decoder`: a TAESD for `preview`; `prediction`: auto|eps|v (see
    `weights.prediction`); device, precision, memory, vram_budget, ram_budget, attention, vae_tiling, tokenizer;
    weights (fp16, bf16, fp8 or int8 storage of the Linear/Conv2d weights; None: the compute dtype),
    int8_matmul (int8 weights on the CPU: Linear layers on fbgemm's dynamic activation quantisation instead
    of dequantising to fp32 first; off by default: measured 1.15-1.18x slower on the whole UNet here, see
    benchmarks/weights_accuracy.py --speed), channels_last (the UNet channels-last on the CPU in fp32 where
    its weights stay placed, `full` and `turbo`; off by default: 0.82x alone, no faster in whole runs here,
    see benchmarks/cpu_options.py)."""
    options = replace(options or LoadOptions(), **fields)
    check_weight_kind(options.weights)
    text_encoders = tuple(Path(path) for path in options.text_encoders or ())
    opening = options.pipeline_kwargs()  # what the pipeline class takes
    family_options = {name: value for name in FAMILY_LOAD_OPTIONS if (value := getattr(options, name)) is not None}
    own = claiming(Path(checkpoint))  # a family with its own files and pipeline class (Flux)
    if own is not None:
        assert own.loader is not None
        given = {"config": options.config is not None, "ema": options.ema, "prediction": options.prediction not in ("auto", None),
                 "preview_decoder": options.preview_decoder is not None,
                 **{name: name not in own.loader.options for name in family_options}}  # fmt: skip
        refused = [name for name, is_given in given.items() if is_given]
        if refused:
            raise FieldError.about(refused[0], f"does not apply to {own.display_name}")
        loaded = own.loader.prepare(checkpoint, text_encoders, options.vae, **family_options)
        return own.loader.pipeline(loaded, **opening)
    parts_from = family_options.pop("parts_from", None)  # the SD families' loader takes it too
    if family_options:
        raise FieldError.about(next(iter(family_options)), "does not apply to this checkpoint's family")
    config, vae = options.config, options.vae
    if config is not None and not isinstance(config, ModelConfig):
        config = ModelConfig.from_file(Path(config))
    fast = open_taesd(vae, "vae") if vae is not None and is_taesd(vae) else None
    preview = None
    if options.preview_decoder is not None:
        same = fast is not None and Path(options.preview_decoder) == fast.path
        preview = fast if same else open_taesd(options.preview_decoder, "preview_decoder")
    loaded = prepare_model(checkpoint, config=config, ema=options.ema, vae=None if fast is not None else vae, parts_from=parts_from,
                           text_encoders=text_encoders)
    checkpoint_source = loaded.checkpoint.source
    prediction_type, why = resolve_prediction(
        options.prediction, loaded.config.family, loaded.checkpoint.path, set(checkpoint_source.keys()), source_metadata(checkpoint_source)
    )
    loaded.config = replace(loaded.config, prediction_type=prediction_type)
    loaded.model.config = loaded.config
    pipe = StableDiffusion(loaded, **opening)
    pipe.prediction_reason = why
    pipe.vae_file = Path(vae) if vae is not None else None
    pipe.use_tiny_decoders(fast, preview)
    return pipe
