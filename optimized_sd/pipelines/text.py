"""Prompt -> text conditioning for every family: each tower tokenised with its own padding and encoded
with AUTOMATIC1111's emphasis, 75-token chunks and textual-inversion vectors (`optimized_sd.prompts`),
the towers' contexts concatenated, and SDXL's vector `y` (pooled text + size embeddings) built.

SD 1.x / SD 2.x: context only. SDXL base: context (CLIP ViT-L | bigG), y = [pooled | original size, crop,
target size], and an empty negative prompt gives all-zero context and pooled vector, as SDXL base's
configuration asks (diffusers `force_zeros_for_empty_prompt`; AUTOMATIC1111 does the same). SDXL refiner:
bigG only, y = [pooled | original size, crop, aesthetic score]."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from optimized_sd.config import ModelConfig
from optimized_sd.models.conditioner import run_tower, size_conditioning, text_towers, tower_pad_ids
from optimized_sd.models.sd import LatentDiffusion
from optimized_sd.models.text_encoder import PromptTokenizer, load_tokenizer, tokenize
from optimized_sd.prompts.encoding import CHUNK_TOKENS, ChunkEncoder, Encoded, PromptTokens, SpecialTokens, pad_to_chunks, spliced
from optimized_sd.prompts.encoding import PromptEncoder as ChunkedPromptEncoder
from optimized_sd.sampling import Conditioning
from optimized_sd.weights.embeddings import EmbeddingLibrary, TowerEmbeddings


def load_tower_tokenizers(config: ModelConfig, folder: Path | None, override: Path | None) -> list[PromptTokenizer]:
    """One tokenizer per text tower, in the order the model runs them. `override` (`--tokenizer`) serves
    every tower; else a diffusers folder's `tokenizer/` and `tokenizer_2/` (SDXL), else the cached hub one.
    All towers share CLIP's BPE vocabulary; each keeps its own padding (OpenCLIP: id 0)."""
    pads = tower_pad_ids(config)
    if override is not None:
        shared = load_tokenizer(Path(override))
        return [shared.with_padding(pad) for pad in pads]
    names = [tower.tokenizer for tower in config.record.towers]  # each tower's tokenizer subfolder, by its record
    folders = [folder / name if folder is not None and (folder / name).is_dir() else None for name in names]
    cache: dict[Path | None, PromptTokenizer] = {}
    tokenizers = []
    for path, pad in zip(folders, pads):
        if path not in cache:
            cache[path] = load_tokenizer(path)
        tokenizers.append(cache[path].with_padding(pad))
    return tokenizers


def prompt_tokens(tokenizer: PromptTokenizer) -> PromptTokens:
    """A tower's tokenizer as the chunked encoder sees it: start, end, the tower's padding (the
    tokenizer's own pad token for CLIP, 0 for OpenCLIP) and the comma a chunk may break after."""
    hf = tokenizer.tokenizer  # a transformers CLIPTokenizer
    own_pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    special = SpecialTokens(
        start=hf.bos_token_id,
        end=hf.eos_token_id,
        pad=own_pad if tokenizer.pad_id is None else tokenizer.pad_id,
        comma=hf.get_vocab().get(",</w>"),
    )
    # verbose=False: a prompt over 77 tokens is expected here (it is chunked), not worth transformers' warning
    return PromptTokens(lambda text: tokenize(hf, text, add_special_tokens=False, truncation=False, verbose=False).input_ids, special)


def token_embedding_of(tower: nn.Module) -> nn.Module:
    """The tower's token-embedding table (CLIP and OpenCLIP both name it `token_embedding`)."""
    for name, module in tower.named_modules():
        if name.split(".")[-1] == "token_embedding":
            return module
    raise ValueError(f"{type(tower).__name__} has no token_embedding module")


@dataclass
class PromptEncoder:
    """Runs a model's text towers on prompts. Call it inside the pipeline's text stage (the memory engine
    places the towers' weights around the module calls). Nothing is cached between calls: a LoRA may
    have changed the towers' weights since."""

    model: LatentDiffusion
    tokenizers: list[PromptTokenizer]
    device: torch.device
    dtype: torch.dtype
    embeddings: EmbeddingLibrary = field(default_factory=lambda: EmbeddingLibrary(None))

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def tower_encoders(self) -> list[ChunkedPromptEncoder]:
        """One chunked encoder per tower, in the order the model concatenates their contexts."""
        towers = text_towers(self.model.get_submodule(self.model.text_root))
        tables = [token_embedding_of(tower) for tower in towers]
        widths = [table.weight.shape[-1] for table in tables]
        encoders = []
        for index, (tower, table, tokenizer) in enumerate(zip(towers, tables, self.tokenizers, strict=True)):
            vectors = TowerEmbeddings(self.embeddings, widths, index)
            encoders.append(ChunkedPromptEncoder(prompt_tokens(tokenizer), self.chunk_encoder(tower, table), vectors))
        return encoders

    def chunk_encoder(self, tower: nn.Module, table: nn.Module) -> ChunkEncoder:
        """The tower run on (n, 77) ids with textual-inversion vectors spliced into its token embeddings."""

        @torch.no_grad()
        def encode(ids: Tensor, fixes) -> tuple[Tensor, Tensor | None]:
            with spliced(table, fixes):
                return run_tower(tower, ids.to(self.device))

        return encode

    def batch(
        self, prompts: Sequence[str], negative_prompt: str | None, height: int, width: int
    ) -> tuple[Conditioning, Conditioning | None, dict[str, Path]]:
        """(cond (B, 77k, C), uncond (B, 77k, C) or None, embeddings used: name -> file) at the compute
        dtype. Every prompt is padded with the empty prompt to the batch's largest chunk count; each
        distinct prompt is encoded once."""
        encoders = self.tower_encoders()
        used: list[str] = []
        # SDXL base zeroes an empty negative prompt's conditioning (force_zeros_for_empty_prompt): nothing to encode
        zero_negative = negative_prompt == "" and self.config.record.zero_empty_negative
        negatives = [] if negative_prompt is None or zero_negative else [negative_prompt]
        texts = list(dict.fromkeys([*prompts, *negatives]))
        encoded = {text: [encoder(text, used) for encoder in encoders] for text in texts}
        chunks = max(z.shape[1] for towers in encoded.values() for z, _ in towers) // (CHUNK_TOKENS + 2)

        def conditioning(text: str, negative: bool) -> Conditioning:
            if negative and zero_negative:
                context = torch.zeros(1, chunks * (CHUNK_TOKENS + 2), self.config.unet.context_dim, device=self.device)
                pooled = torch.zeros(1, self.config.open_clip.projection_dim, device=self.device)
            else:
                context = torch.cat([pad_to_chunks(z, chunks, encoder.empty) for (z, _), encoder in zip(encoded[text], encoders)], dim=-1)
                pooled = next((p for _, p in reversed(encoded[text]) if p is not None), None)
            y = self.vector(pooled, height, width, negative)
            return Conditioning(context.to(self.dtype), None if y is None else y.to(self.dtype))

        each = [conditioning(text, False) for text in prompts]
        cond = Conditioning(torch.cat([c.context for c in each]), None if each[0].y is None else torch.cat([c.y for c in each]))
        uncond = None if negative_prompt is None else conditioning(negative_prompt, True).repeat(len(prompts))
        return cond, uncond, {name: self.embeddings.paths[name] for name in used}

    def encode(self, prompt: str) -> Encoded:
        """(context (1, 77k, C), pooled (1, P) or None) float32 of one prompt, every tower's context concatenated."""
        parts = [encoder(prompt) for encoder in self.tower_encoders()]
        pooled = next((p for _, p in reversed(parts) if p is not None), None)
        return torch.cat([z for z, _ in parts], dim=-1), pooled

    def vector(self, pooled: Tensor | None, height: int, width: int, negative: bool = False) -> Tensor | None:
        """SDXL's `y` for an image of (height, width): the numbers its record's `size_vector` gives (base:
        original = target = the image size, crop (0, 0), diffusers' and AUTOMATIC1111's defaults; refiner: an
        aesthetic score for the last); None for families without a `label_emb`."""
        if self.config.unet.adm_in_channels is None:
            return None
        if pooled is None:
            raise ValueError("this UNet takes pooled text conditioning but the text module gave none")
        size_vector = self.config.record.size_vector
        if size_vector is None:
            raise ValueError(f"this UNet takes a vector y but the {self.config.family_name} record builds none")
        return size_conditioning(pooled, size_vector(height, width, negative))

    def conditioning(self, prompt: str, height: int, width: int, negative: bool = False) -> tuple[Tensor, Tensor | None]:
        """(context, y) for one prompt at the compute dtype: what the UNet takes."""
        cond, uncond, _ = self.batch([prompt], prompt if negative else None, height, width)
        chosen = uncond if negative else cond
        return chosen.context, chosen.y
