"""Where ``response_format=url`` images live: a local folder, under unguessable names."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path

from diffuser_api.errors import NotFound

# Names are random and carry their format, so the file route can check them strictly and no
# path a client sends can leave the storage folder.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{32}\.(png|jpeg|webp)")


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root

    def save(self, data: bytes, output_format: str) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{secrets.token_urlsafe(24)}.{output_format}"
        # Write then rename, so a client never downloads a half-written file.
        handle, scratch = tempfile.mkstemp(dir=self.root, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(scratch, self.root / name)
        except BaseException:
            # A failed write (disk full, bad data) must not leave scratch files piling up.
            os.unlink(scratch)
            raise
        return name

    def path(self, name: str) -> Path:
        path = self.root / name
        if not NAME_PATTERN.fullmatch(name) or not path.is_file():
            raise NotFound(f"no image named '{name}'", param="name", code="not_found")
        return path
