"""AUTOMATIC1111 prompt syntax and chunked, weighted encoding on the tiny CLIP text model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from optimized_sd.config import TINY
from optimized_sd.errors import UserError
from optimized_sd.models.text_encoder import clip_config, write_byte_tokenizer
from optimized_sd.prompts.encoding import PromptEncoder, PromptTokens, SpecialTokens, build_chunks, pad_to_chunks, spliced
from optimized_sd.prompts.syntax import BREAK, LoraTag, Segment, extract_loras, parse_attention, split_subprompts


# -- syntax -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [  # AUTOMATIC1111's own documented examples of parse_prompt_attention
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)],
        ),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("(word: 1.3 )", [("word", 1.3)]),
        ("unopened) and ]", [("unopened) and ]", 1.0)]),  # closing brackets nothing opened are text
        ("[unclosed", [("unclosed", 1 / 1.1)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("no (weight:x)", [("no ", 1.0), ("weight:x", 1.1)]),
        ("cat:1.2) text", [("cat:1.2) text", 1.0)]),
        ("", [("", 1.0)]),
    ],
)  # fmt: skip
def test_parse_attention(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_attention(text)
    assert [s.text for s in got] == [t for t, _ in expected]
    assert [s.weight for s in got] == pytest.approx([w for _, w in expected])


def test_break_splits_segments_only_as_a_whole_word() -> None:
    assert parse_attention("a BREAK (b)") == [Segment("a"), BREAK, Segment("b", pytest.approx(1.1))]
    assert parse_attention("BREAKFAST break") == [Segment("BREAKFAST break")]


def test_bad_emphasis_weight_is_a_user_error() -> None:
    with pytest.raises(UserError, match="emphasis weight"):
        parse_attention("(a:1.2.3)")


def test_lora_tags_are_removed_and_read() -> None:
    text, tags = extract_loras("a <lora:style_one:0.7> cat <lora:Other> <lyco:third:-0.5>")
    assert text == "a  cat  "
    assert tags == [LoraTag("style_one", 0.7), LoraTag("Other", 1.0), LoraTag("third", -0.5)]
    for bad, message in [("<lora:x:abc>", "not a number"), ("<lora:x:1:2>", "separate"), ("<hypernet:x:1>", "unsupported")]:
        with pytest.raises(UserError, match=message):
            extract_loras(f"a {bad} b")


def test_weighted_subprompts_and_emphasis_coexist() -> None:
    assert split_subprompts("tabby cat:0.25 white duck:0.75 hybrid") == [("tabby cat", 0.25), ("white duck", 0.75), ("hybrid", 1.0)]
    # colons inside brackets are AUTOMATIC1111's; colons not followed by a number are text
    assert split_subprompts("(cat:1.2) dog:0.5 [x:2] y") == [("(cat:1.2) dog", 0.5), ("[x:2] y", 1.0)]
    assert split_subprompts("time: noon, a \\(b:2 c") == [("time: noon, a \\(b", 2.0), ("c", 1.0)]
    assert split_subprompts("cat") == [("cat", 1.0)]


# -- encoding -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory):
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(3)
    model = CLIPTextModel(clip_config(TINY.text)).eval()
    with torch.no_grad():  # a fresh LayerNorm's output has mean ~0, which the mean restoration divides by
        getattr(model, "text_model", model).final_layer_norm.bias.uniform_(0.2, 0.6)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_byte_tokenizer(tmp_path_factory.mktemp("tok"), TINY.text.vocab_size)))
    return model, tokenizer


def tokens_of(tokenizer) -> PromptTokens:
    special = SpecialTokens(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id, tokenizer.get_vocab()[",</w>"])
    return PromptTokens(lambda text: tokenizer(text, add_special_tokens=False).input_ids, special)


def token_embedding(model) -> torch.nn.Embedding:
    return getattr(model, "text_model", model).embeddings.token_embedding  # transformers < 5 has a text_model level


def encoder_of(model):
    """encode(ids, fixes): the tower with the fixes spliced into its token embeddings."""

    @torch.no_grad()
    def encode(ids: torch.Tensor, fixes) -> torch.Tensor:
        with spliced(token_embedding(model), fixes):
            return model(input_ids=ids).last_hidden_state, None  # CLIP ViT-L: no pooled vector

    return encode


def a1111_chunk(model, ids: list[int], weights: list[float]) -> torch.Tensor:
    """AUTOMATIC1111's process_tokens + EmphasisOriginal for one chunk, written out directly."""
    with torch.no_grad():
        z = model(input_ids=torch.tensor([ids])).last_hidden_state
    original_mean = z.mean()
    z = z * torch.tensor(weights)[None, :, None]
    return z * (original_mean / z.mean())


def wrap(tokenizer, body: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
    pad = 75 - len(body)
    end = tokenizer.eos_token_id
    return [tokenizer.bos_token_id, *body, end, *[end] * pad], [1.0, *weights, 1.0, *[1.0] * pad]


def test_emphasis_equals_automatic1111(tower) -> None:
    model, tokenizer = tower
    tok = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    pieces = [("a ", 1.0), ("bc", 1.5), (" ", 1.0), ("d", 1 / 1.1)]
    body = [token for text, _ in pieces for token in tok(text)]
    weights = [weight for text, weight in pieces for _ in tok(text)]
    ids, w = wrap(tokenizer, body, weights)
    got = PromptEncoder(tokens_of(tokenizer), encoder_of(model))("a (bc:1.5) [d]")[0]
    torch.testing.assert_close(got, a1111_chunk(model, ids, w), atol=1e-5, rtol=1e-5)
    plain = PromptEncoder(tokens_of(tokenizer), encoder_of(model))("a bc d")[0]
    with torch.no_grad():
        direct = model(input_ids=torch.tensor([wrap(tokenizer, tok("a bc d"), [1.0] * 6)[0]])).last_hidden_state
    torch.testing.assert_close(plain, direct, atol=1e-5, rtol=1e-5)  # weights of 1 change nothing


def test_long_prompts_chunk_at_75_and_at_a_late_comma(tower) -> None:
    model, tokenizer = tower
    tok = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    words = " ".join(["xy"] * 50)  # 100 tokens, no comma: 75 + 25
    ids = tok(words)
    got = PromptEncoder(tokens_of(tokenizer), encoder_of(model))(words)[0]
    want = torch.cat([a1111_chunk(model, *wrap(tokenizer, ids[:75], [1.0] * 75)),
                      a1111_chunk(model, *wrap(tokenizer, ids[75:], [1.0] * 25))], dim=1)  # fmt: skip
    assert got.shape == (1, 154, TINY.text.hidden_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # a comma at token 60 (within the last 20 of 75): the chunk ends after it
    text = " ".join(["xy"] * 30) + ", " + " ".join(["(zw)"] * 20)
    first, rest = tok(" ".join(["xy"] * 30) + ","), tok(" ".join(["zw"] * 20))
    assert len(first) == 61
    chunks, _ = build_chunks(parse_attention(text), tokens_of(tokenizer))
    assert [len(c.ids) for c in chunks] == [77, 77]
    assert chunks[0].ids[1:62] == first and chunks[1].ids[1:41] == rest
    got = PromptEncoder(tokens_of(tokenizer), encoder_of(model))(text)[0]
    want = torch.cat([a1111_chunk(model, *wrap(tokenizer, first, [1.0] * 61)),
                      a1111_chunk(model, *wrap(tokenizer, rest, [1.1] * 40))], dim=1)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_break_and_pad_id(tower) -> None:
    _, tokenizer = tower
    tokens = tokens_of(tokenizer)
    chunks, _ = build_chunks(parse_attention("ab BREAK cd"), tokens)
    assert len(chunks) == 2 and chunks[1].ids[1:3] == tokenizer("cd", add_special_tokens=False).input_ids
    openclip = PromptTokens(tokens.tokenize, SpecialTokens(tokens.special.start, tokens.special.end, 0, tokens.special.comma))
    (chunk,), _ = build_chunks(parse_attention("ab"), openclip)
    assert chunk.ids[:4] == [tokens.special.start, *tokens.tokenize("ab"), tokens.special.end] and set(chunk.ids[4:]) == {0}
    empty, _ = build_chunks(parse_attention(""), tokens)
    assert len(empty) == 1 and empty[0].ids == [tokens.special.start] + [tokens.special.end] * 76


def test_embeddings_take_one_position_per_vector_as_whole_words(tower) -> None:
    model, tokenizer = tower
    vectors = torch.randn(3, TINY.text.hidden_size)
    encoder = PromptEncoder(tokens_of(tokenizer), encoder_of(model), {"Sty": vectors})
    used: list[str] = []
    chunks, names = build_chunks(parse_attention("a (sty) b stylish"), encoder.tokens, encoder.embeddings)
    assert names == ["Sty"]
    (chunk,) = chunks
    offset, fixed = chunk.fixes[0]
    assert offset == 1 + len(encoder.tokens.tokenize("a ")) and fixed is vectors
    assert chunk.weights[offset : offset + 3] == [pytest.approx(1.1)] * 3
    assert len(chunk.fixes) == 1  # 'stylish' is a different word
    got = encoder("a (sty) b stylish", used)[0]
    assert used == ["Sty"]
    with torch.no_grad():  # direct: the same sequence with the vectors in the token embeddings
        ids = torch.tensor([chunk.ids])
        embeds = token_embedding(model)(ids).clone()
        embeds[0, offset : offset + 3] = vectors
        hook = token_embedding(model).register_forward_hook(lambda m, i, o: embeds)
        try:
            z = model(input_ids=ids).last_hidden_state
        finally:
            hook.remove()
    w = torch.tensor(chunk.weights)[None, :, None]
    torch.testing.assert_close(got, z * w * (z.mean() / (z * w).mean()), atol=1e-5, rtol=1e-5)


def test_subprompts_mix_after_padding_with_the_empty_prompt(tower) -> None:
    model, tokenizer = tower
    encoder = PromptEncoder(tokens_of(tokenizer), encoder_of(model))
    long_text = " ".join(["xy"] * 50)
    got = encoder(f"{long_text}:3 cd:1")[0]
    a, b, empty = (encoder.encode_text(text)[0] for text in (long_text, "cd", ""))
    torch.testing.assert_close(got, 0.75 * a + 0.25 * torch.cat([b, empty], dim=1))
    assert pad_to_chunks(b, 3, empty).shape[1] == 231
    with pytest.raises(UserError, match="sum to 0"):
        encoder("a:1 b:-1")


def test_embedding_equals_diffusers_load_textual_inversion(tmp_path, tiny_model) -> None:
    """A1111 .pt file: our splice of its vectors gives diffusers' encode_prompt after load_textual_inversion."""
    import copy
    import json
    import shutil

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from optimized_sd.weights.embeddings import EmbeddingLibrary, TowerEmbeddings

    vectors = torch.randn(3, TINY.text.hidden_size) * 0.5
    (tmp_path / "embeddings").mkdir()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "sty"}, tmp_path / "embeddings" / "sty.pt")
    # diffusers appends the new tokens at len(tokenizer): fill the byte vocabulary up to the model's size first
    folder = Path(shutil.copytree(tiny_model.tokenizer, tmp_path / "tokenizer"))
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab.update({f"<unused{i}>": i for i in range(TINY.text.vocab_size - 2) if i not in vocab.values()})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    pipe = StableDiffusionPipeline(
        unet=tiny_model.unet, vae=tiny_model.vae, text_encoder=copy.deepcopy(tiny_model.text_encoder),
        tokenizer=CLIPTokenizer.from_pretrained(str(folder)), scheduler=EulerDiscreteScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.load_textual_inversion(str(tmp_path / "embeddings" / "sty.pt"), token="sty")
    with torch.no_grad():
        want, _ = pipe.encode_prompt("a sty b", "cpu", 1, False)
    library = TowerEmbeddings(EmbeddingLibrary(tmp_path / "embeddings"), (TINY.text.hidden_size,))
    encoder = PromptEncoder(tokens_of(tokenizer), encoder_of(tiny_model.text_encoder), library)
    used: list[str] = []
    got = encoder("a sty b", used)[0]
    assert used == ["sty"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
