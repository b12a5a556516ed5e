"""Describe a checkpoint without building a model: layout, family, dtypes, part sizes, extras, hashes.

It formats what the loader finds rather than deciding anything itself: files are told apart and
opened by `loading` (`.ckpt` through the restricted unpickler, tensors memory-mapped; `.safetensors`
headers only), keys take `family.canonical_key` form, and a diffusers folder is opened by
`loading.open_diffusers_folder`, so the weight file read for each part, the LDM names and the config
checks are the loader's own.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimized_sd.config import FAMILY_NAMES, ModelConfig
from optimized_sd.errors import CheckpointError, FieldError
from optimized_sd.weights.ckpt import InertLightningObject, load_ckpt, state_dict_from_ckpt
from optimized_sd.weights.family import (
    EMA_COUNTERS,
    PARTS,
    denoiser_family,
    detect_family,
    known_extra_key,
    part_of_key,
)
from optimized_sd.weights.gguf import ORIG_SHAPE_PREFIX, gguf_model_source, is_gguf_file, read_gguf
from optimized_sd.weights.hashing import legacy_model_hash, sha256_short
from optimized_sd.weights.infer import infer_config
from optimized_sd.weights.loading import is_safetensors_file, model_config, normalize_keys, open_diffusers_folder
from optimized_sd.weights.sources import DictSource, SafetensorsSource, TensorSource

__all__ = ["CheckpointInfo", "PartStats", "describe_checkpoint", "format_info"]

LAYOUT_LIGHTNING = "CompVis Lightning .ckpt"
LAYOUT_WRAPPED = "state_dict-wrapped .ckpt"
LAYOUT_BARE = "bare state dict .ckpt"
LAYOUT_SAFETENSORS = "single-file .safetensors"
LAYOUT_DIFFUSERS = "diffusers folder"
LAYOUT_GGUF = "GGUF"
# How the `inspect` command tells where a missing part goes: the flag of the load field giving it (this report is the
# command's output, so it may say flags).
FIELD_FLAGS = {"checkpoint": "--ckpt", "text_encoders": "--text-encoder", "vae": "--vae"}


def said(error: Exception) -> str:
    """An error as this command's report says it: a load field's error by its flag."""
    if isinstance(error, FieldError) and error.field in FIELD_FLAGS:
        return error.named(FIELD_FLAGS[error.field])
    return str(error)


def missing_hint(fields: dict[str, str], present: Iterable[str]) -> str:
    """"word (--flag), ..." for each expected part (its words -> the load field giving it) not `present`."""
    present = set(present)
    return ", ".join(f"{word} ({FIELD_FLAGS[field]})" for word, field in fields.items() if word not in present)


@dataclass(frozen=True)
class PartStats:
    """Tensors, parameters (elements) and storage dtypes of one part (UNet, VAE, text encoder)."""

    tensors: int
    params: int
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class GgufFacts:
    """What a GGUF header says: `types` maps each GGML type name to (tensors, bytes), largest first."""

    version: int
    architecture: str | None
    tensors: int
    types: dict[str, tuple[int, int]]
    reshaped: int  # tensors stored as (n/256, 256) with their real shape in comfy.gguf.orig_shape.<name>


@dataclass
class CheckpointInfo:
    """What `describe_checkpoint` found; `format_info` renders it for the CLI."""

    path: Path
    layout: str
    file_size: int
    family: str | None = None  # "sd1" when runnable
    family_error: str | None = None  # the refusal message otherwise
    prediction: str | None = None  # "eps (family default)", "v (scheduler_config.json)"...
    towers: tuple[str, ...] = ()  # the text towers, e.g. "CLIP ViT-L 12 layers x 768"
    default_size: int | None = None  # the family's --H/--W default
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype name -> tensor count
    parts: dict[str, PartStats] = field(default_factory=dict)
    extras: dict[str, int] = field(default_factory=dict)  # known_extra_key category -> keys
    ema_weights: int = 0  # model_ema.* tensors besides decay/num_updates
    other_keys: tuple[str, ...] = ()  # neither a part's weight nor a known extra
    metadata: dict[str, str] | None = None  # safetensors __metadata__
    lightning: dict[str, str] = field(default_factory=dict)  # version, epoch, global_step, callbacks
    sha256_short: str | None = None
    legacy_hash: str | None = None
    gguf: GgufFacts | None = None
    expected_parts: tuple[str, ...] = ()  # the parts a runnable model has, when not SD's (PARTS)
    missing_hint: str = ""  # how the missing parts are given (Flux: which flag)

    @property
    def ema_present(self) -> bool:
        """True when the file carries an EMA copy of the UNet (non-pruned CompVis files)."""
        return self.ema_weights > 0

    @property
    def tensors(self) -> int:
        return sum(self.dtypes.values())


def describe_checkpoint(
    path: Path, *, hashes: bool = True, hash_cache: Path | None = None
) -> CheckpointInfo:
    """Inspect a `.ckpt`, `.safetensors` or diffusers folder; family problems are recorded, not raised.

    `hashes=False` skips reading the whole file for the A1111 hashes; `hash_cache` is a JSON file
    where full-file SHA-256s are kept (see `hashing.sha256_file`). Raises CheckpointError only when
    the file itself cannot be read safely.
    """
    path = Path(path)
    from optimized_sd.families import claiming

    gguf = path.is_file() and is_gguf_file(path)  # described from its own header, whichever family it holds
    own = None if gguf else claiming(path)
    if own is not None and own.loader is not None:  # a family with its own files (Flux.1, Flux.2 klein, Z-Image)
        info = (own.loader.describe or _describe_flux)(path)
        if hashes and path.is_file():
            info.sha256_short = sha256_short(path, cache_path=hash_cache)
            info.legacy_hash = legacy_model_hash(path)
        return info
    if path.is_dir():
        return _describe_diffusers(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")

    if gguf:
        info = _describe_gguf(path)
    elif is_safetensors_file(path):
        shapes, dtypes, metadata = _safetensors_header(path)
        info = CheckpointInfo(path=path, layout=LAYOUT_SAFETENSORS, file_size=path.stat().st_size)
        info.metadata = metadata
    else:
        obj = load_ckpt(path)
        tensors = state_dict_from_ckpt(obj)
        shapes, dtypes = _tensor_table(normalize_keys(DictSource(tensors), path))
        info = CheckpointInfo(path=path, layout=_ckpt_layout(obj), file_size=path.stat().st_size)
        info.lightning = _lightning_facts(obj)
        del tensors, obj  # drop the memory map

    if info.gguf is None:
        _fill_tensor_stats(info, shapes, dtypes)
        try:
            info.family = detect_family(shapes)
        except CheckpointError as exc:
            info.family_error = str(exc)
        else:
            _family_facts(info, lambda: infer_config(shapes, info.family), set(shapes), info.metadata)
    if hashes:
        info.sha256_short = sha256_short(path, cache_path=hash_cache)
        info.legacy_hash = legacy_model_hash(path)
    return info


def _describe_gguf(path: Path) -> CheckpointInfo:
    """A GGUF file from its header (`gguf.read_gguf`'s checks): architecture, tensor count, GGML types and their
    bytes, and the metadata besides arrays (ComfyUI-GGUF's orig_shape keys are counted, not listed)."""
    gguf = read_gguf(path)
    try:
        types = gguf.type_bytes()
        reshaped = sum(1 for key in gguf.metadata if key.startswith(ORIG_SHAPE_PREFIX))
        info = CheckpointInfo(path=path, layout=f"{LAYOUT_GGUF} version {gguf.version}", file_size=gguf.file_size)
        info.gguf = GgufFacts(gguf.version, gguf.architecture, len(gguf.tensors), types, reshaped)
        info.dtypes = {name: count for name, (count, _) in types.items()}
        info.metadata = {key: str(value) for key, value in gguf.metadata.items() if not isinstance(value, list)}
    finally:
        gguf.close()
    try:
        source = normalize_keys(gguf_model_source(path), path)
        try:
            info.family = denoiser_family(source.shapes())
        finally:
            source.close()
        if info.family is None and info.gguf.architecture == "qwen3":
            info.family_error = "holds a Qwen3 text encoder (Z-Image, Flux.2 klein): give it with --text-encoder"
        elif info.family is None:
            info.family_error = "no family this version runs has these tensors"
    except CheckpointError as exc:
        info.family_error = str(exc)
    return info


def _tensor_table(source: TensorSource) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and dtype names of a source's tensors (headers only for safetensors)."""
    shapes = source.shapes()
    dtypes = {key: str(source.dtype(key)).removeprefix("torch.") for key in shapes}
    return shapes, dtypes


def _safetensors_header(
    path: Path,
) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str]]:
    """Shapes, dtypes and `__metadata__` from a safetensors header, through the loader's reader."""
    try:
        source = SafetensorsSource(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: unreadable .safetensors file ({exc})") from None
    shapes, dtypes = _tensor_table(normalize_keys(source, path))
    metadata = dict(source.metadata)
    source.close()
    return shapes, dtypes, metadata


def _ckpt_layout(obj: dict[str, Any]) -> str:
    if isinstance(obj.get("state_dict"), dict):
        lightning = {"epoch", "global_step", "pytorch-lightning_version", "callbacks"}
        return LAYOUT_LIGHTNING if lightning & obj.keys() else LAYOUT_WRAPPED
    return LAYOUT_BARE


def _scalar_text(value: Any) -> str:
    """An int/float/numpy scalar/0-d tensor as plain text."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (ValueError, RuntimeError, TypeError):
            pass
    return str(value)


def _callback_name(key: Any) -> str:
    if isinstance(key, type) and issubclass(key, InertLightningObject):
        return key.__name__
    if isinstance(key, InertLightningObject):
        return type(key).__name__
    text = str(key)
    return text.split("{", 1)[0]  # newer Lightning keys read "ModelCheckpoint{'monitor': ...}"


def _lightning_facts(obj: dict[str, Any]) -> dict[str, str]:
    """Lightning's version, epoch, global_step and callback names from the top level, as text."""
    facts: dict[str, str] = {}
    if "pytorch-lightning_version" in obj:
        facts["pytorch-lightning"] = str(obj["pytorch-lightning_version"])
    for key in ("epoch", "global_step"):
        if key in obj:
            facts[key] = _scalar_text(obj[key])
    callbacks = obj.get("callbacks")
    if isinstance(callbacks, dict) and callbacks:
        facts["callbacks"] = ", ".join(sorted({_callback_name(k) for k in callbacks}))
    elif isinstance(callbacks, (list, tuple)) and callbacks:
        facts["callbacks"] = ", ".join(sorted({_callback_name(type(c)) for c in callbacks}))
    return facts


def _fill_tensor_stats(
    info: CheckpointInfo, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]
) -> None:
    """Count tensors per dtype, per part, per known extra; list the keys that are neither."""
    info.dtypes = dict(sorted(Counter(dtypes.values()).items()))
    per_part: dict[str, list[str]] = {name: [] for name in PARTS}
    extras: Counter[str] = Counter()
    others: list[str] = []
    for key in shapes:
        reason = known_extra_key(key)
        if reason is not None:
            extras[reason] += 1
            if reason == "EMA" and key not in EMA_COUNTERS:
                info.ema_weights += 1
            continue
        part = part_of_key(key)
        if part is None:
            others.append(key)
        else:
            per_part[part].append(key)
    info.parts = {
        name: PartStats(
            tensors=len(keys),
            params=sum(math.prod(shapes[k]) for k in keys),
            dtypes=tuple(sorted({dtypes[k] for k in keys})),
        )
        for name, keys in per_part.items()
        if keys
    }
    info.extras = dict(sorted(extras.items()))
    info.other_keys = tuple(others)


# --- Flux.1 --------------------------------------------------------------------------------------


def _describe_flux(path: Path) -> CheckpointInfo:
    """A Flux.1 file (BFL, ComfyUI all-in-one, a T5 alone) or diffusers folder: dev or schnell, each part present
    with its tensors and storage dtypes, the parts it lacks (given by --vae / --text-encoder)."""
    from optimized_sd.families.flux import FLUX_DEV, FLUX_SCHNELL, PART_FIELDS, folder_files
    from optimized_sd.weights.flux_keys import identify_flux
    from optimized_sd.weights.flux_loading import PART_WORDS

    tables: list[tuple[dict[str, tuple[int, ...]], dict[str, str]]] = []
    metadata = None
    if path.is_dir():
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        info = CheckpointInfo(path=path, layout=f"{LAYOUT_DIFFUSERS} (Flux)", file_size=size)
        for files in folder_files(path):
            shapes: dict[str, tuple[int, ...]] = {}
            dtypes: dict[str, str] = {}
            for file in files:
                more_shapes, more_dtypes, _ = _safetensors_header(file)
                shapes.update(more_shapes)
                dtypes.update(more_dtypes)
            tables.append((shapes, dtypes))
    else:
        shapes, dtypes, metadata = _safetensors_header(path)
        info = CheckpointInfo(path=path, layout=LAYOUT_SAFETENSORS, file_size=path.stat().st_size, metadata=metadata)
        tables.append((shapes, dtypes))
    all_dtypes: Counter[str] = Counter()
    for shapes, dtypes in tables:
        flux = identify_flux(shapes, str(path))
        if flux.variant is not None:
            info.family = FLUX_DEV if flux.variant == "dev" else FLUX_SCHNELL
        all_dtypes.update(dtypes.values())
        own = [part for part, prefix in flux.prefixes.items() if prefix]
        for part in flux.parts:
            prefix = flux.prefixes[part]
            keys = [k for k in shapes if k.startswith(prefix) and (prefix or not any(k.startswith(flux.prefixes[o]) for o in own))]
            info.parts[PART_WORDS[part]] = PartStats(
                len(keys), sum(math.prod(shapes[k]) for k in keys), tuple(sorted({dtypes[k] for k in keys}))
            )
    info.dtypes = dict(sorted(all_dtypes.items()))
    info.expected_parts = tuple(PART_WORDS.values())
    if info.family is None:
        info.family_error = "a Flux.1 text encoder alone: a text encoder file, loaded beside a Flux transformer"
    else:
        info.prediction = "flow matching (rectified flow, velocity)"
        info.towers = ("CLIP-L (pooled)", "T5-XXL (context)")
        info.default_size = 1024
    info.other_keys = ()
    info.extras = {}
    info.missing_hint = missing_hint({PART_WORDS[part]: PART_FIELDS[part] for part in PART_WORDS}, info.parts)
    return info


# --- diffusers folders ---------------------------------------------------------------------------


def _describe_diffusers(folder: Path) -> CheckpointInfo:
    """A diffusers folder as the loader opens it: its parts' chosen weight files under LDM names;
    a family refusal, or a config.json the loader would refuse, is recorded as the family error."""
    checkpoint = open_diffusers_folder(folder)
    assert checkpoint.folder is not None
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    layout = f"{LAYOUT_DIFFUSERS} ({checkpoint.folder.pipeline_class})"
    info = CheckpointInfo(path=folder, layout=layout, file_size=size)
    shapes, dtypes = _tensor_table(checkpoint.source)
    _fill_tensor_stats(info, shapes, dtypes)
    try:
        info.family = detect_family(shapes)
        config = model_config(checkpoint, shapes)
        _family_facts(info, lambda: config, set(shapes), None)
    except CheckpointError as exc:
        info.family, info.family_error = None, str(exc)
    finally:
        checkpoint.source.close()
    return info


def _family_facts(
    info: CheckpointInfo, config_of: Callable[[], ModelConfig], keys: set[str], metadata: dict[str, str] | None
) -> None:
    """Prediction type (as `--prediction auto` would choose it), text towers and default size; the towers
    and size only when the model's layout can be read (a file of telltale keys alone has none)."""
    from optimized_sd.weights.prediction import resolve_prediction

    assert info.family is not None
    prediction, why = resolve_prediction("auto", info.family, info.path, keys, metadata)
    info.prediction = f"{'v' if prediction == 'v_prediction' else 'eps'} ({why})"
    try:
        config = config_of()
    except CheckpointError:
        return
    towers = []
    if config.text is not None:
        towers.append(f"CLIP ViT-L-style {config.text.num_hidden_layers} layers x {config.text.hidden_size}")
    if config.open_clip is not None:
        clip = config.open_clip
        pooled = f", pooled {clip.projection_dim}" if clip.projection_dim else ""
        towers.append(f"OpenCLIP {clip.layers} layers run x {clip.width}{pooled}")
    info.towers = tuple(towers)
    info.default_size = replace(config, prediction_type=prediction).default_size


# --- text for the CLI ----------------------------------------------------------------------------


def _human_size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.2f} {unit}, {n:,} bytes"
        value /= 1024
    raise AssertionError("unreachable")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _short(value: str, limit: int = 60) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _gguf_lines(facts: GgufFacts, file_size: int) -> list[tuple[str, str]]:
    """Architecture, tensor count and each GGML type's share of the file's bytes."""
    lines = [("architecture", facts.architecture or "(no general.architecture)")]
    reshaped = f" ({facts.reshaped} stored as (n/256, 256), real shape in {ORIG_SHAPE_PREFIX}*)" if facts.reshaped else ""
    lines.append(("tensors", f"{facts.tensors}{reshaped}"))
    shares = [f"{name} {size / max(file_size, 1):.1%} ({_count(count, 'tensor')}, {_human_size(size).split(',')[0]})"
              for name, (count, size) in facts.types.items()]
    lines.append(("quant types", ", ".join(shares) + " of the file's bytes" if shares else "no tensors"))
    return lines


def _layout(info: CheckpointInfo) -> str:
    """The file's layout, with a Lightning checkpoint's training state."""
    layout = info.layout
    if info.lightning:
        layout += " (" + ", ".join(f"{k} {v}" for k, v in info.lightning.items() if k != "callbacks")
        if "callbacks" in info.lightning:
            layout += ("; " if len(info.lightning) > 1 else "") + f"callbacks: {info.lightning['callbacks']}"
        layout += ")"
    return layout


def _family_lines(info: CheckpointInfo) -> list[tuple[str, str]]:
    """The family and what follows from it, or why none was detected."""
    if info.family is None:
        return [("family", info.family_error if info.gguf is not None else f"refused: {info.family_error}")]
    lines = [("family", f"{info.family} ({FAMILY_NAMES.get(info.family, info.family)})")]
    if info.prediction is not None:
        lines.append(("prediction", info.prediction))
    if info.towers:
        lines.append(("text towers", "; ".join(info.towers)))
    if info.default_size is not None:
        lines.append(("size", f"{info.default_size}x{info.default_size} by default"))
    return lines


def _ema(info: CheckpointInfo) -> str:
    """Whether an EMA copy of the UNet is there."""
    if info.ema_present:
        return f"yes: EMA copy of the UNet ({_count(info.ema_weights, 'tensor')})"
    return "no (only model_ema.decay/num_updates; pruned)" if info.extras.get("EMA") else "no"


def format_info(info: CheckpointInfo) -> str:
    """Several `label  value` lines describing the checkpoint, for `optimized-sd inspect`."""
    lines: list[tuple[str, str]] = [("file", f"{info.path}  ({_human_size(info.file_size)})"), ("layout", _layout(info))]
    lines += _family_lines(info)

    if info.gguf is not None:
        lines += _gguf_lines(info.gguf, info.file_size)
    else:
        storage = ", ".join(f"{dtype} ({_count(count, 'tensor')})" for dtype, count in info.dtypes.items())
        lines.append(("storage", storage or "no tensors"))

    for name, stats in info.parts.items():
        lines.append(
            (name, f"{stats.params:,} params in {_count(stats.tensors, 'tensor')}, {'/'.join(stats.dtypes)}")
        )
    missing = [name for name in info.expected_parts or PARTS if name not in info.parts]
    if missing and info.gguf is None:
        lines.append(("missing", info.missing_hint or ", ".join(missing)))

    if info.extras:
        lines.append(("extras", ", ".join(f"{k} {n}" for k, n in info.extras.items())))
    if not info.layout.startswith((LAYOUT_DIFFUSERS, LAYOUT_GGUF)) and not info.expected_parts:
        lines.append(("EMA", _ema(info)))
    if info.other_keys:
        shown = ", ".join(info.other_keys[:5]) + (", ..." if len(info.other_keys) > 5 else "")
        lines.append(("other", f"{_count(len(info.other_keys), 'unrecognised key')}: {shown}"))

    if info.metadata is not None:
        if info.metadata:
            meta = ", ".join(f"{k}={_short(v, 40)}" for k, v in sorted(info.metadata.items()))
        else:
            meta = "(empty)"
        lines.append(("metadata", _short(meta, 400)))

    if info.sha256_short is not None:
        lines.append(
            ("hashes", f"sha256 {info.sha256_short} (A1111 'Model hash'), legacy {info.legacy_hash}")
        )
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in lines)
