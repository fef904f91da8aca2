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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class KnownNoise:
    """A library's message that says nothing true or useful about this server."""

    logger: str  # the logger's name or a parent's
    text: str  # a part of the message
    why: str


KNOWN_NOISE = (
    KnownNoise("transformers", "requires torchvision",
               "advice given each time diffusers imports its pipelines on a CPU; following it breaks the "
               "install (torchvision fails to import beside the pinned torch), and the Pil fallback it "
               "describes is what we use anyway"),
    KnownNoise("torchao", "Failed to load",
               "torchao's optional CUDA and MX kernels, absent from a CPU machine; int8 runs without them"),
    KnownNoise("torchao.kernel.intmm", "Detected no triton", "triton serves CUDA only"),
    KnownNoise("torch.utils._pytree", "is an Enum subclass and is now natively supported",
               "torchao registering its enums the way older torch needed, once per start"),
    KnownNoise("diffusers.quantizers.torchao", "Unable to import `torchao` Tensor objects",
               "at every start, with any model: the installed torchao lacks tensor classes this diffusers "
               "names. It matters only to a checkpoint saved already quantized by torchao (loading one "
               "fails with its own error); `memory: {quantization: int8}` quantizes as weights load"),
    KnownNoise("diffusers.models.modeling_utils", "that should be kept in float32: []",
               "a cast warning about an empty list of modules: nothing is cast wrongly"),
    KnownNoise("alembic.runtime.plugins", "setup plugin", "alembic's plugins, listed at every start"),
    KnownNoise("alembic.runtime.migration", "Context impl", "alembic's dialect, at every start"),
    KnownNoise("alembic.runtime.migration", "Will assume", "alembic's DDL mode, at every start"),
)


class DropKnownNoise(logging.Filter):
    """Drops KNOWN_NOISE, so that a warning at start means something; every other message of
    those libraries stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any((record.name == noise.logger or record.name.startswith(f"{noise.logger}."))
                       and noise.text in record.getMessage() for noise in KNOWN_NOISE)


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
    handler.addFilter(DropKnownNoise())
    return handler


def route_library_logs() -> None:
    """transformers and diffusers write through handlers of their own, and torch through its
    own for some loggers: past our format, key scrubbing and filters. Send transformers' and
    diffusers' records through ours (as uvicorn's are), without their loading progress bars
    (lines of terminal control characters in a log), and filter torch's handlers as ours.
    Called by the server only, before any pipeline is imported: it imports torch."""
    import torch  # noqa: F401 (torch sets up its loggers' handlers on import)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (transformers_logging, diffusers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()
    for handler in logging.getLogger("torch").handlers:
        if not any(isinstance(existing, DropKnownNoise) for existing in handler.filters):
            handler.addFilter(DropKnownNoise())


def configure_logging(level: str, log_format: str) -> None:
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format)], force=True)
