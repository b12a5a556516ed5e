"""How a model is opened, as one frozen dataclass: `load()`, the CLI's generate commands, `serve`, `batch`
and the bench all take a `LoadOptions`, so each option and its default is written here only. Nothing
heavy is imported: the CLI reads the defaults for its --help."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optimized_sd.config import ModelConfig
    from optimized_sd.pipelines.diffusion import StableDiffusion

DEFAULT_LORA_DIR = Path("models/Lora")  # AUTOMATIC1111's folders, relative to where it runs
DEFAULT_EMBEDDINGS_DIR = Path("embeddings")


@dataclass(frozen=True)
class LoadOptions:
    """Everything but the checkpoint that `load` needs; the same for every model a server switches to.
    See `pipelines.diffusion.load` for what each does (`int8_matmul` and `channels_last` are measured
    CPU experiments that no front end exposes)."""

    config: str | Path | ModelConfig | None = None  # a JSON model config overriding the one read off the weights
    ema: bool = False
    vae: str | Path | None = None  # a separate VAE file replacing the checkpoint's
    prediction: str = "auto"  # auto, eps or v
    device: str | None = None  # None: the best available
    precision: str = "autocast"
    memory: str = "auto"
    vram_budget: str | int | None = None
    ram_budget: str | int | None = None  # host RAM for weights off the device: a size, "auto" (available now) or None (no limit)
    attention: str = "sdpa"
    vae_tiling: str = "auto"
    tokenizer: str | Path | tuple[str | Path, ...] | None = None  # one folder, or several (Flux: CLIP's and T5's)
    text_encoders: tuple[str | Path, ...] = ()  # text tower files of a model whose checkpoint lacks them (Flux, GGUF UNets)
    parts_from: str | Path | None = None  # a whole checkpoint of the family giving a denoiser-only file's other parts
    lora_dir: str | Path = DEFAULT_LORA_DIR
    embeddings_dir: str | Path = DEFAULT_EMBEDDINGS_DIR
    weights: str | None = None  # fp16, bf16, fp8 or int8 storage (None: the compute dtype)
    distilled: bool | None = None  # Flux.2 klein: True step-distilled, False base (None: from the file or folder name)
    preview_decoder: str | Path | None = None  # a TAESD decoder for live previews (the CLI's --preview-decoder)
    int8_matmul: bool = False
    channels_last: bool = False

    def kwargs(self) -> dict[str, Any]:
        """The options as `load`'s keywords."""
        return {option.name: getattr(self, option.name) for option in fields(self)}

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The options a pipeline class takes (`StableDiffusion.__init__`); the rest say how `load` opens the files."""
        return {name: value for name, value in self.kwargs().items() if name not in OPENING}

    def load(self, checkpoint: str | Path) -> StableDiffusion:
        """Open `checkpoint` with these options."""
        from optimized_sd.pipelines.diffusion import load

        return load(checkpoint, self)


# The options `load` reads itself to open the files; every other one goes on to the pipeline class.
OPENING = frozenset({"config", "ema", "vae", "prediction", "preview_decoder", "text_encoders", "parts_from", "distilled"})
