"""Flux.1 dev and schnell through the shared task steps (`core.run_task`), as diffusers' FluxPipeline computes them.

What differs from SD, each said once here: the text step (CLIP-L's pooled vector, T5 states padded to
`max_sequence_length`, AUTOMATIC1111 emphasis on the T5 states as Forge weights them), the sampling
(`FlowSampling` shifted per image for dev), the denoiser call (latents packed 2x2 into tokens around the
transformer, the adaLN modulation of every step computed once per run), dev's distilled guidance carried in the
conditioning, and Forge's metadata. Latents stay (B, 16, h, w) between steps: Euler is elementwise, so sampling
packed or unpacked is the same arithmetic."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from optimized_sd.errors import FieldError
from optimized_sd.families.flux import FLUX_DEV, GUIDANCE_DEFAULT, MAX_SEQUENCE, T5_HUB_TOKENIZER, flow_sampling
from optimized_sd.memory.report import StageRecord
from optimized_sd.models.flux import FluxModulation, image_ids, pack_latents, text_ids, unpack_latents
from optimized_sd.models.t5 import TOKENIZER_FILES, T5PromptTokenizer, load_t5_tokenizer
from optimized_sd.models.text_encoder import PromptTokenizer, load_tokenizer, tokenize
from optimized_sd.pipelines.diffusion import StableDiffusion
from optimized_sd.pipelines.request import GenerationRequest
from optimized_sd.prompts.encoding import Chunk, encode_chunks, is_plain, whole_sequence
from optimized_sd.prompts.syntax import parse_attention
from optimized_sd.sampling import Conditioning, Model, ModelSampling, SamplingPlan

log = logging.getLogger("optimized_sd")

PATCH = 2  # latent pixels per token side
SCHEDULE_NAME = "Simple"  # Forge's name for Flux's own schedule in the metadata


def tokenizer_kind(folder: Path) -> str:
    """"clip" or "t5" by the folder's files: CLIP's BPE (vocab.json + merges.txt) or T5's SentencePiece
    (spiece.model); a lone tokenizer.json by its model type (BPE: CLIP, Unigram: T5)."""
    if (folder / "spiece.model").is_file():
        return "t5"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return "clip"
    try:
        kind = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        words = f"holds neither a CLIP tokenizer (vocab.json, merges.txt) nor a T5 one ({TOKENIZER_FILES})"
        raise FieldError.about("tokenizer", f"{folder} {words}") from None
    return "t5" if kind == "Unigram" else "clip"


def default_t5_tokenizer(max_length: int) -> T5PromptTokenizer:
    """T5-XXL's tokenizer from the Hugging Face cache (or hub), as CLIP's default is found."""
    from transformers import T5Tokenizer

    try:
        return T5PromptTokenizer(T5Tokenizer.from_pretrained(T5_HUB_TOKENIZER), max_length)
    except (OSError, ValueError):
        raise FieldError.about(
            "tokenizer",
            f"is needed: no T5 tokenizer is cached and the hub ({T5_HUB_TOKENIZER}) cannot be reached; give a folder with "
            f"{TOKENIZER_FILES} (e.g. a diffusers Flux model's tokenizer_2/)",
        ) from None


def pooled_output(hidden: Tensor, ids: Tensor, eos_token_id: int) -> Tensor:
    """CLIP's pooled vector: the final state at the end token (transformers' `pooler_output` rule: the
    highest id for the original vocabulary's eos 2, else the first end token)."""
    ids = ids.to(hidden.device)
    index = ids.argmax(-1) if eos_token_id == 2 else (ids == eos_token_id).int().argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def unmarked(text: str) -> str:
    """The prompt without AUTOMATIC1111's emphasis markup (itself when it has none)."""
    segments = parse_attention(text)
    return text if is_plain(text, segments) else "".join(segment.text for segment in segments)


class FluxDiffusion(StableDiffusion):
    """A loaded Flux.1 model (see the module docstring); everything else is `StableDiffusion`'s."""

    hoist_modulation = True  # precompute each run's adaLN outputs (False: per call, as the plain forward does)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # On the RAM-lean CPU path every tensor over 128 KiB of the sampling gets its own mapping, given back when
        # freed: reusing freed heap blocks instead (SD's choice) left full-size Flux.1 dev's first `stream` step
        # holding 4.5 GB of freed-but-kept heap beside 1 GB in use (the blocks' first loads split the free
        # blocks, so the next block's tensors did not fit them); the page faults this costs are a few ms of a
        # block's seconds.
        self.memory.reuse_heap_in_sampling = False

    def setup_text(self, tokenizers: tuple[Path, ...]) -> None:
        by_kind: dict[str, Path] = {}
        for folder in tokenizers:
            kind = tokenizer_kind(folder)
            if kind in by_kind:
                raise FieldError.about("tokenizer", f"{by_kind[kind]} and {folder} are both {kind.upper()} tokenizers; give one of each")
            by_kind[kind] = folder
        root = self.loaded.checkpoint.path if self.loaded.checkpoint.path.is_dir() else None
        for kind, sub in (("clip", "tokenizer"), ("t5", "tokenizer_2")):
            if kind not in by_kind and root is not None and (root / sub).is_dir():
                by_kind[kind] = root / sub
        self.tokenizer: PromptTokenizer = load_tokenizer(by_kind.get("clip"))
        length = MAX_SEQUENCE[self.config.family]
        self.t5_tokenizer = load_t5_tokenizer(by_kind["t5"], length) if "t5" in by_kind else default_t5_tokenizer(length)
        self.text = None  # the prompt step is `text_conditioning`

    @property
    def model_sampling(self) -> ModelSampling:
        return flow_sampling(self.config.record)

    def with_defaults(self, request: GenerationRequest) -> GenerationRequest:
        request = super().with_defaults(request)
        dev = self.config.family == FLUX_DEV
        if not dev and request.guidance is not None:
            log.warning("guidance has no effect on %s (it has no distilled guidance input)", self.config.family_name)
        for name, value in (("height", request.height), ("width", request.width)):
            if value % (self.config.vae.downscale * PATCH):
                nearest = max(16, round(value / 16) * 16)
                problem = f"{value} is not a multiple of 16 (Flux packs 2x2 latents); the nearest valid size is {nearest}"
                raise FieldError.about(name, problem)
        return replace(
            request,
            guidance=(GUIDANCE_DEFAULT if request.guidance is None else request.guidance) if dev else None,
            max_sequence_length=MAX_SEQUENCE[self.config.family] if request.max_sequence_length is None else request.max_sequence_length,
        )

    def sampling_for(self, request: GenerationRequest) -> ModelSampling:
        """dev's shift from the image's token count (diffusers' `calculate_shift`); schnell's is none."""
        downscale = self.config.vae.downscale * PATCH
        return self.model_sampling.at_tokens((request.height // downscale) * (request.width // downscale))

    def t5_sequence(self, text: str) -> Chunk:
        """A prompt's T5 ids and their emphasis weights: a plain prompt exactly as diffusers tokenizes it (weights
        1), one with AUTOMATIC1111 emphasis as Forge's T5 engine (`prompts.encoding.whole_sequence`)."""
        segments = parse_attention(text)
        if is_plain(text, segments):
            ids = self.t5_tokenizer([text])[0].tolist()
            return Chunk(ids, [1.0] * len(ids))
        t5 = self.t5_tokenizer.tokenizer
        pieces = lambda piece: tokenize(t5, piece, add_special_tokens=False).input_ids  # noqa: E731
        return whole_sequence(segments, pieces, t5.eos_token_id, t5.pad_token_id, self.t5_tokenizer.max_length)

    def text_conditioning(self, request: GenerationRequest, prompts: list[str], negative: str | None):
        """CLIP-L's pooled vector and T5's states for each prompt (and the negative one for true CFG), as diffusers'
        `encode_prompt`: CLIP padded to 77, T5 to `max_sequence_length`. AUTOMATIC1111 emphasis (`(word:1.5)`) weights
        the T5 states as Forge does (each token's states times its weight, then the prompt's mean restored); CLIP-L
        reads the text without the markup (its pooled vector is unweighted, as in AUTOMATIC1111 and Forge)."""
        texts = list(dict.fromkeys([*prompts, *([negative] if negative is not None else [])]))
        self.t5_tokenizer.max_length = request.max_sequence_length
        plain_texts = [unmarked(text) for text in texts]
        for text in plain_texts:
            for tokenizer, name in ((self.tokenizer, "CLIP"), (self.t5_tokenizer, "T5")):
                lost = tokenizer.truncated_text(text)
                if lost:
                    log.warning("%s truncated the prompt; ignored: %r", name, lost)
        towers = self.model.text_encoders
        clip_ids = self.tokenizer(plain_texts).to(self.device)
        eos = towers.clip_l.eos_token_id
        pooled = pooled_output(towers.clip_l(clip_ids), clip_ids, eos)
        sequences = [self.t5_sequence(text) for text in texts]
        states, _ = encode_chunks(sequences, lambda ids, fixes: (towers.t5xxl(ids.to(self.device)), None))
        context = states.reshape(len(texts), request.max_sequence_length, -1)  # (prompts, tokens, C)
        index = {text: i for i, text in enumerate(texts)}

        def conditioning(chosen: list[str]) -> Conditioning:
            rows = torch.tensor([index[text] for text in chosen], device=self.device)
            guidance = None if request.guidance is None else torch.full((len(chosen),), float(request.guidance), device=self.device)
            return Conditioning(context[rows].to(self.dtype), pooled[rows].to(self.dtype), guidance=guidance)

        uncond = None if negative is None else conditioning([negative] * len(prompts))
        return conditioning(list(prompts)), uncond, {}

    def denoiser_model(self, record: StageRecord, plan: SamplingPlan) -> Model:
        """The transformer as a sampling `Model` over unpacked latents: x (B, 16, h, w) packed into tokens and
        back, t = sigma. With `hoist_modulation` the adaLN outputs of every step of the plan are computed in one
        pass at the first call for a conditioning (a streamed transformer then moves them once per run); when the
        denoiser is placed in halves they are not (its first half is entered at the embedders)."""
        transformer = self.model.model.diffusion_model
        plan_row = self.memory.plan.row if self.memory.plan is not None else None
        hoist = self.hoist_modulation and (plan_row is None or plan_row.denoiser != "halves")
        precomputed: list[tuple[Conditioning, dict[float, FluxModulation]]] = []
        sigmas = [sigma for sigma in plan.sigmas if sigma > 0]

        def modulation(t: Tensor, cond: Conditioning) -> FluxModulation:
            for known, table in precomputed:  # noqa: B007 - the table found is used after the loop
                if torch.equal(known.y, cond.y) and (known.guidance is None or torch.equal(known.guidance, cond.guidance)):
                    break
            else:
                times = [torch.full((cond.batch,), plan.model_sampling.timestep(s), device=self.device) for s in sigmas]
                runs = transformer.precompute_modulation([(time, cond.guidance, cond.y) for time in times])
                table = {float(time[0]): run for time, run in zip(times, runs)}
                precomputed.append((cond, table))
            key = float(t[0])
            if key not in table:  # a step between the grid's sigmas (DPM2's midpoints)
                table[key] = transformer.precompute_modulation([(t, cond.guidance, cond.y)])[0]
            return table[key]

        def call(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            record.steps += 1
            height, width = x.shape[-2:]
            img = pack_latents(x.to(self.dtype))
            ids = image_ids(height, width, self.device)
            txt_ids = text_ids(cond.context.shape[1], self.device)
            t_in = t.to(self.device, torch.float32)
            if hoist and all(math.isclose(v, t_in[0].item()) for v in t_in.tolist()):
                out = transformer.forward_modulated(img, ids, cond.context, txt_ids, modulation(t_in, cond))
            else:
                out = transformer(img, ids, cond.context, txt_ids, t_in.to(self.dtype), cond.y, cond.guidance)
            return unpack_latents(out.float(), height, width)

        return call

    def metadata_extras(self, request: GenerationRequest) -> tuple[tuple[str, str], ...]:
        """Forge's Flux fields: its schedule name, and dev's guidance as "Distilled CFG Scale"."""
        extras = [("Schedule type", SCHEDULE_NAME)]
        if request.guidance is not None:
            extras.append(("Distilled CFG Scale", f"{request.guidance:g}"))
        return tuple(extras)

    def model_hash(self) -> str:
        """AUTOMATIC1111's short hash of the transformer file (of a diffusers folder's transformer weights)."""
        if self._model_hash is None:
            from optimized_sd.weights.hashing import cached_model_hash

            path = self.loaded.checkpoint.path
            self._model_hash = cached_model_hash(sorted((path / "transformer").glob("*.safetensors"))[0] if path.is_dir() else path)
        return self._model_hash
