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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from optimized_sd.errors import FieldError, UserError
from optimized_sd.memory.modes import MemoryMode, mode_row
from optimized_sd.memory.offload import GroupSpec
from optimized_sd.memory.planner import ComponentSize, SideActivations
from optimized_sd.models.controlnet import CONTROL_MODES, ControlNetModel, control_scales, zero_residuals_like
from optimized_sd.pipelines import placement
from optimized_sd.pipelines.control_hints import CANNY_HIGH, CANNY_LOW, PREPROCESSORS, RESIZE_MODES, fit_image, hint_tensor, preprocess
from optimized_sd.pipelines.placement import Component, parameter_bytes, split_unit
from optimized_sd.sampling import Conditioning, ControlResiduals, SamplingPlan, SideNetwork
from optimized_sd.sampling.plan import step_timesteps
from optimized_sd.weights.controlnet import OpenedControlNet, build_controlnet


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
    threshold_a: float = CANNY_LOW  # the preprocessor's thresholds (canny: low, high)
    threshold_b: float = CANNY_HIGH

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
        fitted = fit_image(self.image, width, height, self.resize_mode)
        return hint_tensor(preprocess(fitted, self.preprocessor, self.threshold_a, self.threshold_b))

    def last_step(self, steps: int) -> int | None:
        """The last step of `steps` the window runs (None: none, or the unit runs to the end)."""
        active = [i for i in range(steps) if window_keep(i, steps, self.start, self.end)]
        return active[-1] if active and active[-1] < steps - 1 else None


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
    units: Sequence[ControlNetUnit],
    plan: SamplingPlan,
    width: int,
    height: int,
    guided: bool,
    dtype: torch.dtype = torch.float32,
    *,
    hints: Sequence[Tensor] | None = None,
    window_ended: Callable[[int, int], None] | None = None,
) -> SideNetwork:
    """The side network of `units` for a sampling `plan` at width x height. `guided`: the calls carry the
    unconditional half then the conditional half (CFG), which guess mode needs to tell apart. `hints`: each
    unit's encoded hint, computed before (else encoded at the first call). `window_ended(unit, step)` is told at
    every call after a unit's last step `step` that the unit will not run again in this sampling."""
    timesteps = step_timesteps(plan)
    steps = max(plan.num_steps, 1)
    hints = dict(enumerate(hints)) if hints is not None else {}
    last_steps = [unit.last_step(steps) for unit in units]

    def encoded_hint(index: int, unit: ControlNetUnit, device: torch.device) -> Tensor:
        if index not in hints:
            hints[index] = unit.model.encode_hint(unit.hint(width, height).to(device, dtype))
        return hints[index]

    def residuals(x: Tensor, t: Tensor, cond: Conditioning) -> ControlResiduals | None:
        step = step_index(float(t[0]), timesteps)
        total: ControlResiduals | None = None
        for index, unit in enumerate(units):
            last = last_steps[index]
            if window_ended is not None and last is not None and step > last:
                window_ended(index, last)
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


# -- units from plain values: what every front end builds ----------------------------------------------

CONTROL_FIELD = "controlnets"  # the request field every check below names
MAX_CONTROL_WEIGHT = 10.0  # |weight| above this is a typo, not a setting (AUTOMATIC1111's slider stops at 2)
MODE_NAMES = {"balanced": "Balanced", "prompt": "My prompt is more important", "controlnet": "ControlNet is more important"}
RESIZE_NAMES = {"crop": "Crop and Resize", "resize": "Just Resize", "fill": "Resize and Fill"}


@dataclass(frozen=True)
class ControlNetSpec:
    """One ControlNet unit as plain values (a file, a control image as a path or a PIL image, and how it
    steers): what the CLI, the API and the batch file build; `check` validates it without loading anything."""

    file: Path
    image: Path | Image.Image
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    resize: str = "crop"
    preprocessor: str = "none"
    threshold_a: float = CANNY_LOW
    threshold_b: float = CANNY_HIGH

    def check(self, index: int) -> None:
        """A FieldError naming `controlnets` and the unit's position for any value no ControlNet could run with."""
        problem = self.number_problem() or self.name_problem()
        if problem is None and not Path(self.file).exists():
            problem = f"{self.file}: no such ControlNet file or folder"
        if problem is None and not isinstance(self.image, Image.Image) and not Path(self.image).is_file():
            problem = f"{self.image}: no such control image"
        if problem is not None:
            raise FieldError.about(CONTROL_FIELD, f"{index}: {problem}")

    def number_problem(self) -> str | None:
        """What is wrong with the weight, the window or the thresholds (None: nothing)."""
        for name in ("weight", "start", "end", "threshold_a", "threshold_b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{name} {value!r} is not a finite number"
        if abs(self.weight) > MAX_CONTROL_WEIGHT:
            return f"weight {self.weight:g} is outside [-{MAX_CONTROL_WEIGHT:g}, {MAX_CONTROL_WEIGHT:g}]"
        for name in ("start", "end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                return f"{name} {getattr(self, name):g} is outside [0, 1] (a fraction of the steps)"
        if self.start > self.end:
            return f"start {self.start:g} is after end {self.end:g}"
        if self.threshold_a > self.threshold_b:
            return f"threshold_a {self.threshold_a:g} is above threshold_b {self.threshold_b:g}"
        return None

    def name_problem(self) -> str | None:
        """An unknown mode, resize mode or preprocessor (None: all known)."""
        for name, value, known in (("mode", self.mode, CONTROL_MODES), ("resize", self.resize, RESIZE_MODES),
                                   ("preprocessor", self.preprocessor, PREPROCESSORS)):  # fmt: skip
            if value not in known:
                return f"{name} {value!r} is unknown; expected one of {', '.join(known)}"
        return None

    def unit(self, model: ControlNetModel, image: Image.Image) -> ControlNetUnit:
        return ControlNetUnit(
            model, image, self.weight, self.start, self.end, self.mode, self.preprocessor, self.resize, self.threshold_a, self.threshold_b
        )

    def metadata(self, name: str, short_hash: str) -> str:
        """sd-webui-controlnet's line for this unit (written as `ControlNet N: "..."`)."""
        return (
            f"Module: {self.preprocessor}, Model: {name} [{short_hash}], Weight: {self.weight:g}, "
            f"Resize Mode: {RESIZE_NAMES[self.resize]}, Guidance Start: {self.start:g}, Guidance End: {self.end:g}, "
            f"Control Mode: {MODE_NAMES[self.mode]}"
        )


def parse_controlnet(text: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:WEIGHT' (the weight after the last ':' when it reads as a number)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def per_unit(name: str, values: Sequence, count: int) -> list:
    """A setting given once for every unit, or once per unit in order (nothing given: the default, `values` empty)."""
    if len(values) in (1, count):
        return list(values) * (count if len(values) == 1 else 1)
    problem = f"got {len(values)} values of {name} for {count} ControlNet(s); give one for all, or one per unit"
    raise FieldError.about(CONTROL_FIELD, problem)


def control_specs(
    controlnets: Sequence[str | Path], images: Sequence[str | Path | Image.Image], **settings: Sequence
) -> tuple[ControlNetSpec, ...]:
    """Units from plain values, paired in order: `controlnets` as 'FILE[:WEIGHT]', `images` one per ControlNet,
    and any ControlNetSpec field in `settings` as a sequence of one value (for all) or one per unit."""
    if len(controlnets) != len(images):
        problem = f"got {len(controlnets)} ControlNet(s) and {len(images)} control image(s); give one image per ControlNet, in order"
        raise FieldError.about(CONTROL_FIELD, problem)
    parsed = [parse_controlnet(str(text)) for text in controlnets]
    specs = [ControlNetSpec(file, image, weight) for (file, weight), image in zip(parsed, images)]
    for name, values in settings.items():
        if values:
            specs = [replace(spec, **{name: value}) for spec, value in zip(specs, per_unit(name, values, len(specs)))]
    return tuple(specs)


def check_controlnets(specs: Sequence[ControlNetSpec]) -> None:
    for index, spec in enumerate(specs):
        spec.check(index)


# -- the ControlNet as a memory component ----------------------------------------------------------------

def controlnet_name(index: int) -> str:
    """The memory component of the request's unit `index`."""
    return f"controlnet.{index}"


CONTROLNET_ACTIVATIONS = 0.45  # a ControlNet's activations beside its UNet's: the encoder half, ~40-50% of the work


def controlnet_groups(row: MemoryMode, model: ControlNetModel, unit_params: int | None = None) -> list[GroupSpec]:
    """A ControlNet's offload groups for a mode's row, as its UNet's: resident with everything (`full`), the
    whole network with the UNet during sampling (`turbo`, `split`), or (`stream`) each input block with its zero
    conv, then the middle block with its output, one at a time, a block above `unit_params` parameters split into
    its parts as the UNet's are (`placement.split_unit`), its zero conv with the last part. The hint encoder runs
    alone, once per call."""
    blocks = [name for name in model.block_names() if name not in ("input_hint_block", "zero_convs", "middle_block_out")]
    if row.resident == "everything":
        return [GroupSpec("controlnet", ("input_hint_block", *blocks, "zero_convs", "middle_block_out"), "never")]
    hint = GroupSpec("hint", ("input_hint_block",), "stage_end")
    if row.denoiser != "blocks":
        return [hint, GroupSpec("controlnet", (*blocks, "zero_convs", "middle_block_out"), "stage_end")]
    limit = placement.STREAM_UNIT_PARAMS if unit_params is None else unit_params
    embed = [name for name in blocks if not name.startswith(("input_blocks.", "middle_block"))]
    units = [tuple(embed)]
    outputs = [(f"input_blocks.{i}", f"zero_convs.{i}") for i in range(len(model.zero_convs))] + [("middle_block", "middle_block_out")]
    for block, output in outputs:
        *parts, last = split_unit(model, block, limit)
        units += [*parts, (*last, output)]
    names = [unit[0] for unit in units]
    release = row.denoiser_release
    return [hint] + [
        GroupSpec(name, unit, release, prefetch_next=names[(i + 1) % len(names)]) for i, (name, unit) in enumerate(zip(names, units))
    ]


def controlnet_component(name: str, model: ControlNetModel, source, dtype_bytes: int) -> Component:
    """A ControlNet (built on meta, its tensors in `source`) as a component of the memory session."""
    streamed = controlnet_groups(mode_row("stream"), model)
    unit_bytes = [parameter_bytes(model, list(group.modules), dtype_bytes) for group in streamed]
    return Component(
        name,
        model,
        source,
        lambda row: controlnet_groups(row, model),
        {  # a side network beside the denoiser: its weights whole, its streamed units, its share of the UNet's activations
            "side": ComponentSize(
                "side", parameter_bytes(model, model.block_names(), dtype_bytes), ("denoise",), tuple(unit_bytes),
                activations=SideActivations(CONTROLNET_ACTIVATIONS),
            )
        },
    )


@dataclass
class LoadedControlNet:
    """A request unit's ControlNet as the pipeline keeps it between calls: built on meta, its weights placed by
    the memory session as the component `controlnet_name(index)`."""

    path: Path
    model: ControlNetModel
    opened: OpenedControlNet
    _hash: str | None = None

    @classmethod
    def open(cls, path: Path, index: int, base_family: str) -> LoadedControlNet:
        """Build the ControlNet at `path` for a base of `base_family`; a file of another family, or no ControlNet
        at all, is a FieldError naming `controlnets`, the unit and the file."""
        try:
            model, opened = build_controlnet(path, base_family)
        except UserError as error:
            raise FieldError.about(CONTROL_FIELD, f"{index}: {path}: {error}") from None
        return cls(path, model, opened)

    def short_hash(self) -> str:
        """AUTOMATIC1111's short hash of the file (of its weight file for a diffusers folder)."""
        if self._hash is None:
            from optimized_sd.weights.diffusers_folder import find_weight_file
            from optimized_sd.weights.hashing import cached_model_hash

            self._hash = cached_model_hash(find_weight_file(self.path) if self.path.is_dir() else self.path)
        return self._hash


def control_image(spec: ControlNetSpec, index: int, max_pixels: int | None = None) -> Image.Image:
    """The unit's control image as RGB (a path is opened; any bad file is one FieldError naming the unit)."""
    if isinstance(spec.image, Image.Image):
        return spec.image.convert("RGB")
    from optimized_sd.pipelines.images import open_image

    try:
        return open_image(spec.image, max_pixels)
    except UserError as error:
        raise FieldError.about(CONTROL_FIELD, f"{index}: control image: {error}") from None
