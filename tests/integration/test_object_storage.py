"""``response_format=url`` end to end: the openai SDK asks for a url, the test downloads it and
decodes the image, from a local folder, S3 (moto server) and GCS (gcp-storage-emulator)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from diffuser_api.errors import NotFound
from diffuser_api.service.storage import ImageStorage
from tests.fakes import colour_of, fake_app
from tests.storage_emulators import GCS_ENVIRONMENT, Emulator, gcs_options, s3_options, start_gcs, start_moto
from tests.unit.test_api import assert_envelope, wait_ready
from tests.unit.test_auth import sdk

KEY = "sk-storage"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    emulator = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_options(emulator.endpoint))
        fs.call_s3("create_bucket", Bucket="images")  # fs.mkdir trips over moto's location check
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    os.environ.update(GCS_ENVIRONMENT)
    emulator = start_gcs(tmp_path_factory.mktemp("gcs"))
    try:
        fsspec.filesystem("gs", skip_instance_cache=True, **gcs_options(emulator.endpoint)).mkdir("images")
        yield emulator
    finally:
        emulator.stop()


def generate_url(client: TestClient) -> str:
    result = sdk(client, KEY).images.generate(prompt="a boat", size="32x16", response_format="url",
                                             extra_body={"seed": 5})
    return result.data[0].url


def assert_is_the_image(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (32, 16)
    assert image.convert("RGB").getpixel((0, 0)) == colour_of("a boat", 5)


def storage_app(tmp_path: Path, url: str | None = None, options: dict | None = None) -> TestClient:
    settings = {"storage_url": url, "storage_options": options or {}} if url else {}
    return TestClient(fake_app(tmp_path, api_keys=[KEY], **settings))


def test_url_from_local_storage(tmp_path):
    with storage_app(tmp_path) as client:
        wait_ready(client)
        url = generate_url(client)
        assert url.startswith("http://testserver/v1/images/files/")
        download = client.get(url)  # no key: file names are the secret
        assert download.headers["content-type"] == "image/png"
        assert_is_the_image(download.content)
        assert [path.name for path in (tmp_path / "images").iterdir()] == [url.rsplit("/", 1)[1]]


@pytest.mark.slow
def test_url_from_s3_is_presigned_and_downloads(tmp_path, moto):
    with storage_app(tmp_path, "s3://images/results", s3_options(moto.endpoint)) as client:
        wait_ready(client)
        url = generate_url(client)
        assert url.startswith(f"{moto.endpoint}/images/results/") and "Signature=" in url
        download = httpx.get(url, timeout=10)  # straight from the object store, not through us
        assert download.status_code == 200 and download.headers["content-type"] == "image/png"
        assert_is_the_image(download.content)


@pytest.mark.slow
def test_url_from_s3_served_through_the_server_when_not_presigning(tmp_path, moto):
    settings = {"storage_url": "s3://images/unsigned", "storage_options": s3_options(moto.endpoint),
                "storage_presign": False}
    with TestClient(fake_app(tmp_path, api_keys=[KEY], **settings)) as client:
        wait_ready(client)
        url = generate_url(client)
        assert url.startswith("http://testserver/v1/images/files/")
        assert_is_the_image(client.get(url).content)


@pytest.mark.slow
def test_url_from_gcs_is_served_through_the_server(tmp_path, gcs):
    with storage_app(tmp_path, "gs://images/results", gcs_options(gcs.endpoint)) as client:
        wait_ready(client)
        url = generate_url(client)
        assert url.startswith("http://testserver/v1/images/files/")
        download = client.get(url)
        assert download.status_code == 200 and download.headers["content-type"] == "image/png"
        assert_is_the_image(download.content)
        for bad in ("..%2Fresults%2F" + url.rsplit("/", 1)[1], "%2E%2E%2F%2E%2E%2Fimages", "x.png"):
            assert_envelope(client.get(f"/v1/images/files/{bad}"), 404)


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["s3", "gs"])
def test_expired_objects_are_removed_from_object_stores(request, backend):
    emulator = request.getfixturevalue("moto" if backend == "s3" else "gcs")
    options = s3_options(emulator.endpoint) if backend == "s3" else gcs_options(emulator.endpoint)
    clock = Clock()
    storage = ImageStorage(f"{backend}://images/ttl-{backend}", options, ttl_s=60, clock=clock)
    old = storage.save(b"old", "png")
    clock.now += 30
    young = storage.save(b"young", "webp")
    clock.now += 30
    assert storage.remove_expired() == 1
    fs = fsspec.filesystem(backend, skip_instance_cache=True, **options)
    assert [path.rsplit("/", 1)[1] for path in fs.ls(f"images/ttl-{backend}", detail=False)] == [young]
    assert storage.read(young) == b"young"
    with pytest.raises(NotFound):
        storage.read(old)
