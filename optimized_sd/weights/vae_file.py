"""`--vae FILE`: a separate VAE (LDM keys with or without `first_stage_model.`, or diffusers AutoencoderKL
keys; `.safetensors`, `.ckpt`, `.pt`) that replaces the checkpoint's own, checked strictly against the
model's VAE shapes (an SD 1.x VAE on SDXL has the same shapes and is allowed; a mis-shaped one is refused)."""

from __future__ import annotations

from pathlib import Path

from optimized_sd.config import VAEConfig
from optimized_sd.errors import CheckpointFieldError
from optimized_sd.weights.family import VAE_PREFIX, known_extra_key
from optimized_sd.weights.infer import indices
from optimized_sd.weights.keymap import rename, vae_prefixes
from optimized_sd.weights.sources import ChainSource, RenamedSource, TensorSource

_DIFFUSERS_TELLTALES = ("encoder.down_blocks.", "decoder.up_blocks.")


def vae_names(source: TensorSource) -> dict[str, str]:
    """`first_stage_model.*` name -> file key for a VAE file in any of the three layouts."""
    keys = source.keys()
    if any(k.startswith(_DIFFUSERS_TELLTALES) for k in keys):
        shapes = source.shapes()
        levels = indices(shapes, r"encoder\.down_blocks\.(\d+)\.")
        res = indices(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        return rename(keys, vae_prefixes(VAEConfig(ch_mult=tuple(1 for _ in levels), num_res_blocks=len(res))), VAE_PREFIX)
    names = {}
    for key in keys:
        name = key if key.startswith(VAE_PREFIX) else VAE_PREFIX + key
        if known_extra_key(name) is None:  # the training loss (discriminator, LPIPS) stays out
            names[name] = key
    return names


def check_vae(names: dict[str, str], source: TensorSource, expected: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuse a VAE file that does not fit the model's VAE, naming the keys that differ."""
    from optimized_sd.weights.loading import fits

    wanted = {k: v for k, v in expected.items() if k.startswith(VAE_PREFIX)}
    missing = sorted(set(wanted) - set(names))
    unexpected = sorted(set(names) - set(wanted))
    mismatched = [
        f"{k} {source.shape(names[k])} in file vs {wanted[k]} in model"
        for k in sorted(set(wanted) & set(names))
        if not fits(source.shape(names[k]), wanted[k])
    ]
    problems = []
    for label, items in (("mis-shaped", mismatched), ("missing", missing), ("unexpected", unexpected)):
        if items:
            problems.append(f"{len(items)} {label}: " + ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else ""))
    if problems:
        raise CheckpointFieldError.about("vae", f"{path} does not fit this model's VAE: {'; '.join(problems)}")


def with_vae_file(source: TensorSource, path: Path | str, expected: dict[str, tuple[int, ...]]) -> TensorSource:
    """`source` with every `first_stage_model.*` tensor taken from the VAE file at `path` instead."""
    from optimized_sd.weights.loading import open_weight_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointFieldError.about("vae", f"{path}: no such file")
    vae = open_weight_file(path)
    names = vae_names(vae)
    check_vae(names, vae, expected, path)
    kept = RenamedSource(source, {k: k for k in source.keys() if not k.startswith(VAE_PREFIX)})
    return ChainSource([kept, RenamedSource(vae, names)])
