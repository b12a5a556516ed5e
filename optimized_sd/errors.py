"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (file, flag, value); its message is the whole story."""


class FieldError(UserError):
    """A mistake in one request field. `field` is the library's name for it (a `Job`, `GenerationRequest`
    or `InpaintOptions` field), `problem` the message without the name ("must be ..., got ..."), so each
    front end can say it in its own words: the CLI its flag, the API its AUTOMATIC1111 field, a batch
    file its line and JSON field. `context` leads the message whatever the field is called ("jobs.jsonl line 3: ")."""

    def __init__(self, field_name: str, message: str, problem: str | None = None, context: str = "") -> None:
        super().__init__(message)
        self.field = field_name
        self.problem = problem if problem is not None else message
        self.context = context

    @classmethod
    def about(cls, field_name: str, problem: str) -> FieldError:
        """The error said with the library's own name: "unet_batch must be at least 1"."""
        return cls(field_name, f"{field_name} {problem}", problem)

    def named(self, name: str) -> str:
        """The message with the field called `name`."""
        return f"{self.context}{name} {self.problem}"


class CheckpointError(UserError):
    """A checkpoint that cannot be read, is unsafe, or is not a supported Stable Diffusion model."""


class CheckpointFieldError(FieldError, CheckpointError):
    """A load field whose file does not fit the checkpoint (a VAE, EMA weights that are not there): callers
    that handle checkpoint errors still do, and the front ends name the field."""


class UnsupportedModelError(CheckpointError):
    """A recognised model family that this version does not run yet (SD 2.x, SDXL, depth, upscalers)."""


class OutOfMemoryBudget(UserError):
    """The work does not fit the memory available in any mode (the planner's budget, or out of memory
    even in the leanest mode): the benchmark records such a run as not completing, not as failing."""


class Interrupted(Exception):
    """Raised by a progress callback to stop a generation at the next step (a web request cancelled,
    Ctrl-C in a progress bar). Not a user mistake: the pipeline releases the stage and re-raises it."""
