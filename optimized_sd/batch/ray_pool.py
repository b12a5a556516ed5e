"""Workers as Ray actors: each loads the model once on its own device (`num_gpus` may be fractional,
CPU actors when there is no GPU). Ray is an optional extra, imported only here."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

from optimized_sd.batch.driver import Outcome, WorkerLost, WorkItem
from optimized_sd.batch.worker import BatchWorker, LoadSpec, RenderFailure
from optimized_sd.errors import FieldError, UserError

ITEMS_PER_WORKER = 2  # one rendering, one queued behind it, so a worker never waits for the driver


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FieldError.about("ray", 'needs Ray: pip install "optimized-sd[ray]"') from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """`host:port` must accept a connection; Ray itself would retry for a minute before failing."""
    if address in ("auto", "local") or address.startswith("ray://") and ":" not in address[6:]:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FieldError.about("ray", f"{address}: give HOST:PORT (or no address for a local runtime)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise FieldError.about("ray", f"{address}: cannot reach the Ray cluster ({error.strerror or error})") from None


def connect(address: str | None, num_cpus: int) -> Any:
    """Start a local runtime (address None) sized for the workers, or join the cluster at `address`."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address is None:
        package_root = str(Path(__file__).resolve().parents[2])  # so local workers import this copy of optimized_sd
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
        return ray
    check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, TimeoutError) as error:
        raise FieldError.about("ray", f"{address}: cannot join the Ray cluster ({str(error).splitlines()[0]})") from None
    return ray


def default_workers(ray: Any, gpus_per_worker: float) -> int:
    """Every GPU of the cluster, `1 / gpus_per_worker` workers each; one CPU worker without GPUs."""
    gpus = ray.cluster_resources().get("GPU", 0)
    return max(1, int(gpus / gpus_per_worker)) if gpus and gpus_per_worker > 0 else 1


class RayPool:
    """Actors render items; a dead actor's items come back as `WorkerLost` and the actor is replaced
    (at most `replacements` times in all), so the batch goes on."""

    def __init__(self, ray: Any, spec: LoadSpec, workers: int, gpus_per_worker: float, replacements: int | None = None) -> None:
        if workers < 1:
            raise FieldError.about("workers", "must be at least 1")
        if gpus_per_worker < 0:
            raise FieldError.about("gpus_per_worker", "must be 0 (CPU workers) or more")
        self.ray = ray
        cpus = 0 if gpus_per_worker else (spec.cpu_threads or 1)  # a CPU worker computes on as many threads as it reserves cores
        self.spec = spec if gpus_per_worker or spec.cpu_threads else dataclasses.replace(spec, cpu_threads=cpus)
        self.actor_class = ray.remote(num_cpus=cpus, num_gpus=gpus_per_worker)(BatchWorker)
        self.replacements_left = workers if replacements is None else replacements
        self.actors: dict[int, Any] = {}
        self.load: dict[int, int] = {}
        self.running: dict[Any, tuple[WorkItem, int]] = {}  # object ref -> (item, actor number)
        self._next_number = 0
        self.workers = workers

    def _add_actor(self) -> int:
        number = self._next_number
        self._next_number += 1
        self.actors[number] = self.actor_class.remote(self.spec)
        self.load[number] = 0
        return number

    def start(self) -> list[str]:
        """Start the actors and load the model in each now; a mistake (bad checkpoint) is one UserError, not retries."""
        if not self.actors:
            for _ in range(self.workers):
                self._add_actor()
        try:
            return self.ray.get([actor.load.remote() for actor in self.actors.values()])
        except self.ray.exceptions.RayTaskError as error:
            cause = error.cause if isinstance(getattr(error, "cause", None), Exception) else error
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise

    def pids(self) -> dict[int, int]:
        """Actor number -> worker process id (for tests that kill one)."""
        return dict(zip(self.actors, self.ray.get([actor.pid.remote() for actor in self.actors.values()])))

    def free_slots(self) -> int:
        return sum(ITEMS_PER_WORKER - load for load in self.load.values())

    def in_flight(self) -> int:
        return len(self.running)

    def submit(self, item: WorkItem) -> None:
        number = min(self.load, key=self.load.__getitem__)
        ref = self.actors[number].render.remote(item.job.job, item.seed)
        self.running[ref] = (item, number)
        self.load[number] += 1

    def _lose(self, number: int) -> None:
        if number in self.actors:
            del self.actors[number]
            del self.load[number]
            if self.replacements_left > 0:
                self.replacements_left -= 1
                self._add_actor()

    def wait(self) -> list[tuple[WorkItem, Outcome]]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        finished: list[tuple[WorkItem, Outcome]] = []
        for ref in ready:
            item, number = self.running.pop(ref)
            if number in self.load:
                self.load[number] -= 1
            try:
                finished.append((item, self.ray.get(ref)))
            except self.ray.exceptions.RayActorError as error:
                self._lose(number)
                finished.append((item, WorkerLost(str(error).splitlines()[0])))
            except self.ray.exceptions.RayTaskError as error:  # a bug or a resource error inside the worker: this item fails alone
                cause = getattr(error, "cause", None) or error
                finished.append((item, RenderFailure(f"worker error: {type(cause).__name__}: {str(cause).splitlines()[0]}")))
        return finished

    def close(self) -> None:
        for actor in self.actors.values():
            self.ray.kill(actor)
        self.actors.clear()
        self.load.clear()
        self.running.clear()
