"""The batch on a local Ray runtime with two CPU workers: the same files as the in-process run, and a
worker killed mid-batch loses nothing."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from optimized_sd.batch import BatchJob, LoadSpec, LocalPool, read_jobs, run_batch
from optimized_sd.batch.manifest import MANIFEST
from optimized_sd.errors import UserError
from optimized_sd.pipelines.job import Job, OutputPolicy
from optimized_sd.pipelines.load_options import LoadOptions

ray = pytest.importorskip("ray")

from optimized_sd.batch.ray_pool import RayPool, check_reachable, connect  # noqa: E402

DEFAULTS = Job(prompts=("default prompt",), steps=2, sampler="euler", height=64, width=64, seed=5, output=OutputPolicy(Path("unused")))


def images(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.fixture(scope="module")
def spec(tiny_model) -> LoadSpec:
    """One CPU thread: what a Ray CPU worker uses (torch's CPU sums depend on the thread count)."""
    return LoadSpec(tiny_model.safetensors, LoadOptions(tokenizer=tiny_model.tokenizer, device="cpu"), cpu_threads=1)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> list[BatchJob]:
    path = tmp_path_factory.mktemp("jobs") / "jobs.jsonl"
    lines = [
        {"prompt": "a red cube", "n_samples": 3, "seed": 11},
        {"prompt": "a blue ball", "n_samples": 2},
        {"prompt": "a red cube", "seed": 12},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return read_jobs(path, DEFAULTS)


@pytest.fixture(scope="module")
def serial(jobs, spec, tmp_path_factory) -> dict[str, bytes]:
    outdir = tmp_path_factory.mktemp("serial")
    threads = torch.get_num_threads()
    try:
        run_batch(jobs, outdir, LocalPool(spec))
    finally:
        torch.set_num_threads(threads)  # the in-process worker set it for the whole test process
    return images(outdir)


@pytest.fixture(scope="module")
def runtime() -> Iterator[object]:
    started = connect(None, num_cpus=2)
    yield started
    started.shutdown()


@pytest.mark.slow  # ~30 s idle, minutes on a loaded 2-core machine: Ray start, two model loads
def test_two_workers_write_what_the_serial_run_writes(runtime, jobs, spec, serial, tmp_path):
    report = run_batch(jobs, tmp_path, RayPool(runtime, spec, workers=2, gpus_per_worker=0))
    assert images(tmp_path) == serial and len(serial) == 6 and not report.failures
    manifest = [json.loads(line) for line in (tmp_path / MANIFEST).read_text().splitlines()]
    assert len({m["worker"] for m in manifest}) == 2  # both workers rendered
    assert sorted(m["file"] for m in manifest) == sorted(serial)


@pytest.mark.slow
def test_a_killed_worker_loses_nothing(runtime, jobs, spec, serial, tmp_path):
    pool = RayPool(runtime, spec, workers=2, gpus_per_worker=0)
    pool.start()
    victim = next(iter(pool.pids().values()))
    killed = []

    def kill_once(step) -> None:
        if not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    report = run_batch(jobs, tmp_path, pool, kill_once)
    assert killed and not report.failures and images(tmp_path) == serial
    manifest = [json.loads(line) for line in (tmp_path / MANIFEST).read_text().splitlines()]
    assert len(manifest) == 6 and len({(m["line"], m["index"]) for m in manifest}) == 6  # no duplicate


def test_an_unreachable_address_is_one_line():
    with pytest.raises(UserError, match=r"^ray 127.0.0.1:1: cannot reach the Ray cluster"):
        check_reachable("127.0.0.1:1")
