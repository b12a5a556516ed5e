"""Flux.2 klein txt2img through the shared task steps (`core.run_task`), as diffusers' Flux2KleinPipeline computes it.

What differs from Flux.1 (`pipelines.flux`, whose metadata and hash this reuses): the text step (Qwen3's layers 9,
18 and 27 through the chat template without thinking, all 512 positions: `models.qwen3.encode_klein`); the latents
the sampler walks are the transformer's own (B, 128, H/16, W/16), already patchified and normalised (the VAE
undoes both), so the seeded noise is drawn in that shape, as the pipeline draws it; the schedule's shift mu is
fitted by step count and image tokens (`empirical_mu`); the base model runs CFG as klein defines it (neg + s (pos -
neg), only for s > 1; the distilled model one pass); and the shared adaLN modulation of every step is computed once
per run (it depends on the timestep alone). klein's `image=` is reference editing, not img2img: refused here."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from optimized_sd.errors import FieldError, UserError
from optimized_sd.families.flux2 import KLEIN
from optimized_sd.memory.report import StageRecord
from optimized_sd.models.flux2 import Flux2Modulation, image_ids, pack, text_ids, unpack
from optimized_sd.models.qwen3 import MAX_TOKENS, encode_klein, load_qwen_tokenizer
from optimized_sd.pipelines.defaults import DEFAULT_DOWNSCALE
from optimized_sd.pipelines.diffusion import StableDiffusion
from optimized_sd.pipelines.flux import FluxDiffusion
from optimized_sd.pipelines.request import GenerationRequest, check_size
from optimized_sd.sampling import Conditioning, Model, SamplingPlan
from optimized_sd.sampling.model_sampling import FlowSampling, empirical_mu

log = logging.getLogger("optimized_sd")

# FlowMatchEulerDiscreteScheduler options (scheduler/scheduler_config.json) whose grid this sampler does not walk
UNSUPPORTED_SCHEDULER = (
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "shift_terminal", "stochastic_sampling",
)  # fmt: skip


def klein_flow(checkpoint: Path) -> FlowSampling:
    """Flux.2's flow sampling on Flux's linspace(1, 1/N, N) grid, called with t = sigma: dynamically (exponentially)
    shifted by `empirical_mu`, or as a diffusers folder's scheduler config says (a fixed `shift` when it turns
    dynamic shifting off); a config asking for a grid this sampler does not walk is refused in one line."""
    from optimized_sd.weights.diffusers_folder import read_json

    config_file = checkpoint / "scheduler" / "scheduler_config.json"
    config = read_json(config_file) if checkpoint.is_dir() and config_file.is_file() else {}
    asked = [name for name in UNSUPPORTED_SCHEDULER if config.get(name)]
    if config.get("time_shift_type", "exponential") != "exponential":
        asked.append(f"time_shift_type {config['time_shift_type']}")
    if asked:
        raise UserError(f"{config_file}: {', '.join(asked)} is not supported for Flux.2 klein (its scheduler shifts exponentially)")
    dynamic = bool(config.get("use_dynamic_shifting", True))
    return FlowSampling(shift=float(config.get("shift", 3.0)), dynamic=dynamic, timestep_scale=1.0, flux_grid=True)


class KleinDiffusion(StableDiffusion):
    """A loaded Flux.2 klein model (see the module docstring); everything else is `StableDiffusion`'s."""

    hoist_modulation = True  # precompute each run's adaLN outputs (False: per call, as the plain forward does)
    takes_init_image = False  # its image input is reference editing, not img2img
    metadata_extras = FluxDiffusion.metadata_extras
    model_hash = FluxDiffusion.model_hash

    def __init__(self, loaded, **kwargs) -> None:
        self.flow = klein_flow(loaded.checkpoint.path)
        super().__init__(loaded, **kwargs)
        self.memory.reuse_heap_in_sampling = False  # as Flux.1's (`FluxDiffusion.__init__`)

    @property
    def distilled(self) -> bool:
        return self.config.family == KLEIN

    def setup_text(self, tokenizers: tuple[Path, ...]) -> None:
        """The Qwen2 tokenizer with its chat template: `--tokenizer`, else a diffusers folder's `tokenizer/`."""
        if len(tokenizers) > 1:
            raise FieldError.about("tokenizer", f"gives {len(tokenizers)} folders; Flux.2 klein takes one (Qwen's)")
        root = self.loaded.checkpoint.path
        folder = tokenizers[0] if tokenizers else root / "tokenizer" if root.is_dir() else None
        if folder is None:
            raise FieldError.about("tokenizer", "must name Flux.2 klein's Qwen tokenizer folder (a klein diffusers folder's tokenizer/)")
        self.qwen_tokenizer = load_qwen_tokenizer(folder, enable_thinking=False)
        self.text = None  # the prompt step is `text_conditioning`

    @property
    def model_sampling(self) -> FlowSampling:
        return self.flow

    def with_defaults(self, request: GenerationRequest) -> GenerationRequest:
        """The record's defaults; the transformer's latents (128 channels at 1/16); CFG only where klein runs it."""
        if request.init_image is not None or request.inpaint is not None:
            raise FieldError.about("init_image", "Flux.2 klein runs txt2img only (its image input is reference editing, not img2img)")
        request = super().with_defaults(request)
        check_size(request.height, request.width, self.config.vae.downscale)
        if request.guidance is not None:
            family = self.config.family_name
            log.warning("guidance has no effect on %s (it has no distilled guidance input; the CFG scale is its guidance)", family)
        scale = request.scale
        if self.distilled and scale > 1:
            log.warning("a CFG scale of %g is ignored: the step-distilled klein runs without CFG (the base model takes one)", scale)
        if self.distilled or scale <= 1:  # Flux2KleinPipeline: CFG only for the base model and a scale above 1
            scale = 1.0
        downscale = self.config.vae.downscale if request.downscale == DEFAULT_DOWNSCALE else request.downscale
        length = MAX_TOKENS if request.max_sequence_length is None else request.max_sequence_length
        return replace(request, scale=scale, guidance=None, downscale=downscale, max_sequence_length=length)

    def sampling_for(self, request: GenerationRequest) -> FlowSampling:
        """mu by the image's tokens and the step count (`empirical_mu`), when the shift is dynamic."""
        if not self.flow.dynamic:
            return self.flow
        tokens = (request.height // request.downscale) * (request.width // request.downscale)
        return replace(self.flow, mu=empirical_mu(tokens, request.steps))

    def text_conditioning(self, request: GenerationRequest, prompts: list[str], negative: str | None):
        """Each distinct prompt (and the negative one, empty by default, for the base model's CFG) through Qwen3 once."""
        texts = list(dict.fromkeys([*prompts, *([negative] if negative is not None else [])]))
        self.qwen_tokenizer.max_length = request.max_sequence_length
        context = encode_klein(self.model.text_encoders.qwen3, self.qwen_tokenizer, texts, self.device).to(self.dtype)
        index = {text: i for i, text in enumerate(texts)}

        def conditioning(chosen: list[str]) -> Conditioning:
            return Conditioning(context[torch.tensor([index[text] for text in chosen], device=context.device)])

        return conditioning(list(prompts)), None if negative is None else conditioning([negative] * len(prompts)), {}

    def denoiser_model(self, record: StageRecord, plan: SamplingPlan) -> Model:
        """The transformer as a sampling `Model` over the (B, 128, h, w) latents, packed into tokens and back,
        t = sigma. With `hoist_modulation` the shared adaLN outputs of every step of the plan are computed in one
        pass at the first call (not when the denoiser is placed in halves: its first half is entered at the embedder)."""
        transformer = self.model.model.diffusion_model
        plan_row = self.memory.plan.row if self.memory.plan is not None else None
        hoist = self.hoist_modulation and (plan_row is None or plan_row.denoiser != "halves")
        table: dict[float, Flux2Modulation] = {}

        def modulation(t: Tensor) -> Flux2Modulation:
            if not table:
                times = [torch.full((1,), plan.model_sampling.timestep(s), device=self.device) for s in plan.sigmas if s > 0]
                runs = transformer.precompute_modulation([(time, None) for time in times], self.dtype)
                table.update({float(time[0]): run for time, run in zip(times, runs)})
            key = float(t[0])
            if key not in table:  # a step between the grid's sigmas (DPM2's midpoints)
                table[key] = transformer.precompute_modulation([(t[:1], None)], self.dtype)[0]
            return table[key]

        def call(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            record.steps += 1
            rows, cols = x.shape[-2:]
            img = pack(x.to(self.dtype))
            ids, txt_ids = image_ids(rows, cols, device=self.device), text_ids(cond.context.shape[1], device=self.device)
            t_in = t.to(self.device, torch.float32)
            if hoist and all(math.isclose(v, t_in[0].item()) for v in t_in.tolist()):
                shared = modulation(t_in)
                batch = Flux2Modulation(*(m.expand(x.shape[0], -1) for m in shared.tensors()))
                out = transformer.forward_modulated(img, ids, cond.context, txt_ids, batch)
            else:
                out = transformer(img, ids, cond.context, txt_ids, t_in.to(self.dtype))
            return unpack(out.float(), rows, cols)

        return call
