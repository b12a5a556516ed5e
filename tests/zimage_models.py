"""Tiny random Z-Image models for the pipeline tests: diffusers' ZImageTransformer2DModel, a Flux-like AutoencoderKL,
transformers' Qwen3Model and a Qwen2 tokenizer with the real chat template, written as the files people download
(the transformer in its original names, `qwen_3_4b.safetensors`, `ae.safetensors`) and as a diffusers folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tests.family_models import save
from tests.test_flux_pipeline import tiny_vae
from tests.test_zimage_net import TINY, original_tensors, perturbed, tiny_qwen3, tiny_qwen_tokenizer

PROMPT = "a cat on a mat"
SIZE = (64, 48)  # (H, W): latents 8x6, 12 patches (padded to 32 tokens)
CAPTION_WIDTH = 32  # the tiny Qwen3's hidden size


def tiny_transformer(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    config = {**TINY, "in_channels": 16, "cap_feat_dim": CAPTION_WIDTH}
    return perturbed(diffusers.ZImageTransformer2DModel(**config), seed)


@dataclass
class TinyZImage:
    root: Path
    transformer: object
    vae: object
    qwen: object
    tokenizer: Path
    files: dict[str, Path]  # transformer (original names), qwen, vae

    def load(self, **options):
        """Loaded from the separate files through the flags' options."""
        from optimized_sd.pipelines.diffusion import load

        options = {"device": "cpu", "precision": "full", "memory": "full", "tokenizer": self.tokenizer, **options}
        return load(self.files["transformer"], vae=self.files["vae"], text_encoders=(self.files["qwen"],), **options)

    def diffusers_pipeline(self, kind=None):
        import diffusers
        from transformers import Qwen2Tokenizer

        kind = kind or diffusers.ZImagePipeline
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
        tokenizer = Qwen2Tokenizer.from_pretrained(str(self.tokenizer))
        return kind(scheduler=scheduler, vae=self.vae, text_encoder=self.qwen, tokenizer=tokenizer, transformer=self.transformer)


def build(root: Path) -> TinyZImage:
    root.mkdir(parents=True, exist_ok=True)
    transformer, vae, qwen = tiny_transformer(), tiny_vae(), tiny_qwen3(causal_lm=False)
    tiny_qwen_tokenizer(root / "tokenizer")
    files = {
        "transformer": save(original_tensors(transformer.state_dict()), root / "z_image_turbo_tiny.safetensors"),
        "qwen": save(qwen.state_dict(), root / "qwen_3_4b.safetensors"),
        "vae": save(vae.state_dict(), root / "ae.safetensors"),
    }
    return TinyZImage(root, transformer, vae, qwen, root / "tokenizer", files)
