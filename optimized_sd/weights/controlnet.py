"""Open a ControlNet in either layout it ships in, as tensors under the original (`cldm`) module names, with its
config read off the tensors and its family (SD 1.x, SD 2.x, SDXL) checked against the base model's.

Layouts:
  original   `control_model.input_blocks.*`, `input_hint_block.*`, `zero_convs.N.0.*`, `middle_block_out.0.*`
             (lllyasviel's `.pth`/`.safetensors`, with or without the `control_model.` root; a file holding a
             whole SD model beside it gives its `control_model.*` part), `.pth` through the restricted unpickler;
  diffusers  a folder with config.json and diffusion_pytorch_model.safetensors, or that single file:
             `controlnet_cond_embedding.*`, `controlnet_down_blocks.N.*`, `controlnet_mid_block.*` beside the
             UNet's down-block names, renamed by the UNet's own diffusers -> LDM table (`keymap.unet_prefixes`)
             plus the ControlNet's parts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from optimized_sd.config import FAMILY_NAMES, UNetConfig
from optimized_sd.errors import CheckpointError, UserError
from optimized_sd.families import registry
from optimized_sd.models.controlnet import ControlNetConfig, ControlNetModel, hint_conv_indices
from optimized_sd.weights.diffusers_folder import DiffusersPart, find_weight_file, read_json, unet_config
from optimized_sd.weights.family import SD1, SD2, SDXL
from optimized_sd.weights.infer import Shapes, indices, infer_unet
from optimized_sd.weights.keymap import rename, unet_prefixes
from optimized_sd.weights.loading import check_keys, materialize, open_weight_file
from optimized_sd.weights.sources import RenamedSource, TensorSource

CONTROL_PREFIX = "control_model."
HINT_PREFIX = "input_hint_block."
DIFFUSERS_HINT_PREFIX = "controlnet_cond_embedding."
# The base families a ControlNet of each family runs with (an SDXL ControlNet steers the SDXL base, not its refiner).
COMPATIBLE_BASES = {SD1: (SD1,), SD2: (SD2,), SDXL: (SDXL,)}


@dataclass
class OpenedControlNet:
    """A ControlNet's tensors under original names, its config and family; no module built yet."""

    source: TensorSource
    config: ControlNetConfig
    family: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


def family_of(shapes: Shapes) -> str:
    """SDXL when the copy has a `label_emb` (pooled text and sizes), SD 2.x when its transformers project with
    Linear layers or attend to 1024-wide text (OpenCLIP ViT-H), else SD 1.x (CLIP ViT-L, 768)."""
    if "label_emb.0.0.weight" in shapes:
        return SDXL
    proj_in = shapes.get("middle_block.1.proj_in.weight", ())
    context = shapes.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight", (0, 0))[1]
    return SD2 if len(proj_in) == 2 or context == 1024 else SD1


def check_controlnet_family(controlnet_family: str, base_family: str) -> None:
    """A one-line UserError naming both families unless the ControlNet was trained for this base model."""
    if base_family not in COMPATIBLE_BASES.get(controlnet_family, ()):
        cn, base = (FAMILY_NAMES.get(f, f) for f in (controlnet_family, base_family))
        raise UserError(f"this ControlNet is for {cn} models but the model loaded is {base}; choose a ControlNet made for {base}")


def hint_layout(shapes: Shapes) -> tuple[int, tuple[int, ...]]:
    """(hint channels, hint widths) from the `input_hint_block` convs."""
    convs = indices(shapes, re.escape(HINT_PREFIX) + r"(\d+)\.weight")
    if not convs or len(convs) % 2:
        raise CheckpointError(f"the ControlNet's hint encoder has {len(convs)} convs; expected an even number")
    first = shapes[f"{HINT_PREFIX}{convs[0]}.weight"]
    widths = tuple(shapes[f"{HINT_PREFIX}{index}.weight"][0] for index in convs[:-1:2])
    if convs != hint_conv_indices(widths):
        raise CheckpointError(f"the ControlNet's hint encoder has convs at {convs}; not the layout ControlNets use")
    return first[1], widths


def infer_controlnet(shapes: Shapes) -> ControlNetConfig:
    """The ControlNet's config from original-layout shapes; heads by its family's rule (as `infer_unet`)."""
    family = family_of(shapes)
    in_channels = shapes["input_blocks.0.0.weight"][1]
    # A ControlNet has no output half: `infer_unet` is told the UNet's usual output width.
    unet = infer_unet({**shapes, "out.2.weight": (in_channels,)}, prefix="", heads=registry.by_name(family).unet_heads)
    hint_channels, widths = hint_layout(shapes)
    return ControlNetConfig(unet=unet, hint_channels=hint_channels, hint_widths=widths)


# -- the diffusers layout --------------------------------------------------------------------------------


def diffusers_key_layout(keys: list[str]) -> UNetConfig:
    """Just what names diffusers' down-block keys: levels, resnets per level and which levels attend."""
    levels = indices(dict.fromkeys(keys, ()), r"down_blocks\.(\d+)\.")
    resnets = indices(dict.fromkeys(keys, ()), r"down_blocks\.0\.resnets\.(\d+)\.")
    attending = indices(dict.fromkeys(keys, ()), r"down_blocks\.(\d+)\.attentions\.")
    if not levels or not resnets:
        raise CheckpointError("the diffusers ControlNet has no down_blocks.N.resnets.* keys")
    return UNetConfig(
        num_res_blocks=len(resnets), channel_mult=(1,) * len(levels), attention_resolutions=tuple(2**level for level in attending)
    )


def controlnet_prefixes(keys: list[str]) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers ControlNetModel prefix -> (original prefix, inner names): the UNet's table for the shared half,
    and the hint encoder, zero convs and middle-block output."""
    table = unet_prefixes(diffusers_key_layout(keys))
    blocks = indices(dict.fromkeys(keys, ()), re.escape(DIFFUSERS_HINT_PREFIX) + r"blocks\.(\d+)\.")
    table[DIFFUSERS_HINT_PREFIX + "conv_in."] = (HINT_PREFIX + "0.", {})
    for block in blocks:
        table[f"{DIFFUSERS_HINT_PREFIX}blocks.{block}."] = (f"{HINT_PREFIX}{2 * (block + 1)}.", {})
    table[DIFFUSERS_HINT_PREFIX + "conv_out."] = (f"{HINT_PREFIX}{2 * (len(blocks) + 1)}.", {})
    for index in indices(dict.fromkeys(keys, ()), r"controlnet_down_blocks\.(\d+)\."):
        table[f"controlnet_down_blocks.{index}."] = (f"zero_convs.{index}.0.", {})
    table["controlnet_mid_block."] = ("middle_block_out.0.", {})
    return table


def original_names(keys: list[str]) -> dict[str, str]:
    """Original name -> diffusers key; keys no table covers keep a visible `diffusers/key` name for the report."""
    names = rename(keys, controlnet_prefixes(keys), "")
    covered = set(names.values())
    names.update({f"diffusers/{key}": key for key in keys if key not in covered})
    return names


def folder_settings(folder: Path, family: str) -> tuple[dict[str, object], UNetConfig]:
    """What a diffusers ControlNet folder's config.json states beyond the tensors: head counts (through the UNet's
    reader, which refuses settings our modules do not compute), pooling and channel order."""
    config_path = folder / "config.json"
    config = read_json(config_path)
    order = config.get("controlnet_conditioning_channel_order", "rgb")
    if order not in ("rgb", "bgr"):
        raise CheckpointError(f"{config_path}: controlnet_conditioning_channel_order is {order!r}; expected rgb or bgr")
    part = DiffusersPart("controlnet", find_weight_file(folder), config, config_path)
    settings = {"global_pool": bool(config.get("global_pool_conditions", False)), "bgr": order == "bgr"}
    return settings, unet_config(part, family)


# -- opening ------------------------------------------------------------------------------------------


def not_a_controlnet(path: Path, keys: list[str]) -> CheckpointError:
    """A one-line error saying what the file looks like instead."""
    if any(key.startswith("model.diffusion_model.") for key in keys):
        what = "a Stable Diffusion checkpoint"
    elif any(key.startswith(("lora_unet_", "lora_te")) or ".lora_" in key for key in keys):
        what = "a LoRA"
    elif any(key.startswith(("down_blocks.", "up_blocks.")) for key in keys):
        what = "a diffusers UNet"
    else:
        what = f"not a ControlNet ({len(keys)} tensors, first {', '.join(keys[:2])})"
        return CheckpointError(f"{path} is {what}: no input_hint_block.* or controlnet_cond_embedding.* keys")
    return CheckpointError(f"{path} is {what}, not a ControlNet (no input_hint_block.* or controlnet_cond_embedding.* keys)")


def open_controlnet(path: Path | str) -> OpenedControlNet:
    """Open a ControlNet file or diffusers folder as original-named tensors with its config and family."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"ControlNet not found: {path}")
    source = open_weight_file(find_weight_file(path) if path.is_dir() else path)
    keys = source.keys()
    if any(key.startswith(CONTROL_PREFIX) for key in keys):  # lllyasviel's files; some hold a whole SD model beside
        source = RenamedSource(source, {key[len(CONTROL_PREFIX) :]: key for key in keys if key.startswith(CONTROL_PREFIX)})
    elif any(key.startswith(DIFFUSERS_HINT_PREFIX) for key in keys):
        source = RenamedSource(source, original_names(keys))
    if not any(key.startswith(HINT_PREFIX) for key in source.keys()):
        raise not_a_controlnet(path, keys)
    shapes = source.shapes()
    try:
        config = infer_controlnet(shapes)
    except (KeyError, IndexError, ZeroDivisionError) as error:
        raise CheckpointError(f"{path}: cannot read the ControlNet's layout from its tensors (missing {error})") from None
    family = family_of(shapes)
    if path.is_dir():
        settings, stated = folder_settings(path, family)
        config = replace(config, unet=replace(stated, out_channels=stated.in_channels), **settings)
    return OpenedControlNet(source, config, family, path)


def build_controlnet(path: Path | str, base_family: str | None = None) -> tuple[ControlNetModel, OpenedControlNet]:
    """A ControlNet built on meta (no weights read yet) and checked strictly against its tensors (missing,
    unexpected or mis-shaped keys are one CheckpointError); refused when `base_family` is not its family."""
    opened = open_controlnet(path)
    if base_family is not None:
        check_controlnet_family(opened.family, base_family)
    with torch.device("meta"):
        model = ControlNetModel(opened.config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    report = check_keys(opened.source, expected)
    if not report.ok:
        name = FAMILY_NAMES.get(opened.family, opened.family)
        raise CheckpointError(f"{opened.path} does not match an {name} ControlNet: {report.summary()}")
    return model.eval(), opened


def load_controlnet(
    path: Path | str, base_family: str | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> ControlNetModel:
    """`build_controlnet`, materialised on `device` in `dtype`."""
    model, opened = build_controlnet(path, base_family)
    materialize(model, "", opened.source, torch.device(device), dtype)
    return model.eval()
