"""Issue 25, values and shapes: non-finite or absurd numbers never reach the weights or the conditioning,
bad LoRA factors and SDXL size-embedding widths are refused in one line before any arithmetic, and
tokenizers saved by today's transformers (tokenizer.json only) load and tokenise as the vocab/merges form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runs import run_cli
from lora_files import save
from safetensors.torch import save_file

from optimized_sd.config import TINY
from optimized_sd.errors import UserError
from optimized_sd.models.sd import LatentDiffusion
from optimized_sd.pipelines.networks import lora_weights, resolve_networks
from optimized_sd.weights.embeddings import read_embedding
from optimized_sd.weights.lora import MAX_LORA_WEIGHT, Lora, LoraPatch, LoraSet, merge_into, parse_lora_option, read_lora

PROJ_IN = "lora_unet_input_blocks_1_1_proj_in"  # a (32, 32, 1, 1) convolution of the tiny SD 1.x UNet
PROJ_IN_KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


@pytest.fixture(scope="module")
def model_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in LatentDiffusion(TINY).state_dict().items()}


def one_module(path: Path, **parts: torch.Tensor) -> Path:
    """A LoRA file patching the tiny UNet's proj_in with the given down/up/alpha tensors."""
    names = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"}
    return save({PROJ_IN + names[role]: value for role, value in parts.items()}, path)


# --- A: LoRA weights from every front end ------------------------------------------------------------


@pytest.mark.parametrize("weight", ["nan", "1e309", "-inf", "101", "-1e6"])
def test_lora_weight_out_of_range_is_refused_where_it_is_written(tmp_path: Path, weight: str) -> None:
    refused = rf"^loras style.safetensors:{weight}: the weight '{weight}' must be a finite number from -100 to 100"
    with pytest.raises(UserError, match=refused):
        parse_lora_option(f"style.safetensors:{weight}")
    with pytest.raises(UserError, match=r"LoRA style.safetensors: the weight .* must be a finite number"):
        lora_weights({"style.safetensors": float(weight)})  # the API's {file: weight}
    save({"x": torch.zeros(1)}, tmp_path / "style.safetensors")
    with pytest.raises(UserError, match=rf"<lora:style:{weight}>: the weight '{weight}' must be a finite number"):
        resolve_networks([f"a cat <lora:style:{weight}>"], "", {}, tmp_path)


def test_lora_weights_in_range_still_parse_and_sums_are_bounded(tmp_path: Path) -> None:
    assert parse_lora_option("a.safetensors:-2.5") == (Path("a.safetensors"), -2.5)
    assert lora_weights(["a.safetensors:100", "b.pt"]) == {Path("a.safetensors"): 100.0, Path("b.pt"): 1.0}
    with pytest.raises(UserError, match=r"\(summed\): the weight 160.0 must be"):
        lora_weights(["a.safetensors:80", "a.safetensors:80"])
    assert MAX_LORA_WEIGHT == 100


def test_lora_set_refuses_non_finite_weights_from_direct_callers(model_shapes) -> None:
    with pytest.raises(UserError, match="the weight nan must be a finite number"):
        LoraSet(TINY, model_shapes).activate({Path("x.safetensors"): float("nan")})


def test_cli_refuses_non_finite_lora_weights_in_one_line(capsys, tiny_model, tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    lora = one_module(tmp_path / "loras" / "style.safetensors", down=torch.randn(2, 32, 1, 1), up=torch.randn(32, 2, 1, 1))
    base = ["txt2img", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--device", "cpu", "--H", "64", "--W", "64",
            "--ddim_steps", "1", "--n_samples", "1", "--outdir", tmp_path / "out", "--skip_grid", "--lora-dir", lora.parent]  # fmt: skip
    for args, fragment in [
        (["--prompt", "a cube", "--lora", f"{lora}:nan"], "the weight 'nan' must be a finite number"),
        (["--prompt", "a cube <lora:style:1e309>"], "<lora:style:1e309>: the weight '1e309' must be a finite number"),
    ]:
        code, _, err = run_cli(capsys, *base, *args)
        assert code == 1 and fragment in err and err.count("\n") == 1, err
    assert not any((tmp_path / "out").rglob("*.png"))


# --- A: non-finite values inside files ---------------------------------------------------------------


@pytest.mark.parametrize("role", ["down", "up", "alpha"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_lora_values_are_refused_naming_the_key(tmp_path: Path, model_shapes, role: str, bad: float) -> None:
    parts = {"down": torch.randn(2, 32, 1, 1), "up": torch.randn(32, 2, 1, 1), "alpha": torch.tensor(1.0)}
    parts[role] = parts[role].clone().index_fill_(0, torch.tensor([0]), bad) if role != "alpha" else torch.tensor(bad)
    path = one_module(tmp_path / "bad.safetensors", **parts)
    with pytest.raises(UserError, match=rf"bad.safetensors: {PROJ_IN}\.(lora_{role}\.weight|alpha) holds NaN or infinite values"):
        read_lora(path, TINY, model_shapes)


def test_overflowing_factors_are_refused_at_load(tmp_path: Path, model_shapes) -> None:
    path = one_module(tmp_path / "huge.safetensors", down=torch.full((2, 32, 1, 1), 1e18), up=torch.full((32, 2, 1, 1), 1e18))
    with pytest.raises(UserError, match=r"huge.safetensors: .* give updates up to 2e\+36"):
        read_lora(path, TINY, model_shapes)


def test_half_precision_overflow_is_refused_and_leaves_the_weight_alone(model_shapes) -> None:
    patch = LoraPatch(up=torch.full((4, 1), 300.0), down=torch.full((1, 4), 300.0), scale=1.0)
    lora = Lora(Path("loud.safetensors"), {"w": (patch,)})
    weight = torch.ones(4, 4, dtype=torch.float16)
    with pytest.raises(UserError, match=r"LoRA loud at 1 overflows torch.float16 in w; lower the weight"):
        merge_into("w", weight, [(lora, 1.0)])
    assert torch.equal(weight, torch.ones(4, 4, dtype=torch.float16))
    assert merge_into("w", weight, [(lora, 1e-4)]) and bool(torch.isfinite(weight).all())
    loras = LoraSet(TINY, model_shapes)
    loras.active = ((lora, 1.0),)
    with pytest.raises(UserError):
        loras("w", weight)
    loras.lora = lambda path: lora  # the same file asked for again must be placed again, not trusted
    assert loras.activate({Path("loud.safetensors"): 1.0})


@pytest.mark.parametrize("fmt", ["a1111.pt", "emb_params.safetensors", "pair.safetensors", "concept.bin"])
def test_non_finite_embedding_values_are_refused_naming_the_key(tmp_path: Path, fmt: str) -> None:
    bad = torch.randn(2, 64)
    bad[1, 3] = float("nan")
    name, suffix = fmt.split(".")
    path = tmp_path / f"emb.{suffix}"
    if name == "a1111":
        torch.save({"string_to_param": {"*": bad}}, path)
        key = "string_to_param"
    elif name == "emb_params":
        save_file({"emb_params": bad}, str(path))
        key = "emb_params"
    elif name == "pair":
        save_file({"clip_l": torch.randn(2, 64), "clip_g": bad * float("inf")}, str(path))
        key = "clip_g"
    else:
        torch.save({"<concept>": bad[1]}, path)
        key = "its tensor"
    with pytest.raises(UserError, match=rf"emb.{suffix}: {key} holds NaN or infinite values"):
        read_embedding(path)


# --- B: LoRA factor shapes ----------------------------------------------------------------------------

BAD_SHAPES = {
    "rank 0": ({"down": torch.zeros(0, 32, 1, 1), "up": torch.zeros(32, 0, 1, 1)}, "has rank 0"),
    "scalar factors": ({"down": torch.tensor(1.0), "up": torch.tensor(2.0)}, r"lora up factor has shape \(\); expected a matrix"),
    "vector factor": ({"down": torch.randn(2), "up": torch.randn(32, 2)}, r"lora down factor has shape \(2,\)"),
    "vector alpha": ({"down": torch.randn(2, 32, 1, 1), "up": torch.randn(32, 2, 1, 1), "alpha": torch.ones(2)},
                     r"alpha must be one number, not a tensor of shape \(2,\)"),
    "ranks differ": ({"down": torch.randn(2, 32, 1, 1), "up": torch.randn(32, 3, 1, 1)}, "up factor has rank 3 but the down factor rank 2"),
    "misfit": ({"down": torch.randn(2, 31, 1, 1), "up": torch.randn(32, 2, 1, 1)}, r"gives a \(32 x 31\) update for a layer of shape"),
    "3x3 up": ({"down": torch.randn(2, 32, 1, 1), "up": torch.randn(32, 2, 3, 3)}, r"an up factor with a \(3, 3\) kernel"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_bad_lora_factor_shapes_are_one_line(tmp_path: Path, model_shapes, case: str) -> None:
    parts, message = BAD_SHAPES[case]
    with pytest.raises(UserError, match=message):
        read_lora(one_module(tmp_path / "bad.safetensors", **parts), TINY, model_shapes)


# --- C: SDXL size-embedding widths ----------------------------------------------------------------------

LABEL_KEY = "model.diffusion_model.label_emb.0.0.weight"


def with_label_width(source: Path, target: Path, width: int) -> Path:
    """A copy of a single-file SDXL checkpoint whose label_emb takes `width`-wide vectors."""
    from safetensors.torch import load_file

    tensors = load_file(str(source))
    tensors[LABEL_KEY] = torch.randn(tensors[LABEL_KEY].shape[0], width) * 0.02
    save_file(tensors, str(target))
    return target


def test_sdxl_label_width_that_breaks_the_size_rule_is_refused_at_load(capsys, tiny_sdxl, tmp_path: Path) -> None:
    """64 pooled + 5 x 256 is a refiner's width: an SDXL base builds 64 + 6 x 256 = 1600."""
    checkpoint = with_label_width(tiny_sdxl.files["real"], tmp_path / "odd.safetensors", 64 + 5 * 256)
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", checkpoint, "--tokenizer", tiny_sdxl.tokenizer, "--outdir", tmp_path / "out",
                           "--H", "64", "--W", "64", "--steps", "1", "--n_samples", "1", "--device", "cpu", "--skip_grid")  # fmt: skip
    assert code == 1 and err.count("\n") == 1, err
    assert "label_emb takes 1344-wide vectors but an SDXL model builds 1600 (64 pooled text + 6 x 256 size embeddings)" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_refiner_label_width_is_checked_against_its_five_numbers(tiny_refiner, tmp_path: Path) -> None:
    from optimized_sd.errors import CheckpointError
    from optimized_sd.weights.infer import infer_config
    from optimized_sd.weights.sources import SafetensorsSource

    good = SafetensorsSource(tiny_refiner.files["real"]).shapes()
    assert infer_config(good).unet.adm_in_channels == 64 + 5 * 256
    with pytest.raises(CheckpointError, match=r"takes 1600-wide vectors but an SDXL refiner model builds 1344"):
        infer_config({**good, LABEL_KEY: (good[LABEL_KEY][0], 64 + 6 * 256)})
    projection = "conditioner.embedders.0.model.text_projection"
    with pytest.raises(CheckpointError, match="bigG text encoder has no text_projection"):
        infer_config({key: shape for key, shape in good.items() if key != projection})


def test_diffusers_folder_label_width_is_checked_too(tiny_sdxl, tmp_path: Path) -> None:
    import json
    import shutil

    from optimized_sd.errors import CheckpointError
    from optimized_sd.weights.loading import prepare_model

    folder = shutil.copytree(tiny_sdxl.folder, tmp_path / "sdxl")
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["projection_class_embeddings_input_dim"] = 64 + 7 * 256
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"label_emb takes 1856-wide vectors but an SDXL model builds 1600"):
        prepare_model(folder)


# --- D: tokenizer folders in today's form (tokenizer.json only) --------------------------------------------

MERGES = [("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"), ("o", "n</w>"), ("m", "a"), ("ma", "t</w>")]
PROMPTS = [
    "the cat on the mat",
    "(masterpiece:1.2), [blurry], ((cat)) {x} <lora:a:0.5> BREAK the:mat",
    "Zoë, ÜBER café 日本語 🐱 naïve — “quoted”",
    "  spaces\tand\nnewlines  ",
    "the <|endoftext|> cat <|startoftext|>",
    "a long prompt, " + "the cat on the mat, " * 40,
    "",
]


def bpe_tokenizer(folder: Path, pad_with_bang: bool = False) -> Path:
    """The byte-level stand-in with a few real merges (so words become multi-byte tokens), vocab/merges form."""
    import json

    from family_models import write_tokenizer

    write_tokenizer(folder, pad_with_bang)
    vocab = json.loads((folder / "vocab.json").read_text())
    first = len(vocab) - 2
    for index, (left, right) in enumerate(MERGES):
        vocab[left + right] = first + index
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return folder


def json_only(bpe_folder: Path, folder: Path) -> Path:
    """The same tokenizer as transformers 5.x saves it, with any vocab.json/merges.txt removed."""
    from transformers import CLIPTokenizerFast

    CLIPTokenizerFast.from_pretrained(str(bpe_folder)).save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    return folder


@pytest.mark.parametrize("pad_with_bang", [False, True], ids=["clip-pads-with-end", "openclip-pads-with-bang"])
def test_tokenizer_json_folder_tokenises_as_the_vocab_merges_form(tmp_path: Path, pad_with_bang: bool) -> None:
    from optimized_sd.models.conditioner import OPEN_CLIP_PAD_ID
    from optimized_sd.models.text_encoder import load_tokenizer
    from optimized_sd.pipelines.text import prompt_tokens

    bpe = load_tokenizer(bpe_tokenizer(tmp_path / "bpe", pad_with_bang))
    fast = load_tokenizer(json_only(tmp_path / "bpe", tmp_path / "json"))
    assert bpe.tokenizer("the cat", add_special_tokens=False).input_ids == [first_merge_id(bpe) + 3, first_merge_id(bpe) + 1]
    for pad in (None, OPEN_CLIP_PAD_ID):
        assert torch.equal(bpe.with_padding(pad)(PROMPTS), fast.with_padding(pad)(PROMPTS))
        assert prompt_tokens(bpe.with_padding(pad)).special == prompt_tokens(fast.with_padding(pad)).special
    assert fast.tokenizer.pad_token_id == (0 if pad_with_bang else 999)  # "!" or the end token, from tokenizer_config.json
    for prompt in PROMPTS:
        assert prompt_tokens(bpe).tokenize(prompt) == prompt_tokens(fast).tokenize(prompt)
        assert bpe.truncated_text(prompt) == fast.truncated_text(prompt)


def first_merge_id(tokenizer) -> int:
    return tokenizer.tokenizer.get_vocab()["ca"]


def test_folder_without_either_tokenizer_form_names_both(tmp_path: Path) -> None:
    from optimized_sd.models.text_encoder import load_tokenizer

    (tmp_path / "tok").mkdir()
    with pytest.raises(UserError, match=r"must hold vocab.json and merges.txt, or tokenizer.json"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"cannot read the tokenizer in .* \(tokenizer.json\)"):
        load_tokenizer(tmp_path / "tok")


def test_sdxl_diffusers_folder_with_tokenizer_json_only_generates_the_same_image(capsys, tiny_sdxl, tmp_path: Path) -> None:
    """A folder as today's diffusers saves it (tokenizer/ and tokenizer_2/ hold tokenizer.json) runs end to end."""
    import shutil

    import numpy as np
    from PIL import Image

    folder = shutil.copytree(tiny_sdxl.folder, tmp_path / "sdxl")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / name)
        json_only(tiny_sdxl.folder / name, folder / name)
    images = []
    for model in (tiny_sdxl.folder, folder):
        out = tmp_path / f"out-{model.name}-{len(images)}"
        code, _, err = run_cli(capsys, "txt2img", "--ckpt", model, "--outdir", out, "--prompt", "a red cube, Zoë", "--H", "64", "--W", "64",
                               "--steps", "2", "--n_samples", "1", "--device", "cpu", "--seed", "3", "--skip_grid")  # fmt: skip
        assert code == 0, err
        (image,) = sorted(out.rglob("*.png"))
        images.append(np.asarray(Image.open(image)))
    assert np.array_equal(images[0], images[1])


# --- E: prompts the tokenizer cannot read -------------------------------------------------------------------


def test_prompt_the_tokenizer_cannot_read_is_one_line(tiny_model) -> None:
    """A lone surrogate (undecodable command-line bytes, a JSON "\\udcff" escape) or any tokenizer failure."""
    import optimized_sd
    from optimized_sd.models.text_encoder import load_tokenizer, tokenize
    from optimized_sd.pipelines.diffusion import GenerationRequest

    with pytest.raises(UserError, match=r"prompt 'a \\udcff cat' holds U\+DCFF, which is not a character"):
        load_tokenizer(tiny_model.tokenizer)(["fine", "a \udcff cat"])

    def broken(text, **options):
        raise RuntimeError("tokenizer exploded\nsecond line")

    with pytest.raises(UserError, match=r"^the tokenizer cannot read the prompt 'odd': tokenizer exploded$"):
        tokenize(broken, "odd")
    pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu")
    try:
        for prompt, negative, bad in [("a \udcff cat", "", "DCFF"), ("fine", "a \ud800", "D800")]:
            with pytest.raises(UserError, match=rf"holds an unpaired surrogate \(U\+{bad}\)"):  # the request's prompt check
                pipe.generate(GenerationRequest(prompts=[prompt], negative_prompt=negative, steps=1, height=64, width=64, seed=1))
        assert pipe.generate(GenerationRequest(prompts=["fine"], steps=1, height=64, width=64, seed=1)).latents.isfinite().all()
    finally:
        pipe.close()
