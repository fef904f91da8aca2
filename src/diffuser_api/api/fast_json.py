"""JSON answers rendered by orjson: an image answer is mostly one long base64 string, which
orjson writes several times faster than the standard library, on the event loop's thread."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    """The same bytes on the wire as ``JSONResponse`` (compact, UTF-8), written by orjson."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
