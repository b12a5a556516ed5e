"""Text conditioning by family: which towers run, how their outputs combine, and SDXL's vector `y`.

SD 1.x and SD 2.x hold one tower as `cond_stage_model`; SDXL holds two under `conditioner.embedders`
(CLIP ViT-L then OpenCLIP bigG, contexts concatenated on the channel axis, the pooled vector from bigG);
the SDXL refiner holds bigG alone. The pipeline sees one call: token ids per tower -> (context, pooled)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from optimized_sd.config import ModelConfig
from optimized_sd.families import registry
from optimized_sd.models.layers import timestep_embedding
from optimized_sd.models.open_clip import FrozenOpenCLIPEmbedder
from optimized_sd.models.text_encoder import OPEN_CLIP_PAD_ID, FrozenCLIPEmbedder

SIZE_EMBEDDING_DIM = 256  # SGM's ConcatTimestepEmbedderND outdim: one Fourier embedding per number


class GeneralConditioner(nn.Module):
    """SGM's `conditioner`: the towers as `embedders.N`, run in order, contexts concatenated."""

    def __init__(self, towers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(towers)

    def towers(self) -> list[str]:
        """The towers' paths under this module, in run order."""
        return [f"embedders.{i}" for i in range(len(self.embedders))]

    def forward(self, ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        contexts, pooled = [], None
        for embedder, tokens in zip(self.embedders, ids, strict=True):
            context, tower_pooled = run_tower(embedder, tokens)
            contexts.append(context)
            pooled = tower_pooled if tower_pooled is not None else pooled
        return torch.cat(contexts, dim=-1), pooled  # (B, 77, sum of widths)


def run_tower(tower: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor | None]:
    """One tower's (context, pooled): CLIP ViT-L gives no pooled vector, OpenCLIP may."""
    if isinstance(tower, FrozenOpenCLIPEmbedder):
        return tower(ids)
    return tower(ids), None


def build_text_module(config: ModelConfig) -> tuple[str, nn.Module]:
    """(attribute name, module) of the family's text conditioning, named as its checkpoints name it (the
    record's `conditioner`: SGM's `conditioner.embedders.N`, or one tower as `cond_stage_model`)."""
    if registry.record_for(config).conditioner == "sgm":
        towers: list[nn.Module] = []
        if config.text is not None:
            towers.append(FrozenCLIPEmbedder(config.text))
        if config.open_clip is not None:
            towers.append(FrozenOpenCLIPEmbedder(config.open_clip))
        return "conditioner", GeneralConditioner(towers)
    if config.open_clip is not None:
        return "cond_stage_model", FrozenOpenCLIPEmbedder(config.open_clip)
    if config.text is None:
        raise ValueError("a model config needs a text tower (text or open_clip)")
    return "cond_stage_model", FrozenCLIPEmbedder(config.text)


def tower_pad_ids(config: ModelConfig) -> list[int | None]:
    """Each tower's padding id in run order: the tokenizer's own (CLIP) or 0 (OpenCLIP)."""
    pads: list[int | None] = []
    if config.text is not None:
        pads.append(None)
    if config.open_clip is not None:
        pads.append(OPEN_CLIP_PAD_ID)
    return pads


def text_towers(module: nn.Module) -> list[nn.Module]:
    """The towers of the text module `build_text_module` made, in the order their contexts are concatenated."""
    return list(module.embedders) if isinstance(module, GeneralConditioner) else [module]


def encode_tokens(module: nn.Module, ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """(context, pooled) of the text module `build_text_module` made, from one id tensor per tower."""
    if isinstance(module, GeneralConditioner):
        return module(ids)
    (only,) = ids
    return run_tower(module, only)


def size_conditioning(pooled: Tensor, numbers: Sequence[float]) -> Tensor:
    """SDXL's `y`: [pooled | a 256-wide [cos | sin] embedding of each size number] -> (B, adm_in_channels).

    Base: numbers = original (h, w), crop (top, left), target (h, w); refiner: original (h, w), crop
    (top, left), aesthetic score (SGM's ConcatTimestepEmbedderND, diffusers' `add_time_ids`)."""
    values = torch.tensor([float(n) for n in numbers], device=pooled.device)
    embedded = timestep_embedding(values, SIZE_EMBEDDING_DIM).reshape(1, -1)  # (1, 256 * len(numbers))
    return torch.cat([pooled.float(), embedded.expand(pooled.shape[0], -1)], dim=1).to(pooled.dtype)
