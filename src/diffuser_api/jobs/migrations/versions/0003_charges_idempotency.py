"""Batch lines charged to their caller's image limit as they run; one record per Idempotency-Key.

``jobs.charge_to`` (copied from ``batches.charge_to``) names the rate-limit identity a line is
charged to when it runs; ``jobs.not_before`` holds a line back until its caller's window has
room. Unique indexes on (owner, idempotency_key) make two simultaneous submissions with one key
store one record: the loser reads the winner's. Duplicates stored before this revision keep
their records, and only the oldest keeps its key.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

IDEMPOTENT_TABLES = ("jobs", "files", "batches")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as table:
        table.add_column(sa.Column("charge_to", sa.String(300), nullable=True))
        table.add_column(sa.Column("not_before", sa.Float, nullable=True))
    with op.batch_alter_table("batches") as table:
        table.add_column(sa.Column("charge_to", sa.String(300), nullable=True))
    for name in IDEMPOTENT_TABLES:
        _forget_repeated_keys(name)
    op.drop_index("jobs_idempotency", "jobs")
    for name in IDEMPOTENT_TABLES:
        op.create_index(f"{name}_idempotency", name, ["owner", "idempotency_key"], unique=True)


def _forget_repeated_keys(name: str) -> None:
    """Keep the key on the oldest record of each (owner, key); later ones lose it."""
    table = sa.table(name, sa.column("id"), sa.column("owner"), sa.column("idempotency_key"),
                     sa.column("created_at"))
    older = table.alias("older")
    has_older = sa.exists().where(
        older.c.owner == table.c.owner, older.c.idempotency_key == table.c.idempotency_key,
        sa.or_(older.c.created_at < table.c.created_at,
               sa.and_(older.c.created_at == table.c.created_at, older.c.id < table.c.id)),
    )
    op.execute(table.update().where(table.c.idempotency_key.is_not(None), has_older).values(idempotency_key=None))


def downgrade() -> None:
    for name in IDEMPOTENT_TABLES:
        op.drop_index(f"{name}_idempotency", name)
    op.create_index("jobs_idempotency", "jobs", ["owner", "idempotency_key"])
    with op.batch_alter_table("batches") as table:
        table.drop_column("charge_to")
    with op.batch_alter_table("jobs") as table:
        table.drop_column("not_before")
        table.drop_column("charge_to")
