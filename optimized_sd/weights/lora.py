"""LoRA files (kohya/AUTOMATIC1111, LoCon, diffusers/peft) read into low-rank patches keyed by our
model's checkpoint keys, and merged into a weight tensor where it is placed.

Every file format names the layer it patches differently; each name is resolved against the set of
module names the model really has (kohya's names are diffusers or LDM module paths with `_` for
`.`, so they are looked up, never split by guessing). The diffusers -> LDM step reuses the
checkpoint key tables of `keymap.py`; LoRA files name every text tower by transformers' CLIP names,
which `keymap.clip_module_name` gives for the OpenCLIP towers (SD 2.x, SDXL's bigG), whose q, k and v
share one fused `attn.in_proj_weight`: each of them patches its third of the rows. A denoiser that is no
UNet names its modules through its family record (`LoraKeys.denoiser_names`: Flux's BFL and diffusers names,
the latter's q, k, v row ranges of our fused layers). A delta is
`scale * up @ down` in float32, with scale = weight * alpha / rank (weight alone when the file has no
alpha); a convolution's down (rank, in, kh, kw) and 1x1 up (out, rank, 1, 1) give (out, in, kh, kw)
through the same product over flattened kernels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from optimized_sd.config import FAMILY_NAMES, MAX_LORA_WEIGHT, ModelConfig, check_lora_weight
from optimized_sd.errors import FieldError, UserError
from optimized_sd.families.registry import FamilyView, LoraKeys

from .ckpt import load_ckpt, state_dict_from_ckpt
from .family import UNET_PREFIX
from .keymap import clip_module_name, unet_prefixes
from .sources import SafetensorsSource

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
MAX_FLOAT32_UPDATE = 1e30  # far above any real update, far below float32's overflow at 3.4e38

# Per family (from its record): text tower -> (our key prefix, its kind: transformers "clip" or fused "open_clip");
# a tower no LoRA format names (the SDXL refiner's) is absent: its LoRAs patch the UNet.
TEXT_TOWERS: Mapping[str, dict[str, tuple[str, str]]] = FamilyView(
    lambda record: {tower.lora_name: (tower.prefix, tower.kind) for tower in record.towers if tower.lora_name}
)
# Per family: file-name prefix -> the tower it patches (its record's `lora`). Prefixes of other families are refused by name.
KOHYA_PREFIXES: Mapping[str, Mapping[str, str]] = FamilyView(lambda record: record.lora.kohya)
DIFFUSERS_PREFIXES: Mapping[str, Mapping[str, str]] = FamilyView(lambda record: record.lora.diffusers)
LORA_KEYS: Mapping[str, LoraKeys] = FamilyView(lambda record: record.lora)
CONTEXT_PATTERN = re.compile(r"attn2[._]to_[kv]$")
SINGLE_TOWER_PATTERN = re.compile(r"^(lora_te_|text_encoder\.).*[._](q_proj|k_proj|v_proj|fc1)$")


def same_conventions(family: str, other: str) -> bool:
    """Whether two families take the same LoRA files (Flux.1 dev's and schnell's share their tables)."""
    return family == other or LORA_KEYS[family] == LORA_KEYS[other]


def telltales() -> tuple[tuple[re.Pattern, dict[int, str], str], ...]:
    """Widths that give a LoRA's family away when its names or shapes do not fit the model (each record's
    `lora` widths): the UNet's cross-attention context (every family differs), then the single text tower of
    SD 1.x / SD 2.x files."""
    context: dict[int, str] = {}
    text: dict[int, str] = {}
    for family, record in FamilyView(lambda record: record).items():
        if record.lora.context_width is not None:
            context.setdefault(record.lora.context_width, family)
        if record.lora.text_width is not None:
            text.setdefault(record.lora.text_width, family)
    return (CONTEXT_PATTERN, context, "cross-attention width"), (SINGLE_TOWER_PATTERN, text, "text encoder width")


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


@dataclass(frozen=True)
class Target:
    """Where one LoRA module's update goes: a weight, and the rows it covers (all of them, or the q, k or
    v third of a fused `in_proj_weight`), taken from the module's update from `source_row` on (a module
    may be split over several targets: Flux's final adaLN holds diffusers' halves in the other order)."""

    key: str
    first_row: int = 0
    rows: int | None = None  # None: every row
    source_row: int = 0


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """One layer's low-rank update: delta = scale * up @ down, added to rows first_row.. of the weight."""

    up: Tensor  # (rows, rank) float32
    down: Tensor  # (rank, in * kh * kw) float32
    scale: float  # alpha / rank, or 1 without alpha
    first_row: int = 0

    @property
    def rows(self) -> slice:
        """The rows of the weight (flattened to (out, in * kh * kw)) that the update covers."""
        return slice(self.first_row, self.first_row + self.up.shape[0])

    def delta(self, shape: torch.Size, device: torch.device) -> Tensor:
        """The float32 update of the covered rows of a weight of `shape`, computed on `device`."""
        product = self.up.to(device) @ self.down.to(device)  # (rows, in * kh * kw)
        return (product * self.scale).reshape(self.up.shape[0], *shape[1:])


@dataclass(frozen=True, eq=False)
class Lora:
    """A LoRA file resolved against one model: checkpoint key -> its patches (one, or up to three for
    the q, k and v rows of a fused weight)."""

    path: Path
    patches: dict[str, tuple[LoraPatch, ...]]

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


def check_finite(path: Path, key: str, tensor: Tensor) -> None:
    """UserError naming the file and key when a tensor holds NaN or inf: merged into a weight or spliced
    into a prompt it would turn every image black, with nothing to say why."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise UserError(f"{Path(path).name}: {key} holds NaN or infinite values; the file is damaged")


def flat(name: str) -> str:
    """kohya's spelling of a module path: dots become underscores."""
    return name.replace(".", "_")


def module_names(config: ModelConfig, model_shapes: Mapping[str, Sequence[int]]) -> dict[str, dict[str, tuple[Target, ...]]]:
    """tower -> {name a LoRA file may use (dotted, diffusers or LDM) -> where its update goes}.

    The denoiser's names come from `denoiser_module_names`. Text modules are named by transformers' CLIP
    names, with or without its `text_model.` level, whatever the tower's own layout (`text_module_names`)."""
    towers = TEXT_TOWERS.get(config.family, {})
    names: dict[str, dict[str, tuple[Target, ...]]] = {"unet": denoiser_module_names(config, model_shapes)}
    names.update({tower: {} for tower in towers})
    for key, shape in model_shapes.items():
        for tower, (prefix, kind) in towers.items():
            if key.startswith(prefix):
                for name, target in text_module_names(key, key[len(prefix) :], kind, shape):
                    name = name.removeprefix("text_model.")
                    names[tower][name] = names[tower]["text_model." + name] = (target,)
    return names


def denoiser_module_names(config: ModelConfig, model_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[Target, ...]]:
    """The denoiser's LoRA names: its record's own table (`LoraKeys.denoiser_names`), or for a UNet its LDM
    module paths and the diffusers name of each, from inverting `keymap.unet_prefixes`."""
    denoiser = {key[len(UNET_PREFIX) :]: tuple(shape) for key, shape in model_shapes.items() if key.startswith(UNET_PREFIX)}
    own_names = LORA_KEYS[config.family].denoiser_names
    if own_names is not None:
        return {
            name: tuple(replace(target, key=UNET_PREFIX + target.key) for target in targets)
            for name, targets in own_names(denoiser).items()
        }
    inverse = sorted(
        ((ldm, diffusers, {new: old for old, new in inner.items()}) for diffusers, (ldm, inner) in unet_prefixes(config.unet).items()),
        key=lambda entry: len(entry[0]),
        reverse=True,
    )
    names: dict[str, tuple[Target, ...]] = {}
    for local in denoiser:
        if local.endswith(".weight"):
            ldm = local[: -len(".weight")]
            names[ldm] = (Target(UNET_PREFIX + local),)
            for ldm_prefix, diffusers_prefix, inner in inverse:
                if (ldm + ".").startswith(ldm_prefix):
                    rest = ldm[len(ldm_prefix) :]
                    for old, new in inner.items():
                        if rest == old or rest.startswith(old + "."):
                            rest = new + rest[len(old) :]
                            break
                    names[diffusers_prefix + rest] = (Target(UNET_PREFIX + local),)
                    break
    return names


def text_module_names(key: str, local: str, kind: str, shape: Sequence[int]) -> Iterator[tuple[str, Target]]:
    """(CLIP module name, target) for one text-tower weight `key` (`local`: the key under its tower).

    A transformers tower is named as it is; an OpenCLIP one by `keymap.clip_module_name`, besides its
    own names, and its fused in_proj (rows q, k, v) answers to three names, one third of the rows each."""
    if kind == "open_clip" and local.endswith(".attn.in_proj_weight"):
        layer = clip_module_name(local[: -len(".attn.in_proj_weight")])
        width = shape[0] // 3
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            yield f"{layer}.self_attn.{name}", Target(key, index * width, width)
    elif local.endswith(".weight"):
        module = local[: -len(".weight")]
        yield module, Target(key)
        if kind == "open_clip":
            yield clip_module_name(module), Target(key)


def _split_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x.lora_down.weight' -> ('lora_unet_x', 'down'); None for a key of no known role."""
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _foreign_prefix(module: str, family: str) -> tuple[list[str], str] | None:
    """(other families, prefix) when a module name uses other families' prefix more specifically than
    any of `family`'s (SDXL's `lora_te1_` or `text_encoder_2.` on SD 1.x; `lora_te_` on SDXL, which
    SD 1.x and SD 2.x share), else None."""

    def longest(prefixes: Iterable[str]) -> str:
        return max((p for p in prefixes if module.startswith(p)), key=len, default="")

    own = longest((*KOHYA_PREFIXES[family], *DIFFUSERS_PREFIXES[family], *LORA_KEYS[family].unsupported))
    best, owners = own, []
    for other in KOHYA_PREFIXES:
        theirs = longest((*KOHYA_PREFIXES[other], *DIFFUSERS_PREFIXES[other]))
        if other == family or len(theirs) < len(best) or not theirs:
            continue
        if len(theirs) > len(best):
            best, owners = theirs, []
        if best != own and not any(same_conventions(owner, other) for owner in owners):
            owners.append(other)
    return (owners, best) if owners else None


def _telltale(groups: Mapping[str, Mapping[str, Tensor]]) -> tuple[str, str] | None:
    """(family, the width or name that says so) of a LoRA file, read off its factors' input widths
    (`telltales`), else off module names only one family's LoRAs have (its record's `lora.telltale`)."""
    for pattern, families, what in telltales():
        for module, parts in groups.items():
            down = parts.get("down")
            if down is not None and down.dim() >= 2 and pattern.search(module) and int(down.shape[1]) in families:
                return families[int(down.shape[1])], f"{what} {down.shape[1]}"
    for family, keys in LORA_KEYS.items():
        for module in groups if keys.telltale else ():
            found = re.search(keys.telltale, module)
            if found:
                return family, f"it has {found.group(0)}* modules"
    return None


def _a(name: str) -> str:
    """The article before a family's name as it is read aloud ("an SD 1.x", "a Flux.1 dev")."""
    return "an" if name[:1] in "AEIOUS" else "a"


def _family_error(path: Path, config: ModelConfig, groups: Mapping[str, Mapping[str, Tensor]]) -> UserError | None:
    """The error naming both families when the file's widths say it is another family's LoRA, else None."""
    telltale = _telltale(groups)
    if telltale is None or same_conventions(telltale[0], config.family):
        return None
    name = FAMILY_NAMES[telltale[0]]
    return UserError(f"{path.name} is {_a(name)} {name} LoRA ({telltale[1]}); this model is {config.family_name}")


def _resolve(
    module: str,
    family: str,
    names: Mapping[str, Mapping[str, tuple[Target, ...]]],
    flat_names: Mapping[str, Mapping[str, tuple[Target, ...]]],
) -> tuple[Target, ...] | None:
    """Where a LoRA file's module name puts its update, or None."""
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


def _lora_groups(path: Path, tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The file's factors by module and role (up, down, alpha), each finite; a file with another kind of
    network, or a key that is no LoRA factor, is refused."""
    for key in tensors:
        for marker, kind in _UNSUPPORTED_KINDS.items():
            if marker in key:
                raise UserError(f"{path.name}: {kind} networks are not supported (key {key})")
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        split = _split_key(key)
        if split is None:
            raise UserError(f"{path.name}: not a LoRA file: {key!r} is no LoRA factor (lora_down/lora_up/alpha, lora_A/lora_B)")
        check_finite(path, key, value)
        module, role = split
        groups.setdefault(module, {})[role] = value
    if not groups:
        raise UserError(f"{path.name}: holds no LoRA weights")
    return groups


def _check_prefixes(path: Path, config: ModelConfig, groups: Mapping[str, Mapping[str, Tensor]]) -> None:
    """UserError naming the family whose module prefixes the file uses, where they are another family's, or
    the part a prefix of this family's patches when none of ours takes it (Flux's T5)."""
    foreign = [found for module in groups if (found := _foreign_prefix(module, config.family)) is not None]
    if foreign:
        owners, prefix = foreign[0]
        # the families every foreign prefix fits (an SDXL file's lora_te2_ narrows lora_te1_'s "SDXL or Flux.1")
        common = [owner for owner in owners if all(any(same_conventions(owner, o) for o in others) for others, _ in foreign)]
        owners = common or owners
        telltale = _telltale(groups)
        if telltale is not None and any(same_conventions(telltale[0], owner) for owner in owners):
            owners = [telltale[0]]
        named = " or ".join(FAMILY_NAMES[o] for o in owners)
        raise UserError(f"{path.name} is {_a(named)} {named} LoRA (it has {prefix}* keys); this model is {config.family_name}")
    for module in groups:
        for prefix, part in LORA_KEYS[config.family].unsupported.items():
            if module.startswith(prefix):
                raise UserError(f"{path.name}: LoRA modules for the {part} ({prefix}*) are not supported; e.g. {module}")


def _lora_patch(
    path: Path,
    config: ModelConfig,
    groups: Mapping[str, Mapping[str, Tensor]],
    module: str,
    target: Target,
    shape: tuple[int, ...],
    covered: int,
) -> LoraPatch:
    """`module`'s factors (an update of `covered` rows) as a patch of the layer (of `shape`) at `target`,
    checked to fit it and to give bounded updates."""
    parts = groups[module]
    check_factor_shapes(path.name, module, parts)
    up, down = parts["up"].float(), parts["down"].float()
    rank = down.shape[0]
    up, down = up.reshape(up.shape[0], -1), down.reshape(rank, -1)  # (rows, rank), (rank, in * kh * kw)
    rows = shape[0] if target.rows is None else target.rows
    if up.shape[1] != rank or up.shape[0] != covered or down.shape[1] * shape[0] != _numel(shape):
        where = "" if target.rows is None else f" (rows {target.first_row}..{target.first_row + rows})"
        raise _family_error(path, config, groups) or UserError(
            f"{path.name}: {module} gives a ({up.shape[0]} x {down.shape[1]}) update for a layer of shape {shape}{where}; "
            "is it for another model?"
        )
    alpha = parts.get("alpha")
    scale = float(alpha) / rank if alpha is not None else 1.0
    # |up @ down| <= rank * max|up| * max|down|: bounded, every float32 merge stays finite at any allowed weight
    largest = abs(scale) * rank * float(up.abs().max()) * float(down.abs().max())
    if not largest * MAX_LORA_WEIGHT <= MAX_FLOAT32_UPDATE:
        raise UserError(f"{path.name}: {module}: its factors and alpha give updates up to {largest:.3g}; the file is damaged")
    up = up[target.source_row : target.source_row + rows]
    return LoraPatch(up=up.contiguous(), down=down.contiguous(), scale=scale, first_row=target.first_row)


def read_lora(path: Path, config: ModelConfig, model_shapes: Mapping[str, Sequence[int]]) -> Lora:
    """Read a LoRA file and map each of its modules to one of the model's weights (or rows of one).

    UserError when the file is another family's (naming both), when any module matches no layer
    (saying how many did), or when a factor does not fit its layer."""
    path = Path(path)
    family = config.family
    groups = _lora_groups(path, read_tensors(path))
    _check_prefixes(path, config, groups)

    names = module_names(config, model_shapes)
    flat_names = {tower: {flat(name): target for name, target in table.items()} for tower, table in names.items()}
    patches: dict[str, tuple[LoraPatch, ...]] = {}
    patched_by: dict[tuple[str, int], str] = {}
    unmatched: list[str] = []
    for module, parts in groups.items():
        if "up" not in parts or "down" not in parts:
            raise UserError(f"{path.name}: {module} has {' and '.join(sorted(parts))} but not both lora up and down")
        targets = _resolve(module, family, names, flat_names)
        if targets is None:
            unmatched.append(module)
            continue
        covered = sum(model_shapes[t.key][0] if t.rows is None else t.rows for t in targets)
        for target in targets:
            if (target.key, target.first_row) in patched_by:
                raise UserError(f"{path.name}: {module} and {patched_by[target.key, target.first_row]} patch the same layer")
            patched_by[target.key, target.first_row] = module
            patch = _lora_patch(path, config, groups, module, target, tuple(model_shapes[target.key]), covered)
            patches[target.key] = (*patches.get(target.key, ()), patch)
    if unmatched:
        raise _family_error(path, config, groups) or UserError(
            f"{path.name}: {len(unmatched)} of {len(groups)} LoRA modules match no layer of this "
            f"{config.family_name} model ({len(groups) - len(unmatched)} matched), e.g. {unmatched[0]}"
        )
    return Lora(path=path, patches=patches)


def check_factor_shapes(name: str, module: str, parts: Mapping[str, Tensor]) -> None:
    """UserError (before any arithmetic) unless up (out, rank[, 1, 1]) and down (rank, in[, kh, kw]) are
    matrices or convolution kernels of one rank above 0 and alpha is one number."""
    up, down = parts["up"], parts["down"]
    for role, factor in (("up", up), ("down", down)):
        if factor.dim() not in (2, 4):
            shape = tuple(factor.shape)
            raise UserError(f"{name}: {module}: the lora {role} factor has shape {shape}; expected a matrix or a convolution kernel")
    if down.shape[0] == 0 or up.shape[1] == 0:
        raise UserError(f"{name}: {module} has rank 0 (empty lora factors)")
    if up.shape[1] != down.shape[0]:
        raise UserError(f"{name}: {module}: the lora up factor has rank {up.shape[1]} but the down factor rank {down.shape[0]}")
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise UserError(f"{name}: {module}: an up factor with a {tuple(up.shape[2:])} kernel is not supported")
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise UserError(f"{name}: {module}: alpha must be one number, not a tensor of shape {tuple(alpha.shape)}")


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def merge_into(key: str, weight: Tensor, loras: Sequence[tuple[Lora, float]]) -> bool:
    """Add every LoRA's delta for `key` (times its user weight) to its rows of `weight`, in place.

    A float32 weight takes each product in place (`addmm_` on a row view, no delta-sized temporary:
    this runs for every block arrival in `stream`); a half-precision weight gets the deltas summed in
    float32 and is rounded once. Returns whether anything was added."""
    patches = [(patch, strength) for lora, strength in loras if strength != 0 for patch in lora.patches.get(key, ())]
    if not patches:
        return False
    if weight.dtype == torch.float32 and weight.is_contiguous():
        rows = weight.view(weight.shape[0], -1)  # (out, in * kh * kw)
        for patch, strength in patches:
            rows[patch.rows].addmm_(patch.up.to(weight.device), patch.down.to(weight.device), alpha=patch.scale * strength)
        return True
    total = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for patch, strength in patches:
        total[patch.rows] += patch.delta(weight.shape, weight.device) * strength
    merged = (weight.float() + total).to(weight.dtype)
    if not bool(torch.isfinite(merged).all()):  # checked before writing: the weight stays as it was
        names = ", ".join(f"{lora.name} at {strength:g}" for lora, strength in loras if key in lora.patches)
        raise UserError(f"LoRA {names} overflows {weight.dtype} in {key}; lower the weight or use full precision")
    weight.copy_(merged)
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
        # the folder is a load option (lora_dir): each front end names how to set it (the CLI's and serve's --lora-dir)
        message = f"<lora:{name}>: the LoRA folder {folder} holds no LoRA files"
        raise FieldError("lora_dir", message, f"{folder} holds no LoRA files: <lora:{name}> cannot be found")
    nearest = difflib.get_close_matches(name, list(found), n=3, cutoff=0.0)
    raise UserError(f"<lora:{name}>: no {name}.safetensors/.pt/.ckpt in {folder}; nearest: {', '.join(nearest)}")


def parse_lora_option(text: str) -> tuple[Path, float]:
    """`--lora FILE[:WEIGHT]` -> (path, weight); the weight defaults to 1."""
    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("/", "\\")):
        try:
            float(tail)
        except ValueError:
            raise FieldError.about("loras", f"{text}: the weight {tail!r} is not a number (write FILE or FILE:WEIGHT)") from None
        try:
            path, weight = head, check_lora_weight(tail, text)
        except UserError as error:
            raise FieldError.about("loras", str(error)) from None
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
        self._failed = False  # a merge was refused: the placed weights must be placed again, whatever comes next

    def lora(self, path: Path) -> Lora:
        """The file's patches, read once per (path, size, mtime)."""
        resolved = Path(path).resolve()
        try:
            stat = resolved.stat()
        except OSError:
            raise FieldError.about("loras", f"{path}: no such file") from None
        key = (resolved, stat.st_size, stat.st_mtime_ns)
        if key not in self._read:
            self._read[key] = read_lora(Path(path), self.config, self.model_shapes)
        return self._read[key]

    def activate(self, weights: Mapping[Path, float]) -> bool:
        """Make `weights` (file -> weight) the active set; files no longer used are forgotten."""
        checked = {path: check_lora_weight(weight, f"LoRA {Path(path).name}") for path, weight in weights.items()}
        active = tuple((self.lora(path), weight) for path, weight in checked.items() if weight != 0)
        self._read = {key: lora for key, lora in self._read.items() if any(lora is a for a, _ in active)}
        changed = [(id(a), w) for a, w in active] != [(id(a), w) for a, w in self.active] or self._failed
        self.active, self._failed = active, False
        return changed

    def __call__(self, key: str, tensor: Tensor) -> None:
        if self.active:
            try:
                merge_into(key, tensor, self.active)
            except UserError:
                self._failed = True
                raise
