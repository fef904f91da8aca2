"""url responses in a local folder: random names, no escape from the folder, expiry by age."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from diffuser_api.api.files import file_headers
from diffuser_api.errors import NotFound, Unavailable
from diffuser_api.service.storage import ImageStorage
from tests.conftest import free_port
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


def sizes_on_disk(storage: ImageStorage) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in folder(storage).iterdir()}


def test_quota_deletes_the_oldest_images_first(tmp_path: Path, clock: Clock) -> None:
    storage = ImageStorage(str(tmp_path / "images"), ttl_s=None, max_bytes=250, clock=clock)
    first = storage.save(b"1" * 100, "png")
    clock.now += 1
    second = storage.save(b"2" * 100, "png")
    clock.now += 1
    third = storage.save(b"3" * 100, "png")  # 300 > 250: the first goes
    assert sizes_on_disk(storage) == {second: 100, third: 100}
    with pytest.raises(NotFound):
        storage.read(first)
    clock.now += 1
    fourth = storage.save(b"4" * 200, "png")  # needs both older ones gone
    assert sizes_on_disk(storage) == {fourth: 200}
    assert storage.quota is not None and storage.quota.used_bytes == 200


def test_quota_counts_images_stored_before_a_restart(tmp_path: Path, clock: Clock) -> None:
    before = ImageStorage(str(tmp_path / "images"), ttl_s=None, clock=clock)
    old = before.save(b"o" * 100, "png")
    clock.now += 1
    kept = before.save(b"k" * 100, "png")
    (folder(before) / "notes.txt").write_text("not ours" * 100)  # not an image: neither counted nor deleted
    clock.now += 1
    after = ImageStorage(str(tmp_path / "images"), ttl_s=None, max_bytes=250, clock=clock)
    new = after.save(b"n" * 100, "png")
    assert set(sizes_on_disk(after)) == {kept, new, "notes.txt"}
    assert old not in sizes_on_disk(after)


def test_quota_forgets_expired_images(tmp_path: Path, clock: Clock) -> None:
    storage = ImageStorage(str(tmp_path / "images"), ttl_s=60, max_bytes=250, clock=clock)
    storage.save(b"1" * 100, "png")
    storage.save(b"2" * 100, "png")
    clock.now += 60
    assert storage.remove_expired() == 2
    assert storage.quota is not None and storage.quota.used_bytes == 0
    young = [storage.save(b"y" * 100, "png") for _ in range(2)]
    assert set(sizes_on_disk(storage)) == set(young)  # nothing young was deleted for the expired ones


def test_an_image_larger_than_the_quota_is_still_stored_alone(tmp_path: Path, clock: Clock) -> None:
    storage = ImageStorage(str(tmp_path / "images"), ttl_s=None, max_bytes=100, clock=clock)
    storage.save(b"s" * 50, "png")
    big = storage.save(b"b" * 500, "png")
    assert sizes_on_disk(storage) == {big: 500}


def test_quota_holds_under_concurrent_saves(tmp_path: Path) -> None:
    storage = ImageStorage(str(tmp_path / "images"), ttl_s=None, max_bytes=10_000)
    with ThreadPoolExecutor(max_workers=8) as pool:
        names = list(pool.map(lambda index: storage.save(bytes(1000), "png"), range(200)))
    on_disk = sizes_on_disk(storage)
    assert sum(on_disk.values()) <= 10_000 and len(on_disk) == 10
    assert storage.quota is not None and storage.quota.used_bytes == sum(on_disk.values())
    assert set(on_disk) <= set(names)


def test_a_failed_write_is_unavailable_and_releases_its_quota(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = ImageStorage(str(tmp_path / "images"), ttl_s=None, max_bytes=1000, clock=clock)
    kept = storage.save(b"k" * 100, "png")

    def disk_full(path: str, data: bytes) -> None:
        raise OSError(28, "No space left on device", path)

    with monkeypatch.context() as patch:
        patch.setattr(storage._fs, "pipe_file", disk_full)
        with pytest.raises(Unavailable) as caught:
            storage.save(b"x" * 100, "png")
    assert caught.value.retry_after and str(tmp_path) not in caught.value.message
    assert sizes_on_disk(storage) == {kept: 100}  # no scratch file either
    assert storage.quota is not None and storage.quota.used_bytes == 100


def test_an_object_store_that_is_down_is_unavailable(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = {"key": "testing", "secret": "testing", "config_kwargs": {"retries": {"max_attempts": 1}},
               "client_kwargs": {"endpoint_url": closed, "region_name": "us-east-1"}}
    storage = ImageStorage("s3://images/results", options, ttl_s=60)
    with pytest.raises(Unavailable) as caught:
        storage.save(b"data", "png")
    assert caught.value.retry_after and "127.0.0.1" not in caught.value.message


def test_storage_failures_answer_503_and_the_server_carries_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with TestClient(fake_app(tmp_path)) as client:
        wait_ready(client)
        storage = client.app.state.storage
        stored = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
        name = stored.json()["data"][0]["url"].rsplit("/", 1)[1]

        def denied(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied", f"{storage.root}/secret")

        with monkeypatch.context() as patch:
            patch.setattr(storage._fs, "pipe_file", denied)
            patch.setattr(storage._fs, "cat_file", denied)
            for response in (
                client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"}),
                client.get(f"/v1/images/files/{name}"),
            ):
                error = assert_envelope(response, 503)
                assert error["type"] == "server_error" and "store" in error["message"]
                assert str(tmp_path) not in response.text and "Permission" not in response.text
                assert float(response.headers["retry-after"]) > 0
            # Answers that store nothing are not held up by a broken store.
            assert client.post("/v1/images/generations", json={"prompt": "x"}).status_code == 200
        assert "Permission denied" in caplog.text  # the details are in the log
        again = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
        assert client.get(again.json()["data"][0]["url"]).status_code == 200


def test_file_route_headers_follow_the_images_time_to_live(tmp_path: Path) -> None:
    for ttl, expected in ((3600, range(3598, 3601)), (None, [365 * 24 * 3600])):
        with TestClient(fake_app(tmp_path / str(ttl), storage_ttl_s=ttl)) as client:
            wait_ready(client)
            url = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
            response = client.get(url.json()["data"][0]["url"])
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
            assert response.headers["x-content-type-options"] == "nosniff"
            cache = response.headers["cache-control"]
            assert re.fullmatch(r"private, max-age=\d+, immutable", cache), cache
            assert int(cache.split("max-age=")[1].split(",")[0]) in expected


def test_max_age_is_what_is_left_of_the_images_life(storage: ImageStorage, clock: Clock) -> None:
    name = storage.save(b"x", "png")
    clock.now += 45.5
    assert file_headers(storage.remaining_s(name))["cache-control"] == "private, max-age=14, immutable"
    clock.now += 15
    with pytest.raises(NotFound):
        storage.remaining_s(name)
