"""LoRA files (kohya/AUTOMATIC1111, LoCon, diffusers/peft) read into low-rank patches keyed by our
model's checkpoint keys, and merged into a weight tensor where it is placed.

Every file format names the layer it patches differently; each name is resolved against the set of
module names the model really has (kohya's names are diffusers or LDM module paths with `_` for
`.`, so they are looked up, never split by guessing). The diffusers -> LDM step reuses the
checkpoint key tables of `keymap.py`. A delta is `scale * up @ down` in float32, with
scale = weight * alpha / rank (weight alone when the file has no alpha); a convolution's down
(rank, in, kh, kw) and 1x1 up (out, rank, 1, 1) give (out, in, kh, kw) through the same product
over flattened kernels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from optimized_sd.config import ModelConfig
from optimized_sd.errors import UserError

from .ckpt import load_ckpt, state_dict_from_ckpt
from .keymap import unet_prefixes
from .sources import SafetensorsSource

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

# Per family: file-name prefix -> the tower it patches. Prefixes of other families are refused by name.
KOHYA_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"lora_unet_": "unet", "lora_te_": "text"},
    "sd2": {"lora_unet_": "unet", "lora_te_": "text"},
    "sdxl": {"lora_unet_": "unet", "lora_te1_": "text", "lora_te2_": "text_2"},
}
DIFFUSERS_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"unet.": "unet", "text_encoder.": "text"},
    "sd2": {"unet.": "unet", "text_encoder.": "text"},
    "sdxl": {"unet.": "unet", "text_encoder.": "text", "text_encoder_2.": "text_2"},
}
# Cross-attention context widths that give a LoRA's family away when its shapes do not fit.
CONTEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}

# (suffix, role): how each format names the two factors and alpha, longest first where they overlap
_ROLES = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),  # diffusers' attention processors: processor.to_q_lora.down.weight
    ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
# diffusers' old attention-processor names -> the module they patch
_PROCESSOR_NAMES = {".processor.to_q": ".to_q", ".processor.to_k": ".to_k", ".processor.to_v": ".to_v", ".processor.to_out": ".to_out.0"}
_UNSUPPORTED_KINDS = {
    "hada_w1_a": "LoHa",
    "lokr_w1": "LoKr",
    "lora_mid": "LoCon with a Tucker (lora_mid) factor",
    "dora_scale": "DoRA",
    ".diff": "full-difference (diff) patch",
    "oft_": "OFT",
}


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """One layer's low-rank update: delta = scale * up @ down, reshaped to the weight's shape."""

    up: Tensor  # (out, rank) float32
    down: Tensor  # (rank, in * kh * kw) float32
    scale: float  # alpha / rank, or 1 without alpha

    def delta(self, shape: torch.Size, device: torch.device) -> Tensor:
        """The float32 update for a weight of `shape`, computed on `device`."""
        product = self.up.to(device) @ self.down.to(device)  # (out, in * kh * kw)
        return (product * self.scale).reshape(shape)


@dataclass(frozen=True, eq=False)
class Lora:
    """A LoRA file resolved against one model: checkpoint key -> patch."""

    path: Path
    patches: dict[str, LoraPatch]

    @property
    def name(self) -> str:
        """The name AUTOMATIC1111 shows and `<lora:NAME>` uses: the file stem."""
        return self.path.stem


def read_tensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a LoRA or embedding file: safetensors memory-mapped, .pt/.ckpt through the
    restricted unpickler (never a plain torch.load)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        source = SafetensorsSource(path)
        return {key: source.get(key) for key in source.keys()}
    if path.suffix in (".pt", ".ckpt", ".bin", ".pth"):
        return state_dict_from_ckpt(load_ckpt(path))
    raise UserError(f"{path}: not a LoRA or embedding file (expected .safetensors, .pt or .ckpt)")


def flat(name: str) -> str:
    """kohya's spelling of a module path: dots become underscores."""
    return name.replace(".", "_")


def module_names(config: ModelConfig, model_keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """tower -> {name a LoRA file may use (dotted, diffusers or LDM) -> our module path}.

    The model's weight keys give the LDM module paths; the diffusers name of each UNet module comes
    from inverting `keymap.unet_prefixes`. CLIP modules are named the same in every format, with or
    without transformers' `text_model.` level."""
    inverse = sorted(
        ((ldm, diffusers, {new: old for old, new in inner.items()}) for diffusers, (ldm, inner) in unet_prefixes(config.unet).items()),
        key=lambda entry: len(entry[0]),
        reverse=True,
    )
    names: dict[str, dict[str, str]] = {"unet": {}, "text": {}}
    for key in model_keys:
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        if module.startswith(UNET_PREFIX):
            ldm = module[len(UNET_PREFIX) :]
            names["unet"][ldm] = module
            for ldm_prefix, diffusers_prefix, inner in inverse:
                if (ldm + ".").startswith(ldm_prefix):
                    rest = ldm[len(ldm_prefix) :]
                    for old, new in inner.items():
                        if rest == old or rest.startswith(old + "."):
                            rest = new + rest[len(old) :]
                            break
                    names["unet"][diffusers_prefix + rest] = module
                    break
        elif module.startswith(TEXT_PREFIX):
            clip = module[len(TEXT_PREFIX) :]
            clip = clip if clip.startswith("text_model.") else "text_model." + clip
            names["text"][clip] = module
            names["text"][clip[len("text_model.") :]] = module
    return names


def _split_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x.lora_down.weight' -> ('lora_unet_x', 'down'); None for a key of no known role."""
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _foreign_prefix(module: str, family: str) -> tuple[str, str] | None:
    """(other family, prefix) when a module name uses another family's prefix more specifically than
    any of `family`'s (SDXL's `lora_te1_` or `text_encoder_2.` on SD 1.x), else None."""

    def longest(prefixes: Iterable[str]) -> str:
        return max((p for p in prefixes if module.startswith(p)), key=len, default="")

    own = longest((*KOHYA_PREFIXES[family], *DIFFUSERS_PREFIXES[family]))
    for other in KOHYA_PREFIXES:
        theirs = longest((*KOHYA_PREFIXES[other], *DIFFUSERS_PREFIXES[other]))
        if other != family and len(theirs) > len(own):
            return other, theirs
    return None


def _resolve(module: str, family: str, names: Mapping[str, Mapping[str, str]], flat_names: Mapping[str, Mapping[str, str]]) -> str | None:
    """Our module path for a LoRA file's module name, or None."""
    for prefix, tower in KOHYA_PREFIXES[family].items():
        if module.startswith(prefix) and tower in flat_names:
            return flat_names[tower].get(module[len(prefix) :])
    for prefix, tower in DIFFUSERS_PREFIXES[family].items():
        if module.startswith(prefix) and tower in names:
            rest = module[len(prefix) :]
            for old, new in _PROCESSOR_NAMES.items():
                if rest.endswith(old):
                    rest = rest[: -len(old)] + new
            return names[tower].get(rest)
    return None


def read_lora(path: Path, config: ModelConfig, model_shapes: Mapping[str, Sequence[int]]) -> Lora:
    """Read a LoRA file and map each of its modules to one of the model's weights.

    UserError when the file is another family's (naming both), when any module matches no layer
    (saying how many did), or when a factor does not fit its layer."""
    path = Path(path)
    family = config.family
    tensors = read_tensors(path)
    for key in tensors:
        for marker, kind in _UNSUPPORTED_KINDS.items():
            if marker in key:
                raise UserError(f"{path.name}: {kind} networks are not supported (key {key})")
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        split = _split_key(key)
        if split is None:
            raise UserError(f"{path.name}: not a LoRA file: {key!r} is no LoRA factor (lora_down/lora_up/alpha, lora_A/lora_B)")
        module, role = split
        groups.setdefault(module, {})[role] = value
    if not groups:
        raise UserError(f"{path.name}: holds no LoRA weights")
    for module in groups:
        foreign = _foreign_prefix(module, family)
        if foreign is not None:
            raise UserError(
                f"{path.name} is an {FAMILY_NAMES[foreign[0]]} LoRA (it has {foreign[1]}* keys); "
                f"this model is {FAMILY_NAMES.get(family, family)}"
            )

    names = module_names(config, model_shapes)
    flat_names = {tower: {flat(name): module for name, module in table.items()} for tower, table in names.items()}
    patches: dict[str, LoraPatch] = {}
    unmatched: list[str] = []
    for module, parts in groups.items():
        if "up" not in parts or "down" not in parts:
            raise UserError(f"{path.name}: {module} has {' and '.join(sorted(parts))} but not both lora up and down")
        target = _resolve(module, family, names, flat_names)
        if target is None:
            unmatched.append(module)
            continue
        key = target + ".weight"
        up, down = parts["up"].float(), parts["down"].float()
        rank = down.shape[0]
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise UserError(f"{path.name}: {module}: an up factor with a {tuple(up.shape[2:])} kernel is not supported")
        up, down = up.reshape(up.shape[0], -1), down.reshape(rank, -1)  # (out, rank), (rank, in * kh * kw)
        shape = tuple(model_shapes[key])
        if up.shape[1] != rank or up.shape[0] * down.shape[1] != _numel(shape) or up.shape[0] != shape[0]:
            raise UserError(_shape_error(path, module, up, down, shape, family))
        alpha = parts.get("alpha")
        scale = float(alpha) / rank if alpha is not None else 1.0
        patches[key] = LoraPatch(up=up.contiguous(), down=down.contiguous(), scale=scale)
    if unmatched:
        raise UserError(
            f"{path.name}: {len(unmatched)} of {len(groups)} LoRA modules match no layer of this "
            f"{FAMILY_NAMES.get(family, family)} model ({len(patches)} matched), e.g. {unmatched[0]}"
        )
    return Lora(path=path, patches=patches)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _shape_error(path: Path, module: str, up: Tensor, down: Tensor, shape: tuple[int, ...], family: str) -> str:
    """A factor that does not fit: name the LoRA's family when its cross-attention width gives it away."""
    if re.search(r"attn2[._]to_[kv]$", module):
        other = CONTEXT_WIDTH_FAMILY.get(int(down.shape[1]))
        if other is not None and other != family:
            return (
                f"{path.name} is an {FAMILY_NAMES[other]} LoRA (cross-attention width {down.shape[1]}); "
                f"this model is {FAMILY_NAMES.get(family, family)}"
            )
    return f"{path.name}: {module} gives a ({up.shape[0]} x {down.shape[1]}) update for a layer of shape {shape}; is it for another model?"


def merge_into(key: str, weight: Tensor, loras: Sequence[tuple[Lora, float]]) -> bool:
    """Add every LoRA's delta for `key` (times its user weight) to `weight` in place.

    A float32 weight takes each product in place (`addmm_`, no delta-sized temporary: this runs for
    every block arrival in `stream`); a half-precision weight gets the deltas summed in float32 and
    is rounded once. Returns whether anything was added."""
    patches = [(lora.patches[key], strength) for lora, strength in loras if strength != 0 and key in lora.patches]
    if not patches:
        return False
    if weight.dtype == torch.float32 and weight.is_contiguous():
        rows = weight.view(weight.shape[0], -1)  # (out, in * kh * kw)
        for patch, strength in patches:
            rows.addmm_(patch.up.to(weight.device), patch.down.to(weight.device), alpha=patch.scale * strength)
        return True
    total = sum(patch.delta(weight.shape, weight.device) * strength for patch, strength in patches)
    weight.copy_((weight.float() + total).to(weight.dtype))
    return True


def find_lora(name: str, folder: Path) -> Path:
    """`<lora:NAME>`: NAME.safetensors (or .pt, .ckpt) anywhere under `folder`, as AUTOMATIC1111 finds
    it by file stem; a UserError lists the nearest names when there is none."""
    import difflib

    folder = Path(folder)
    files = sorted(folder.rglob("*")) if folder.is_dir() else []
    found = {path.stem: path for path in files if path.suffix in LORA_SUFFIXES and path.is_file()}
    if name in found:
        return found[name]
    lowered = {stem.lower(): stem for stem in found}
    if name.lower() in lowered:
        return found[lowered[name.lower()]]
    if not found:
        raise UserError(f"<lora:{name}>: no LoRA files in {folder} (set --lora-dir)")
    nearest = difflib.get_close_matches(name, list(found), n=3, cutoff=0.0)
    raise UserError(f"<lora:{name}>: no {name}.safetensors/.pt/.ckpt in {folder}; nearest: {', '.join(nearest)}")


def parse_lora_option(text: str) -> tuple[Path, float]:
    """`--lora FILE[:WEIGHT]` -> (path, weight); the weight defaults to 1."""
    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("/", "\\")):
        try:
            weight = float(tail)
            path = head
        except ValueError:
            raise UserError(f"--lora {text}: the weight {tail!r} is not a number (write FILE or FILE:WEIGHT)") from None
    return Path(path), weight


class LoraSet:
    """The LoRAs of a model, read once per file and kept while in use, and the memory engine's
    `tensor_hook` that merges the active ones into each weight as it is placed.

    `activate` answers whether the active set changed, i.e. whether resident weights must be placed
    again (the engine's `reload`) for the new set to take effect."""

    def __init__(self, config: ModelConfig, model_shapes: Mapping[str, Sequence[int]]) -> None:
        self.config = config
        self.model_shapes = dict(model_shapes)
        self.active: tuple[tuple[Lora, float], ...] = ()
        self._read: dict[tuple[Path, int, int], Lora] = {}

    def lora(self, path: Path) -> Lora:
        """The file's patches, read once per (path, size, mtime)."""
        resolved = Path(path).resolve()
        try:
            stat = resolved.stat()
        except OSError:
            raise UserError(f"--lora: {path}: no such file") from None
        key = (resolved, stat.st_size, stat.st_mtime_ns)
        if key not in self._read:
            self._read[key] = read_lora(Path(path), self.config, self.model_shapes)
        return self._read[key]

    def activate(self, weights: Mapping[Path, float]) -> bool:
        """Make `weights` (file -> weight) the active set; files no longer used are forgotten."""
        active = tuple((self.lora(path), float(weight)) for path, weight in weights.items() if weight != 0)
        self._read = {key: lora for key, lora in self._read.items() if any(lora is a for a, _ in active)}
        changed = [(id(a), w) for a, w in active] != [(id(a), w) for a, w in self.active]
        self.active = active
        return changed

    def __call__(self, key: str, tensor: Tensor) -> None:
        if self.active:
            merge_into(key, tensor, self.active)
