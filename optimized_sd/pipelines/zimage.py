"""Z-Image through the shared task steps (`core.run_task`), as diffusers' ZImagePipeline and ZImageImg2ImgPipeline
compute it; what it shares with Flux.1 (the VAE, the Euler flow steps on linspace(1, 1/N, N), the transformer
file's hash) comes from `FluxDiffusion`.

What differs, each said once here: the text step (Qwen3's second-to-last hidden state of the prompt's chat
template, padding dropped per prompt), the sampling (a static shift of 3, or the folder's scheduler config), the
denoiser call (the model is called at t = 1 - sigma and predicts x0 - noise, so its output is negated into the
velocity; the caption branch and the adaLN outputs computed once per run), and the guidance: diffusers'
`guidance_scale` s with pos + s (pos - neg), so 0 is off, with its `cfg_normalization` and `cfg_truncation`."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from optimized_sd.errors import FieldError, UserError
from optimized_sd.families.zimage import SHIFT
from optimized_sd.memory.report import StageRecord
from optimized_sd.models.qwen3 import MAX_TOKENS, QwenPromptTokenizer, encode_zimage, load_qwen_tokenizer
from optimized_sd.models.zimage import RefinedCaptions, ZImageModulation
from optimized_sd.pipelines.defaults import DEFAULT_CFG_NORMALIZATION, DEFAULT_CFG_TRUNCATION
from optimized_sd.pipelines.flux import PATCH, FluxDiffusion
from optimized_sd.pipelines.request import GenerationRequest
from optimized_sd.sampling import Conditioning, EpsFn, Model, ModelSampling, SamplingPlan
from optimized_sd.sampling.model_sampling import FlowSampling

log = logging.getLogger("optimized_sd")

NEEDS_TOKENIZER = (
    "must name Z-Image's Qwen tokenizer, as the hub is not reached: a Qwen2 tokenizer folder with its chat template "
    "(e.g. the tokenizer/ of a diffusers Z-Image-Turbo folder)"
)


@dataclass(frozen=True)
class CaptionConditioning(Conditioning):
    """Captions of several lengths in one batch: `context` (B, longest, hidden) zero-padded, `lengths` the real
    tokens of each (Z-Image attends to those only)."""

    lengths: tuple[int, ...] = ()

    def captions(self) -> list[Tensor]:
        return [self.context[i, :n] for i, n in enumerate(self.lengths)]

    def cat(self, other: Conditioning) -> CaptionConditioning:
        assert isinstance(other, CaptionConditioning)
        return caption_batch([*self.captions(), *other.captions()])


def caption_batch(captions: list[Tensor]) -> CaptionConditioning:
    """One conditioning of per-prompt caption states (tokens_i, hidden)."""
    longest = max(c.shape[0] for c in captions)
    context = captions[0].new_zeros(len(captions), longest, captions[0].shape[-1])
    for i, caption in enumerate(captions):
        context[i, : caption.shape[0]] = caption
    return CaptionConditioning(context, lengths=tuple(c.shape[0] for c in captions))


def scheduler_shift(folder: Path | None) -> tuple[float, bool]:
    """(shift, dynamic) from a diffusers folder's scheduler/scheduler_config.json; Z-Image-Turbo's (3, static) else."""
    config_path = folder / "scheduler" / "scheduler_config.json" if folder is not None else None
    if config_path is None or not config_path.is_file():
        return SHIFT, False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        return float(config.get("shift", SHIFT)), bool(config.get("use_dynamic_shifting", False))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise UserError(f"cannot read {config_path}: {error}") from None


class ZImageDiffusion(FluxDiffusion):
    """A loaded Z-Image model (see the module docstring); the rest is `FluxDiffusion`'s and `StableDiffusion`'s."""

    hoist = True  # the caption branch and the adaLN outputs once per run (False: every call, as the plain forward)
    reads_cfg_options = True
    cfg_normalization = DEFAULT_CFG_NORMALIZATION  # a request's None: diffusers' cfg_normalization (> 0 caps the guided norm)
    cfg_truncation = DEFAULT_CFG_TRUNCATION  # a request's None: diffusers' cfg_truncation (no negative pass past it)

    def setup_text(self, tokenizers: tuple[Path, ...]) -> None:
        if len(tokenizers) > 1:
            raise FieldError.about("tokenizer", f"gives {len(tokenizers)} folders; Z-Image takes one Qwen tokenizer")
        root = self.loaded.checkpoint.path
        folder = tokenizers[0] if tokenizers else (root / "tokenizer" if root.is_dir() else None)
        if folder is None:
            raise FieldError.about("tokenizer", NEEDS_TOKENIZER)
        try:
            self.qwen_tokenizer: QwenPromptTokenizer = load_qwen_tokenizer(folder, enable_thinking=True)
        except UserError as error:
            raise FieldError.about("tokenizer", str(error)) from None
        self.text = None  # the prompt step is `text_conditioning`

    @property
    def model_sampling(self) -> ModelSampling:
        """Euler over linspace(1, 1/N, N) shifted (ZImagePipeline passes these sigmas), the model at t = sigma."""
        root = self.loaded.checkpoint.path
        shift, dynamic = scheduler_shift(root if root.is_dir() else None)
        return FlowSampling(shift=shift, dynamic=dynamic, timestep_scale=1.0, flux_grid=True)

    def with_defaults(self, request: GenerationRequest) -> GenerationRequest:
        request = super(FluxDiffusion, self).with_defaults(request)
        if request.guidance is not None:
            log.warning("guidance has no effect on Z-Image (it has no distilled guidance input); the CFG scale is its guidance")
        for name, value in (("height", request.height), ("width", request.width)):
            if value % (self.config.vae.downscale * PATCH):
                nearest = max(16, round(value / 16) * 16)
                problem = f"{value} is not a multiple of 16 (Z-Image patches 2x2 latents); the nearest valid size is {nearest}"
                raise FieldError.about(name, problem)
        length = MAX_TOKENS if request.max_sequence_length is None else request.max_sequence_length
        normalization = self.cfg_normalization if request.cfg_normalization is None else request.cfg_normalization
        truncation = self.cfg_truncation if request.cfg_truncation is None else request.cfg_truncation
        return replace(request, guidance=None, unguided_scale=0.0, max_sequence_length=length, cfg_normalization=normalization,
                       cfg_truncation=truncation)  # fmt: skip

    def text_conditioning(self, request: GenerationRequest, prompts: list[str], negative: str | None):
        """Each prompt's (and the negative's, for CFG) caption states, as diffusers' `encode_prompt` (no weighting)."""
        texts = list(dict.fromkeys([*prompts, *([negative] if negative is not None else [])]))
        self.qwen_tokenizer.max_length = request.max_sequence_length
        states = encode_zimage(self.model.text_encoders.qwen3, self.qwen_tokenizer, texts, self.device)
        by_text = {text: state.to(self.dtype) for text, state in zip(texts, states, strict=True)}
        cond = caption_batch([by_text[text] for text in prompts])
        uncond = None if negative is None else caption_batch([by_text[negative]] * len(prompts))
        return cond, uncond, {}

    def denoiser_model(self, record: StageRecord, plan: SamplingPlan) -> Model:
        """The transformer as a sampling `Model` of the velocity: x (B, 16, h, w), t = sigma, called at 1 - sigma and
        negated. With `hoist` the caption branch runs once per conditioning and the adaLN outputs of every step of
        the plan in one pass (a streamed transformer moves those weights once per run); not when the denoiser is
        placed in halves (its first half is entered at the pad tokens)."""
        transformer = self.model.model.diffusion_model
        plan_row = self.memory.plan.row if self.memory.plan is not None else None
        hoist = self.hoist and (plan_row is None or plan_row.denoiser != "halves")
        refined: list[tuple[CaptionConditioning, RefinedCaptions]] = []
        modulations: dict[float, ZImageModulation] = {}

        def captions_for(cond: CaptionConditioning) -> RefinedCaptions:
            for known, states in refined:
                if known.lengths == cond.lengths and torch.equal(known.context, cond.context):
                    return states
            states = transformer.refine_captions(cond.captions(), self.dtype)
            refined.append((cond, states))
            return states

        def modulation(sigma: Tensor) -> ZImageModulation:
            """The adaLN outputs at t = 1 - sigma, of every step of the plan computed at the first call."""
            if not modulations:
                sigmas = torch.tensor([s for s in plan.sigmas if s > 0], dtype=torch.float32)
                table = transformer.modulation((1.0 - sigmas).to(self.device), self.dtype)
                modulations.update({float(s): table.rows(i, i + 1) for i, s in enumerate(sigmas)})
            key = float(sigma)
            if key not in modulations:  # a step between the grid's sigmas (DPM2's midpoints)
                modulations[key] = transformer.modulation((1.0 - sigma.float()).reshape(1).to(self.device), self.dtype)
            return modulations[key]

        def call(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            assert isinstance(cond, CaptionConditioning)
            record.steps += 1
            times = 1.0 - t.to(self.device, torch.float32)
            latents = x.to(self.dtype)
            if hoist and all(math.isclose(v, times[0].item()) for v in times.tolist()):
                captions = captions_for(cond)  # before the modulation: the hoisted units' order
                out = transformer.forward_modulated(latents, captions, modulation(t[0].float().cpu()))
            else:
                out = transformer(latents, times, cond.captions())
            return -out.float()

        return call

    def guidance(self, model: Model, request: GenerationRequest, conditioning, side) -> EpsFn:
        """ZImagePipeline's CFG: pos + s (pos - neg) in one batched call; with `cfg_normalization` the result's norm
        (per image) is capped at that many times pos's; past `cfg_truncation` (1 - sigma above it) pos alone."""
        if side is not None:
            raise UserError("Z-Image takes no ControlNet in this version")
        cond, uncond = conditioning
        if uncond is None:
            return lambda x, t: model(x, t, cond)
        both, scale = uncond.cat(cond), request.scale
        normalization, truncation = request.cfg_normalization, request.cfg_truncation
        assert normalization is not None and truncation is not None, "with_defaults fills them"

        def guided(x: Tensor, t: Tensor) -> Tensor:
            if truncation <= 1 and 1.0 - float(t[0]) > truncation:
                return model(x, t, cond)
            out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            guided_out = out_cond + scale * (out_cond - out_uncond)
            if normalization > 0:
                dims = tuple(range(1, out_cond.dim()))
                limit = torch.linalg.vector_norm(out_cond, dim=dims, keepdim=True) * normalization
                norm = torch.linalg.vector_norm(guided_out, dim=dims, keepdim=True)
                guided_out = torch.where(norm > limit, guided_out * (limit / norm), guided_out)
            return guided_out

        return guided

    def metadata_extras(self, request: GenerationRequest) -> tuple[tuple[str, str], ...]:
        """The schedule, and the CFG options that are not their defaults (they change the image only with CFG)."""
        cfg = (("CFG normalization", request.cfg_normalization, DEFAULT_CFG_NORMALIZATION),
               ("CFG truncation", request.cfg_truncation, DEFAULT_CFG_TRUNCATION)) if request.guided else ()  # fmt: skip
        own = tuple((name, f"{value:g}") for name, value, default in cfg if value is not None and value != default)
        return (("Schedule type", "Simple"), ("Shift", f"{self.model_sampling.shift:g}"), *own)


def describe_files(path: Path):
    """What `inspect` says of a Z-Image file or folder (or of a file refused as its checkpoint): each part present
    with its tensors and storage dtypes, and the parts other flags give."""
    from collections import Counter

    from optimized_sd.families.zimage import ZIMAGE, check_file, file_keys, unsupported_model
    from optimized_sd.weights.inspect import (
        LAYOUT_DIFFUSERS,
        LAYOUT_SAFETENSORS,
        CheckpointInfo,
        PartStats,
        _safetensors_header,
        missing_hint,
        said,
    )

    words = {"transformer": "Z-Image transformer", "text_encoder": "Qwen3 text encoder", "vae": "Flux VAE"}
    fields = {"transformer": "checkpoint", "text_encoder": "text_encoders", "vae": "vae"}
    if path.is_dir():
        files = {part: sorted((path / part).glob("*.safetensors")) for part in words}
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        info = CheckpointInfo(path=path, layout=f"{LAYOUT_DIFFUSERS} (Z-Image)", file_size=size)
    else:
        files = {"transformer": [path]}
        info = CheckpointInfo(path=path, layout=LAYOUT_SAFETENSORS, file_size=path.stat().st_size)
        try:
            check_file(path)
        except UserError as error:  # a Qwen3 file or a model refused by name: what it is, nothing missing
            info.family_error = said(error)
            words["transformer"] = unsupported_model(file_keys(path) or ()) or words["text_encoder"]
    dtypes: Counter[str] = Counter()
    for part, found in files.items():
        shapes, types = {}, {}
        for file in found:
            more_shapes, more_types, info.metadata = _safetensors_header(file)
            shapes.update(more_shapes)
            types.update(more_types)
        if shapes:
            info.parts[words[part]] = PartStats(len(shapes), sum(math.prod(s) for s in shapes.values()), tuple(sorted(set(types.values()))))
            dtypes.update(types.values())
    info.dtypes = dict(sorted(dtypes.items()))
    info.expected_parts = tuple(info.parts)  # a refused file: nothing is missing, it is the wrong file
    if info.family_error is None:
        info.family = ZIMAGE
        info.prediction = "flow matching (x0 - noise, negated into the velocity)"
        info.towers = ("Qwen3 (second-to-last hidden state, chat template)",)
        info.default_size = 1024
        info.expected_parts = tuple(words.values())
        info.missing_hint = missing_hint({words[part]: fields[part] for part in fields}, info.parts)
    return info
