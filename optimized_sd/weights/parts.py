"""A checkpoint that holds only the denoiser (city96's GGUF UNets, a UNet-only file) completed from other files:
`--parts-from CKPT` (a whole checkpoint of the same family whose denoiser is not read), `--vae FILE` and
`--text-encoder FILE` (repeatable: SD 1.x a CLIP-L file, SDXL ComfyUI's `clip_l` and `clip_g` files, in
transformers' names), all under the single-file names the rest of loading reads. A part still missing is a
one-line error naming the flag that supplies it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from optimized_sd.errors import CheckpointError, FieldError
from optimized_sd.families import registry
from optimized_sd.weights.diffusers_folder import tower_source
from optimized_sd.weights.family import EMA_PREFIX, UNET_PREFIX, VAE_PREFIX, denoiser_family, detect_family
from optimized_sd.weights.sources import ChainSource, RenamedSource, TensorSource

TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")
CLIP_HEAD = ("text_projection.weight", "logit_scale")  # CLIP-L's contrastive head: SD's towers never run it


def _holds(keys: Sequence[str], prefixes: tuple[str, ...] | str) -> bool:
    return any(key.startswith(prefixes) for key in keys)


def _donor(path: Path, family: str, denoiser: Path, present: set[str]) -> TensorSource:
    """`--parts-from`: everything of a whole checkpoint of `family` but its denoiser (and its EMA copy)."""
    from optimized_sd.weights.loading import open_checkpoint

    source = open_checkpoint(path).source
    try:
        found = detect_family(source.shapes())
    except CheckpointError as error:
        raise FieldError.about("parts_from", f"{path}: {error}") from None
    if found != family:
        names = registry.by_name(found).display_name, registry.by_name(family).display_name
        raise FieldError.about("parts_from", f"{path} is an {names[0]} checkpoint; {denoiser.name} is an {names[1]} denoiser")
    kept = [key for key in source.keys() if not key.startswith((UNET_PREFIX, EMA_PREFIX)) and key not in present]
    return RenamedSource(source, {key: key for key in kept})


def _width(source: TensorSource) -> int:
    """A CLIP text model's hidden width (its final norm's), to tell CLIP-L (narrower) from bigG."""
    for key in ("text_model.final_layer_norm.weight", "final_layer_norm.weight"):
        if key in source.keys():
            return source.shape(key)[0]
    return 0


def _towers(files: Sequence[Path], family: str) -> list[TensorSource]:
    """`--text-encoder` files as the family's towers, narrowest first (CLIP-L before bigG, as the towers run)."""
    from optimized_sd.weights.loading import open_weight_file

    record = registry.by_name(family)
    if len(files) != len(record.towers):
        words = "a CLIP-L file" if len(record.towers) == 1 else "clip_l and clip_g files"
        raise FieldError.about("text_encoders", f"gives {len(files)} files; {record.display_name} takes {words}")
    for path in files:
        if not Path(path).is_file():
            raise FieldError.about("text_encoders", f"{path}: no such file")
    sources = sorted((open_weight_file(Path(path)) for path in files), key=_width)
    towers = []
    for tower, source in zip(record.towers, sources):
        if not _width(source):
            raise FieldError.about("text_encoders", "gives a file that holds no CLIP text model (text_model.* keys)")
        kept = [key for key in source.keys() if key not in CLIP_HEAD or tower.kind == "open_clip"]
        towers.append(tower_source(tower, RenamedSource(source, {key: key for key in kept})))
    return towers


def with_parts(
    source: TensorSource, path: Path, *, parts_from: Path | str | None = None, vae: Path | str | None = None,
    text_encoders: Sequence[Path | str] = (),
) -> tuple[TensorSource, Path | str | None]:
    """The checkpoint's tensors with the parts it lacks from the flags, and the `--vae` still to apply (None once it
    supplied the missing VAE). A whole checkpoint is returned as it is; flags that complete one are refused for it."""
    keys = source.keys()
    has_vae, has_text = _holds(keys, VAE_PREFIX), _holds(keys, TEXT_PREFIXES)
    if not _holds(keys, UNET_PREFIX) or (has_vae and has_text):
        if text_encoders:
            raise FieldError.about("text_encoders", "gives the text towers of a denoiser-only file; this checkpoint holds its own")
        if parts_from is not None:
            raise FieldError.about("parts_from", f"completes a denoiser-only file; {path.name} holds its own VAE and text encoders")
        return source, vae
    family = denoiser_family(source.shapes())
    if family is None:
        raise CheckpointError(f"{path} holds a UNet of no family this version runs")
    parts = [source]
    if parts_from is not None:
        parts.append(_donor(Path(parts_from), family, path, set(keys)))
    elif vae is not None and not has_vae:
        from optimized_sd.weights.loading import open_weight_file
        from optimized_sd.weights.vae_file import vae_names

        if not Path(vae).is_file():
            raise FieldError.about("vae", f"{vae}: no such file")
        vae_file = open_weight_file(Path(vae))
        parts.append(RenamedSource(vae_file, vae_names(vae_file)))
        vae = None  # supplied here; the model's VAE shapes check it with the rest
    if text_encoders:
        if has_text or parts_from is not None:
            raise FieldError.about("text_encoders", f"gives text towers {path.name} already has (in it or in parts_from)")
        parts.extend(_towers([Path(p) for p in text_encoders], family))
    combined = ChainSource(parts)
    name = registry.by_name(family).display_name
    if not _holds(combined.keys(), VAE_PREFIX):
        problem = f"must give the VAE of {path.name}, which holds only an {name} denoiser (or parts_from: a whole checkpoint)"
        raise FieldError.about("vae", problem)
    if not _holds(combined.keys(), TEXT_PREFIXES):
        words = "a CLIP-L file" if len(registry.by_name(family).towers) == 1 else "clip_l and clip_g files"
        problem = f"must give {words} for {path.name}, which holds only an {name} denoiser (or parts_from: a whole checkpoint)"
        raise FieldError.about("text_encoders", problem)
    return combined, vae
