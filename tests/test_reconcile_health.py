"""What the reconciler tells /_gateway/health: billables waiting for the record, each counted once."""

from __future__ import annotations

import asyncio

from engine_support import BASE
from services import RedisSpace

from gateway.catalog import parse_catalog
from gateway.reconcile import Reconciler
from gateway.store.db import Database

CATALOG = parse_catalog(BASE)


def test_pending_counts_a_billable_once_when_touched_again_before_its_flush(
    empty_db_url: str, redis_space: RedisSpace
) -> None:
    """A billable taken for a flush and touched again before the flush lands is one pending billable, not two
    (while the database is down every request touches it again)."""

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        await db.upgrade()
        engine = redis_space.engine(CATALOG)
        reconciler = Reconciler(engine, db)
        try:
            route = CATALOG.route_for("POST", "/projects")
            await engine.decide("org", route)
            reconciler.take()  # a tick took it; its flush has not landed (the database is down, say)
            await engine.decide("org", route)
            await engine.decide("other", route)
            assert reconciler.health()["pending"] == 2
            await reconciler.flush_dirty()
            assert reconciler.health()["pending"] == 0
        finally:
            await engine.store.close()
            await db.close()

    asyncio.run(main())
