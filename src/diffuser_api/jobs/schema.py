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
    # A line of a batch (migration 0002): its batch, custom_id and 1-based line number. Claims
    # take a lower class first (0: async job, 1: batch line).
    Column("batch_id", String(64), nullable=True),
    Column("custom_id", String(512), nullable=True),
    Column("line", Integer, nullable=True),
    Column("job_class", Integer, nullable=False, default=0),
    # Migration 0003: a batch line's rate-limit identity, charged as it runs (None: an async
    # job, charged at submission), and the time before which it is not claimed (its caller's
    # image window was full).
    Column("charge_to", String(300), nullable=True),
    Column("not_before", Float, nullable=True),
)
# In the claim's order, so a claim reads the first rows instead of sorting every queued one (0005).
Index("jobs_claim", jobs.c.status, jobs.c.model, jobs.c.job_class, jobs.c.created_at, jobs.c.line)
Index("jobs_batch", jobs.c.batch_id, jobs.c.line)
# Whether a batch has pending lines, and its counts by status, without reading every line (0004).
Index("jobs_batch_status", jobs.c.batch_id, jobs.c.status)
Index("jobs_owner", jobs.c.owner, jobs.c.created_at)
# One record per (owner, Idempotency-Key): a race between two submissions stores one (0003).
Index("jobs_idempotency", jobs.c.owner, jobs.c.idempotency_key, unique=True)

job_inputs = Table(
    "job_inputs",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    # "image" or "images" as uploaded, or "mask".
    Column("param", String(32), nullable=False),
    Column("data", LargeBinary, nullable=False),
)

# Uploaded and produced files (/v1/files): the bytes live in the storage backend under their id.
files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("filename", String(512), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("lines", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
)
Index("files_owner", files.c.owner, files.c.created_at)
Index("files_idempotency", files.c.owner, files.c.idempotency_key, unique=True)

batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("request_id", String(100), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("metadata", JSON, nullable=True),
    # The models the creating key may use (None: all), and the base of url results.
    Column("allowed_models", JSON, nullable=True),
    Column("url_base", String(2048), nullable=False),
    Column("output_ttl_s", Float, nullable=False),
    Column("total", Integer, nullable=False, default=0),
    # Written when it finishes (its lines' rows expire sooner than the batch).
    Column("completed", Integer, nullable=True),
    Column("failed", Integer, nullable=True),
    Column("errors", JSON, nullable=True),
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("in_progress_at", Float, nullable=True),
    Column("finalizing_at", Float, nullable=True),
    Column("completed_at", Float, nullable=True),
    Column("failed_at", Float, nullable=True),
    Column("expired_at", Float, nullable=True),
    Column("cancelling_at", Float, nullable=True),
    Column("cancelled_at", Float, nullable=True),
    # The rate-limit identity its lines are charged to as they run (migration 0003).
    Column("charge_to", String(300), nullable=True),
)
Index("batches_owner", batches.c.owner, batches.c.created_at)
Index("batches_status", batches.c.status)
Index("batches_idempotency", batches.c.owner, batches.c.idempotency_key, unique=True)
