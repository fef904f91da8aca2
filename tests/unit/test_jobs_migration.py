"""Replicas that start together on one new jobs database each bring its schema up to date
without tripping over the others (the second used to fail with the table already there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

MIGRATE = """
import sys
from diffuser_api.config import Settings
from diffuser_api.jobs.database import migrate, open_database
migrate(open_database(Settings(_env_file=None, jobs_url=sys.argv[1])))
"""


def migrate_at_once(url: str, replicas: int) -> list[subprocess.CompletedProcess[str]]:
    processes = [subprocess.Popen([sys.executable, "-c", MIGRATE, url], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(replicas)]
    outputs = [process.communicate(timeout=60)[0] for process in processes]  # reads as it waits: no full pipe
    return [subprocess.CompletedProcess(process.args, process.returncode, output)
            for process, output in zip(processes, outputs, strict=True)]


def migrated_tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_replicas_starting_together_on_one_new_sqlite_database_all_start(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    for finished in migrate_at_once(url, replicas=4):
        assert finished.returncode == 0, finished.stdout
    assert {"jobs", "alembic_version"} <= migrated_tables(url)
