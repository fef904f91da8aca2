"""url responses in a local folder: random names, no escape from the folder, expiry by age."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from diffuser_api.errors import NotFound
from diffuser_api.service.storage import ImageStorage
from tests.fakes import fake_app
from tests.unit.test_api import assert_envelope, wait_ready


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def storage(tmp_path: Path, clock: Clock) -> ImageStorage:
    return ImageStorage(str(tmp_path / "images"), ttl_s=60, clock=clock)


def folder(storage: ImageStorage) -> Path:
    return Path(storage.root)


def test_saved_image_reads_back_from_the_folder(storage: ImageStorage) -> None:
    name = storage.save(b"\x89PNG fake bytes", "png")
    assert storage.read(name) == b"\x89PNG fake bytes"
    assert (folder(storage) / name).read_bytes() == b"\x89PNG fake bytes"


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_names_are_random_url_safe_and_carry_time_and_format(storage: ImageStorage, output_format: str) -> None:
    names = {storage.save(b"x", output_format) for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert re.fullmatch(rf"1800000000-[A-Za-z0-9_-]{{32}}\.{output_format}", name)


def test_local_urls_point_at_the_file_route(storage: ImageStorage) -> None:
    name = storage.save(b"x", "png")
    assert storage.url(name, "https://host/v1/images/files") == f"https://host/v1/images/files/{name}"


def test_no_scratch_files_remain(storage: ImageStorage) -> None:
    for _ in range(3):
        storage.save(b"data", "webp")
    assert not list(folder(storage).glob(".partial-*"))
    assert len(list(folder(storage).iterdir())) == 3


def test_failed_write_leaves_no_scratch_file(storage: ImageStorage) -> None:
    with pytest.raises(TypeError):
        storage.save("not bytes", "png")  # type: ignore[arg-type]
    assert list(folder(storage).iterdir()) == []


def test_names_outside_the_pattern_are_not_found(storage: ImageStorage, tmp_path: Path) -> None:
    real = storage.save(b"data", "png")
    stem = real.removesuffix(".png")
    (folder(storage) / f"{stem}.gif").write_bytes(b"data")
    (tmp_path / "x").write_bytes(b"secret")
    for name in [
        "../x",
        "..%2Fx",
        str(tmp_path / "x"),
        f"{storage.root}/{real}",
        f"{stem}.gif",
        f"{stem}.PNG",
        f"{real}\n",
        f"../images/{real}",
        "",
    ]:
        with pytest.raises(NotFound):
            storage.read(name)


def test_missing_file_is_not_found(storage: ImageStorage) -> None:
    name = "1800000000-" + "A" * 32 + ".png"
    with pytest.raises(NotFound) as caught:
        storage.read(name)
    assert name in caught.value.message


def test_expired_images_are_not_served_and_cleanup_removes_only_them(storage: ImageStorage, clock: Clock) -> None:
    old = storage.save(b"old", "png")
    clock.now += 30
    young = storage.save(b"young", "png")
    (folder(storage) / "notes.txt").write_text("not ours")
    clock.now += 30  # old is 60 s old: at its time to live
    with pytest.raises(NotFound):
        storage.read(old)
    assert storage.read(young) == b"young"
    assert storage.remove_expired() == 1
    assert sorted(path.name for path in folder(storage).iterdir()) == sorted([young, "notes.txt"])
    assert storage.remove_expired() == 0


def test_without_ttl_nothing_expires(tmp_path: Path, clock: Clock) -> None:
    storage = ImageStorage(str(tmp_path / "images"), ttl_s=None, clock=clock)
    name = storage.save(b"kept", "png")
    clock.now += 10 * 365 * 24 * 3600
    assert storage.read(name) == b"kept"
    assert storage.remove_expired() == 0


def test_cleanup_before_anything_is_stored(tmp_path: Path) -> None:
    assert ImageStorage(str(tmp_path / "never-written"), ttl_s=1).remove_expired() == 0


def test_the_app_deletes_expired_images_in_the_background(tmp_path: Path) -> None:
    app = fake_app(tmp_path, storage_ttl_s=1, storage_cleanup_interval_s=0.1)
    with TestClient(app) as client:
        wait_ready(client)
        response = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
        name = response.json()["data"][0]["url"].rsplit("/", 1)[1]
        assert client.get(f"/v1/images/files/{name}").status_code == 200
        deadline = time.monotonic() + 5
        while (tmp_path / "images" / name).exists():
            assert time.monotonic() < deadline, "the cleanup task never removed the expired image"
            time.sleep(0.1)
        assert_envelope(client.get(f"/v1/images/files/{name}"), 404)
