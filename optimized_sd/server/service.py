"""What the UI and the API share: the backend (the model) behind the job queue, and the limits."""

from __future__ import annotations

from dataclasses import dataclass

from optimized_sd.server.backend import Backend, Generated, GenerationSpec, check_spec
from optimized_sd.server.catalog import ModelEntry
from optimized_sd.server.jobs import Job, JobQueue

MIB = 2**20


@dataclass(frozen=True)
class Limits:
    """Request limits; over them a request is refused with 413 before any work."""

    max_request_bytes: int = 64 * MIB  # a whole HTTP body (base64 images included)
    max_image_pixels: int = 4096 * 4096  # one decoded image (width * height)


class Service:
    """Every device operation goes through `queue`, one at a time, in arrival order."""

    def __init__(self, backend: Backend, queue: JobQueue | None = None, limits: Limits | None = None) -> None:
        self.backend = backend
        self.queue = queue if queue is not None else JobQueue()
        self.limits = limits if limits is not None else Limits()

    def submit_generation(self, spec: GenerationSpec, model: ModelEntry | None = None, restore: bool = True) -> Job:
        """Queue a generation (checked first, so a bad request never waits in line). With `model`,
        the job switches to it first and, when `restore`, back afterwards (AUTOMATIC1111's
        `override_settings` with `override_settings_restore_afterwards`)."""
        check_spec(spec)
        backend = self.backend

        def work(job: Job) -> Generated:
            previous = backend.current
            switching = model is not None and model != previous
            if switching:
                backend.load(model)
            try:
                return backend.generate(spec, job)
            finally:
                if switching and restore and previous is not None:
                    backend.load(previous)

        return self.queue.submit(spec.task, work)

    def switch_model(self, entry: ModelEntry) -> Job:
        """Queue a model switch: it waits for the jobs ahead of it, so none runs half on each model."""
        return self.queue.submit("load model", lambda job: self.backend.load(entry))

    def close(self) -> None:
        self.queue.close()
        self.backend.close()
