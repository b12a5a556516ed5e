"""Qwen3 (Qwen team 2025), a decoder-only language model, as a text encoder through transformers' `Qwen3Model`,
built from a config read off the tensors, and its chat-templated Qwen2 tokenizer.

Two ways of reading it (diffusers' pipelines are the reference):
- Z-Image (`ZImagePipeline.encode_prompt`): the prompt as one user turn of the chat template with the
  generation prompt and thinking enabled, at most 512 tokens; the second-to-last hidden state (the output of
  layer N-1 of N), only the prompt's real tokens (padding dropped, so each prompt has its own length);
- Flux.2 klein (`Flux2KleinPipeline._get_qwen3_prompt_embeds`): the same turn with thinking disabled (an
  empty think block), padded to 512; the outputs of layers 9, 18 and 27 side by side per token
  (B, 512, 3 * hidden), every position kept.

Only the layers up to the last one read are built, and the final norm never is: the file's later layers,
its final norm and any language-model head are known, unread keys (`unused_keys`)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from optimized_sd.errors import CheckpointError, UserError
from optimized_sd.models.ops import adopt_linears
from optimized_sd.models.text_encoder import tokenize

log = logging.getLogger("optimized_sd")

MAX_TOKENS = 512  # both pipelines' max_sequence_length
KLEIN_LAYERS = (9, 18, 27)  # Flux.2 klein's `text_encoder_out_layers`
ROPE_THETA = 1_000_000.0  # every Qwen3 model; not in the tensors
RMS_EPS = 1e-6
ATTENTION = "layers.0.self_attn."
QWEN_TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
QWEN_CHAT_TOKEN = "<|im_start|>"


@dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 sizes (Qwen3-4B: 2560 wide, 36 layers, 32 query and 8 key/value heads of 128, 9728 MLP)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    num_layers: int = 36  # in the file; the tower builds only those it reads
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9728
    attention_bias: bool = False

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> Qwen3Config:
        """The config stated by `Qwen3Model`-named tensors (no `model.` prefix)."""
        head_dim = shapes[ATTENTION + "q_norm.weight"][0]
        layers = {int(m.group(1)) for key in shapes if (m := re.match(r"layers\.(\d+)\.", key))}
        vocab, hidden = shapes["embed_tokens.weight"]
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=max(layers) + 1,
            num_heads=shapes[ATTENTION + "q_proj.weight"][0] // head_dim,
            num_kv_heads=shapes[ATTENTION + "k_proj.weight"][0] // head_dim,
            head_dim=head_dim,
            intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
            attention_bias=ATTENTION + "q_proj.bias" in shapes,
        )

    def transformers_config(self, layers: int):  # -> transformers.Qwen3Config
        from transformers import Qwen3Config as HFQwen3Config

        return HFQwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=RMS_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
            attention_bias=self.attention_bias,
            max_position_embeddings=40960,
        )


def zimage_layers(config: Qwen3Config) -> tuple[int, ...]:
    """Z-Image reads hidden_states[-2]: the output of the second-to-last layer."""
    return (config.num_layers - 1,)


class Qwen3TextEncoder(nn.Module):
    """Holds transformers' Qwen3Model as `transformer`, cut after the last layer read, without its final norm."""

    def __init__(self, config: Qwen3Config, layers_read: Sequence[int]) -> None:
        super().__init__()
        from transformers import Qwen3Model

        if not layers_read or min(layers_read) < 1 or max(layers_read) >= config.num_layers:
            raise CheckpointError(
                f"the Qwen3 text encoder has {config.num_layers} layers; this model reads the outputs of layers "
                f"{', '.join(map(str, layers_read))} (each must be below the last)"
            )
        self.config = config
        self.layers_read = tuple(layers_read)
        hf_config = config.transformers_config(max(layers_read))
        self.transformer = Qwen3Model(hf_config)
        # its Linears through the op layer: an fp8 file's weights stay fp8 (`weight_storage.file_float8`); transformers'
        # Qwen3 never casts activations to a weight's dtype (its norms cast back to the input's), so nothing else changes
        adopt_linears(self.transformer)
        with torch.device("cpu"):  # RoPE's frequencies are computed, never loaded: real even when built on `meta`
            self.transformer.rotary_emb = type(self.transformer.rotary_emb)(hf_config)
        self.transformer.norm = nn.Identity()  # hidden_states[-1] is then the last layer's raw output, as read

    def unused_keys(self) -> dict[str, str]:
        """Key prefixes (Qwen3Model names) of the file that this tower never reads, with the reason."""
        unused = {"norm.": "Qwen3 final norm (unused)", "lm_head.": "Qwen3 language-model head (unused)"}
        for index in range(max(self.layers_read), self.config.num_layers):
            unused[f"layers.{index}."] = "Qwen3 layer past the last one read"
        return unused

    def stream_parts(self) -> list[str]:
        """Children in call order: the token embedding, each layer."""
        return ["transformer.embed_tokens", *(f"transformer.layers.{i}" for i in range(max(self.layers_read)))]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, tokens) ids and mask -> (B, tokens, len(layers_read) * hidden): the outputs of the layers read,
        side by side per token (the causal mask with the padding mask, as transformers computes it)."""
        output = self.transformer(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        states = output.hidden_states  # (embeddings, layer 1, ..., last layer built)
        return torch.cat([states[index] for index in self.layers_read], dim=-1)


class QwenPromptTokenizer:
    """Prompts as one user turn of the chat template, right-padded, cut at `max_length` tokens with a warning."""

    def __init__(self, tokenizer, enable_thinking: bool, max_length: int = MAX_TOKENS) -> None:  # a transformers Qwen2 tokenizer
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.max_length = max_length

    def templated(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=self.enable_thinking
        )

    def __call__(self, prompts: list[str], pad_to_max: bool) -> tuple[Tensor, Tensor]:
        """(input ids, attention mask), each (B, tokens): padded to `max_length` or to the longest prompt."""
        texts = [self.templated(prompt) for prompt in prompts]
        for prompt, text in zip(prompts, texts, strict=True):
            if len(tokenize(self.tokenizer, text, truncation=False, verbose=False).input_ids) > self.max_length:
                log.warning("the prompt %r is over %d tokens with its chat template; the rest is cut off", prompt[:60], self.max_length)
        batch = tokenize(
            self.tokenizer, texts, padding="max_length" if pad_to_max else "longest", max_length=self.max_length,
            truncation=True, padding_side="right", return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask


def encode_zimage(tower: Qwen3TextEncoder, tokenizer: QwenPromptTokenizer, prompts: list[str], device=None) -> list[Tensor]:
    """Z-Image caption features: per prompt (its tokens, hidden) from the second-to-last layer. Padding to the
    longest prompt instead of 512 changes nothing for the real tokens (causal attention, right padding).
    `device`: where the ids go (None: the embedding's; a streamed tower's is not placed before it runs)."""
    device = tower.transformer.embed_tokens.weight.device if device is None else device
    ids, mask = tokenizer(prompts, pad_to_max=False)
    states = tower(ids.to(device), mask.to(device))
    return [sample[keep.to(device).bool()] for sample, keep in zip(states, mask, strict=True)]


def encode_klein(tower: Qwen3TextEncoder, tokenizer: QwenPromptTokenizer, prompts: list[str], device: torch.device | None = None) -> Tensor:
    """Flux.2 klein context: (B, 512, 3 * hidden) from layers 9, 18 and 27, every position kept (`device`: where the
    ids go, when the tower's weights are placed by a memory engine; else the embedding's device)."""
    device = device or tower.transformer.embed_tokens.weight.device
    ids, mask = tokenizer(prompts, pad_to_max=True)
    return tower(ids.to(device), mask.to(device))


def load_qwen_tokenizer(folder: Path | str, enable_thinking: bool, max_length: int = MAX_TOKENS) -> QwenPromptTokenizer:
    """The Qwen2 tokenizer in `folder` (diffusers' `tokenizer/`), with its chat template. The folder's kind is
    read from `tokenizer_config.json`: CLIP's folders hold the same vocab.json and merges.txt."""
    from transformers import Qwen2Tokenizer

    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            kind = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, ValueError, AttributeError) as error:
            raise UserError(f"cannot read {config_path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    elif (folder / "tokenizer.json").is_file():  # a lone tokenizer.json: Qwen's if it has Qwen's chat tokens
        kind = QWEN_TOKENIZER_CLASSES[0] if QWEN_CHAT_TOKEN in (folder / "tokenizer.json").read_text(encoding="utf-8") else None
    else:
        raise UserError(f"Qwen tokenizer folder {folder} must hold tokenizer_config.json or tokenizer.json")
    if kind not in QWEN_TOKENIZER_CLASSES:
        held = f"a {kind} tokenizer" if kind else "no tokenizer of a named class"
        raise UserError(f"tokenizer folder {folder} holds {held}; this model needs a Qwen2 tokenizer")
    try:
        tokenizer = Qwen2Tokenizer.from_pretrained(str(folder))
    except Exception as error:  # noqa: BLE001 - the transformers boundary: any failure reading these files is a bad folder
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read the Qwen tokenizer in {folder}: {detail}") from None
    if not tokenizer.chat_template:
        raise UserError(f"the Qwen tokenizer in {folder} has no chat template (tokenizer_config.json or chat_template.jinja)")
    return QwenPromptTokenizer(tokenizer, enable_thinking, max_length)
