"""Logging for the server process: text or one JSON object per line, with keys scrubbed.

Our own lines never carry a key, but a WebSocket client may put one in its URL and other
libraries log URLs; the scrubbing filter sits on the handler, so it covers every logger.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

SECRETS = re.compile(r"(api_key=|openai-insecure-api-key\.|Bearer\s+)[^\s&\"',]+", re.IGNORECASE)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = SECRETS.sub(r"\1***", message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


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


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactKeys())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
