"""The T5 encoder (Raffel et al. 2020; v1.1 XXL for Flux) through transformers' `T5EncoderModel`, built
from a config read off the tensors, and its tokenizer (a `spiece.model` or `tokenizer.json` folder)."""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from optimized_sd.errors import UserError
from optimized_sd.models.ops import adopt_linears
from optimized_sd.models.text_encoder import tokenize

ATTENTION = "encoder.block.0.layer.0.SelfAttention."
TOKENIZER_FILES = "spiece.model or tokenizer.json"
TIED_EMBEDDING = "transformer.encoder.embed_tokens.weight"  # the same tensor as `transformer.shared.weight`


@dataclass(frozen=True)
class T5Config:
    """T5 encoder sizes (T5 v1.1 XXL, Flux's: 4096 wide, 64 heads of 64, 24 layers, 10240 gated-GELU)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    num_layers: int = 24
    d_ff: int = 10240
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # not in the tensors; every T5 uses 128
    gated: bool = True  # v1.1: gated GELU (`wi_0`, `wi_1`); v1.0: ReLU (`wi`)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> T5Config:
        """The config stated by transformers-named T5 encoder tensors (`t5_names` form)."""
        buckets, heads = shapes[ATTENTION + "relative_attention_bias.weight"]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
        layers = {int(m.group(1)) for key in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", key))}
        return cls(
            vocab_size=shapes["shared.weight"][0],
            d_model=shapes["shared.weight"][1],
            d_kv=shapes[ATTENTION + "q.weight"][0] // heads,
            num_heads=heads,
            num_layers=max(layers) + 1,
            d_ff=shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0],
            relative_attention_num_buckets=buckets,
            gated=gated,
        )

    def transformers_config(self):  # -> transformers.T5Config
        from transformers import T5Config as HFT5Config

        return HFT5Config(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_kv=self.d_kv,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            d_ff=self.d_ff,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            feed_forward_proj="gated-gelu" if self.gated else "relu",
            dropout_rate=0.0,
        )


def feed_forward_in_input_dtype(self, hidden: Tensor) -> Tensor:
    """transformers' T5 feed-forward (`T5DenseGatedActDense` or `T5DenseActDense`) without its cast of the hidden
    states to `wo`'s stored dtype: that dtype is the compute dtype unless the weight is stored 8-bit, where the
    op layer dequantises the weight instead (cast to fp8, the states would lose their precision)."""
    if hasattr(self, "wi_0"):
        hidden = self.act(self.wi_0(hidden)) * self.wi_1(hidden)
    else:
        hidden = self.act(self.wi(hidden))
    return self.wo(self.dropout(hidden))


class T5Encoder(nn.Module):
    """Holds transformers' T5EncoderModel as `transformer` (ComfyUI's `text_encoders.t5xxl.transformer.*`)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        from transformers import T5EncoderModel

        self.config = config
        self.transformer = T5EncoderModel(config.transformers_config())
        adopt_linears(self.transformer)  # its weights through the op layer: an fp8 file's stay fp8 (`weight_storage`)
        for block in self.transformer.encoder.block:
            feed_forward = block.layer[-1].DenseReluDense
            feed_forward.forward = types.MethodType(feed_forward_in_input_dtype, feed_forward)

    def tie_embedding(self) -> None:
        """Point the encoder's token embedding at `shared` again after `shared` was replaced (one tensor, not two)."""
        self.transformer.encoder.embed_tokens.weight = self.transformer.shared.weight

    def stream_parts(self) -> list[str]:
        """Children in call order: the token embedding, each block (the first computes the position bias the
        others reuse), the final norm."""
        blocks = [f"transformer.encoder.block.{i}" for i in range(self.config.num_layers)]
        return ["transformer.shared", *blocks, "transformer.encoder.final_layer_norm"]

    def forward(self, input_ids: Tensor) -> Tensor:
        """(B, tokens) ids -> (B, tokens, d_model): the last hidden state, every token attended (padding too,
        as Flux was trained: no attention mask)."""
        return self.transformer(input_ids=input_ids).last_hidden_state


class T5PromptTokenizer:
    """Pads or truncates prompts to `max_length` tokens (Flux.1 dev 512, schnell 256), the end token included."""

    def __init__(self, tokenizer, max_length: int) -> None:  # a transformers T5 tokenizer
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, prompts: list[str]) -> Tensor:
        batch = tokenize(self.tokenizer, prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        return batch.input_ids

    def truncated_text(self, prompt: str) -> str:
        """The words cut off by the length limit ('' when the prompt fits)."""
        ids = tokenize(self.tokenizer, prompt, truncation=False, verbose=False).input_ids
        if len(ids) <= self.max_length:
            return ""
        return self.tokenizer.decode(ids[self.max_length - 1 : -1]).strip()


def load_t5_tokenizer(folder: Path | str, max_length: int) -> T5PromptTokenizer:
    """The T5 tokenizer in `folder` (diffusers' `tokenizer_2/`, or any folder with TOKENIZER_FILES)."""
    from transformers import T5Tokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").is_file():
        raise UserError(f"T5 tokenizer folder {folder} must hold {TOKENIZER_FILES}")
    try:
        return T5PromptTokenizer(T5Tokenizer.from_pretrained(str(folder)), max_length)
    except Exception as error:  # noqa: BLE001 - the transformers boundary: any failure reading these files is a bad folder
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read the T5 tokenizer in {folder}: {detail}") from None

