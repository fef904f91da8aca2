"""Logging for the server process: text or one JSON object per line, with keys scrubbed.

Our own lines never carry a key, but a WebSocket client may put one in its URL and other
libraries log URLs; the scrubbing filter sits on the handler, so it covers every logger.
Clients also choose text that gets logged (a path, a model name): its control characters are
escaped, so a ``%0a`` in a path cannot forge a log line of its own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import TextIO

SECRETS = re.compile(r"(api_key=|openai-insecure-api-key\.|Bearer\s+)[^\s&\"',]+", re.IGNORECASE)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# C0 and C1 controls, DEL, and Unicode's line and paragraph separators: what a terminal or a
# log shipper may take for a new line or a command.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_control_characters(text: str) -> str:
    """``\\n``, ``\\r``, ``\\t``, else ``\\xNN`` or ``\\uNNNN``: visible, and on one line."""
    return CONTROL_CHARACTERS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    character = match.group()
    code = ord(character)
    return SHORT_ESCAPES.get(character) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


class RedactKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = SECRETS.sub(r"\1***", message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


class DropTorchvisionAdvice(logging.Filter):
    """transformers advises installing torchvision each time diffusers imports its pipelines, on
    every CPU start. Following the advice breaks the install (torchvision fails to import beside
    the torch wheel this project pins), and the Pil fallback it describes is what we use anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("transformers") and "requires torchvision" in record.getMessage())


class TextFormatter(logging.Formatter):
    """One line per message; a traceback after it keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's API)
        record.message = escape_control_characters(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """Log shippers parse this without patterns; a request line adds its fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "request", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """The handler every logger writes through: formatted, keys scrubbed. Default: stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    handler.addFilter(RedactKeys())
    handler.addFilter(DropTorchvisionAdvice())
    return handler


def route_transformers_logs() -> None:
    """transformers writes through a handler of its own, past our format, key scrubbing and
    filters; send its records through ours, as uvicorn's are. Called by the server only: it
    imports transformers."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


def configure_logging(level: str, log_format: str) -> None:
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format)], force=True)
