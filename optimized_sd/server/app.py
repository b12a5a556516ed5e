"""`optimized-sd serve`: one FastAPI application with the AUTOMATIC1111 API routes and the gradio
UI mounted on it, served by uvicorn; `RunningServer` runs it on a thread (tests, notebooks)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from optimized_sd.errors import UserError

log = logging.getLogger("optimized_sd")

LOOPBACK = "127.0.0.1"
UI_CSS = "[id$='-memory'] textarea, [id$='-parameters'] textarea { font-family: ui-monospace, monospace; font-size: 12px; }"


def create_app(service, auth: tuple[str, str] | None = None, ui: bool = True):
    """The API routes first, then the UI at "/" (routes added before the mount take precedence)."""
    from fastapi import FastAPI

    from optimized_sd.server.api import add_api_routes

    app = FastAPI(title="optimized-sd", version=_version())
    add_api_routes(app, service, auth)
    if ui:
        import gradio as gr

        from optimized_sd.server.ui import build_ui

        app = gr.mount_gradio_app(app, build_ui(service), path="/", auth=auth, footer_links=["api"], css=UI_CSS)
    return app


def _version() -> str:
    import optimized_sd

    return optimized_sd.__version__


class RunningServer:
    """uvicorn on a daemon thread, on a socket bound before it starts (port 0: a free port)."""

    def __init__(self, app, host: str = LOOPBACK, port: int = 0) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(128)  # connections wait in the backlog until uvicorn accepts them
        except OSError as error:
            self.socket.close()
            raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> RunningServer:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="optimized-sd-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError(f"the HTTP server did not start on {self.url}")
        return self

    def run_forever(self) -> None:
        """Serve in the foreground until Ctrl-C."""
        self.server.run(sockets=[self.socket])

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
        self.socket.close()


@dataclass(frozen=True)
class ServeOptions:
    ckpt: Path | None
    models_dir: Path | None
    host: str | None
    port: int
    listen: bool
    auth: str | None
    device: str | None
    memory: str
    vram_budget: str | None
    precision: str
    tokenizer: Path | None
    attention: str
    weights: str | None = None


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth takes USER:PASS, both non-empty")
    return user, password


def bind_host(host: str | None, listen: bool) -> str:
    """127.0.0.1 unless --listen; a host reachable from the network only with --listen."""
    if host is None:
        return "0.0.0.0" if listen else LOOPBACK
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not listen:
        raise UserError(f"--host {host} makes the server reachable from the network; add --listen to mean it")
    return host


def serve(options: ServeOptions) -> None:
    """Load the model once, then serve the UI and the API until interrupted."""
    from optimized_sd.server.backend import Backend, LoadOptions
    from optimized_sd.server.catalog import ModelCatalog
    from optimized_sd.server.service import Service

    auth = parse_auth(options.auth)
    host = bind_host(options.host, options.listen)
    if not 0 <= options.port <= 65535:
        raise UserError(f"--port {options.port} is not a port number")
    catalog = ModelCatalog(options.models_dir, options.ckpt)
    first = catalog.default()
    try:
        import fastapi  # noqa: F401
        import gradio  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as missing:
        raise UserError(f"the web UI needs the [ui] extra ({missing.name} is missing): pip install 'optimized-sd[ui]'") from None
    backend = Backend(
        catalog,
        LoadOptions(
            options.device, options.precision, options.memory, options.vram_budget, options.tokenizer, options.attention, options.weights
        ),
    )
    backend.load(first)
    service = Service(backend)
    server = RunningServer(create_app(service, auth), host, options.port)
    print(f"optimized-sd: model {first.title} loaded on {backend.pipe.device}", flush=True)
    print(f"optimized-sd: UI at {server.url}/  ·  API at {server.url}/sdapi/v1/  ·  API docs at {server.url}/docs", flush=True)
    if host not in (LOOPBACK, "localhost", "::1"):
        print(
            f"optimized-sd: --listen: the UI and the API are reachable from the network on port {server.port}"
            + ("" if auth else " (no --auth)"),
            flush=True,
        )
    try:
        server.run_forever()
    finally:
        service.close()
