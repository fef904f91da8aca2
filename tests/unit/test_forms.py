"""Multipart bodies: image and mask parts are raw bytes whatever their filename or content type,
text fields are text, and every part is capped while it is read."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import Request

from diffuser_api.api.forms import MAX_IMAGES, ParsedForm, read_image_form
from diffuser_api.config import Settings
from diffuser_api.domain import Task
from tests.fakes import FakeRunner, fake_app, png_bytes
from tests.unit.test_api import EDIT, VAR, assert_envelope, assert_still_serves, wait_ready

# Every byte value, CR LF pairs and a fake boundary line: what a text decode or a naive
# splitter would corrupt.
BINARY = bytes(range(256)) * 3 + b"\r\n--boundary\r\n\r\n\xff\xfe\x00" + "é".encode("latin-1")


def parse(data: dict[str, str], files: list, *, chunk: int = 7, **settings: object) -> ParsedForm:
    """The body exactly as httpx writes it, fed to the reader in small chunks."""
    encoded = httpx.Request("POST", "http://test/v1/images/edits", data=data, files=files)
    body = encoded.read()
    chunks = [body[start:start + chunk] for start in range(0, len(body), chunk)]
    scope = {
        "type": "http", "method": "POST", "path": "/v1/images/edits",
        "headers": [(name.lower().encode(), value.encode()) for name, value in encoded.headers.items()],
    }

    async def receive() -> dict:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    return asyncio.run(read_image_form(Request(scope, receive), Settings(_env_file=None, **settings)))


def test_image_parts_arrive_byte_identical_with_or_without_filename():
    form = parse(
        {"prompt": "un café", "n": "2"},
        [
            ("image", (None, BINARY, "application/octet-stream")),
            ("image[]", ("x.txt", BINARY[::-1], "text/plain")),
            ("image[]", ("photo.png", BINARY[:100], "image/png")),
            ("mask", (None, BINARY[5:], "text/plain; charset=utf-8")),
        ],
    )
    assert [upload.data for upload in form.images] == [BINARY, BINARY[::-1], BINARY[:100]]
    assert {upload.param for upload in form.images} == {"image"}
    assert form.mask is not None and form.mask.data == BINARY[5:] and form.mask.param == "mask"
    assert form.fields == {"prompt": "un café", "n": "2"}
    assert all(isinstance(value, str) for value in form.fields.values())


def test_parts_larger_than_one_chunk_are_whole():
    big = BINARY * 400
    form = parse({"prompt": "x"}, [("image", (None, big, "application/octet-stream"))], chunk=65536)
    assert form.images[0].data == big


@pytest.fixture()
def runner():
    return FakeRunner()


@pytest.fixture()
def client(tmp_path, runner):
    with TestClient(fake_app(tmp_path, runner, tasks=frozenset(Task))) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.mark.parametrize(
    "part",
    [
        (None, png_bytes((40, 24), (9, 99, 199)), "application/octet-stream"),
        (None, png_bytes((40, 24), (9, 99, 199)), None),
        ("x.txt", png_bytes((40, 24), (9, 99, 199)), "text/plain"),  # the name and the type lie
        ("upload", png_bytes((40, 24), (9, 99, 199)), "application/octet-stream"),
    ],
)
def test_edit_and_variation_take_image_parts_by_their_bytes(client, runner, part):
    name, data, content_type = part
    files = {"image": (name, data) if content_type is None else (name, data, content_type)}
    assert client.post(EDIT, data={"prompt": "blue"}, files=files).status_code == 200
    assert client.post(VAR, files=files).status_code == 200
    for job in runner.jobs_seen:
        assert job.images[0].size == (40, 24)
        assert job.images[0].convert("RGB").getpixel((0, 0)) == (9, 99, 199)


def test_image_array_and_mask_without_filenames(client, runner):
    files = [
        ("image[]", (None, png_bytes((32, 32), (10, 20, 30)), "application/octet-stream")),
        ("image[]", (None, png_bytes((32, 32), (40, 50, 60)), "application/octet-stream")),
    ]
    assert client.post(EDIT, data={"prompt": "two"}, files=files).status_code == 200
    mask = ("mask", (None, png_bytes((32, 32), (0, 0, 0, 0), "RGBA"), "application/octet-stream"))
    assert client.post(EDIT, data={"prompt": "masked"}, files=[files[0], mask]).status_code == 200
    several, masked = runner.jobs_seen
    assert [image.convert("RGB").getpixel((0, 0)) for image in several.images] == [(10, 20, 30), (40, 50, 60)]
    assert masked.task is Task.MASKED_EDIT and isinstance(masked.mask, Image.Image)
    assert masked.mask.getpixel((0, 0)) == 255


def multipart(parts: list[bytes], *, closed: bool = True) -> tuple[bytes, dict[str, str]]:
    body = b"".join(b"--b0undary\r\n" + part + b"\r\n" for part in parts) + (b"--b0undary--\r\n" if closed else b"")
    return body, {"content-type": "multipart/form-data; boundary=b0undary"}


PNG_PART = b'Content-Disposition: form-data; name="image"\r\n\r\n' + png_bytes()


@pytest.mark.parametrize(
    ("body", "headers", "status", "param", "code"),
    [
        (*multipart([PNG_PART, b'Content-Disposition: form-data; name="prompt"\r\n\r\nx'], closed=False), 400,
         None, "invalid_multipart"),
        (b"--x\r\n", {"content-type": "multipart/form-data"}, 400, None, "invalid_multipart"),
        (*multipart([b'Content-Disposition: form-data\r\n\r\nx']), 400, None, "invalid_multipart"),
        (*multipart([PNG_PART, b'Content-Disposition: form-data; name="prompt"\r\n\r\n\xff\xfe']), 400,
         "prompt", "invalid_value"),
        (*multipart([PNG_PART, b'Content-Disposition: form-data; name="prompt"; filename="p.txt"\r\n\r\nx']),
         400, "prompt", "invalid_value"),
        (*multipart([PNG_PART, b'Content-Disposition: form-data; name="prompt"\r\n\r\n' + b"x" * 5000]),
         413, "prompt", "payload_too_large"),
        (*multipart([b'Content-Disposition: form-data; name="image"\r\n\r\n' + b"\0" * 9000]),
         413, "image", "payload_too_large"),
        (*multipart([PNG_PART] * (MAX_IMAGES + 1)), 400, "image", "invalid_value"),
        (b"prompt=x&image=abc", {"content-type": "application/x-www-form-urlencoded"}, 400, "image",
         "invalid_content_type"),
    ],
)
def test_bad_multipart_bodies(tmp_path, body, headers, status, param, code):
    with TestClient(fake_app(tmp_path, max_json_bytes=4096, max_upload_bytes=8192)) as client:
        wait_ready(client)
        assert_envelope(client.post(EDIT, content=body, headers=headers), status, param, code)
        assert_still_serves(client)
