"""`describe_checkpoint` / `format_info` for each layout, and A1111's model hashes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from optimized_sd.errors import CheckpointError
from optimized_sd.weights.hashing import legacy_model_hash, sha256_file, sha256_short
from optimized_sd.weights.inspect import (
    LAYOUT_BARE,
    LAYOUT_LIGHTNING,
    LAYOUT_SAFETENSORS,
    LAYOUT_WRAPPED,
    describe_checkpoint,
    format_info,
)

from lightning_checkpoints import UNET, tiny_sd1, write_lightning_ckpt

# Parameter counts of lightning_checkpoints.tiny_sd1 (its comments give each tensor's).
UNET_PARAMS = 288 + 8 + 64 + 128 + 288
VAE_PARAMS = 216 + 216
TE_PARAMS = 160 + 16


def hashes_of(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()[:10], hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def field(text: str, label: str) -> str:
    """The value on the `label  value` line of format_info's output."""
    for line in text.splitlines():
        if line.startswith(label + " "):
            return line[len(label):].strip()
    raise AssertionError(f"no {label!r} line in:\n{text}")


# --- hashes -------------------------------------------------------------------------------------


def test_hashes_match_hashlib_on_a_file_past_the_legacy_window(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = np.random.default_rng(0).integers(0, 256, size=0x100000 + 0x10000 + 12345, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_short(path) == hashlib.sha256(data).hexdigest()[:10]
    assert len(sha256_short(path)) == 10
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def test_legacy_hash_of_short_files(tmp_path: Path) -> None:
    """Under 1 MiB there is nothing at the offset: A1111 hashes the empty read."""
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    assert legacy_model_hash(small) == hashlib.sha256(b"").hexdigest()[:8]
    partial = tmp_path / "partial.bin"
    partial.write_bytes(bytes(0x100000) + b"tail")
    assert legacy_model_hash(partial) == hashlib.sha256(b"tail").hexdigest()[:8]


def test_the_metadata_hash_of_a_model_is_read_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every generation writes `Model hash:`; a 12 GB transformer took 9.7 s to hash each run until it was cached."""
    from optimized_sd.weights.hashing import cached_model_hash, hash_cache_path

    monkeypatch.setenv("OPTIMIZED_SD_HASH_CACHE", str(tmp_path / "hashes.json"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    assert hash_cache_path() == tmp_path / "hashes.json"
    assert cached_model_hash(path) == hashlib.sha256(b"weights").hexdigest()[:10]
    entries = json.loads((tmp_path / "hashes.json").read_text())
    entries[str(path.resolve())]["sha256"] = "e" * 64  # a hit is served from the cache
    (tmp_path / "hashes.json").write_text(json.dumps(entries))
    assert cached_model_hash(path) == "e" * 10
    monkeypatch.delenv("OPTIMIZED_SD_HASH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hash_cache_path() == tmp_path / "xdg" / "optimized-sd" / "hashes.json"


def test_hash_cache_reuses_and_invalidates(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"first contents")
    cache = tmp_path / "cache" / "hashes.json"
    first = sha256_file(path, cache_path=cache)
    assert first == hashlib.sha256(b"first contents").hexdigest()
    entries = json.loads(cache.read_text())
    assert entries[str(path.resolve())]["sha256"] == first

    # a hit is served from the cache: plant a marker value with the right stamp
    entries[str(path.resolve())]["sha256"] = "f" * 64
    cache.write_text(json.dumps(entries))
    assert sha256_file(path, cache_path=cache) == "f" * 64
    assert sha256_short(path, cache_path=cache) == "f" * 10

    # a changed file (size and mtime) is hashed again
    path.write_bytes(b"second, longer contents")
    os.utime(path, ns=(1, 1))
    assert sha256_file(path, cache_path=cache) == hashlib.sha256(b"second, longer contents").hexdigest()

    # a damaged cache is ignored and rewritten
    cache.write_text("{not json")
    assert sha256_file(path, cache_path=cache) == hashlib.sha256(b"second, longer contents").hexdigest()
    assert json.loads(cache.read_text())


def test_hash_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        sha256_short(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="is a folder"):
        legacy_model_hash(tmp_path)


# --- describe_checkpoint / format_info ----------------------------------------------------------


def test_lightning_ckpt(tmp_path: Path) -> None:
    path = tmp_path / "sd-v1-4.ckpt"
    write_lightning_ckpt(path, tiny_sd1())
    info = describe_checkpoint(path)

    assert info.layout == LAYOUT_LIGHTNING
    assert info.family == "sd1" and info.family_error is None
    assert info.file_size == path.stat().st_size
    assert info.parts["UNet"].params == UNET_PARAMS and info.parts["UNet"].tensors == 5
    assert info.parts["VAE"].params == VAE_PARAMS
    assert info.parts["text encoder"].params == TE_PARAMS
    assert info.parts["UNet"].dtypes == ("float32",)
    assert info.extras == {"EMA": 4, "position_ids": 1, "schedule buffer": 3}
    assert info.ema_weights == 2 and info.ema_present
    assert info.other_keys == ()
    assert info.dtypes == {"float32": 15, "int32": 1, "int64": 1}
    assert info.lightning == {
        "pytorch-lightning": "1.4.2", "epoch": "6", "global_step": "470000", "callbacks": "ModelCheckpoint",
    }
    assert (info.sha256_short, info.legacy_hash) == hashes_of(path)
    assert "pytorch_lightning" not in sys.modules
    cached = describe_checkpoint(path, hash_cache=tmp_path / "hashes.json")
    assert cached.sha256_short == info.sha256_short and (tmp_path / "hashes.json").is_file()

    text = format_info(info)
    short, legacy = hashes_of(path)
    for needle in [
        str(path),
        "CompVis Lightning .ckpt (pytorch-lightning 1.4.2, epoch 6, global_step 470000; callbacks: ModelCheckpoint)",
        "sd1 (SD 1.x)",
        "float32 (15 tensors), int32 (1 tensor), int64 (1 tensor)",
        f"{UNET_PARAMS:,} params in 5 tensors, float32",
        f"{VAE_PARAMS:,} params in 2 tensors",
        "EMA 4, position_ids 1, schedule buffer 3",
        "yes: EMA copy of the UNet (2 tensors)",
        f"sha256 {short}",
        f"legacy {legacy}",
    ]:
        assert needle in text, (needle, text)
    assert "refused" not in text and "metadata" not in text and "missing" not in text


def test_bare_fp16_pruned_ckpt(tmp_path: Path) -> None:
    sd = {k: v.half() if v.is_floating_point() else v for k, v in tiny_sd1(ema_copy=False).items()}
    path = tmp_path / "v1-5-pruned-emaonly-fp16.ckpt"
    torch.save(sd, path)
    info = describe_checkpoint(path)
    assert info.layout == LAYOUT_BARE
    assert info.family == "sd1"
    assert info.parts["UNet"].dtypes == ("float16",)
    assert info.parts["UNet"].params == UNET_PARAMS
    assert not info.ema_present and info.extras["EMA"] == 2
    assert info.lightning == {}
    text = format_info(info)
    assert "bare state dict .ckpt" in text
    assert "float16 (13 tensors)" in text
    assert "no (only model_ema.decay/num_updates; pruned)" in text


def test_wrapped_ckpt_with_unknown_keys(tmp_path: Path) -> None:
    sd = tiny_sd1(ema_copy=False)
    del sd["model_ema.decay"], sd["model_ema.num_updates"]
    sd["lora_leftover.weight"] = torch.ones(2)
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": sd}, path)
    info = describe_checkpoint(path, hashes=False)
    assert info.layout == LAYOUT_WRAPPED
    assert info.other_keys == ("lora_leftover.weight",)
    assert info.sha256_short is None and info.legacy_hash is None
    text = format_info(info)
    assert "1 unrecognised key: lora_leftover.weight" in text
    assert "EMA" in text and "hashes" not in text


def test_safetensors_with_metadata(tmp_path: Path) -> None:
    sd = {k: v.half() if v.is_floating_point() else v for k, v in tiny_sd1(ema_copy=False).items()}
    path = tmp_path / "model.safetensors"
    save_file(sd, path, metadata={"format": "pt", "modelspec.title": "tiny sd1", "ss_note": "x" * 300})
    info = describe_checkpoint(path)
    assert info.layout == LAYOUT_SAFETENSORS
    assert info.family == "sd1"
    assert info.metadata == {"format": "pt", "modelspec.title": "tiny sd1", "ss_note": "x" * 300}
    assert info.parts["text encoder"].dtypes == ("float16",)
    assert info.parts["VAE"].params == VAE_PARAMS
    assert info.dtypes == {"float16": 13, "int32": 1, "int64": 1}
    assert (info.sha256_short, info.legacy_hash) == hashes_of(path)
    text = format_info(info)
    assert "single-file .safetensors" in text
    assert "format=pt" in text and "modelspec.title=tiny sd1" in text
    assert "x" * 100 not in text  # long metadata values are shortened
    assert all(len(line) < 500 for line in text.splitlines())


def test_unsupported_family_is_described_not_raised(tmp_path: Path) -> None:
    sd = tiny_sd1(ema_copy=False)
    sd[UNET + "input_blocks.0.0.weight"] = torch.zeros(8, 8, 3, 3)  # InstructPix2Pix (9 channels: inpainting, supported)
    path = tmp_path / "ip2p.safetensors"
    save_file(sd, path)
    info = describe_checkpoint(path, hashes=False)
    assert info.family is None
    assert "InstructPix2Pix (SD 1.x)" in info.family_error
    text = format_info(info)
    assert field(text, "family").startswith("refused: this is an InstructPix2Pix (SD 1.x) model")
    assert field(text, "metadata") == "(empty)"


def test_vae_only_file_is_described(tmp_path: Path) -> None:
    path = tmp_path / "vae-ft-mse.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.ones(8, 3, 3, 3),
                               "decoder.conv_out.weight": torch.ones(3, 8, 3, 3)}}, path)
    info = describe_checkpoint(path, hashes=False)
    assert info.family is None and "VAE alone" in info.family_error
    text = format_info(info)
    assert "missing" in text and "UNet, VAE, text encoder" in text
    assert "2 unrecognised keys" in text


def test_unsafe_or_broken_files_raise(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        describe_checkpoint(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((16).to_bytes(8, "little") + b'{"a": 1}' + b" " * 20)
    with pytest.raises(CheckpointError, match="unreadable .safetensors"):
        describe_checkpoint(bad)
    with pytest.raises(CheckpointError, match="without model_index.json"):
        describe_checkpoint(tmp_path)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(64)}, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="unreadable .safetensors"):
        describe_checkpoint(cut)
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": _Exec()}, evil)
    with pytest.raises(CheckpointError, match="nothing in the file was run"):
        describe_checkpoint(evil)


class _Exec:
    def __reduce__(self) -> tuple:
        return (exec, ("raise SystemExit('ran')",))


def _unet_like(tiny_model, **changes):
    """The tiny diffusers UNet's config with another family's traits."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**tiny_model.unet.config, **changes})


def test_diffusers_folder(tiny_model, diffusers_variant) -> None:
    folder = diffusers_variant("sd15-diffusers")
    half = {k: v.half() for k, v in tiny_model.unet.state_dict().items()}
    save_file(half, folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")  # the loader reads the fp32 file
    info = describe_checkpoint(folder)
    assert info.layout == "diffusers folder (StableDiffusionPipeline)"
    assert info.family == "sd1", info.family_error
    assert info.parts["UNet"].params == sum(p.numel() for p in tiny_model.unet.parameters())
    assert info.parts["UNet"].dtypes == ("float32",)
    assert info.parts["VAE"].params == sum(p.numel() for p in tiny_model.vae.parameters())
    assert info.parts["text encoder"].params == sum(p.numel() for p in tiny_model.text_encoder.parameters())
    assert info.other_keys == ()  # every key of every part has an LDM name
    assert info.sha256_short is None
    text = format_info(info)
    assert "diffusers folder (StableDiffusionPipeline)" in text
    assert "EMA" not in text and "hashes" not in text


def test_diffusers_folder_config_the_loader_refuses(diffusers_variant) -> None:
    folder = diffusers_variant("model")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
    info = describe_checkpoint(folder)
    assert info.family is None and "act_fn is 'gelu'" in info.family_error


@pytest.mark.parametrize(
    ("class_name", "unet_changes", "needle"),
    [
        ("StableDiffusionPipeline", {"use_linear_projection": True}, "SD 2.x"),
        (
            "StableDiffusionXLPipeline",
            {"addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 112},
            "SDXL",
        ),
        ("StableDiffusionInstructPix2PixPipeline", {"in_channels": 8}, "InstructPix2Pix (SD 1.x)"),  # 9 (inpainting) is supported
    ],
)
def test_diffusers_folder_other_families(tiny_model, diffusers_variant, class_name: str, unet_changes: dict, needle: str) -> None:
    folder = diffusers_variant("model", class_name=class_name, unet=_unet_like(tiny_model, **unet_changes))
    info = describe_checkpoint(folder)
    assert info.family is None and needle in info.family_error
