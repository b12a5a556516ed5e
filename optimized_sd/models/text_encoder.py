"""The CLIP ViT-L/14 text encoder (transformers' names, our modules) and the prompt tokenizer every tower uses."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimized_sd.config import TextEncoderConfig
from optimized_sd.errors import FieldError, UserError

MAX_TOKENS = 77
CLIP_NORM_EPS = 1e-5  # CLIPTextConfig's layer_norm_eps, the same in every SD text tower
HUB_TOKENIZER = "openai/clip-vit-large-patch14"
# The two ways a CLIP tokenizer folder is saved: the BPE files (transformers 4.x, the hub's repos) or the one
# `tokenizer.json` of the fast tokenizer (what transformers 5.x and so today's diffusers write).
TOKENIZER_FILES = "vocab.json and merges.txt, or tokenizer.json"


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """CLIPTextConfig's special-token ids for a vocabulary of `vocab_size`: at its top, as in the real
    CLIP vocabulary (49406 start, 49407 end, which also pads)."""
    return {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}


def clip_config(config: TextEncoderConfig):  # -> transformers.CLIPTextConfig
    """transformers' config for our dataclass (`special_token_ids` as the real vocabulary places them)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        hidden_act=config.hidden_act,
        **special_token_ids(config.vocab_size),
    )


def causal_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """A text tower's causal self-attention over (B, tokens, width) queries, keys and values, `heads` heads, back
    as (B, tokens, width). Over 77 tokens with a mask, so torch's SDPA directly: the backends of
    `optimized_sd.attention` exist for the UNet's large unmasked attention."""
    batch, tokens, width = q.shape

    def split(t: Tensor) -> Tensor:
        return t.view(batch, tokens, heads, width // heads).transpose(1, 2)  # (B, heads, tokens, dim)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    return out.transpose(1, 2).reshape(batch, tokens, width)


class ClipAttention(nn.Module):
    """Causal multi-head self-attention, named as transformers' CLIPAttention (q/k/v/out projections)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (SD 1.x's tower)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}  # CLIPTextConfig.hidden_act: SD 1.x, SD 2.x as transformers


class ClipMlp(nn.Module):
    def __init__(self, width: int, inner: int, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"a CLIP text encoder with the activation {activation!r} is not supported (only {', '.join(ACTIVATIONS)})")
        self.fc1, self.fc2 = nn.Linear(width, inner), nn.Linear(inner, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class ClipLayer(nn.Module):
    """Pre-norm residual block: attention, then the MLP."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.self_attn = ClipAttention(width, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=CLIP_NORM_EPS)
        self.mlp = ClipMlp(width, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(width, eps=CLIP_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class ClipEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(config) for _ in range(config.num_hidden_layers))


class ClipTextTransformer(nn.Module):
    """CLIP's text transformer with transformers' module names (`embeddings`, `encoder.layers.N`,
    `final_layer_norm`), so every file's keys load as they are. Ours rather than transformers' CLIPTextModel:
    the same numbers (tested against it), and importing transformers' modelling stack cost 2 s of every
    command's start on the CPU, a fifteenth of a whole SD 1.5 run at 512x512 (the tokenizer is still theirs)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.embeddings = ClipEmbeddings(config)
        self.encoder = ClipEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=CLIP_NORM_EPS)

    def forward(self, input_ids: Tensor, penultimate: bool) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(positions)[None]
        layers = self.encoder.layers
        for index, layer in enumerate(layers):
            if penultimate and index == len(layers) - 1:
                return x
            x = layer(x)
        return self.final_layer_norm(x)


class ClipTextModel(nn.Module):
    """The `text_model` level real SD 1.x files carry under `cond_stage_model.transformer.`."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.text_model = ClipTextTransformer(config)


class FrozenCLIPEmbedder(nn.Module):
    """`cond_stage_model`: holds the CLIP text model as `transformer`, like LDM, so keys match."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.transformer = ClipTextModel(config)
        self.penultimate = config.penultimate
        self.eos_token_id = special_token_ids(config.vocab_size)["eos_token_id"]

    def stream_parts(self) -> list[str]:
        """Children in call order: the token embedding (its position embedding stays with the tower), each
        encoder layer, the final norm."""
        inner = "transformer.text_model"
        layers = len(self.get_submodule(f"{inner}.encoder.layers"))
        return [f"{inner}.embeddings.token_embedding", *(f"{inner}.encoder.layers.{i}" for i in range(layers)), f"{inner}.final_layer_norm"]

    def forward(self, input_ids: Tensor) -> Tensor:
        """(B, 77) token ids -> (B, 77, hidden): the last hidden state after the final layer norm (SD 1.x),
        or the hidden state entering the last layer, without the norm (`penultimate`, SDXL)."""
        return self.transformer.text_model(input_ids, self.penultimate)


OPEN_CLIP_PAD_ID = 0  # open_clip pads with zeros (the token "!"); CLIP's own tokenizer pads with the end token


class PromptTokenizer:
    """Pads or truncates prompts to 77 tokens, and says what a long prompt lost. `pad_id` overrides the
    tokenizer's padding token (OpenCLIP towers pad with id 0 whatever tokenizer files they come with)."""

    def __init__(self, tokenizer, pad_id: int | None = None) -> None:  # a transformers CLIPTokenizer
        self.tokenizer = tokenizer
        self.pad_id = pad_id

    def with_padding(self, pad_id: int | None) -> PromptTokenizer:
        """The same vocabulary padding with `pad_id` (None: the tokenizer's own pad token)."""
        return PromptTokenizer(self.tokenizer, pad_id)

    def __call__(self, prompts: list[str]) -> Tensor:
        batch = tokenize(self.tokenizer, prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        if self.pad_id is None:
            return batch.input_ids
        return batch.input_ids.masked_fill(batch.attention_mask == 0, self.pad_id)

    def truncated_text(self, prompt: str) -> str:
        """The words cut off by the 77-token limit ('' when the prompt fits). `verbose=False` keeps
        transformers from warning, for this call only, about the very length checked here."""
        ids = tokenize(self.tokenizer, prompt, truncation=False, verbose=False).input_ids
        if len(ids) <= MAX_TOKENS:
            return ""
        return self.tokenizer.decode(ids[MAX_TOKENS - 1 : -1]).strip()


def tokenize(tokenizer, text: str | list[str], **options):  # -> transformers BatchEncoding
    """`tokenizer(text, **options)`, with whatever the tokenizer raises on text it cannot read (a lone
    surrogate from undecodable command-line bytes or a JSON escape, say) as a one-line UserError."""
    for prompt in [text] if isinstance(text, str) else text:
        bad = next((char for char in prompt if "\ud800" <= char <= "\udfff"), None)
        if bad is not None:
            raise UserError(f"prompt {_shown(prompt)} holds U+{ord(bad):04X}, which is not a character (undecodable input?)")
    try:
        return tokenizer(text, **options)
    except Exception as error:  # noqa: BLE001 - the tokenizer's boundary: any failure on a prompt is a bad prompt
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        shown = _shown(text) if isinstance(text, str) else f"{len(text)} prompts"
        raise UserError(f"the tokenizer cannot read the prompt {shown}: {detail}") from None


def _shown(prompt: str) -> str:
    """A prompt as an error message quotes it: repr (escapes visible), cut to 60 characters."""
    return repr(prompt if len(prompt) <= 60 else prompt[:57] + "...")


def load_tokenizer(folder: Path | None) -> PromptTokenizer:
    """From `folder` (a diffusers `tokenizer/` or any CLIP tokenizer folder, in either form of
    TOKENIZER_FILES), else the HF cache or hub. A folder with only `tokenizer.json` is read by the fast
    class, which transformers 4.x needs for it (in 5.x both names are one class); its tokenizer_config.json
    still gives the pad token (SD 2.x's and SDXL's second tokenizer pad with "!")."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    if folder is not None:
        folder = Path(folder)
        bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        if not bpe_files and not (folder / "tokenizer.json").is_file():
            raise UserError(f"tokenizer folder {folder} must hold {TOKENIZER_FILES}")
        kind = CLIPTokenizer if bpe_files else CLIPTokenizerFast
        try:
            return PromptTokenizer(kind.from_pretrained(str(folder)))
        except Exception as error:  # noqa: BLE001 - the transformers boundary: any failure reading these files is a bad folder
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            files = "vocab.json, merges.txt" if bpe_files else "tokenizer.json"
            raise UserError(f"cannot read the tokenizer in {folder} ({files}): {detail}") from None
    try:
        return PromptTokenizer(CLIPTokenizer.from_pretrained(HUB_TOKENIZER))
    except OSError:
        raise FieldError.about(
            "tokenizer",
            f"is needed: no CLIP tokenizer is cached and the hub ({HUB_TOKENIZER}) cannot be reached; give a folder with "
            f"{TOKENIZER_FILES} (e.g. a diffusers model's tokenizer/)",
        ) from None


def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of bytes to printable characters (Radford et al. 2019)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_byte_tokenizer(folder: Path, vocab_size: int) -> Path:
    """Write a CLIP-format tokenizer whose vocabulary is the 256 byte symbols (alone and word-final)
    plus start/end tokens at the top ids. It stands in for CLIP's real 49408-token BPE where none can
    be had: for random-weight demos, benchmarks and tests, never for real images."""
    symbols = sorted(byte_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    if vocab_size < len(vocab) + 2:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab) + 2} byte tokens")
    vocab["<|startoftext|>"] = vocab_size - 2
    vocab["<|endoftext|>"] = vocab_size - 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder

