"""AUTOMATIC1111 emphasis on Flux's T5 states, as Forge's T5 engine weights them: a plain prompt keeps diffusers'
states exactly; `(word:1.5)` multiplies that word's states by 1.5 and the prompt's mean is restored, checked by hand
on the tiny T5; CLIP-L reads the prompt without its markup."""

from __future__ import annotations

import pytest
import torch

from optimized_sd.pipelines.diffusion import GenerationRequest
from tests.test_flux_pipeline import SIZE, T5_LENGTH, TinyFlux, build

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> TinyFlux:
    return build(tmp_path_factory.mktemp("flux_emphasis") / "dev", "dev")


def conditioning(pipe, prompt: str, negative: str | None = None):
    """The (positive, negative) conditioning a one-step run of `prompt` computes."""
    captured = []
    original = pipe.text_conditioning

    def spy(*args):
        captured.append(original(*args))
        return captured[-1]

    pipe.text_conditioning = spy
    extra = {} if negative is None else dict(negative_prompt=negative, scale=2.0)
    request = GenerationRequest(prompts=[prompt], seed=1, height=SIZE[0], width=SIZE[1], steps=1, max_sequence_length=T5_LENGTH, **extra)
    pipe.generate(request)
    return captured[0][:2]


def t5_states(model: TinyFlux, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.t5(torch.tensor([ids])).last_hidden_state[0]  # (tokens, C)


def hand_ids(model: TinyFlux, words: list[str]) -> list[int]:
    """SentencePiece pieces by hand: each word as its own piece, then </s> and padding to T5_LENGTH."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(str(model.t5_tokenizer))
    ids = tokenizer.convert_tokens_to_ids([f"\u2581{word}" for word in words]) + [tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (T5_LENGTH - len(ids))


def test_plain_prompt_keeps_todays_states(dev):
    pipe = dev.load()
    cond, uncond = conditioning(pipe, "a cat on the dog", negative="the red dog")
    for states, words in ((cond.context[0], ["a", "cat", "on", "the", "dog"]), (uncond.context[0], ["the", "red", "dog"])):
        ids = torch.tensor([hand_ids(dev, words)])
        assert torch.equal(states, pipe.model.text_encoders.t5xxl(ids)[0])  # the plain path: the tower's output itself
        assert torch.allclose(states, t5_states(dev, ids[0].tolist()), atol=1e-6)


def test_emphasis_weights_the_word_and_restores_the_mean(dev):
    pipe = dev.load()
    plain, _ = conditioning(pipe, "a cat on the dog")
    emphasised, _ = conditioning(pipe, "a (cat:1.5) on the dog")
    z = t5_states(dev, hand_ids(dev, ["a", "cat", "on", "the", "dog"]))
    weights = torch.ones(T5_LENGTH, 1)
    weights[1] = 1.5  # "cat": the second piece
    weighted = z * weights
    expected = weighted * (z.mean() / weighted.mean())
    assert torch.allclose(emphasised.context[0], expected, atol=1e-6), (emphasised.context[0] - expected).abs().max()
    # only what it should: every state scaled by the mean's ratio, "cat"'s by 1.5 more
    ratio = emphasised.context[0] / plain.context[0]
    others = torch.cat([ratio[:1], ratio[2:]])
    assert torch.allclose(others, others.flatten()[0].expand_as(others), rtol=1e-5)
    assert torch.allclose(ratio[1], others.flatten()[0] * 1.5, rtol=1e-5)
    assert not torch.allclose(ratio[1], others.flatten()[0].expand_as(ratio[1]))
    # CLIP-L reads "a cat on the dog": its pooled vector is the plain prompt's
    assert torch.equal(emphasised.y, plain.y)


def test_emphasis_segments_tokenized_apart_and_cut_to_length(dev):
    """`[x]` divides by 1.1; a prompt longer than the sequence keeps its end token last."""
    pipe = dev.load()
    pipe.t5_tokenizer.max_length = 4
    sequence = pipe.t5_sequence("[the red] cat on a dog")
    assert sequence.ids == hand_ids(dev, ["the", "red", "cat"])[:3] + [1]
    assert sequence.weights == pytest.approx([1 / 1.1, 1 / 1.1, 1.0, 1.0])
