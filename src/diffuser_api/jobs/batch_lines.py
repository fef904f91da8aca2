"""The lines of a batch input file, checked as OpenAI checks them before a batch starts.

A line that is not a JSON object, lacks ``custom_id``/``method``/``url``/``body``, names another
url than the batch's endpoint, or repeats a ``custom_id`` fails the whole batch, with every such
line named (1-based). Whether a well-formed line's *body* is a valid request is decided later,
line by line: a refused body fails that line alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# OpenAI's batch endpoints for images, and the job endpoint each line becomes.
BATCH_ENDPOINTS = {"/v1/images/generations": "generations", "/v1/images/edits": "edits"}
REQUIRED = ("custom_id", "method", "url", "body")
MAX_CUSTOM_ID = 512
# Past this many, a failed batch's errors stop listing lines (the count is still reported).
MAX_LISTED_ERRORS = 1000


@dataclass(frozen=True)
class BatchLine:
    line: int
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class CheckedLines:
    lines: list[BatchLine]
    errors: list[dict[str, Any]]


def _error(line: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


def check_lines(raw_lines: Iterable[bytes], endpoint: str) -> CheckedLines:
    """Every line parsed, or the reasons the batch fails; blank lines are skipped."""
    lines: list[BatchLine] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        problem, parsed = _check(number, raw, endpoint, seen)
        if problem is not None:
            errors.append(problem)
        elif parsed is not None:
            seen.add(parsed.custom_id)
            lines.append(parsed)
    if not lines and not errors:
        errors.append(_error(1, "empty_file", "the input file holds no requests"))
    return CheckedLines(lines, errors)


def _check(number: int, raw: bytes, endpoint: str, seen: set[str]) -> tuple[dict[str, Any] | None, BatchLine | None]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _error(number, "invalid_json_line", "this line is not valid JSON"), None
    if not isinstance(value, dict):
        return _error(number, "invalid_json_line", "this line is not a JSON object"), None
    for name in REQUIRED:
        if name not in value:
            return _error(number, "missing_required_parameter", f"Missing required parameter: '{name}'.",
                          name), None
    custom_id, body = value["custom_id"], value["body"]
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        return _error(number, "invalid_custom_id", f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters",
                      "custom_id"), None
    if value["method"] != "POST":
        return _error(number, "invalid_method", "method must be 'POST'", "method"), None
    if value["url"] != endpoint:
        return _error(number, "mismatched_url", f"url '{value['url']}' is not the batch's endpoint '{endpoint}'",
                      "url"), None
    if not isinstance(body, dict):
        return _error(number, "invalid_body", "body must be a JSON object", "body"), None
    if custom_id in seen:
        return _error(number, "duplicate_custom_id", f"custom_id '{custom_id}' is used by an earlier line",
                      "custom_id"), None
    return None, BatchLine(number, custom_id, body)
