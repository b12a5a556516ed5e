"""ControlNet units -> one side network for the sampler (`sampling.denoisers.with_side_network`).

Per model call it gives the UNet the sum of every active unit's residuals (diffusers' MultiControlNet), each unit:
  * its hint encoded once (the first call) and reused at every step;
  * active on the steps of its window, by diffusers' rule over step indices: step i of n runs the unit unless
    i / n < start or (i + 1) / n > end. The step is found from the call's timestep among the plan's step
    timesteps (the step whose interval holds it: exact for one call per step, and a second-order sampler's
    extra calls count with the step they fall in);
  * scaled by its weight and control mode (`models.controlnet.control_scales`): "balanced" (diffusers' default),
    "prompt" (AUTOMATIC1111's soft injection), "controlnet" (diffusers' guess mode: the ControlNet runs on the
    conditional half alone and the unconditional half gets no residual)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from optimized_sd.errors import UserError
from optimized_sd.models.controlnet import CONTROL_MODES, ControlNetModel, control_scales, zero_residuals_like
from optimized_sd.pipelines.control_hints import PREPROCESSORS, RESIZE_MODES, fit_image, hint_tensor, preprocess
from optimized_sd.sampling import Conditioning, ControlResiduals, SamplingPlan, SideNetwork
from optimized_sd.sampling.plan import step_timesteps


@dataclass
class ControlNetUnit:
    """One ControlNet with its control image and how it steers (AUTOMATIC1111's unit fields)."""

    model: ControlNetModel
    image: Image.Image
    weight: float = 1.0
    start: float = 0.0  # fraction of the steps before the unit starts ("Starting Control Step")
    end: float = 1.0  # fraction of the steps after which it stops ("Ending Control Step")
    mode: str = "balanced"  # CONTROL_MODES
    preprocessor: str = "none"  # PREPROCESSORS
    resize_mode: str = "crop"  # RESIZE_MODES

    def __post_init__(self) -> None:
        if self.mode not in CONTROL_MODES:
            raise UserError(f"unknown control mode {self.mode!r}; expected one of {', '.join(CONTROL_MODES)}")
        if self.preprocessor not in PREPROCESSORS:
            raise UserError(f"unknown preprocessor {self.preprocessor!r}; expected one of {', '.join(PREPROCESSORS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(f"unknown resize mode {self.resize_mode!r}; expected one of {', '.join(RESIZE_MODES)}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise UserError(f"a control window needs 0 <= start <= end <= 1, got {self.start} to {self.end}")

    @property
    def guess_mode(self) -> bool:
        """Whether the unit runs on the conditional half only (guess mode; a pooled ControlNet always does)."""
        return self.mode == "controlnet" or self.model.control_config.global_pool

    def scales(self, keep: float) -> list[float]:
        """Per-residual weights at a step (keep 0 or 1 from the window)."""
        mode = "balanced" if self.model.control_config.global_pool else self.mode  # diffusers: no logspace when pooled
        return control_scales(self.model.residual_count, mode, self.weight * keep)

    def hint(self, width: int, height: int) -> Tensor:
        """The control image fitted to the output size and preprocessed: (1, 3, height, width) in [0, 1]."""
        return hint_tensor(preprocess(fit_image(self.image, width, height, self.resize_mode), self.preprocessor))


def window_keep(step: int, steps: int, start: float, end: float) -> float:
    """diffusers' `controlnet_keep`: 1 when step `step` of `steps` lies inside [start, end], else 0."""
    return 1.0 - float(step / steps < start or (step + 1) / steps > end)


def step_index(t: float, timesteps: Sequence[float]) -> int:
    """The step whose interval holds timestep `t` (timesteps decrease over the steps): the last starting at or above t."""
    above = [i for i, start in enumerate(timesteps) if start >= t - 1e-4]
    return above[-1] if above else 0


def rows(cond: Conditioning, start: int) -> Conditioning:
    """The conditioning of rows `start:` (context and y only: what a ControlNet reads)."""
    return Conditioning(cond.context[start:], None if cond.y is None else cond.y[start:])


def control_side_network(
    units: Sequence[ControlNetUnit], plan: SamplingPlan, width: int, height: int, guided: bool, dtype: torch.dtype = torch.float32
) -> SideNetwork:
    """The side network of `units` for a sampling `plan` at width x height. `guided`: the calls carry the
    unconditional half then the conditional half (CFG), which guess mode needs to tell apart."""
    timesteps = step_timesteps(plan)
    steps = max(plan.num_steps, 1)
    hints: dict[int, Tensor] = {}

    def encoded_hint(index: int, unit: ControlNetUnit, device: torch.device) -> Tensor:
        if index not in hints:
            hints[index] = unit.model.encode_hint(unit.hint(width, height).to(device, dtype))
        return hints[index]

    def residuals(x: Tensor, t: Tensor, cond: Conditioning) -> ControlResiduals | None:
        step = step_index(float(t[0]), timesteps)
        total: ControlResiduals | None = None
        for index, unit in enumerate(units):
            keep = window_keep(step, steps, unit.start, unit.end)
            if not keep:
                continue  # a unit outside its window adds zeros: skip it
            half = x.shape[0] // 2 if guided and unit.guess_mode else 0
            unit_cond = rows(cond, half)
            hint = encoded_hint(index, unit, x.device)
            out = unit.model(x[half:].to(dtype), hint, t[half:], unit_cond.context.to(dtype), y=unit_cond.y, scales=unit.scales(keep))
            if half:
                out = zero_residuals_like(out).cat(out)
            total = out if total is None else total.plus(out)
        return total

    return residuals
