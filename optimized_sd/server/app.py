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
from optimized_sd.pipelines.load_options import LoadOptions

log = logging.getLogger("optimized_sd")

LOOPBACK = "127.0.0.1"
UI_CSS = (
    "[id$='-memory'] textarea, [id$='-parameters'] textarea { font-family: ui-monospace, monospace; font-size: 12px; }"
    " [id$='-memory'] textarea { white-space: pre; overflow-x: auto; }"  # the report is a table: its rows must not wrap
)


def create_app(service, auth: tuple[str, str] | None = None, ui: bool = True, any_host: bool = False):
    """The API routes first, then the UI at "/" (routes added before the mount take precedence), behind
    the guards every request passes first: its Host (loopback names only unless `any_host`, --listen)
    and its body (counted against `service.limits` as it arrives)."""
    from fastapi import FastAPI

    from optimized_sd.server.api import add_api_routes

    app = FastAPI(title="optimized-sd", version=_version())
    add_api_routes(app, service, auth)
    if ui:
        import gradio as gr

        from optimized_sd.server.ui import build_ui

        app = gr.mount_gradio_app(app, build_ui(service), path="/", auth=auth, footer_links=["api"], css=UI_CSS)
    guarded = BodyLimit(app, service.limits.max_request_bytes)
    return guarded if any_host else LoopbackHostOnly(guarded)


async def refuse(scope, receive, send, status: int, error: str, detail: str) -> None:
    """A one-line JSON error (AUTOMATIC1111's shape) sent from a guard, before the application runs."""
    from optimized_sd.server.api import error_response

    await error_response(status, error, detail)(scope, receive, send)


class BodyLimit:
    """413 once a request body passes `limit` bytes, counted as they arrive (whatever Content-Length
    says, chunked bodies too), so no body is ever buffered past the limit."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        over = f"request body over this server's limit of {self.limit} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await refuse(scope, receive, send, 413, "TooLarge", over)
        received, cut, answered, started = 0, False, False, False

        async def counted_receive():
            nonlocal received, cut, answered
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    cut = True  # the application sees a client gone, and reads no further
                    if not started:
                        answered = True
                        await refuse(scope, receive, send, 413, "TooLarge", over)
                    return {"type": "http.disconnect"}
            return message

        async def checked_send(message) -> None:
            nonlocal started
            if answered:
                return  # the 413 was the answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, checked_send)
        except Exception:
            if not answered:
                raise  # a body cut off at the limit may surface as any error in the application: already answered


def is_loopback_host(header: str) -> bool:
    """A Host header naming this machine: localhost, 127.x.x.x or [::1], with or without a port."""
    host = header.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or rest[:1] not in ("", ":"):
            return False
        port = rest[1:]
    else:
        name, _, port = host.partition(":")
    if port and not port.isdigit():
        return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class LoopbackHostOnly:
    """400 for a request whose Host is not a loopback name: without --listen only pages served from this
    machine may reach the server, not a web page whose own host name was re-pointed here (DNS rebinding)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope["headers"]).get(b"host")
            if header is not None and not is_loopback_host(header.decode("latin-1")):
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                detail = f"host {header.decode('latin-1')!r} is not this machine's; serve with --listen to accept other host names"
                return await refuse(scope, receive, send, 400, "InvalidHost", detail)
        return await self.app(scope, receive, send)


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
    """The `serve` flags: where the models are, how to listen, and how every model is loaded (`loading`)."""

    ckpt: Path | None
    models_dir: Path | None
    host: str | None
    port: int
    listen: bool
    auth: str | None
    loading: LoadOptions = LoadOptions()  # `memory` and `vram_budget` are the defaults a request may override


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
    from optimized_sd.server.backend import Backend
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
    backend = Backend(catalog, options.loading)
    backend.load(first)
    service = Service(backend)
    server = RunningServer(create_app(service, auth, any_host=options.listen), host, options.port)
    print(f"optimized-sd: model {first.title} loaded on {backend.pipe.device}", flush=True)
    lora_dir, embeddings_dir = Path(options.loading.lora_dir).resolve(), Path(options.loading.embeddings_dir).resolve()
    print(f"optimized-sd: LoRAs from {lora_dir}, embeddings from {embeddings_dir}", flush=True)
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
