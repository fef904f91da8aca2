"""How a command reports: a live display on a terminal, plain lines otherwise, or script modes."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console

from diffuser_api.client.display_parts import PathsDisplay, SilentDisplay
from diffuser_api.client.progress import Display, LineDisplay, LiveDisplay

EXIT_CODES_HELP = """exit codes:
  0  done
  1  a local file could not be read or written
  2  usage error (bad command line)
  3  the server refused the request (HTTP 4xx: bad value, unknown model, key, rate limit)
  4  the server failed or cannot do it (HTTP 5xx, e.g. 501 for a disabled task)
  5  no connection to the server (refused, not found, timed out, closed mid-answer)
  130  Ctrl-C: a synchronous request is cancelled on the server; a job being watched keeps running
"""


@dataclass(frozen=True)
class Output:
    """Where and how results go: a live display on a terminal, lines otherwise, or script modes."""

    mode: str  # "live", "lines", "paths" (-q) or "json"
    stdout: TextIO

    @classmethod
    def for_args(cls, args: argparse.Namespace, stdout: TextIO) -> Output:
        if args.json:
            return cls("json", stdout)
        if args.quiet:
            return cls("paths", stdout)
        return cls("live" if stdout.isatty() else "lines", stdout)

    def display(self, what: str) -> Display:
        displays: dict[str, Callable[[], Display]] = {
            "live": lambda: LiveDisplay(Console(file=self.stdout), what),
            "lines": lambda: LineDisplay(self.stdout),
            "paths": lambda: PathsDisplay(self.stdout),
            "json": SilentDisplay,
        }
        return displays[self.mode]()

    def line(self, text: str) -> None:
        """A line a person reads: not with ``-q`` or ``--json``, whose output scripts parse."""
        if self.mode in ("live", "lines"):
            print(text, file=self.stdout, flush=True)
