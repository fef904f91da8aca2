"""How the client fails: the server's error envelope or an unreachable server, as exit codes.

Scripts branch on the exit code, so each kind of failure has its own: whether to fix the
request (4xx), retry later (5xx) or check the address (connection) is theirs to decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    FILE_ERROR = 1  # an input image could not be read or an output image written
    USAGE = 2  # argparse's own code for a bad command line
    CLIENT_ERROR = 3  # the server answered 4xx: the request must change
    SERVER_ERROR = 4  # the server answered 5xx: it failed or cannot do it now
    CONNECTION = 5  # no server reached, or it hung up mid-answer
    INTERRUPTED = 130  # Ctrl-C, as shells report a SIGINT death (128 + 2)


# A WebSocket error message carries the envelope without an HTTP status; its type tells the side.
SERVER_SIDE_TYPES = frozenset({"server_error", "not_supported_error", "timeout_error"})


@dataclass
class ServerRefused(Exception):
    """The server answered with its error envelope."""

    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None
    request_id: str | None = None
    status: int | None = None  # None on the WebSocket, where errors come as messages

    @property
    def exit_code(self) -> ExitCode:
        server_side = self.status >= 500 if self.status is not None else self.type in SERVER_SIDE_TYPES
        return ExitCode.SERVER_ERROR if server_side else ExitCode.CLIENT_ERROR

    def envelope(self) -> dict[str, Any]:
        """The error as ``--json`` prints it: the server's envelope plus the status when known."""
        fields = {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                  "request_id": self.request_id}
        return {"error": fields | ({"status": self.status} if self.status is not None else {})}

    def describe(self) -> list[str]:
        """The lines a person reads on stderr: the message (it names the bad value), then the param."""
        lines = [f"error: {self.message}"]
        if self.param:
            lines.append(f"param: {self.param}")
        details = [f"HTTP {self.status}" if self.status is not None else None,
                   "/".join(part for part in (self.type, self.code) if part) or None,
                   f"request id {self.request_id}" if self.request_id else None]
        known = [detail for detail in details if detail]
        if known:
            lines.append("(" + ", ".join(known) + ")")
        return lines


def refusal_from(body: Any, status: int | None) -> ServerRefused:
    """The envelope of an error answer; a body that is not one (a proxy's page) still gets a message."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return ServerRefused(f"the server answered HTTP {status} without an error envelope", status=status)
    return ServerRefused(
        message=error["message"], type=error.get("type"), param=error.get("param"), code=error.get("code"),
        request_id=error.get("request_id"), status=status,
    )


class ConnectionFailed(Exception):
    """No answer from the server: refused, unreachable, timed out, or closed before it finished."""


class StoppedWatching(Exception):
    """Ctrl-C while following a job or a batch: it keeps running on the server (and can be resumed)."""

    def __init__(self, job_id: str, noun: str = "job", command: str = "jobs") -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.noun = noun  # "job" or "batch", as the user reads it
        self.command = command  # the client command that resumes or cancels it

    def describe(self) -> str:
        return (f"stopped watching; {self.noun} {self.job_id} keeps running on the server: resume with "
                f"`diffuser-api {self.command} wait {self.job_id}`, "
                f"stop it with `diffuser-api {self.command} cancel {self.job_id}`")


class SomeLinesFailed(Exception):
    """A batch ended with lines that did not complete: what did complete is saved and reported
    (``result``), and the command exits as a refused request does, so scripts see it."""

    def __init__(self, result: dict[str, Any], problems: list[str]) -> None:
        super().__init__(problems)
        self.result = result
        self.problems = problems
