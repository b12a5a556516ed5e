"""Flux.1 key layouts: what a file holds (`identify_flux`) and views of its tensors under the names our
modules use (`flux_parts`), with no per-layer code.

Layouts read:
- BFL's originals (`flux1-dev.safetensors`: `double_blocks.*`, `img_in.*`, ...) and the same under ComfyUI's
  `model.diffusion_model.`, our transformer's own names;
- diffusers' `FluxTransformer2DModel` (`transformer_blocks.*`, `x_embedder.*`): q, k and v (and the single
  blocks' MLP input) are separate there and are concatenated back, and the final adaLN's halves are in the
  other order (diffusers' single-file converter, `convert_flux_transformer_checkpoint_to_diffusers`, is the
  reference this inverts);
- ComfyUI's all-in-one files: `text_encoders.clip_l.transformer.*`, `text_encoders.t5xxl.transformer.*`, `vae.*`
  beside the transformer; standalone T5 (`encoder.block.*`), CLIP-L (`text_model.*`) and VAE files (BFL's
  `ae.safetensors` with LDM names, or a diffusers AutoencoderKL).

Kontext [dev] has the same tensors as Flux.1 dev and cannot be told apart by its keys; it loads as dev."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from optimized_sd.errors import CheckpointError
from optimized_sd.weights.infer import indices
from optimized_sd.weights.sources import ComputedSource, RenamedSource, TensorSource

COMFY_TRANSFORMER_PREFIX = "model.diffusion_model."
COMFY_CLIP_PREFIX = "text_encoders.clip_l.transformer."
COMFY_T5_PREFIX = "text_encoders.t5xxl.transformer."
COMFY_VAE_PREFIX = "vae."

BFL_TELLTALE = "double_blocks.0.img_attn.norm.key_norm.scale"
DIFFUSERS_TELLTALE = "transformer_blocks.0.attn.norm_added_k.weight"
GUIDANCE_KEYS = ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight")
FLUX1_IN_CHANNELS = 64  # 16 VAE channels x 2x2 patches; Fill adds mask and image (384), Depth/Canny a control image (128)

# A key part that names a model this version does not run (diffusers' `CHECKPOINT_KEY_NAMES` facts).
UNSUPPORTED_TELLTALES = (
    ("joint_blocks.", "Stable Diffusion 3 (MMDiT)"),
    ("distilled_guidance_layer.", "Chroma"),
    ("double_stream_modulation_img.", "Flux.2"),
    ("single_stream_modulation.", "Flux.2"),
    ("early_stream_modulations.", "a later Flux generation"),
)
UNSUPPORTED_IN_CHANNELS = {384: "Flux.1 Fill (inpainting)", 128: "Flux.1 Depth/Canny (structural control)"}

# diffusers FluxTransformer2DModel -> BFL names, inside one double block. A module name maps its `.weight` and
# `.bias`; a name ending in `.scale` is a whole key (diffusers' RMSNorm calls it `.weight`). Several diffusers
# modules are concatenated along the output axis in the order given.
# A double block's joint attention, the same in Flux.1 and Flux.2 (`flux2_keys` builds on it).
DOUBLE_BLOCK_ATTENTION_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn.norm.query_norm.scale", ("attn.norm_q.weight",)),
    ("img_attn.norm.key_norm.scale", ("attn.norm_k.weight",)),
    ("txt_attn.norm.query_norm.scale", ("attn.norm_added_q.weight",)),
    ("txt_attn.norm.key_norm.scale", ("attn.norm_added_k.weight",)),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
)
DOUBLE_BLOCK_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_mod.lin", ("norm1.linear",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    *DOUBLE_BLOCK_ATTENTION_NAMES,
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
)
SINGLE_BLOCK_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("norm.query_norm.scale", ("attn.norm_q.weight",)),
    ("norm.key_norm.scale", ("attn.norm_k.weight",)),
    ("modulation.lin", ("norm.linear",)),
)
TOP_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("final_layer.linear", ("proj_out",)),
)
FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # diffusers holds (scale, shift), BFL (shift, scale)

CLIP_UNUSED = frozenset({"text_projection.weight", "logit_scale", "text_model.embeddings.position_ids", "embeddings.position_ids"})

Recipes = dict[str, tuple[str, tuple[str, ...]]]


def diffusers_transformer_recipes(
    keys: Iterable[str], top=TOP_NAMES, double=DOUBLE_BLOCK_NAMES, single=SINGLE_BLOCK_NAMES, final_adaln=FINAL_ADALN
) -> Recipes:
    """BFL name -> (op, diffusers keys) for a diffusers Flux transformer's keys (ComputedSource recipes); the name
    tables are Flux.1's unless given (Flux.2 passes its own). Keys no table covers keep their own name, so the
    strict loader reports them."""
    present = set(keys)
    shapes = dict.fromkeys(present, ())
    tables: list[tuple[str, str, tuple[tuple[str, tuple[str, ...]], ...]]] = [("", "", top)]
    tables += [
        (f"double_blocks.{i}.", f"transformer_blocks.{i}.", double) for i in indices(shapes, r"transformer_blocks\.(\d+)\.")
    ]
    tables += [
        (f"single_blocks.{i}.", f"single_transformer_blocks.{i}.", single)
        for i in indices(shapes, r"single_transformer_blocks\.(\d+)\.")
    ]
    recipes: Recipes = {}
    for bfl_prefix, diffusers_prefix, table in tables:
        for bfl, parts in table:
            leaves = [("", "")] if bfl.endswith(".scale") else [(".weight", ".weight"), (".bias", ".bias")]
            for bfl_leaf, diffusers_leaf in leaves:
                sources = tuple(diffusers_prefix + part + diffusers_leaf for part in parts)
                if all(name in present for name in sources):
                    recipes[bfl_prefix + bfl + bfl_leaf] = ("cat" if len(sources) > 1 else "same", sources)
    for leaf in (".weight", ".bias"):
        if final_adaln[1] + leaf in present:
            recipes[final_adaln[0] + leaf] = ("swap_halves", (final_adaln[1] + leaf,))
    covered = {name for _, names in recipes.values() for name in names}
    recipes.update({key: ("same", (key,)) for key in present - covered})
    return recipes


@dataclass(frozen=True)
class FluxFile:
    """What a file holds for Flux.1: the transformer's layout and variant, and each part's key prefix."""

    transformer: str | None = None  # "bfl" or "diffusers"; None: no transformer in this file
    variant: str | None = None  # "dev" (distilled guidance input) or "schnell"
    prefixes: dict[str, str] = field(default_factory=dict)  # part ("transformer", "clip_l", "t5", "vae") -> key prefix

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.prefixes)


def refuse_unsupported(keys: Iterable[str], shapes: dict[str, tuple[int, ...]], name: str) -> None:
    """A one-line CheckpointError naming the model family when the keys are those of one this version does not run."""
    for key in keys:
        for telltale, family in UNSUPPORTED_TELLTALES:
            if telltale in key:
                raise CheckpointError(f"{name} is a {family} model ({key!r}), which this version does not run")
    for key in ("img_in.weight", COMFY_TRANSFORMER_PREFIX + "img_in.weight", "x_embedder.weight"):
        channels = shapes.get(key, (0, 0))[1] if len(shapes.get(key, ())) == 2 else 0
        if channels in UNSUPPORTED_IN_CHANNELS:
            family = UNSUPPORTED_IN_CHANNELS[channels]
            raise CheckpointError(f"{name} is {family} ({key} takes {channels} channels), which this version does not run")


def identify_flux(shapes: dict[str, tuple[int, ...]], name: str = "the checkpoint") -> FluxFile:
    """Which Flux.1 parts the file with these tensor shapes holds, where, and dev or schnell; unsupported
    relatives (SD3, Chroma, Flux.2, Fill, Depth/Canny) are refused by name."""
    refuse_unsupported(shapes, shapes, name)
    prefixes: dict[str, str] = {}
    layout = variant = None
    for prefix in ("", COMFY_TRANSFORMER_PREFIX):
        if prefix + BFL_TELLTALE in shapes:
            layout, prefixes["transformer"] = "bfl", prefix
            variant = "dev" if prefix + GUIDANCE_KEYS[0] in shapes else "schnell"
    if DIFFUSERS_TELLTALE in shapes:
        layout, prefixes["transformer"] = "diffusers", ""
        variant = "dev" if GUIDANCE_KEYS[1] in shapes else "schnell"
    for part, prefix, telltales in (
        ("clip_l", COMFY_CLIP_PREFIX, ("text_model.encoder.layers.0.", "encoder.layers.0.")),
        ("t5", COMFY_T5_PREFIX, ("encoder.block.0.", "block.0.layer.0.")),
        ("vae", COMFY_VAE_PREFIX, ("decoder.conv_in.",)),
    ):
        if any(key.startswith(prefix) for key in shapes):
            prefixes[part] = prefix
        elif "transformer" not in prefixes and any(key.startswith(telltales) for key in shapes):
            prefixes[part] = ""  # a standalone file of that part
    if not prefixes:
        raise CheckpointError(f"{name} holds no Flux.1 part (transformer, CLIP-L, T5 or VAE) that this version knows")
    return FluxFile(layout, variant, prefixes)


def strip_prefix(source: TensorSource, prefix: str) -> TensorSource:
    """The tensors under `prefix`, named without it."""
    return RenamedSource(source, {key[len(prefix) :]: key for key in source.keys() if key.startswith(prefix)})


def transformer_view(source: TensorSource, info: FluxFile) -> TensorSource:
    """The transformer's tensors under BFL names (our `Flux` module's)."""
    inner = strip_prefix(source, info.prefixes["transformer"])
    if info.transformer == "diffusers":
        return ComputedSource(inner, diffusers_transformer_recipes(inner.keys()))
    return inner


def t5_names(keys: Iterable[str]) -> dict[str, str]:
    """transformers' T5EncoderModel name -> file key: files come with or without the `encoder.` level, with
    `shared.weight` or only its tied alias `encoder.embed_tokens.weight` (kept as `shared.weight`)."""
    names = {}
    for key in keys:
        name = key if key.startswith(("encoder.", "shared.")) else "encoder." + key
        if name == "encoder.embed_tokens.weight":
            name = "shared.weight"
        names.setdefault(name, key)
    return names


def flux_parts(source: TensorSource, info: FluxFile) -> dict[str, TensorSource]:
    """Each part the file holds as a source under its module's names: `transformer` BFL names, `clip_l` and
    `t5` transformers' names (CLIPTextModel's with `text_model.`, T5EncoderModel's), `vae` LDM names of the
    autoencoder's own modules (`encoder.*`, `decoder.*`; a diffusers AutoencoderKL file is renamed)."""
    from optimized_sd.weights.family import VAE_PREFIX
    from optimized_sd.weights.vae_file import vae_names

    parts: dict[str, TensorSource] = {}
    for part, prefix in info.prefixes.items():
        inner = strip_prefix(source, prefix) if prefix else source
        if part == "transformer":
            parts[part] = transformer_view(source, info)
        elif part == "clip_l":  # the contrastive head (projection, temperature) is unused: Flux takes the pooled state
            kept = [key for key in inner.keys() if key not in CLIP_UNUSED]
            parts[part] = RenamedSource(inner, {key if key.startswith("text_model.") else "text_model." + key: key for key in kept})
        elif part == "t5":
            parts[part] = RenamedSource(inner, t5_names(inner.keys()))
        else:
            names = vae_names(inner)
            parts[part] = RenamedSource(inner, {name[len(VAE_PREFIX) :]: key for name, key in names.items()})
    return parts
