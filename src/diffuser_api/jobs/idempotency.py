"""One record per (owner, Idempotency-Key), even when two submissions race.

Looking for an earlier record before inserting leaves a window in which two simultaneous
submissions (an SDK retrying a POST whose answer was slow) both find none. A unique index on
(owner, idempotency_key) closes it: the second insert fails, and the loser answers with the
winner's record. The index would also refuse a key reused after the window, so an expired
record gives up its key in the same transaction as the new insert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine


def insert_once(
    engine: Engine, table: sa.Table, owner: str, key: str | None, since: float, write: Callable[[Connection], None],
) -> Any | None:
    """Run ``write`` (which inserts the new row of ``table``) in one transaction; returns None
    once written, or the row that holds ``key`` for ``owner`` (created since ``since``) when
    another submission stored it first."""
    try:
        with engine.begin() as connection:
            if key is not None:
                connection.execute(
                    table.update().where(table.c.owner == owner, table.c.idempotency_key == key,
                                         table.c.created_at < since).values(idempotency_key=None)
                )
            write(connection)
    except sa.exc.IntegrityError:
        if key is None:
            raise
        with engine.connect() as connection:
            earlier = connection.execute(
                sa.select(table).where(table.c.owner == owner, table.c.idempotency_key == key)
            ).first()
        if earlier is None:  # not the key's index that refused it
            raise
        return earlier
    return None
