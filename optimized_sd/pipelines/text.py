"""Prompt -> text conditioning for every family: each tower tokenised with its own padding, the towers run
through the model's text module, and SDXL's vector `y` (pooled text + size embeddings) built.

SD 1.x / SD 2.x: context only. SDXL base: context (CLIP ViT-L | bigG), y = [pooled | original size, crop,
target size], and an empty negative prompt gives all-zero context and pooled vector, as SDXL base's
configuration asks (diffusers `force_zeros_for_empty_prompt`; AUTOMATIC1111 does the same). SDXL refiner:
bigG only, y = [pooled | original size, crop, aesthetic score]."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from optimized_sd.config import ModelConfig
from optimized_sd.models.conditioner import size_conditioning, tower_pad_ids
from optimized_sd.models.sd import LatentDiffusion
from optimized_sd.models.text_encoder import MAX_TOKENS, PromptTokenizer, load_tokenizer
from optimized_sd.pipelines.prompts import prompt_mix

log = logging.getLogger("optimized_sd")

# The refiner's aesthetic-score conditioning: diffusers' defaults for the prompt and the negative prompt.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5

# A diffusers folder's tokenizer subfolder for each tower, by family (default: one `tokenizer/`).
TOKENIZER_FOLDERS = {"sdxl": ("tokenizer", "tokenizer_2"), "sdxl_refiner": ("tokenizer_2",)}


def load_tower_tokenizers(config: ModelConfig, folder: Path | None, override: Path | None) -> list[PromptTokenizer]:
    """One tokenizer per text tower, in the order the model runs them. `override` (`--tokenizer`) serves
    every tower; else a diffusers folder's `tokenizer/` and `tokenizer_2/` (SDXL), else the cached hub one.
    All towers share CLIP's BPE vocabulary; each keeps its own padding (OpenCLIP: id 0)."""
    pads = tower_pad_ids(config)
    if override is not None:
        shared = load_tokenizer(Path(override))
        return [shared.with_padding(pad) for pad in pads]
    names = TOKENIZER_FOLDERS.get(config.family, ("tokenizer",))
    folders = [folder / name if folder is not None and (folder / name).is_dir() else None for name in names]
    cache: dict[Path | None, PromptTokenizer] = {}
    tokenizers = []
    for path, pad in zip(folders, pads):
        if path not in cache:
            cache[path] = load_tokenizer(path)
        tokenizers.append(cache[path].with_padding(pad))
    return tokenizers


@dataclass
class PromptEncoder:
    """Runs a model's text module on prompts. Call it inside the pipeline's text stage (the memory engine
    places the towers' weights around the module calls)."""

    model: LatentDiffusion
    tokenizers: list[PromptTokenizer]
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def encode(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        """(context (1, 77, C), pooled (1, P) or None); weighted subprompts `a:2 b:1` are mixed as optimizedSD
        does (weights normalised), the pooled vectors alike."""
        cut = self.tokenizers[0].truncated_text(prompt)
        if cut:
            log.warning("prompt longer than %d tokens; this part was cut: %s", MAX_TOKENS, cut)
        parts, weights = prompt_mix(prompt)
        ids = [tokenizer(parts).to(self.device) for tokenizer in self.tokenizers]
        context, pooled = self.model.encode_text(ids)
        weight = torch.tensor(weights, device=self.device, dtype=torch.float32)  # (parts,), summing to 1
        context = (context.float() * weight[:, None, None]).sum(0, keepdim=True)
        if pooled is not None:
            pooled = (pooled.float() * weight[:, None]).sum(0, keepdim=True)
        return context, pooled

    def encode_negative(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        """The unconditional side: zeros for an empty negative prompt on SDXL base, else `encode`."""
        context, pooled = self.encode(prompt)
        if not prompt and self.config.family == "sdxl":
            context = torch.zeros_like(context)
            pooled = None if pooled is None else torch.zeros_like(pooled)
        return context, pooled

    def vector(self, pooled: Tensor | None, height: int, width: int, negative: bool = False) -> Tensor | None:
        """SDXL's `y` for an image of (height, width): original = target = the image size, crop (0, 0)
        (diffusers' and AUTOMATIC1111's defaults); None for families without a `label_emb`."""
        if self.config.unet.adm_in_channels is None:
            return None
        if pooled is None:
            raise ValueError("this UNet takes pooled text conditioning but the text module gave none")
        if self.config.family == "sdxl_refiner":
            score = NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE
            numbers: tuple[float, ...] = (height, width, 0, 0, score)
        else:
            numbers = (height, width, 0, 0, height, width)
        return size_conditioning(pooled, numbers)

    def conditioning(self, prompt: str, height: int, width: int, negative: bool = False) -> tuple[Tensor, Tensor | None]:
        """(context, y) for one prompt at the compute dtype: what the UNet takes."""
        context, pooled = self.encode_negative(prompt) if negative else self.encode(prompt)
        y = self.vector(pooled, height, width, negative)
        return context.to(self.dtype), None if y is None else y.to(self.dtype)
