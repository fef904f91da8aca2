"""The lines of a batch's output and error files, in OpenAI's shape.

``{"id": "batch_req_…", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}``: a completed line's body is the images response (``b64_json`` unless the line
asked for ``url``), a refused or failed line's is the OpenAI error envelope; a line that never
ran (cancelled or expired batch) has no response and an ``error`` with OpenAI's code.
"""

from __future__ import annotations

from typing import Any

from diffuser_api import errors
from diffuser_api.api.errors import envelope, error_kind
from diffuser_api.api.jobs import _result as job_result
from diffuser_api.errors import DiffuserError
from diffuser_api.jobs.batch_records import BatchRecord
from diffuser_api.jobs.batch_service import NOT_RUN
from diffuser_api.jobs.records import JobRecord, JobStatus
from diffuser_api.service.storage import ImageStorage

NOT_RUN_CODES = {code for code, _ in NOT_RUN.values()}


class BatchOutput:
    """The ``render_line`` the batch service writes its files with."""

    def __init__(self, storage: ImageStorage) -> None:
        self._storage = storage

    async def __call__(self, line: JobRecord, batch: BatchRecord) -> tuple[bool, dict[str, Any]]:
        shape: dict[str, Any] = {"id": line.id, "custom_id": line.custom_id, "response": None, "error": None}
        if line.status is JobStatus.COMPLETED:
            body = await job_result(line, self._storage, f"{batch.url_base}/jobs")
            shape["response"] = {"status_code": 200, "request_id": line.request_id, "body": body}
            return True, shape
        stored = line.error or {}
        if stored.get("code") in NOT_RUN_CODES:
            shape["error"] = {"code": stored["code"], "message": stored["message"]}
            return False, shape
        status, error_type, _ = error_kind(_error_class(stored.get("class")))
        body = envelope(line.request_id, stored.get("message", "the request failed"), error_type,
                        stored.get("param"), stored.get("code"))
        shape["response"] = {"status_code": status, "request_id": line.request_id, "body": body}
        return False, shape


def _error_class(name: Any) -> type[DiffuserError]:
    kind = getattr(errors, str(name), DiffuserError)
    return kind if isinstance(kind, type) and issubclass(kind, DiffuserError) else DiffuserError
