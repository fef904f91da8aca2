"""Bad and heavy uploads through the API: refused with the field named and our words only,
before their pixels are decoded, without spending anyone's budget on decode work they may
not do, and without stopping the server."""

from __future__ import annotations

import asyncio
import base64
import os
import threading

import openai
import pytest
from fastapi.testclient import TestClient
from PIL import EpsImagePlugin, Image, ImageFile

import diffuser_api.service.images as image_service
from diffuser_api.errors import Overloaded, Unavailable
from diffuser_api.service.codec_pool import CodecPool
from tests.fakes import FakeRunner, fake_app, png_bytes
from tests.servers import ThreadedServer
from tests.unit.test_api import EDIT, assert_envelope, assert_still_serves, wait_ready
from tests.unit.test_uploads import ACCEPTED_MESSAGE, MINIMAL_EPS, bilevel_png, encode, noisy_png

DEFAULT_MAX_INPUT_PIXELS = 16_777_216


@pytest.fixture()
def client(tmp_path):
    with TestClient(fake_app(tmp_path)) as test_client:
        wait_ready(test_client)
        yield test_client


def edit(client: TestClient, image: bytes, *, mask: bytes | None = None, **fields: str):
    files = {"image": ("upload.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return client.post(EDIT, data={"prompt": "x", **fields}, files=files)


def refuse_decoding(monkeypatch: pytest.MonkeyPatch, *, sizes: set[tuple[int, int]] | None = None) -> None:
    """Fail the test if Pillow decodes pixels (of an image of one of ``sizes``, if given)."""
    decode = ImageFile.ImageFile.load

    def guarded(self: ImageFile.ImageFile):
        if sizes is None or self.size in sizes:
            raise AssertionError(f"the pixels of a {self.size} upload were decoded")
        return decode(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded)


def test_eps_never_reaches_ghostscript(client, monkeypatch):
    def ghostscript_reached(self):
        raise AssertionError("the EPS reader ran: the next step is Ghostscript")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", ghostscript_reached)
    error = assert_envelope(edit(client, MINIMAL_EPS), 400, "image", "invalid_image")
    assert error["message"] == "image " + ACCEPTED_MESSAGE
    data_url = "data:application/postscript;base64," + base64.b64encode(MINIMAL_EPS).decode()
    response = client.post(EDIT, json={"prompt": "x", "images": [{"image_url": data_url}]})
    error = assert_envelope(response, 400, code="invalid_image")
    assert error["message"].endswith(ACCEPTED_MESSAGE)
    assert_still_serves(client)


@pytest.mark.parametrize("fmt", ["PCX", "ICO", "TGA"])
def test_a_format_pillow_reads_but_we_do_not_is_400(client, fmt):
    data = encode(Image.new("RGB", (40, 40), (5, 6, 7)), fmt)
    error = assert_envelope(edit(client, data), 400, "image", "invalid_image")
    assert error["message"] == "image " + ACCEPTED_MESSAGE
    assert_still_serves(client)


def test_bilevel_bomb_is_refused_from_its_header(client, monkeypatch):
    """10 KB of PNG that would decode to 64 M pixels (192 MB as RGB)."""
    bomb = bilevel_png(8000, 8000)
    assert len(bomb) < 20_000
    with monkeypatch.context() as patch:
        refuse_decoding(patch)
        error = assert_envelope(edit(client, bomb), 400, "image", "invalid_image")
    assert f"limit {DEFAULT_MAX_INPUT_PIXELS}" in error["message"]
    assert_still_serves(client)


@pytest.mark.parametrize(
    ("width", "height", "words"),
    [
        pytest.param(60_000, 60_000, f"limit {DEFAULT_MAX_INPUT_PIXELS}", id="above-pillows-own-limit"),
        pytest.param(5000, 4000, f"limit {DEFAULT_MAX_INPUT_PIXELS}", id="above-ours"),
        pytest.param(20_000, 16, "no side of an upload may be over 16384 pixels", id="side-too-long"),
    ],
)
def test_huge_header_on_a_tiny_file_is_400(client, monkeypatch, width, height, words):
    header_only = bilevel_png(width, height, with_pixels=False)
    with monkeypatch.context() as patch:
        refuse_decoding(patch)
        error = assert_envelope(edit(client, header_only), 400, "image", "invalid_image")
    assert words in error["message"]
    assert_still_serves(client)


def test_wrong_size_mask_is_refused_before_its_pixels_are_decoded(client, monkeypatch):
    mask = encode(Image.new("RGBA", (3000, 2000), (0, 0, 0, 0)), "PNG")
    with monkeypatch.context() as patch:
        refuse_decoding(patch, sizes={(3000, 2000)})
        error = assert_envelope(edit(client, png_bytes((40, 40)), mask=mask), 400, "mask", "invalid_value")
    assert "3000x2000" in error["message"] and "40x40" in error["message"]
    assert_still_serves(client)


def test_truncated_png_is_400_without_pillows_words(client):
    error = assert_envelope(edit(client, noisy_png()[:300]), 400, "image", "invalid_image")
    assert error["message"] == "image " + ACCEPTED_MESSAGE
    assert_still_serves(client)


def test_full_codec_queue_is_429_with_retry_after(tmp_path):
    app = fake_app(tmp_path, max_codec_queue=1)
    with TestClient(app) as client:
        wait_ready(client)
        gate = threading.Event()
        blocked = [app.state.service.codec.submit(gate.wait, 10) for _ in range(3)]  # 2 threads + 1 waiting
        try:
            response = edit(client, png_bytes())
            error = assert_envelope(response, 429, code="rate_limit_exceeded")
            assert "codec queue is full" in error["message"]
            assert response.headers["retry-after"] == "1"
        finally:
            gate.set()
        assert all(task.result(timeout=10) for task in blocked)
        assert edit(client, png_bytes()).status_code == 200
        assert_still_serves(client)


def recording_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    params: list[str] = []
    decode = image_service.decode_image

    def recording(data: bytes, *, param: str, **options):
        params.append(param)
        return decode(data, param=param, **options)

    monkeypatch.setattr(image_service, "decode_image", recording)
    return params


def test_images_are_charged_before_decoding(tmp_path, monkeypatch):
    decoded = recording_decodes(monkeypatch)
    with TestClient(fake_app(tmp_path, rate_limit_images="1/minute")) as client:
        wait_ready(client)
        assert_envelope(edit(client, png_bytes(), n="2"), 400, "n", "rate_limit_exceeded")
        assert decoded == []
        assert_still_serves(client)  # spends the one image of the minute
        assert_envelope(edit(client, png_bytes()), 429, code="rate_limit_exceeded")
        assert decoded == []


def test_invalid_edits_are_neither_charged_nor_decoded(tmp_path, monkeypatch):
    decoded = recording_decodes(monkeypatch)
    with TestClient(fake_app(tmp_path, rate_limit_images="1/minute")) as client:
        wait_ready(client)
        assert_envelope(edit(client, png_bytes(), size="13x7"), 400, "size")
        assert_envelope(edit(client, png_bytes(), strength="0.01", num_inference_steps="4"), 400, "strength")
        assert decoded == []
        assert edit(client, png_bytes()).status_code == 200
        assert decoded == ["image"]


@pytest.mark.parametrize("size", ["64x48", "auto"])
def test_large_jpeg_reaches_the_model_at_the_output_size(tmp_path, size):
    runner = FakeRunner()
    with TestClient(fake_app(tmp_path, runner)) as client:
        wait_ready(client)
        upload = encode(Image.new("RGB", (2048, 1536), (0, 120, 240)), "JPEG")
        response = edit(client, upload, size=size)
        assert response.status_code == 200, response.text
    (image,) = runner.jobs_seen[0].images
    assert image.size == ((64, 48) if size == "64x48" else (256, 256))  # auto: the fake's largest side
    red, green, blue = image.getpixel((image.width // 2, image.height // 2))
    assert red < 20 and 100 < green < 140 and blue > 220


@pytest.mark.slow
def test_sdk_sees_our_message_through_a_real_server(tmp_path):
    with ThreadedServer(fake_app(tmp_path)) as server:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(image=("drawing.eps", MINIMAL_EPS, "application/postscript"), prompt="x")
        error = caught.value.body
        assert (error["param"], error["code"]) == ("image", "invalid_image")
        assert error["message"] == "image " + ACCEPTED_MESSAGE
        assert error["request_id"] == caught.value.response.headers["x-request-id"]
        assert len(client.images.generate(prompt="still alive", size="32x32").data) == 1


def test_codec_pool_counts_work_until_it_ends_and_never_refuses_admitted_work():
    pool = CodecPool(threads=1, max_queue=1)
    gate = threading.Event()
    try:
        running, waiting = pool.submit(gate.wait, 10), pool.submit(lambda: "decoded")
        with pytest.raises(Overloaded) as caught:
            pool.submit(lambda: "refused")
        assert caught.value.retry_after == 1.0

        async def finish_then_open_the_gate() -> str:
            encoding = asyncio.ensure_future(pool.run_admitted(lambda: "encoded"))
            await asyncio.sleep(0.05)
            assert not encoding.done()  # queued behind the blocked task, not refused
            gate.set()
            return await encoding

        assert asyncio.run(finish_then_open_the_gate()) == "encoded"
        assert (running.result(timeout=10), waiting.result(timeout=10)) == (True, "decoded")
        assert pool.submit(lambda: "room again").result(timeout=10) == "room again"
    finally:
        gate.set()
        pool.close()


def test_closed_codec_pool_says_the_server_is_shutting_down():
    pool = CodecPool(threads=1, max_queue=0)
    pool.close()
    with pytest.raises(Unavailable):
        pool.submit(lambda: None)


@pytest.mark.skipif(not hasattr(os, "nice"), reason="thread niceness is a POSIX call")
def test_a_background_codec_pool_runs_at_a_lower_os_priority_than_the_rest_of_the_process():
    """Async jobs' images are encoded there: the OS must give the cores to interactive work first."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    background, foreground = CodecPool(threads=1, max_queue=1, niceness=10), CodecPool(threads=1, max_queue=1)
    try:
        def niceness() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        assert foreground.submit(niceness).result(timeout=5) == own
        assert background.submit(niceness).result(timeout=5) == min(own + 10, 19)
        assert os.getpriority(os.PRIO_PROCESS, 0) == own, "the calling thread kept its priority"
    finally:
        background.close()
        foreground.close()
