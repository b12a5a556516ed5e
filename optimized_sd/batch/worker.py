"""A batch worker: loads the model once (its own memory plan for its own device), then renders one
image at a time and returns it encoded, with what it cost. The same class runs in this process and,
wrapped by `ray.remote`, as a Ray actor."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from optimized_sd.errors import UserError
from optimized_sd.pipelines.job import Job
from optimized_sd.pipelines.load_options import LoadOptions


@dataclass(frozen=True)
class LoadSpec:
    """How a worker opens the model: `options.load(checkpoint)`. `gpu_share` < 1 (several workers
    on one GPU) plans for that share of the card unless options give a `vram_budget`. `cpu_threads` sets
    torch's CPU thread count: CPU kernels split their sums by thread, so two runs give the same bytes only
    with the same count (a different one moves a few pixels by 1)."""

    checkpoint: Path
    options: LoadOptions = LoadOptions()
    gpu_share: float = 1.0
    cpu_threads: int | None = None


@dataclass(frozen=True)
class RenderedImage:
    """One finished image: encoded bytes (PNG/JPEG with the parameters text) and its cost."""

    data: bytes
    parameters: str
    worker: str
    device: str
    seconds: float
    peak_vram_mib: float
    peak_rss_mib: float


@dataclass(frozen=True)
class RenderFailure:
    """A mistake in the job itself (init image missing, a size the model rejects): not retried."""

    reason: str


class BatchWorker:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.pipe = None
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._init_image: tuple[tuple[Path, int | None, int | None], Any] | None = None  # the last one only: nothing grows

    def load(self) -> str:
        """Open the model now (idempotent); returns the worker's name and device."""
        if self.pipe is None:
            options = self.spec.options
            if self.spec.cpu_threads is not None:
                import torch

                torch.set_num_threads(self.spec.cpu_threads)
            if self.spec.gpu_share < 1 and options.vram_budget is None:
                import torch

                if torch.cuda.is_available():
                    options = replace(options, vram_budget=int(torch.cuda.get_device_properties(0).total_memory * self.spec.gpu_share))
            self.pipe = options.load(self.spec.checkpoint)
        return f"{self.name} on {self.pipe.device}"

    def pid(self) -> int:
        return os.getpid()

    def init_image(self, job: Job) -> Any:
        """The job's init image, opened once for consecutive jobs that share it."""
        if job.init_image is None:
            return None
        key = (Path(job.init_image), job.height, job.width, job.inpaint)
        if self._init_image is None or self._init_image[0] != key:
            self._init_image = (key, job.open_init_image())
        return self._init_image[1]

    def render(self, job: Job, seed: int) -> RenderedImage | RenderFailure:
        """Image `seed` of a single-prompt job, as the serial run makes it."""
        from optimized_sd.pipelines.output import encode

        try:
            self.load()
            assert self.pipe is not None
            started = time.perf_counter()
            request = job.request([job.prompts[0]], seed, self.init_image(job))
            result = self.pipe.generate(request)
            data = encode(result.images[0], job.output.fmt, result.parameters[0].text())
        except UserError as error:
            return RenderFailure(str(error))
        records = self.pipe.meter.records  # this call's stages
        return RenderedImage(
            data=data,
            parameters=result.parameters[0].text(),
            worker=self.name,
            device=str(self.pipe.device),
            seconds=time.perf_counter() - started,
            peak_vram_mib=max((r.peak_allocated_mib for r in records), default=0.0),
            peak_rss_mib=max((r.peak_rss_mib for r in records), default=0.0),
        )

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
