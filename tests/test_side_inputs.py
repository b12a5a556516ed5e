"""Side inputs in the model call: control residuals added to the UNet's skips and middle block (against
diffusers' additional residuals), routed per half through CFG, computed per call by a side-network hook,
and the same in the streamed memory mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import optimized_sd
from optimized_sd.pipelines import core
from optimized_sd.pipelines.diffusion import GenerationRequest
from optimized_sd.pipelines.txt2img import Txt2Img
from optimized_sd.sampling import Conditioning, ControlResiduals, classifier_free_guidance
from optimized_sd.weights.loading import materialize, prepare_model

LATENT = (2, 4, 16, 24)


@pytest.fixture(scope="module")
def unet(tiny_model):
    loaded = prepare_model(tiny_model.safetensors)
    materialize(loaded.model, "", loaded.source, torch.device("cpu"), torch.float32)
    return loaded.model.eval().model.diffusion_model


def residual_shapes(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple[list[torch.Size], torch.Size]:
    """The (C, h, w) of each input block's output and of the middle block's, for inputs like these."""
    shapes: list[torch.Size] = []
    handles = [block.register_forward_hook(lambda m, a, out: shapes.append(out.shape[1:])) for block in unet.input_blocks]
    handles.append(unet.middle_block.register_forward_hook(lambda m, a, out: shapes.append(out.shape[1:])))
    try:
        unet(x, t, context)
    finally:
        for handle in handles:
            handle.remove()
    return shapes[:-1], shapes[-1]


def random_residuals(down_shapes, middle_shape, batch: int, seed: int, scale: float = 0.5) -> ControlResiduals:
    g = torch.Generator().manual_seed(seed)
    down = tuple(scale * torch.randn(batch, *shape, generator=g) for shape in down_shapes)
    return ControlResiduals(down, scale * torch.randn(batch, *middle_shape, generator=g))


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.randn(LATENT), torch.tensor([999.0, 37.0]), torch.randn(2, 77, 64)


@torch.inference_mode()
def test_zero_residuals_change_nothing(unet):
    x, t, context = inputs()
    zeros = random_residuals(*residual_shapes(unet, x, t, context), batch=2, seed=0, scale=0.0)
    plain = unet(x, t, context)
    assert torch.equal(unet(x, t, context, down_residuals=zeros.down, middle_residual=zeros.middle), plain)


@torch.inference_mode()
def test_residuals_match_diffusers_additional_residuals(unet, tiny_model):
    x, t, context = inputs(2)
    control = random_residuals(*residual_shapes(unet, x, t, context), batch=2, seed=3)
    expected = tiny_model.unet(
        x, t, encoder_hidden_states=context,
        down_block_additional_residuals=control.down, mid_block_additional_residual=control.middle,
    ).sample  # fmt: skip
    got = unet(x, t, context, down_residuals=control.down, middle_residual=control.middle)
    assert (got - unet(x, t, context)).abs().max() > 0.05  # the residuals are felt
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
    with pytest.raises(ValueError, match="down residuals"):
        unet(x, t, context, down_residuals=control.down[:-1], middle_residual=control.middle)


# -- through CFG --------------------------------------------------------------------------------------


def residual_model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """A stub model whose output shows, per row, the control and guidance it was given."""
    out = x + cond.context.mean((1, 2)).view(-1, 1, 1, 1)
    if cond.control is not None:
        out = out + cond.control.middle.mean((1, 2, 3)).view(-1, 1, 1, 1) + 10 * cond.control.down[0]
    if cond.guidance is not None:
        out = out + 100 * cond.guidance.view(-1, 1, 1, 1)
    return out


def stub_side_network(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> ControlResiduals:
    """Residuals from the call's own inputs: row i's depend on x[i], t[i] and cond row i's context."""
    per_row = cond.context.mean((1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000
    return ControlResiduals((torch.tanh(x) * per_row,), per_row.expand(-1, 3, 2, 2) * 2)


def test_cfg_routes_static_side_inputs_per_half():
    g = torch.Generator().manual_seed(0)
    half = lambda seed: (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 2, 2, generator=g))  # noqa: E731
    (down_c, mid_c), (down_u, mid_u) = half(0), half(1)
    cond = Conditioning(torch.randn(2, 7, 5, generator=g), control=ControlResiduals((down_c,), mid_c), guidance=torch.tensor([3.5, 4.0]))
    uncond = Conditioning(torch.randn(2, 7, 5, generator=g), control=ControlResiduals((down_u,), mid_u), guidance=torch.tensor([0.0, 0.0]))
    x, t, scale = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]), 6.0
    guided = classifier_free_guidance(residual_model, cond, uncond, scale)(x, t)
    out_u, out_c = residual_model(x, t, uncond), residual_model(x, t, cond)
    assert torch.allclose(guided, out_u + scale * (out_c - out_u), atol=1e-4)
    with pytest.raises(ValueError, match="control residuals"):
        cond.cat(Conditioning(uncond.context))


def test_cfg_computes_side_inputs_per_call_per_half():
    g = torch.Generator().manual_seed(1)
    cond, uncond = Conditioning(torch.randn(2, 7, 5, generator=g)), Conditioning(torch.randn(2, 7, 5, generator=g))
    x, t, scale = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 20.0]), 5.0
    seen = []

    def side(x_in, t_in, c):
        seen.append(x_in.shape[0])
        return stub_side_network(x_in, t_in, c)

    guided = classifier_free_guidance(residual_model, cond, uncond, scale, side_network=side)(x, t)
    assert seen == [4]  # once per call, on the batched halves

    def with_side(c):  # each half with its own residuals
        return c.with_control(stub_side_network(x, t, c))

    out_u, out_c = residual_model(x, t, with_side(uncond)), residual_model(x, t, with_side(cond))
    assert torch.allclose(guided, out_u + scale * (out_c - out_u), atol=1e-4)
    assert not torch.allclose(guided, classifier_free_guidance(residual_model, cond, uncond, scale)(x, t), atol=1e-2)
    unguided = classifier_free_guidance(residual_model, cond, None, scale, side_network=stub_side_network)(x, t)
    assert torch.equal(unguided, residual_model(x, t, with_side(cond)))


def test_with_control_adds_to_carried_residuals():
    one = ControlResiduals((torch.ones(1, 2, 2, 2),), torch.ones(1, 3, 1, 1))
    cond = Conditioning(torch.zeros(1, 4, 5), control=one).with_control(one)
    assert torch.equal(cond.control.middle, 2 * one.middle) and torch.equal(cond.control.down[0], 2 * one.down[0])
    assert cond.repeat(3).control.down[0].shape == (3, 2, 2, 2)
    with pytest.raises(ValueError, match="control"):
        Conditioning(torch.zeros(2, 4, 5), control=one)


# -- through the pipeline, streamed -------------------------------------------------------------------


class ControlledTxt2Img(Txt2Img):
    """txt2img with a stub side network shaped for the UNet's skips (a ControlNet's place)."""

    def __init__(self, down_shapes, middle_shape) -> None:
        self.down_shapes, self.middle_shape = down_shapes, middle_shape

    def side_network(self, pipe, request, plan):
        def residuals(x, t, cond):
            signal = torch.tanh(x.float().mean(1, keepdim=True)) * (1 + cond.context.float().mean((1, 2)).view(-1, 1, 1, 1))
            down = tuple(0.3 * F.interpolate(signal, size=shape[1:]).expand(-1, shape[0], -1, -1) for shape in self.down_shapes)
            return ControlResiduals(down, 0.3 * F.interpolate(signal, size=self.middle_shape[1:]).expand(-1, self.middle_shape[0], -1, -1))

        return residuals


def test_stream_mode_with_a_side_network_matches_full(tiny_model):
    pipes = {
        mode: optimized_sd.load(tiny_model.safetensors, tokenizer=tiny_model.tokenizer, device="cpu", memory=mode)
        for mode in ("full", "stream")
    }
    request = GenerationRequest(prompts=["a cube", "a ball"], steps=3, sampler="euler", seed=5, height=64, width=64)
    plain = pipes["full"].generate(request).latents  # places the weights of `full` for good
    with torch.inference_mode():
        unet = pipes["full"].model.model.diffusion_model
        shapes = residual_shapes(unet, torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 77, 64))
    task = ControlledTxt2Img(*shapes)
    reference = core.run_task(pipes["full"], task, request).latents
    streamed = core.run_task(pipes["stream"], task, request).latents
    assert (reference - plain).abs().max() > 1e-3  # the side network is felt
    assert (streamed - reference).abs().max().item() <= 1e-5 * max(1.0, reference.abs().max().item())
