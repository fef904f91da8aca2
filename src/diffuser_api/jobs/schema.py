"""The jobs tables (SQLAlchemy Core). Changing them needs a migration in ``migrations/versions``."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
)

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    # The caller's API key name ("" without keys): another key's job is not found.
    Column("owner", String(200), nullable=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("request_id", String(100), nullable=False, default=""),
    Column("endpoint", String(32), nullable=False),
    Column("model", String(200), nullable=False),
    # Every ImageRequest field but the uploads, as JSON: fields added later ride along.
    Column("request", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("completed_at", Float, nullable=True),
    Column("expires_at", Float, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("step", Integer, nullable=True),
    Column("total_steps", Integer, nullable=True),
    Column("image_index", Integer, nullable=True),
    Column("result", JSON, nullable=True),
    Column("error", JSON, nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    # Which replica runs it, until when: a lapsed lease means that replica died.
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
)
Index("jobs_claim", jobs.c.status, jobs.c.model, jobs.c.created_at)
Index("jobs_owner", jobs.c.owner, jobs.c.created_at)
Index("jobs_idempotency", jobs.c.owner, jobs.c.idempotency_key)

job_inputs = Table(
    "job_inputs",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    # "image" or "images" as uploaded, or "mask".
    Column("param", String(32), nullable=False),
    Column("data", LargeBinary, nullable=False),
)
