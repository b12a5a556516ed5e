"""The full-size Flux.1 dev benchmark model (`flux-dev`): the real architectures with seeded random bf16 weights in
BFL + separate-files layout, as Flux is usually downloaded: `flux1-dev` (the 12B transformer, 23.8 GB), `t5xxl`
(T5 v1.1 XXL's encoder, 9.5 GB), `clip_l` (CLIP ViT-L's text tower) and `ae` (the 16-channel VAE), with stand-in
tokenizers (CLIP's byte tokenizer, a few-word T5 SentencePiece vocabulary).

Each file is written TENSOR BY TENSOR: its header is laid out from a model built on the meta device, then each tensor
is drawn, cast to bf16 and appended, so the writer's peak is one tensor (T5's 32128x4096 embedding, 0.5 GB in fp32)
however large the model: the 33 GB of Flux.1 dev never have to fit in RAM.

Values: N(0, 0.02) matrices, 1 for the 1-D weights of norms (RMSNorm scales, LayerNorm/GroupNorm weights), 0 for
biases: small enough that every activation stays finite in bf16. Speed and memory depend on the shapes only."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from optimized_sd.errors import UserError

FLUX_DEV = "flux-dev"
FORMAT_TAG = "optimized-sd random benchmark model"
FORMAT_VERSION = "1"
STD = 0.02
T5_WORDS = ("a", "red", "cube", "cat", "dog", "on", "the", "photo", "of")


def transformer_entries() -> list[tuple[str, tuple[int, ...]]]:
    """BFL `flux1-dev.safetensors` keys and shapes (our `Flux` module's names are BFL's)."""
    import torch

    from optimized_sd.models.flux import Flux, FluxConfig

    with torch.device("meta"):
        model = Flux(FluxConfig())
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


def t5_entries() -> list[tuple[str, tuple[int, ...]]]:
    """T5 v1.1 XXL encoder keys as `t5xxl_fp16.safetensors` holds them (transformers' names, `shared.weight` once)."""
    import torch

    from optimized_sd.models.t5 import TIED_EMBEDDING, T5Config, T5Encoder

    with torch.device("meta"):
        model = T5Encoder(T5Config())
    prefix = "transformer."
    return [(key.removeprefix(prefix), tuple(value.shape)) for key, value in model.state_dict().items() if key != TIED_EMBEDDING]


def clip_entries() -> list[tuple[str, tuple[int, ...]]]:
    """CLIP ViT-L text tower keys as `clip_l.safetensors` holds them (`text_model.*`)."""
    import torch

    from optimized_sd.config import TextEncoderConfig
    from optimized_sd.models.text_encoder import FrozenCLIPEmbedder

    with torch.device("meta"):
        model = FrozenCLIPEmbedder(TextEncoderConfig())
    return [("text_model." + key.removeprefix("transformer.").removeprefix("text_model."), tuple(value.shape))
            for key, value in model.state_dict().items()]  # fmt: skip


def vae_entries() -> list[tuple[str, tuple[int, ...]]]:
    """Flux's `ae.safetensors` keys: the LDM autoencoder with 16 latent channels and no quant convs."""
    import torch

    from optimized_sd.config import VAEConfig
    from optimized_sd.models.vae import AutoencoderKL

    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig(z_channels=16, embed_dim=16, use_quant_conv=False))
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


FILES: dict[str, tuple[str, Callable[[], list[tuple[str, tuple[int, ...]]]]]] = {
    "transformer": ("flux1-dev-random-bf16.safetensors", transformer_entries),
    "t5": ("t5xxl-random-bf16.safetensors", t5_entries),
    "clip_l": ("clip_l-random-bf16.safetensors", clip_entries),
    "vae": ("ae-random-bf16.safetensors", vae_entries),
}


def header_for(entries: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, int]:
    """The safetensors header for bf16 tensors (length prefix included, padded to 8 bytes) and the data size."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, shape in entries:
        size = 2
        for dim in shape:
            size *= dim
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def random_tensor(key: str, shape: tuple[int, ...], generator):  # -> bf16 Tensor
    """N(0, STD) for matrices, 1 for a norm's 1-D weight or scale, 0 for a bias."""
    import torch

    if len(shape) >= 2:
        return torch.empty(shape).normal_(0.0, STD, generator=generator).to(torch.bfloat16)
    return (torch.zeros if key.endswith("bias") else torch.ones)(shape, dtype=torch.bfloat16)


def is_valid(path: Path, entries: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> bool:
    """A cached file with our tag and seed, every key and shape, and its full length."""
    from optimized_sd.errors import CheckpointError
    from optimized_sd.weights.sources import SafetensorsSource

    try:
        source = SafetensorsSource(path)
    except CheckpointError:
        return False
    try:
        same = source.metadata == metadata and {key: source.shape(key) for key in source.keys()} == dict(entries)
        return same and path.stat().st_size == source.data_end
    finally:
        source.close()


def write_file(path: Path, entries: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str], seed: int) -> None:
    """Append each tensor as it is drawn (through a temporary file, renamed when complete)."""
    import torch

    header, data_size = header_for(entries, metadata)
    generator = torch.Generator().manual_seed(seed)
    partial = path.with_name(path.name + ".partial")
    written = 0
    with open(partial, "wb") as handle:
        handle.write(header)
        for key, shape in entries:
            tensor = random_tensor(key, shape, generator).contiguous()
            handle.write(tensor.view(torch.uint8).numpy().tobytes())
            written += tensor.numel() * 2
            del tensor
    if written != data_size:
        raise AssertionError(f"wrote {written} bytes of tensor data, planned {data_size}")
    os.replace(partial, path)


def write_tokenizers(folder: Path) -> tuple[Path, Path]:
    """CLIP's stand-in byte tokenizer and a few-word T5 SentencePiece tokenizer (ids well inside T5's vocabulary)."""
    from transformers import T5Tokenizer

    from optimized_sd.models.text_encoder import write_byte_tokenizer

    clip = write_byte_tokenizer(folder / "tokenizer", 49408)
    t5 = folder / "tokenizer_2"
    if not (t5 / "tokenizer_config.json").is_file():
        vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -float(i)) for i, w in enumerate(T5_WORDS)]
        T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(t5))
    return clip, t5


def ensure_flux_model(folder: Path, seed: int = 0):  # -> model_cache.CachedModel
    """The four files and two tokenizers in `folder`, each file written when missing or invalid."""
    from optimized_sd.benchmark.model_cache import CachedModel, check_disk_space

    start = time.perf_counter()
    built = False
    paths: dict[str, Path] = {}
    for index, (part, (name, planned)) in enumerate(FILES.items()):
        entries = planned()
        metadata = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "seed": str(seed), "dtype": "bfloat16", "part": part}
        path = paths[part] = folder / name
        if path.is_file() and is_valid(path, entries, metadata):
            continue
        header, data_size = header_for(entries, metadata)
        check_disk_space(folder, len(header) + data_size - (path.stat().st_size if path.is_file() else 0))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_file(path, entries, metadata, seed * 16 + index)
        except OSError as error:
            raise UserError(f"cannot write the benchmark model to {folder}: {error.strerror or error}") from None
        built = True
    clip_tokenizer, t5_tokenizer = write_tokenizers(folder)
    return CachedModel(
        checkpoint=paths["transformer"],
        tokenizer=clip_tokenizer,
        diffusers_config=folder,
        built=built,
        seconds=time.perf_counter() - start,
        parts=(paths["t5"], paths["clip_l"], paths["vae"]),
        t5_tokenizer=t5_tokenizer,
    )
