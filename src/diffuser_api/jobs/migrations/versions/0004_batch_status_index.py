"""An index on (batch_id, status): whether a batch still has pending lines, and its counts by
status, were read by scanning all of its lines (the batch index is in line order), once per
finished group of lines: quadratic in the batch's size (a 50,000-line batch scanned some
hundred million rows over its life).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("jobs_batch_status", "jobs", ["batch_id", "status"])


def downgrade() -> None:
    op.drop_index("jobs_batch_status", "jobs")
