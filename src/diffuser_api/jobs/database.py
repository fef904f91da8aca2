"""The jobs database: its URL, its engine, and its schema brought up to date at start-up."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from filelock import FileLock
from sqlalchemy.engine import Connection, Engine

from diffuser_api.config import Settings

MIGRATIONS = Path(__file__).parent / "migrations"
# A writer waits this long for SQLite's lock (another thread of this process) before failing.
SQLITE_BUSY_TIMEOUT_S = 30
# Replicas starting together wait this long for the one migrating before giving up.
MIGRATION_LOCK_TIMEOUT_S = 300
# PostgreSQL advisory lock key that serialises migrations (any fixed 64-bit number; "diffuser").
MIGRATION_ADVISORY_LOCK = 0x6469666675736572


def database_url(settings: Settings) -> str:
    """``postgresql://`` means psycopg 3 (SQLAlchemy alone would pick psycopg2, not installed)."""
    url = settings.jobs_url or f"sqlite:///{settings.cache_dir / 'jobs.sqlite3'}"
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url.removeprefix(plain)
    return url


def open_database(settings: Settings) -> Engine:
    url = database_url(settings)
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(connection: object, _record: object) -> None:
    """WAL lets readers (polls, GETs) go on while the dispatcher writes; foreign keys make
    deleting a job delete its inputs, as PostgreSQL does. ``synchronous=NORMAL`` in WAL mode
    syncs at checkpoints rather than at every commit: a killed process (SIGKILL, a crash) loses
    nothing committed, only a power cut can lose the last commits, and each batch line's
    several commits stop costing a disk sync each."""
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def migrate(engine: Engine) -> None:
    """Run every migration not run yet (Alembic's version table says which), in code: no
    ``alembic.ini`` to install, and an upgrade never loses the jobs already stored."""
    config = migration_config()
    with _sqlite_file_lock(engine), engine.begin() as connection:
        _hold_postgres_lock(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """Replicas started together on one new database would each see no schema and each create
    it, and all but one fail ("table jobs already exists"). SQLite has no lock a migration can
    hold across its DDL, so a lock file beside the database makes them take turns: the later
    ones find the schema current and do nothing."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    with FileLock(f"{path}.migrate.lock", timeout=MIGRATION_LOCK_TIMEOUT_S):
        yield


def _hold_postgres_lock(connection: Connection) -> None:
    """PostgreSQL's transactional DDL alone would fail the later replicas on the unique version
    row; a transaction-scoped advisory lock makes them wait for the first one's commit."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_ADVISORY_LOCK})


def migration_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config
