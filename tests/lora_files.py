"""LoRA and embedding files for tests, written from the tiny diffusers model's own module names."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

UNET_TARGETS = re.compile(
    r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out|resnets\.\d+\.(conv1|conv2|conv_shortcut))$"
)
TEXT_TARGETS = re.compile(r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])$")


def clip_module_name(name: str) -> str:
    """The CLIP module name as real LoRA files write it (with transformers' `text_model.` level)."""
    return name if name.startswith("text_model.") else "text_model." + name


def factors(module: nn.Module, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a Linear ((rank, in), (out, rank)) or a Conv2d ((rank, in, kh, kw), (out, rank, 1, 1))."""
    weight = module.weight
    if weight.dim() == 4:
        down = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], rank, 1, 1, generator=generator) * 0.3
    else:
        down = torch.randn(rank, weight.shape[1], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], rank, generator=generator) * 0.3
    return down, up


def text_towers(text: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """One text tower (SD 1.x / 2.x) or SDXL's two, in order."""
    return [text] if isinstance(text, nn.Module) else list(text)


def lora_modules(unet: nn.Module, text: nn.Module | Sequence[nn.Module]) -> list[tuple[str, str, nn.Module]]:
    """(tower, diffusers module name, module) for every layer a typical LoCon LoRA patches; towers are
    "unet", "text" and (SDXL's second) "text_2"."""
    found = [("unet", name, m) for name, m in unet.named_modules() if UNET_TARGETS.search(name)]
    for index, tower in enumerate(text_towers(text)):
        tag = "text" if index == 0 else f"text_{index + 1}"
        found += [(tag, clip_module_name(name), m) for name, m in tower.named_modules() if TEXT_TARGETS.search(name)]
    return found


def tower_prefix(tower: str, towers: int, kohya: bool) -> str:
    """The file prefix of a tower: kohya `lora_unet_`, `lora_te_` (one text tower) or `lora_te1_`/`lora_te2_`
    (SDXL); diffusers `unet.`, `text_encoder.`, `text_encoder_2.`."""
    if tower == "unet":
        return "lora_unet_" if kohya else "unet."
    if not kohya:
        return "text_encoder." if tower == "text" else "text_encoder_2."
    return "lora_te_" if towers == 1 else ("lora_te1_" if tower == "text" else "lora_te2_")


def kohya_lora(
    unet: nn.Module,
    text: nn.Module | Sequence[nn.Module],
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    text_too: bool = True,
    unet_names: Mapping[str, str] | None = None,
):
    """kohya / AUTOMATIC1111 names: lora_unet_<diffusers path with _>, lora_te_<CLIP path with _> (SDXL:
    lora_te1_/lora_te2_). `unet_names` renames UNet modules first (diffusers -> LDM, as kohya's SDXL
    trainer names them)."""
    generator = torch.Generator().manual_seed(seed)
    towers = len(text_towers(text))
    tensors: dict[str, torch.Tensor] = {}
    for tower, name, module in lora_modules(unet, text):
        if tower != "unet" and not text_too:
            continue
        if tower == "unet" and unet_names is not None:
            name = unet_names[name]
        base = tower_prefix(tower, towers, kohya=True) + name.replace(".", "_")
        down, up = factors(module, rank, generator)
        tensors[base + ".lora_down.weight"] = down
        tensors[base + ".lora_up.weight"] = up
        if alpha is not None:
            tensors[base + ".alpha"] = torch.tensor(alpha)
    return tensors


def peft_lora(unet: nn.Module, text: nn.Module | Sequence[nn.Module], rank: int = 4, seed: int = 0, attention_only: bool = False):
    """diffusers' own (peft) names: unet.<path>.lora_A/lora_B.weight, text_encoder(_2).<path>..."""
    generator = torch.Generator().manual_seed(seed)
    towers = len(text_towers(text))
    tensors: dict[str, torch.Tensor] = {}
    for tower, name, module in lora_modules(unet, text):
        if attention_only and not re.search(r"(to_[qkv]|to_out\.0|_proj)$", name):
            continue
        prefix = tower_prefix(tower, towers, kohya=False)
        down, up = factors(module, rank, generator)
        tensors[f"{prefix}{name}.lora_A.weight"] = down
        tensors[f"{prefix}{name}.lora_B.weight"] = up
    return tensors


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return path
