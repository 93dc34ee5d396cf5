"""Events: the outbox in the record, and their signed delivery to `[events] webhook_url`.

    outbox = Outbox(db)
    await outbox.add(events)          idempotent by event id; the body is the exact JSON to POST
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from gateway.store.db import Database, events_outbox

log = logging.getLogger(__name__)


def event_body(event: dict[str, Any]) -> str:
    """The JSON of an event exactly as it is signed and POSTed (DESIGN §3)."""
    return json.dumps(event, separators=(",", ":"), sort_keys=False)


class Outbox:
    """Events waiting for delivery, in `events_outbox`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, events: list[dict[str, Any]]) -> None:
        """Insert each event once, by its id; adding an event already there changes nothing."""
        if not events:
            return
        now = datetime.now(UTC)
        rows = [
            {
                "id": e["id"],
                "billable": e["billable"],
                "type": e["type"],
                "body": event_body(e),
                "created_at": now,
                "next_attempt_at": now,
            }
            for e in events
        ]
        stmt = self.db.insert(events_outbox).on_conflict_do_nothing(index_elements=["id"])
        async with self.db.engine.begin() as conn:
            await conn.execute(stmt, rows)
