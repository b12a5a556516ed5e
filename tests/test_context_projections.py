"""The sampling stage keeps each cross-attention's keys and values of the text context (`ContextProjections`, on
the CPU): the same latents as computing them at every step, bit for bit, also where the UNet runs the CFG
batch in slices (two contexts), and each projection runs once per distinct context instead of once per step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import optimized_sd
from optimized_sd.models.runtime import ContextProjections
from optimized_sd.pipelines import memory_session
from optimized_sd.pipelines.diffusion import GenerationRequest


def counting_projection(calls: list[int]):
    def project(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return context * 2, context * 3

    return project


def test_a_context_of_the_same_values_reuses_its_projections():
    cache, calls, owner = ContextProjections(), [], object()
    context = torch.randn(2, 77, 8)
    first = cache.get(owner, context, counting_projection(calls))
    again = cache.get(owner, context.clone(), counting_projection(calls))  # another tensor, the same values
    assert len(calls) == 1 and again[0] is first[0]
    cache.get(owner, context + 1, counting_projection(calls))
    cache.get(object(), context, counting_projection(calls))  # another layer computes its own
    assert len(calls) == 3
    assert torch.equal(cache.get(owner, context + 1, counting_projection(calls))[1], (context + 1) * 3) and len(calls) == 3
    context.add_(5)  # a caller's tensor changed in place is a new context, not the one it was
    assert torch.equal(cache.get(owner, context, counting_projection(calls))[0], context * 2) and len(calls) == 4


def test_only_the_latest_contexts_are_kept():
    cache, calls, owner = ContextProjections(), [], object()
    contexts = [torch.full((1, 4), float(i)) for i in range(ContextProjections.MAX_CONTEXTS + 1)]
    for context in contexts:
        cache.get(owner, context, counting_projection(calls))
    cache.get(owner, contexts[-1], counting_projection(calls))
    assert len(calls) == len(contexts)
    cache.get(owner, contexts[0], counting_projection(calls))  # the oldest was dropped: computed again
    assert len(calls) == len(contexts) + 1


def key_projection_calls(pipe) -> list[int]:
    """A counter of the calls of every cross-attention's key projection."""
    calls: list[int] = []
    for module in pipe.model.modules():
        if getattr(module, "projects_context", False):
            module.to_k.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("mode", ["full", "stream"])
@pytest.mark.parametrize("micro_batch", [None, 1])
def test_kept_projections_give_the_same_latents_bit_for_bit(tiny_model, monkeypatch, mode, micro_batch):
    def generate() -> tuple[torch.Tensor, int]:
        pipe = optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory=mode, precision="full")
        planned = pipe.memory.plan_for
        monkeypatch.setattr(pipe.memory, "plan_for", lambda request: dataclasses.replace(planned(request), unet_batch=micro_batch))
        calls = key_projection_calls(pipe)
        request = GenerationRequest(prompts=["a red cube"], steps=4, sampler="euler", seed=3, height=64, width=64)
        return pipe.generate(request).latents, len(calls)

    kept, kept_calls = generate()
    monkeypatch.setattr(memory_session, "ContextProjections", lambda: None)
    computed, computed_calls = generate()
    assert torch.equal(kept, computed)
    contexts = 2 if micro_batch else 1  # the CFG batch whole, or its unconditional and conditional halves apart
    layers = computed_calls // (4 * contexts)
    assert layers > 0 and kept_calls == contexts * layers
