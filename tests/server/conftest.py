"""One in-process server for the server tests: the tiny model behind the UI and the API on
127.0.0.1 at a free port, with small limits so the 413 paths are cheap to reach."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from optimized_sd.server.service import Limits
from tests.test_inpaint import tiny_inpainting  # noqa: F401 (a fixture: the tiny model with a 9-channel UNet)

LIMITS = Limits(max_request_bytes=2 * 2**20, max_image_pixels=256 * 256)
TIMEOUT = 300  # seconds for one request on a loaded CI machine; every loop in the server tests is bounded too


@dataclass
class ServerUnderTest:
    url: str
    host: str
    port: int
    service: object  # optimized_sd.server.service.Service
    models_dir: Path
    tokenizer: Path


@pytest.fixture(scope="session")
def models_dir(tiny_model, tmp_path_factory) -> Path:
    """Two names for the tiny model: the listing the API may switch between."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(tiny_model.safetensors, folder / "tiny.safetensors")
    (folder / "zoo").mkdir()
    shutil.copy(tiny_model.ckpt, folder / "zoo" / "tiny-copy.ckpt")
    return folder


@contextlib.contextmanager
def running_server(models_dir: Path, tokenizer, **load_options) -> Iterator[ServerUnderTest]:
    """A server over the models in `models_dir` (the first one loaded; more LoadOptions in `load_options`), stopped on exit."""
    from optimized_sd.server.app import RunningServer, create_app
    from optimized_sd.server.backend import Backend, LoadOptions
    from optimized_sd.server.catalog import ModelCatalog
    from optimized_sd.server.service import Service

    catalog = ModelCatalog(models_dir)
    backend = Backend(catalog, LoadOptions(device="cpu", tokenizer=tokenizer, **load_options))
    backend.load(catalog.default())
    service = Service(backend, limits=LIMITS)
    running = RunningServer(create_app(service), "127.0.0.1", 0).start()
    try:
        yield ServerUnderTest(running.url, running.host, running.port, service, models_dir, tokenizer)
    finally:
        running.stop()
        service.close()


@pytest.fixture(scope="session")
def server(tiny_model, models_dir) -> Iterator[ServerUnderTest]:
    with running_server(models_dir, tiny_model.tokenizer) as running:
        yield running


@pytest.fixture(scope="session")
def reference_pipe(tiny_model):
    """The same model through the Python API, for pixel-equality checks."""
    import optimized_sd

    pipe = optimized_sd.load(tiny_model.safetensors, device="cpu", tokenizer=tiny_model.tokenizer)
    yield pipe
    pipe.close()


def post(server: ServerUnderTest, path: str, **kwargs) -> requests.Response:
    """POST to the API's `path` under /sdapi/v1 (`requests.post` arguments in `kwargs`)."""
    return requests.post(f"{server.url}/sdapi/v1/{path}", timeout=TIMEOUT, **kwargs)
