"""Extra networks for a generation, as AUTOMATIC1111 users write them: `<lora:NAME:WEIGHT>` tags and
`--lora` files (merged into the weights by the memory engine's tensor hook) and the hashes AUTOMATIC1111
writes for them and for textual-inversion embeddings (which `pipelines.text` splices into the towers)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from optimized_sd.pipelines.load_options import DEFAULT_EMBEDDINGS_DIR, DEFAULT_LORA_DIR  # noqa: F401 (their old home)
from optimized_sd.prompts.syntax import extract_loras
from optimized_sd.weights.hashing import extra_network_hash
from optimized_sd.weights.lora import check_lora_weight, find_lora, parse_lora_option

log = logging.getLogger("optimized_sd")



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
        result[path] = check_lora_weight(result.get(path, 0.0) + check_lora_weight(weight, f"LoRA {path}"), f"LoRA {path} (summed)")
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
        path = find_lora(tag.name, lora_dir)  # the tag's own weight was checked as the prompt was parsed
        loras[path] = check_lora_weight(loras.get(path, 0.0) + tag.weight, f"LoRA {path.name} (summed)")
    return PromptNetworks(tuple(cleaned), negative, loras)


def network_hashes(named: Mapping[str, Path], *, lora: bool) -> str | None:
    """AUTOMATIC1111's `name: hash, name: hash` (None when empty; the metadata writer quotes it, as it
    holds ':' and ','); ':' and ',' dropped from names."""
    if not named:
        return None
    parts = [f"{name.replace(':', '').replace(',', '')}: {extra_network_hash(path, lora=lora)}" for name, path in named.items()]
    return ", ".join(parts)
