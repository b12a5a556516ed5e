"""Extra networks for a generation, as AUTOMATIC1111 users write them: `<lora:NAME:WEIGHT>` tags and
`--lora` files (merged into the weights by the memory engine's tensor hook), textual-inversion
embeddings by file name, and the chunked, emphasis-weighted prompt encoding over the text tower."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from optimized_sd.errors import UserError
from optimized_sd.prompts.encoding import PromptEncoder, PromptTokens, SpecialTokens, pad_to_chunks, spliced
from optimized_sd.prompts.syntax import extract_loras
from optimized_sd.weights.embeddings import EmbeddingLibrary, TowerEmbeddings
from optimized_sd.weights.hashing import extra_network_hash
from optimized_sd.weights.lora import find_lora, parse_lora_option

log = logging.getLogger("optimized_sd")

DEFAULT_LORA_DIR = Path("models/Lora")  # AUTOMATIC1111's folders, relative to where it runs
DEFAULT_EMBEDDINGS_DIR = Path("embeddings")


@dataclass(frozen=True)
class PromptNetworks:
    """A batch's prompts with their LoRA tags removed, and every LoRA the batch asked for."""

    prompts: tuple[str, ...]
    negative_prompt: str
    loras: dict[Path, float] = field(default_factory=dict)  # file -> weight, tags and explicit files summed


def lora_weights(loras: Mapping[str | Path, float] | Sequence[str] | None) -> dict[Path, float]:
    """The API's `loras={path: weight}` or the CLI's ['FILE[:WEIGHT]', ...] as {path: weight}."""
    if not loras:
        return {}
    if isinstance(loras, Mapping):
        items = [(Path(path), weight) for path, weight in loras.items()]
    else:
        items = [parse_lora_option(text) for text in loras]
    result: dict[Path, float] = {}
    for path, weight in items:
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise UserError(f"LoRA {path}: the weight {weight!r} is not a number") from None
        result[path] = result.get(path, 0.0) + weight
    return result


def resolve_networks(prompts: Sequence[str], negative_prompt: str, explicit: Mapping[Path, float], lora_dir: Path) -> PromptNetworks:
    """Remove the tags from every prompt; the LoRAs are the explicit files plus the first prompt's
    tags (AUTOMATIC1111 takes a batch's networks from its first prompt) and the negative prompt's."""
    cleaned, tag_sets = zip(*(extract_loras(prompt) for prompt in prompts)) if prompts else ((), ())
    negative, negative_tags = extract_loras(negative_prompt)
    if any([(t.name, t.weight) for t in tags] != [(t.name, t.weight) for t in tag_sets[0]] for tags in tag_sets[1:]):
        log.warning("prompts of one batch ask for different LoRAs; the first prompt's are used for the whole batch")
    loras = dict(explicit)
    for tag in [*(tag_sets[0] if tag_sets else ()), *negative_tags]:
        path = find_lora(tag.name, lora_dir)
        loras[path] = loras.get(path, 0.0) + tag.weight
    return PromptNetworks(tuple(cleaned), negative, loras)


def quoted_hashes(named: Mapping[str, Path], *, lora: bool) -> str | None:
    """AUTOMATIC1111's `"name: hash, name: hash"` (None when empty); ':' and ',' dropped from names."""
    if not named:
        return None
    parts = [f"{name.replace(':', '').replace(',', '')}: {extra_network_hash(path, lora=lora)}" for name, path in named.items()]
    return '"' + ", ".join(parts) + '"'


def token_embedding_of(tower: nn.Module) -> nn.Module:
    """The tower's token-embedding table (CLIP and OpenCLIP both name it `token_embedding`)."""
    for name, module in tower.named_modules():
        if name.split(".")[-1] == "token_embedding":
            return module
    raise ValueError(f"{type(tower).__name__} has no token_embedding module")


def clip_prompt_tokens(tokenizer, pad_id: int | None = None) -> PromptTokens:
    """A transformers CLIPTokenizer as the encoder sees it; `pad_id` None pads with the end token (CLIP)."""
    special = SpecialTokens(
        start=tokenizer.bos_token_id,
        end=tokenizer.eos_token_id,
        pad=tokenizer.eos_token_id if pad_id is None else pad_id,
        comma=tokenizer.get_vocab().get(",</w>"),
    )
    # verbose=False: a prompt longer than 77 tokens is expected here (it is chunked), not worth transformers' warning
    return PromptTokens(lambda text: tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids, special)


@dataclass
class TextConditioning:
    """cond (B, 77k, C), uncond (1, 77k, C) or None, and the embeddings the prompts used (name -> file)."""

    cond: Tensor
    uncond: Tensor | None
    embeddings: dict[str, Path]


def encode_prompts(
    tower: nn.Module,
    tokens: PromptTokens,
    library: EmbeddingLibrary,
    prompts: Sequence[str],
    negative_prompt: str | None,
    device: torch.device,
) -> TextConditioning:
    """Encode a batch's prompts and negative prompt with one text tower (run it inside the text stage),
    all padded with the empty prompt to the same number of 77-token chunks."""
    embedding = token_embedding_of(tower)

    @torch.no_grad()
    def encode(ids: Tensor, fixes) -> Tensor:
        with spliced(embedding, fixes):
            return tower(ids.to(device))

    encoder = PromptEncoder(tokens, encode, TowerEmbeddings(library, (embedding.weight.shape[-1],)))
    used: list[str] = []
    cache: dict[str, Tensor] = {}
    for text in [*prompts, *([] if negative_prompt is None else [negative_prompt])]:
        if text not in cache:
            cache[text] = encoder(text, used)
    chunks = max(z.shape[1] for z in cache.values()) // encoder.empty().shape[1]
    padded = {text: pad_to_chunks(z, chunks, encoder.empty()) for text, z in cache.items()}
    cond = torch.cat([padded[text] for text in prompts])
    uncond = None if negative_prompt is None else padded[negative_prompt]
    return TextConditioning(cond, uncond, {name: library.paths[name] for name in used})
