"""The HTTP server against hostile requests: bodies counted as they arrive (chunked, or with a
Content-Length that lies), Host names other than this machine's without --listen, and `serve`'s
model-loading flags. After every bad request the server still answers."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
import requests

from tests.server.conftest import LIMITS, TIMEOUT, ServerUnderTest

LIMIT = LIMITS.max_request_bytes
PIECE = 64 * 1024


def still_serving(server: ServerUnderTest) -> None:
    response = requests.get(f"{server.url}/sdapi/v1/progress", timeout=TIMEOUT)
    assert response.status_code == 200 and response.json()["progress"] == 0.0


def status_and_body(raw: bytes) -> tuple[int, dict]:
    """The status and the JSON body of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def read_response(sock: socket.socket) -> bytes:
    """One complete response with a Content-Length (all this server sends for errors)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_chunked_body_is_refused_once_past_the_limit_before_it_ends(server):
    """413 arrives while the client is still sending (the final chunk never comes): the bytes were counted, not buffered."""
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(
            b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            % (server.host.encode(), server.port)
        )
        for _ in range(LIMIT // PIECE + 1):
            sock.sendall(chunked(b" " * PIECE))
        status, body = status_and_body(read_response(sock))
    assert status == 413 and body["error"] == "TooLarge" and str(LIMIT) in body["detail"]
    still_serving(server)


def test_a_whole_chunked_body_over_the_limit_gets_413_and_one_under_it_is_read(server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        pieces = (b" " * PIECE for _ in range(LIMIT // PIECE + 2))
        connection.request("POST", "/sdapi/v1/txt2img", body=pieces, headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"] == "TooLarge"
        still_serving(server)
        connection.request("POST", "/sdapi/v1/options", body=iter([b"{", b"}"]), headers={"Content-Type": "application/json"},
                           encode_chunked=True)  # fmt: skip
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b"null"
    finally:
        connection.close()
    still_serving(server)


def test_a_content_length_that_lies_does_not_get_a_body_past_the_limit(server):
    """Content-Length says 2 bytes: the application reads those 2, and the rest is not a request; with a
    chunked body too, the bytes are counted, whatever the Content-Length said."""
    head = b"POST /sdapi/v1/options HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n" % (server.host.encode(), server.port)
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(head + b"Content-Length: 2\r\n\r\n{}" + b"x" * 1024)
        first = read_response(sock)
        assert status_and_body(first) == (200, None)
        try:
            sock.sendall(b"x" * (LIMIT + 1))
        except OSError:
            pass  # the server closed the connection on the garbage: what matters is that it never read it as a body
    still_serving(server)
    with socket.create_connection((server.host, server.port), timeout=60) as sock:
        sock.sendall(head + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(LIMIT // PIECE + 1):
                sock.sendall(chunked(b" " * PIECE))
        except OSError:
            pass  # refused before the body ended (below): the server stops reading
        status, _ = status_and_body(read_response(sock))
    assert status in (413, 400)  # h11 (uvicorn's default) reads the chunked body: 413; httptools refuses both headers: 400
    still_serving(server)


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("localhost", True),
        ("LocalHost:7860", True),
        ("127.0.0.1", True),
        ("127.5.6.7:80", True),
        ("[::1]:7860", True),
        ("[::1]", True),
        ("evil.example", False),
        ("evil.example:7860", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.nip.io", False),
        ("0.0.0.0:7860", False),
        ("192.168.1.2", False),
        ("[::1", False),
        ("::1", False),
        ("127.0.0.1:http", False),
    ],
)
def test_loopback_host_names(host, allowed):
    from optimized_sd.server.app import is_loopback_host

    assert is_loopback_host(host) is allowed


def test_without_listen_only_loopback_host_names_are_answered(server):
    for path in ("/sdapi/v1/progress", "/"):
        response = requests.get(f"{server.url}{path}", headers={"Host": f"rebound.example:{server.port}"}, timeout=TIMEOUT)
        assert response.status_code == 400
        assert response.text.count("\n") == 0 and response.json()["error"] == "InvalidHost" and "--listen" in response.json()["detail"]
        still_serving(server)
    response = requests.post(f"{server.url}/sdapi/v1/interrupt", headers={"Host": "attacker.example"}, timeout=TIMEOUT)
    assert response.status_code == 400
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}", "127.0.0.2"):
        assert requests.get(f"{server.url}/sdapi/v1/progress", headers={"Host": host}, timeout=TIMEOUT).status_code == 200


def test_serve_help_lists_the_load_flags(capsys):
    from tests.cli_runs import run_cli

    code, out, _ = run_cli(capsys, "serve", "--help")
    assert code == 0
    for flag in ("--lora-dir", "--embeddings-dir", "--vae-tiling", "--weights"):
        assert flag in out


def test_serve_loads_with_its_flags_and_finds_loras_and_embeddings(capsys, monkeypatch, tiny_model, tmp_path):
    """`serve --lora-dir --embeddings-dir --vae-tiling --listen`: the flags reach the loader, a prompt's
    <lora:NAME> and an embedding's name are found there, and --listen answers any Host."""
    import torch

    from optimized_sd.pipelines import diffusion
    from optimized_sd.server.app import RunningServer
    from tests.cli_runs import run_cli
    from tests.lora_files import kohya_lora, save

    loras, embeddings = tmp_path / "my-loras", tmp_path / "my-embeddings"
    (loras / "styles").mkdir(parents=True)
    embeddings.mkdir()
    save(kohya_lora(tiny_model.unet, tiny_model.text_encoder, seed=5), loras / "styles" / "kohya_style.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}}, embeddings / "shiny.pt")
    loaded: list = []  # the LoadOptions each load was given
    real_load = diffusion.load
    monkeypatch.setattr(
        diffusion, "load", lambda path, options=None, **fields: loaded.append(options) or real_load(path, options, **fields)
    )
    answers: dict[str, requests.Response] = {}

    def probe(running: RunningServer) -> None:
        """Instead of serving forever: the requests of this test, then stop."""
        running.start()
        try:
            answers["txt2img"] = requests.post(
                f"{running.url}/sdapi/v1/txt2img",
                json={"prompt": "a shiny cube <lora:kohya_style:0.8>", "steps": 2, "width": 64, "height": 64, "seed": 1},
                headers={"Host": "my-machine.lan"},
                timeout=TIMEOUT,
            )
        finally:
            running.stop()

    monkeypatch.setattr(RunningServer, "run_forever", probe)
    code, out, err = run_cli(
        capsys, "serve", "--ckpt", tiny_model.safetensors, "--tokenizer", tiny_model.tokenizer, "--device", "cpu", "--port", 0,
        "--listen", "--host", "127.0.0.1", "--lora-dir", loras, "--embeddings-dir", embeddings, "--vae-tiling", "off",
    )  # fmt: skip
    assert code == 0, err
    assert f"LoRAs from {loras.resolve()}" in out and f"embeddings from {embeddings.resolve()}" in out
    assert loaded[0].lora_dir == loras and loaded[0].embeddings_dir == embeddings and loaded[0].vae_tiling == "off"
    response = answers["txt2img"]
    assert response.status_code == 200, response.text
    (infotext,) = json.loads(response.json()["info"])["infotexts"]
    assert "Lora hashes" in infotext and "kohya_style: " in infotext and 'TI hashes: "shiny: ' in infotext


def test_the_lora_hint_names_a_flag_serve_has(server):
    """Without --lora-dir the default folder has no LoRA: the 422 says so and names --lora-dir, a serve flag."""
    response = requests.post(
        f"{server.url}/sdapi/v1/txt2img", json={"prompt": "a <lora:nowhere:1>", "steps": 2, "width": 64, "height": 64}, timeout=TIMEOUT
    )
    assert response.status_code == 422 and "--lora-dir" in response.json()["detail"]
    still_serving(server)
