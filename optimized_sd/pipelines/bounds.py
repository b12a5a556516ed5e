"""The accepted range of every numeric request field, in one table: the CLI, the web UI, the API and the
batch driver check their numbers here (through `Job.validate`), and each names a mistake by its own word for
the field (its mapping table: `cli.CLI_FLAGS`, `server.fields.API_FIELDS`, `batch.jobs.BATCH_KEYS`).

Ranges are generous but finite: a NaN or an inf, or a huge value, reaches code that was never meant to
see it (Pillow's GaussianBlur crashes the process at a radius of about 3e9; a guidance scale of 1e308
overflows to a black image; n_samples x n_iter of 10^16 plans images until memory runs out)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from optimized_sd.errors import FieldError, UserError

MAX_STEPS = 1000  # the training schedules' timesteps; `sampling.make_plan` checks the model's own count
MAX_SCALE = 1000.0  # |cfg scale|; AUTOMATIC1111's UI stops at 30
MAX_MASK_BLUR = 10_000.0  # pixels; `masks.blur_mask` also clamps it to the image's diagonal
MAX_PADDING = 10_000  # pixels around the mask's box ("only masked")
MAX_OUTPAINT = 2048  # pixels added on one side of the canvas
MAX_SAMPLES = 64  # images per batch (the UNet's batch)
MAX_ITERATIONS = 10_000  # batches
MAX_GUIDANCE = 100.0  # Flux.1 dev's distilled guidance; Forge's slider stops at 30
MAX_SEQUENCE_LENGTH = 512  # T5 positions Flux.1 was trained with
MAX_IMAGES_PER_JOB = 10_000  # n_samples x n_iter: one job, or one line of a batch file
MAX_CFG_NORMALIZATION = 100.0  # Z-Image: times the positive's norm (0: off)
MAX_HR_SCALE = 8.0  # hires fix; the second pass' size is also checked against the side limit (`hires.HiresFix.target`)


@dataclass(frozen=True)
class Bound:
    """An inclusive range. `capped`: the upper end is this project's
    safety limit, not the quantity's nature (said as "at least 1 (at most N)" rather than "from 0 to 1")."""

    low: float
    high: float
    whole: bool = False
    capped: bool = True

    def words(self) -> str:
        if not self.capped:
            return f"from {self.low:g} to {self.high:g}"
        low = "0 or more" if self.low == 0 else f"at least {self.low:g}"
        return f"{low} (at most {self.high:g})"


# field (as `Job`, `GenerationRequest` and `InpaintOptions` name it) -> its range
NUMBER_BOUNDS: dict[str, Bound] = {
    "steps": Bound(1, MAX_STEPS, whole=True),
    "scale": Bound(-MAX_SCALE, MAX_SCALE, capped=False),
    "eta": Bound(0.0, 1.0, capped=False),
    "strength": Bound(0.0, 1.0, capped=False),
    "n_samples": Bound(1, MAX_SAMPLES, whole=True),
    "n_iter": Bound(1, MAX_ITERATIONS, whole=True),
    "mask_blur": Bound(0.0, MAX_MASK_BLUR),
    "padding": Bound(0, MAX_PADDING, whole=True),
    "outpaint": Bound(0, MAX_OUTPAINT, whole=True),  # each of the four sides
    "hr_scale": Bound(1.0, MAX_HR_SCALE),
    "hr_steps": Bound(0, MAX_STEPS, whole=True),  # 0: the first pass' steps
    "hr_strength": Bound(0.0, 1.0, capped=False),
    "guidance": Bound(0.0, MAX_GUIDANCE),  # a guidance-distilled model's value (Flux.1 dev)
    "max_sequence_length": Bound(1, MAX_SEQUENCE_LENGTH, whole=True, capped=False),  # T5 tokens (Flux.1)
    "cfg_normalization": Bound(0.0, MAX_CFG_NORMALIZATION),  # Z-Image's cap on the guided norm (0: off)
    "cfg_truncation": Bound(0.0, 1.0, capped=False),  # Z-Image: the share of the run with a negative pass
}


def check_number(field: str, value: object) -> None:
    """`value` within NUMBER_BOUNDS[field]; FieldError naming the field otherwise."""
    bound = NUMBER_BOUNDS[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problem = f"must be {'a whole number' if bound.whole else 'a number'}, not {value!r}"
    elif bound.whole and not isinstance(value, int):
        problem = f"must be a whole number, not {value!r}"
    elif isinstance(value, float) and not math.isfinite(value):
        problem = f"must be a finite number, not {value}"
    elif not bound.low <= value <= bound.high:
        problem = f"must be {bound.words()}, got {shown(value)}"
    else:
        return
    raise FieldError.about(field, problem)


def shown(value: float) -> str:
    """A number as a message quotes it (an integer of hundreds of digits by its size)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return f"{value}"


def check_numbers(**values: object) -> None:
    """Each keyword (a field of NUMBER_BOUNDS) within its range; the first one out of it is the error. None
    is not checked: the field takes the model family's default."""
    for field, value in values.items():
        if value is not None:
            check_number(field, value)


def check_image_count(n_samples: int, n_iter: int) -> None:
    """One job (one batch-file line) makes at most MAX_IMAGES_PER_JOB images."""
    if n_samples * n_iter > MAX_IMAGES_PER_JOB:
        raise UserError(
            f"n_samples x n_iter = {n_samples} x {n_iter} = {n_samples * n_iter} images, over the limit of {MAX_IMAGES_PER_JOB} per job"
        )
