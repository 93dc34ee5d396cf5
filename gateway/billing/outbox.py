"""Billed units into the record's meter outbox, in the reconciler's flush transaction.

Each billed-units counter of a state (decide.lua's `o:<meter>|<window>`, absolute and only growing) is
compared with what the record last took of it (`meter_totals`, read under a row lock), and the increase
is added to the outbox row of (billable, meter, minute of the flush). A flush repeated, or read from an
older snapshot, adds nothing. A row is sent once its minute is over (gateway/billing/meters.py), so
increases never land in a row already sent; should one be (a clock far off), they go to the next minute.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from gateway.state import Snapshot, billed_counters
from gateway.store.db import Database, meter_outbox, meter_totals


async def take_billed(conn: Any, db: Database, snapshots: Mapping[str, Snapshot], written: Iterable[str]) -> int:
    """Add the billed units that grew since the record's totals to the outbox; answers the units added."""
    counters = {(billable, meter, window): units for billable in sorted(written)
                for meter, window, units in billed_counters(snapshots[billable].state)}  # fmt: skip
    if not counters:
        return 0
    t = meter_totals
    key = (t.c.billable, t.c.meter, t.c.window)
    old = {
        (r[0], r[1], r[2]): r[3]
        for r in await conn.execute(
            sa.select(*key, t.c.units)
            .where(t.c.billable.in_({k[0] for k in counters}), t.c.meter.in_({k[1] for k in counters}))
            .order_by(*key)
            .with_for_update()
        )
    }
    grown: dict[tuple[str, str, int], int] = defaultdict(int)
    totals = []
    for (billable, meter, window), units in sorted(counters.items()):
        increase = units - old.get((billable, meter, window), 0)
        if increase <= 0:
            continue
        totals.append({"billable": billable, "meter": meter, "window": window, "units": units})
        grown[(billable, meter, snapshots[billable].now_ms // 60_000 * 60)] += increase
    if not totals:
        return 0
    insert = db.insert(meter_totals)
    await conn.execute(insert.on_conflict_do_update(index_elements=list(key), set_={"units": insert.excluded.units}), totals)
    rows = await _unsent_minutes(conn, grown)
    insert = db.insert(meter_outbox)
    o = meter_outbox
    upsert = insert.on_conflict_do_update(index_elements=[o.c.billable, o.c.meter, o.c.minute], set_={"units": o.c.units + insert.excluded.units})
    await conn.execute(upsert, rows)
    return sum(grown.values())


async def _unsent_minutes(conn: Any, grown: Mapping[tuple[str, str, int], int]) -> list[dict[str, Any]]:
    """The outbox rows to add to: a minute whose row was sent already moves on to the next one unsent."""
    o = meter_outbox
    sent = {
        (r[0], r[1], r[2])
        for r in await conn.execute(
            sa.select(o.c.billable, o.c.meter, o.c.minute).where(
                o.c.billable.in_({k[0] for k in grown}), o.c.minute >= min(k[2] for k in grown), o.c.sent_at.is_not(None)
            )
        )
    }
    now = datetime.now(UTC)
    merged: dict[tuple[str, str, int], int] = defaultdict(int)
    for (billable, meter, minute), units in grown.items():
        while (billable, meter, minute) in sent:
            minute += 60
        merged[(billable, meter, minute)] += units
    return [{"billable": b, "meter": m, "minute": minute, "units": u, "next_attempt_at": now} for (b, m, minute), u in sorted(merged.items())]
