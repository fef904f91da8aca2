"""A throwaway PostgreSQL server for tests: Debian's binaries, run as the ``postgres`` user in a
temporary directory on a free port, trust authentication, stopped at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Debian installs each major version side by side; the newest will do.
BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/usr/lib/postgresql/15/bin"),
          key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)
USER = "postgres"


def available() -> str | None:
    """Why no server can be started here, or None."""
    if not (BIN / "initdb").exists():
        return f"no PostgreSQL binaries in {BIN} (apt-get install postgresql)"
    if os.geteuid() != 0 and os.environ.get("USER") != USER:
        return "starting PostgreSQL needs root (to run it as the postgres user)"
    return None


def _as_postgres(*command: str) -> list[str]:
    return list(command) if os.geteuid() != 0 else ["runuser", "-u", USER, "--", *command]


@contextmanager
def postgres_server(port: int) -> Iterator[str]:
    """Yields a ``postgresql://`` URL to a fresh database."""
    folder = Path(tempfile.mkdtemp(prefix="diffuser-pg-"))
    data = folder / "data"
    try:
        if os.geteuid() == 0:
            shutil.chown(folder, USER, USER)
        subprocess.run(_as_postgres(str(BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", USER),
                       check=True, capture_output=True)
        subprocess.run(_as_postgres(
            str(BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
            "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start",
        ), check=True, capture_output=True)
        try:
            yield f"postgresql://{USER}@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(_as_postgres(str(BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
                           capture_output=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
