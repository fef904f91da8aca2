"""What ``jobs`` and ``batch`` share: both name work that runs on the server without a
connection, so both submit it and report its id, show or cancel it by id, and wait for it,
where Ctrl-C only stops watching.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from diffuser_api.client.failures import StoppedWatching
from diffuser_api.client.output import Output
from diffuser_api.client.server import Server

ActionRun = Callable[[argparse.Namespace, Server, Output], dict[str, Any]]


@dataclass(frozen=True)
class Watched:
    """The kind of work, in the words the user reads and types."""

    noun: str  # "job" or "batch"
    command: str  # the client command that waits for it or cancels it


JOB = Watched("job", "jobs")
BATCH = Watched("batch", "batch")


def action_adder(actions: Any, connection: argparse.ArgumentParser,
                 epilog: str) -> Callable[[str, ActionRun, str], argparse.ArgumentParser]:
    """``add(name, run, help)`` for the subcommands of ``jobs`` or ``batch``: each takes the
    connection options and ends its help with the exit codes."""

    def add(name: str, run: ActionRun, help: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, parents=[connection], help=help, description=help, epilog=epilog,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.set_defaults(run=run)
        return parser

    return add


def report_submitted(record: dict[str, Any], watched: Watched, output: Output) -> dict[str, Any]:
    """Submitted, not waited for: the id is what a script needs (``-q`` prints only it)."""
    if output.mode == "paths":
        print(record["id"], file=output.stdout, flush=True)
    output.line(f"{watched.noun} {record['id']} {record['status']}: follow it with "
                f"`diffuser-api {watched.command} wait {record['id']}`")
    return record


def report_status(record: dict[str, Any], lines: list[str], output: Output) -> dict[str, Any]:
    """``show`` and ``cancel``: ``-q`` prints only the status (for scripts), a person reads the lines."""
    if output.mode == "paths":
        print(record["status"], file=output.stdout)
    for line in lines:
        output.line(line)
    return record


@contextmanager
def stop_watching_on_ctrl_c(record_id: str, watched: Watched) -> Iterator[None]:
    """Ctrl-C while waiting leaves the work running: say how to resume or cancel it."""
    try:
        yield
    except KeyboardInterrupt:
        raise StoppedWatching(record_id, noun=watched.noun, command=watched.command) from None
