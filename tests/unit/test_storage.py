"""url responses: files under random names, and no name a client sends reaches outside the folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diffuser_api.errors import NotFound
from diffuser_api.service.storage import LocalStorage


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "images")


def test_saved_file_is_served_with_the_same_bytes(storage: LocalStorage) -> None:
    name = storage.save(b"\x89PNG fake bytes", "png")
    path = storage.path(name)
    assert path.is_file()
    assert path.read_bytes() == b"\x89PNG fake bytes"
    assert path.parent == storage.root


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_names_are_random_url_safe_and_carry_the_format(storage: LocalStorage, output_format: str) -> None:
    names = {storage.save(b"x", output_format) for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert re.fullmatch(rf"[A-Za-z0-9_-]{{32}}\.{output_format}", name)


def test_no_scratch_files_remain(storage: LocalStorage) -> None:
    for _ in range(3):
        storage.save(b"data", "webp")
    assert not list(storage.root.glob(".partial-*"))
    assert len(list(storage.root.iterdir())) == 3


def test_failed_write_leaves_no_scratch_file(storage: LocalStorage) -> None:
    with pytest.raises(TypeError):
        storage.save("not bytes", "png")  # type: ignore[arg-type]
    assert list(storage.root.iterdir()) == []


def test_names_outside_the_pattern_are_not_found(storage: LocalStorage, tmp_path: Path) -> None:
    real = storage.save(b"data", "png")
    stem = real.removesuffix(".png")
    (storage.root / f"{stem}.gif").write_bytes(b"data")
    (tmp_path / "x").write_bytes(b"secret")
    for name in [
        "../x",
        "..%2Fx",
        str(tmp_path / "x"),
        str(storage.root / real),
        f"{stem}.gif",
        f"{stem}.PNG",
        f"{real}\n",
        f"../images/{real}",
        "",
    ]:
        with pytest.raises(NotFound):
            storage.path(name)


def test_missing_file_is_not_found(storage: LocalStorage) -> None:
    name = "A" * 32 + ".png"
    with pytest.raises(NotFound) as caught:
        storage.path(name)
    assert name in caught.value.message
