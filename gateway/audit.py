"""The audit log: every change made through the admin API or the CLI, with the token that made it.

    await record(db, token="ops", action="plan.assign", billable="org_1", before={...}, after={...})
    await entries(db, billable="org_1", since=datetime(...))   newest first, as GET /_gateway/admin/audit answers

`token` is the name of a named admin token (GATEWAY_ADMIN_TOKENS), "admin" for GATEWAY_ADMIN_TOKEN, "cli"
for a command. `before` and `after` are whatever JSON says what changed (None for nothing: a new key has
no before). A caller inside a transaction passes its connection, so the change and its entry commit together.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.errors import DatabaseUnavailable
from gateway.store.db import Database, audit_log

log = logging.getLogger(__name__)

ADMIN = "admin"  # the name of GATEWAY_ADMIN_TOKEN
CLI = "cli"  # the name of a change made by a command
MAX_ENTRIES = 1000  # one answer's entries at most: `since` pages further back


async def record(
    db: Database,
    *,
    token: str,
    action: str,
    billable: str | None,
    before: Any,
    after: Any,
    conn: AsyncConnection | None = None,
) -> None:
    """One entry. Without `conn`, its own record operation: a record that does not answer then loses the
    entry (logged in full at ERROR), never the change that was already made."""
    at = datetime.now(UTC)
    row: dict[str, Any] = {
        "at": at,
        "token": token,
        "action": action,
        "billable": billable,
        "before": None if before is None else json.dumps(before, sort_keys=True),
        "after": None if after is None else json.dumps(after, sort_keys=True),
    }
    if conn is not None:
        await conn.execute(audit_log.insert().values(**row))
        return
    try:
        async with db.engine.begin() as own:
            await own.execute(audit_log.insert().values(**row))
    except DatabaseUnavailable as exc:
        log.error("audit entry not recorded (%s): %s", exc, json.dumps({**row, "at": at.isoformat()}))


async def entries(
    db: Database, *, billable: str | None = None, since: datetime | None = None, limit: int = MAX_ENTRIES
) -> list[dict[str, Any]]:
    """Entries newest first (at or after `since`, of `billable` when given), as the endpoint shows them."""
    c = audit_log.c
    query = sa.select(c.at, c.token, c.action, c.billable, c.before, c.after).order_by(c.at.desc(), c.id.desc()).limit(limit)
    if billable is not None:
        query = query.where(c.billable == billable)
    if since is not None:
        query = query.where(c.at >= since)
    async with db.reader.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [
        {
            "at": r.at.isoformat().replace("+00:00", "Z"),
            "token": r.token,
            "action": r.action,
            "billable": r.billable,
            "before": None if r.before is None else json.loads(r.before),
            "after": None if r.after is None else json.loads(r.after),
        }
        for r in rows
    ]


async def last_after(db: Database, action: str, billable: str) -> Any:
    """What the newest entry of `action` on `billable` says came after it (None when there is none): the
    before of a setting Redis keeps in the engine's own fields."""
    c = audit_log.c
    query = sa.select(c.after).where(c.action == action, c.billable == billable).order_by(c.at.desc(), c.id.desc()).limit(1)
    async with db.reader.connect() as conn:
        found = (await conn.execute(query)).scalar()
    return None if found is None else json.loads(found)
