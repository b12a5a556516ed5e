"""The memory session's named components: the model's denoiser, VAE and text towers on its one tree (one engine,
the footprint their sum), and a whole second model (a refiner) attached as an ordinary component whose own session
plans it and reports into the same meter."""

from __future__ import annotations

import optimized_sd
from optimized_sd.memory.modes import mode_row
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.placement import DENOISER, TEXT, VAE, combined_sizes, group_specs


def make_pipe(tiny_model, memory: str):
    return optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", precision="full", memory=memory)


def test_the_model_is_three_components_on_one_tree(tiny_model):
    pipe = make_pipe(tiny_model, "split")
    session = pipe.memory
    components = session.components
    assert list(components) == [DENOISER, VAE, TEXT] and session.parts() == list(components.values()) and session.sides() == []
    sizes = combined_sizes(components.values())
    assert sizes == {name: getattr(session.sizes, name) for name in sizes}  # the planner's footprint is their sum
    assert set(components[TEXT].sizes) == {"text_encoder"} and set(components[VAE].sizes) == {"vae_encoder", "vae_decoder"}
    plan = pipe.prepare(GenerationRequest(prompts=["a cube"], steps=1, height=64, width=64))
    groups = {name: [spec.name for spec in c.specs(plan.row)] for name, c in components.items()}
    assert groups[DENOISER] == ["unet_half_1", "unet_half_2"] and groups[VAE] == ["vae_encoder", "vae_decoder"]
    assert list(pipe.engine.groups) == [group for names in groups.values() for group in names]  # one engine places them all
    assert all(c.engine is pipe.engine for c in components.values())
    pipe.close()
    assert all(c.engine is None for c in components.values())


def test_everything_resident_is_one_group_of_the_tree(tiny_model):
    pipe = make_pipe(tiny_model, "full")
    row = mode_row("full")
    each = [c.specs(row) for c in pipe.memory.components.values()]
    assert [[(s.name, s.release) for s in specs] for specs in each] == [[(DENOISER, "never")], [(VAE, "never")], [(TEXT, "never")]]
    [whole] = group_specs(row, pipe.model)
    assert whole.name == "all" and whole.modules == tuple(s.modules[0] for specs in each for s in specs)
    pipe.close()


def test_a_second_model_is_an_ordinary_component_with_its_own_session(tiny_model):
    base, other = make_pipe(tiny_model, "full"), make_pipe(tiny_model, "split")
    base.memory.attach(other.memory.as_component("second"))
    assert base.memory.sessions == {"second": other.memory} and other.memory.parent is base.memory
    assert other.memory.meter is base.meter and base.memory.sides() == []  # planned by its own session, not the base's plan
    assert base.memory.neighbours() == [other.memory] and other.memory.neighbours() == [base.memory]
    request = GenerationRequest(prompts=["a cube"], steps=1, height=64, width=64)
    base.generate(request)
    other.prepare(request)
    assert other.mode == "split" and base.mode == "full"  # each by its own plan
    base.memory.detach("second")
    assert base.memory.sessions == {} and other.memory.parent is None and other.engine is not None  # its owner closes it
    other.close()
    base.close()
