"""Body caps, the discard bound, the body timeout and max_connections on real sockets.

uvicorn on a port with the fake model (no torch): clients that send the whole body before
reading (httpx, the openai SDK) still get the 413, a body past the discard bound loses its
connection, a stalled body gets the 408, and the server keeps serving after each.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.fakes import FakeRunner, fake_app, png_bytes
from tests.servers import ThreadedServer

pytestmark = pytest.mark.slow

KIB, MIB = 1024, 1024 * 1024
GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
LIMITS = {
    "max_json_bytes": 64 * KIB, "max_edit_bytes": MIB, "max_upload_bytes": 512 * KIB,
    "max_discard_bytes": 4 * MIB, "body_timeout_s": 0.5,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with ThreadedServer(fake_app(tmp_path_factory.mktemp("limits"), **LIMITS)) as running:
        running.wait_ready()
        yield running


def sdk(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-test", max_retries=0, timeout=30)


def assert_envelope(status: int, headers: dict[str, str], error: dict, expected: int, code: str) -> dict:
    assert status == expected, error
    assert {"message", "type", "param", "code", "request_id"} <= set(error)
    assert error["message"] and error["code"] == code
    assert error["request_id"] == headers["x-request-id"]
    return error


def assert_serves(server: ThreadedServer) -> None:
    response = httpx.post(f"{server.base_url}{GEN}", json={"prompt": "still serving", "size": "32x32"}, timeout=10)
    assert response.status_code == 200, response.text


def connect(server: ThreadedServer) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """One response, read up to its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    header_block, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, httpx.Response(200, content=body).json()["error"]


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_declared_length_over_the_cap_is_answered_before_the_body_is_sent(server):
    with connect(server) as sock:
        sock.sendall(head(GEN, f"Content-Length: {100 * KIB}"))
        status, headers, error = read_response(sock)  # not a byte of the body sent yet
        error = assert_envelope(status, headers, error, 413, "payload_too_large")
        assert error["param"] is None and str(64 * KIB) in error["message"]
        assert headers["connection"] == "close"
        sock.sendall(b"x" * 100 * KIB)  # within the discard bound: read and dropped
        assert closed_by_server(sock)
    assert_serves(server)


def test_chunked_body_is_413_once_it_passes_the_cap(server):
    def body() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 8 * KIB

    response = httpx.post(f"{server.base_url}{GEN}", content=body(), headers={"content-type": "application/json"})
    assert_envelope(response.status_code, dict(response.headers), response.json()["error"], 413, "payload_too_large")
    assert_serves(server)


def test_big_body_sent_whole_before_reading_still_gets_the_413(server):
    """httpx and the openai SDK send everything first; the discarded rest lets them read the 413."""
    response = httpx.post(f"{server.base_url}{GEN}", content=b"x" * 3 * MIB,
                          headers={"content-type": "application/json"})
    assert_envelope(response.status_code, dict(response.headers), response.json()["error"], 413, "payload_too_large")
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(server).images.generate(prompt="x" * 2 * MIB)
    assert caught.value.status_code == 413
    assert caught.value.code == "payload_too_large" and caught.value.request_id
    assert_serves(server)


@pytest.mark.parametrize("framing", ["Content-Length: 1073741824", "Transfer-Encoding: chunked"])
def test_body_past_the_discard_bound_loses_its_connection(server, framing):
    piece = b"x" * 64 * KIB
    if framing.startswith("Transfer"):
        piece = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    sent = 0
    with connect(server) as sock, pytest.raises(OSError):  # EPIPE or ECONNRESET: the server closed it
        sock.sendall(head(GEN, framing))
        while sent < 256 * MIB:
            sock.sendall(piece)
            sent += len(piece)
    assert sent < LIMITS["max_discard_bytes"] + 64 * MIB  # the bound, plus what socket buffers hold
    assert_serves(server)


def test_stalled_body_is_408_and_the_connection_closed(server):
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(head(GEN, "Content-Length: 100") + b"{")
        status, headers, error = read_response(sock)
        waited = time.monotonic() - started
        error = assert_envelope(status, headers, error, 408, "body_timeout")
        assert error["type"] == "invalid_request_error" and "0.5 s" in error["message"]
        assert 0.4 <= waited < 5
        assert headers["connection"] == "close" and closed_by_server(sock)
    assert_serves(server)


def test_multipart_edit_over_the_edit_cap_is_413(server):
    images = [io.BytesIO(png_bytes() + b"\0" * 400 * KIB) for _ in range(3)]  # each under its part cap
    for image, name in zip(images, "abc", strict=True):
        image.name = f"{name}.png"
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(server).images.edit(image=images, prompt="x")
    assert caught.value.status_code == 413 and caught.value.code == "payload_too_large"
    assert str(MIB) in caught.value.message and caught.value.request_id
    assert_serves(server)


def test_image_part_over_its_cap_is_413_naming_it(server):
    """The multipart reader refuses the part (whether the rest of the body had arrived yet or not:
    a refusal before the body's end closes the connection, tested with the body limits)."""
    files = {"image": (None, png_bytes() + b"\0" * 700 * KIB, "application/octet-stream")}
    response = httpx.post(f"{server.base_url}{EDIT}", data={"prompt": "x"}, files=files, timeout=10)
    error = assert_envelope(response.status_code, dict(response.headers), response.json()["error"], 413,
                            "payload_too_large")
    assert error["param"] == "image"
    assert_serves(server)


def test_beyond_max_connections_is_503_with_retry_after(tmp_path):
    import websockets.exceptions
    from websockets.sync.client import connect as ws_connect

    gate = threading.Event()
    runner = FakeRunner(gate=gate)
    with ThreadedServer(fake_app(tmp_path, runner, max_connections=1)) as busy:
        gate.set()
        busy.wait_ready()
        gate.clear()
        first: list[httpx.Response] = []
        holder = threading.Thread(target=lambda: first.append(
            httpx.post(f"{busy.base_url}{GEN}", json={"prompt": "holds the place"}, timeout=30)))
        holder.start()
        deadline = time.monotonic() + 10
        while not runner.started("holds the place"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = httpx.post(f"{busy.base_url}{GEN}", json={"prompt": "one too many"}, timeout=10)
        error = assert_envelope(refused.status_code, dict(refused.headers), refused.json()["error"], 503,
                                "server_busy")
        assert error["type"] == "server_error" and refused.headers["retry-after"] == "1"
        with pytest.raises(websockets.exceptions.InvalidStatus) as denied:
            ws_connect(busy.base_url.replace("http", "ws") + "/v1/images/ws", open_timeout=10)
        assert denied.value.response.status_code == 503
        assert httpx.get(f"{busy.base_url}/health", timeout=10).status_code == 200  # probes are not counted
        gate.set()
        holder.join(30)
        assert first[0].status_code == 200
        assert_serves(busy)


def rss_bytes() -> int:
    """This process's resident memory; the in-process server's included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    raise AssertionError("no VmRSS in /proc/self/status")


def test_a_200_mb_body_is_discarded_without_being_stored(tmp_path):
    with ThreadedServer(fake_app(tmp_path, max_discard_bytes=512 * MIB)) as running:
        running.wait_ready()
        assert_serves(running)
        baseline, peak, done = rss_bytes(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        piece = b"x" * MIB
        try:
            response = httpx.post(f"{running.base_url}{GEN}", content=(piece for _ in range(200)),
                                  headers={"content-type": "application/json"}, timeout=60)
        finally:
            done.set()
            sampler.join()
        assert response.status_code == 413
        assert peak[0] - baseline < 50 * MIB, f"RSS grew by {(peak[0] - baseline) / MIB:.0f} MiB"
        assert_serves(running)
