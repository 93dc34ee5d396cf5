"""The record (DESIGN §5): flushes, the sweep, the leader lease, the database down, rehydration, usage history.

Each test runs on SQLite and on Postgres (a private database per run); Redis is the shared server under
a private key prefix, or a private redis-server where a test flushes or restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from engine_support import BASE
from http_servers import serve_in_thread
from services import PostgresServer, RedisCluster, RedisServer, raw_redis, shared_redis_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from waiting import until, wait_until

from gateway.app import GatewayApp
from gateway.catalog import parse_catalog
from gateway.engine import Engine, Restorer
from gateway.errors import DatabaseUnavailable, StateUnavailable
from gateway.grants import Grants
from gateway.reconcile import Reconciler, Rehydrator
from gateway.settings import Settings
from gateway.state import Restored, Snapshot
from gateway.store import db as tables
from gateway.store.cluster import key_slot
from gateway.store.db import Database
from gateway.store.redis import RedisStore, open_redis
from gateway.usage import current_period, daily_usage, day_of

CATALOG = parse_catalog(BASE)
ADMIN = "admin-secret-for-tests"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def go(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


@dataclass
class Proc:
    """One gateway process's record side: its engine, grants, reconciler and restorer over shared Redis and database."""

    engine: Engine
    grants: Grants
    reconciler: Reconciler
    rehydrator: Rehydrator

    async def decide(self, billable: str, method: str, path: str, **kw: Any) -> Any:
        return await self.engine.decide(billable, CATALOG.route_for(method, path), **kw)


@dataclass
class Env:
    db: Database
    store: RedisStore
    prefix: str
    stores: list[RedisStore]

    def process(
        self,
        *,
        interval: float = 0.2,
        redis_url: str | None = None,
        restore: Callable[[Restorer], Restorer] = lambda restore: restore,
        **kw: Any,
    ) -> Proc:
        """`restore` wraps the record's restore the engine is built with (a test's spy)."""
        store = self.store
        if redis_url is not None:
            store = open_redis(redis_url)
            self.stores.append(store)
        rehydrator = Rehydrator(self.db)
        engine = Engine(
            store, CATALOG, prefix=self.prefix, restore=restore(rehydrator.restore), grants_after=rehydrator.grants_after
        )
        grants = Grants(self.db, engine)
        return Proc(engine, grants, Reconciler(engine, self.db, grants=grants, interval=interval, **kw), rehydrator)

    async def rows(self, table: sa.Table) -> list[dict[str, Any]]:
        async with self.db.engine.connect() as conn:
            found = [dict(r._mapping) for r in await conn.execute(sa.select(table))]
        return sorted(found, key=lambda r: json.dumps(r, sort_keys=True, default=str))

    async def snapshot_row(self, billable: str) -> dict[str, Any] | None:
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(sa.select(tables.snapshots).where(tables.snapshots.c.billable == billable))).first()
        return dict(row._mapping) if row is not None else None


@asynccontextmanager
async def environment(db_url: str, redis_url: str | None = None) -> AsyncIterator[Env]:
    db = await Database.connect(db_url)
    await db.upgrade()
    url = redis_url or shared_redis_url()
    store = open_redis(url)
    prefix = f"gwt{uuid.uuid4().hex[:10]}"
    env = Env(db, store, prefix, [store])
    try:
        yield env
    finally:
        raw = raw_redis(url)
        with contextlib.suppress(Exception):  # a test may leave its private Redis stopped
            async for key in store.scan(f"{prefix}:*"):
                await raw.delete(key)
        await raw.aclose()
        for s in env.stores:
            await s.close()
        await db.close()


# ---- flushing -------------------------------------------------------------------------------------------


def test_flush_writes_state_usage_and_events_and_twice_changes_nothing(empty_db_url: str) -> None:
    """A flush records the snapshot, usage totals and pending events; flushing again leaves the same rows."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            p = env.process()
            await p.grants.grant("org-a", 1000, idempotency_key=f"k-{uuid.uuid4()}")
            for _ in range(4):
                assert (await p.decide("org-a", "POST", "/cheap-images")).admitted
            for _ in range(2):
                assert (await p.decide("org-a", "POST", "/projects")).admitted
            for _ in range(3):
                await p.decide("org-a", "POST", "/exports")  # warns at 0.5 and 0.9: two events
            chat = await p.decide("org-a", "POST", "/chat")
            assert chat.admitted
            await p.engine.settle(chat, give_back_limits=False, credits_owed=7, units=7)
            pending = await p.engine.pending_events("org-a")
            assert len(pending) == 3  # warnings: projects at its cap, exports at 0.5 and 0.9

            assert await p.reconciler.flush_dirty() == 1
            snap = await p.engine.snapshot("org-a")
            row = await env.snapshot_row("org-a")
            assert row is not None and json.loads(row["state"]) == snap.state and row["chg"] == int(snap.state["chg"])
            month = current_period(CATALOG.settings.zone, time.time())
            usage = {(r["route"], r["operation"]): r for r in await env.rows(tables.usage_totals)}
            assert usage[("POST /cheap-images", "image")] | {} == {
                "billable": "org-a", "period": month, "route": "POST /cheap-images", "operation": "image",
                "requests": 4, "units": 0, "credits": 20, "amount_cents": 20, "shadow_denials": 0,
            }
            assert (usage[("POST /projects", "")]["requests"], usage[("POST /projects", "")]["units"]) == (2, 2)
            assert (usage[("POST /chat", "chat")]["units"], usage[("POST /chat", "chat")]["credits"]) == (7, 7)
            outbox = await env.rows(tables.events_outbox)
            assert sorted(e["id"] for e in outbox) == sorted(e["id"] for e in pending)
            assert [json.loads(e["body"]) for e in sorted(outbox, key=lambda e: e["id"])] == sorted(pending, key=lambda e: e["id"])
            assert await p.engine.pending_events("org-a") == []  # acknowledged once the record held them

            before = [await env.rows(t) for t in (tables.snapshots, tables.usage_totals, tables.events_outbox)]
            assert await p.reconciler.flush_dirty() == 0  # nothing touched since
            await p.reconciler.flush(["org-a"], force=True)  # and forced: the same absolute values again
            await env.process().reconciler.flush(["org-a"], force=True)  # from another process
            after = [await env.rows(t) for t in (tables.snapshots, tables.usage_totals, tables.events_outbox)]
            assert after == before

    go(main())


def test_daily_usage_is_each_flush_s_increase_on_its_day(empty_db_url: str) -> None:
    """usage_daily gets a total's increase on the flush's day: the same totals again add nothing, two days give two rows."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            p = env.process()
            await p.grants.grant("org-d", 1000, idempotency_key=f"k-{uuid.uuid4()}")
            for _ in range(3):
                assert (await p.decide("org-d", "POST", "/cheap-images")).admitted
            await p.reconciler.flush(["org-d"], force=True)
            today = day_of(CATALOG.settings.zone, (await p.engine.snapshot("org-d")).now_ms / 1000)
            daily = await env.rows(tables.usage_daily)
            assert [(r["day"], r["route"], r["requests"], r["credits"]) for r in daily] == [(today, "POST /cheap-images", 3, 15)]

            await p.reconciler.flush(["org-d"], force=True)  # the same absolute totals, again
            await env.process().reconciler.flush(["org-d"], force=True)  # and from another process
            assert await env.rows(tables.usage_daily) == daily

            # Make that flush an earlier day's, then use more today: the increase alone lands on today.
            async with env.db.engine.begin() as conn:
                await conn.execute(sa.update(tables.usage_daily).values(day="2000-01-01"))
            assert (await p.decide("org-d", "POST", "/cheap-images")).admitted
            await p.reconciler.flush(["org-d"], force=True)
            rows = await env.rows(tables.usage_daily)
            assert sorted((r["day"], r["requests"]) for r in rows) == [("2000-01-01", 3), (today, 1)]
            month = today[:7]
            assert [(r["day"], r["requests"]) for r in await daily_usage(env.db, "org-d", month)] == [(today, 1)]

    go(main())


def test_an_older_snapshot_never_replaces_a_newer_one(empty_db_url: str) -> None:
    """Two processes flushing one billable out of order: the record keeps the later state and its usage."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            p = env.process()
            await p.decide("org-b", "POST", "/projects")
            early = await p.engine.snapshot("org-b")
            await p.decide("org-b", "POST", "/projects")
            late = await p.engine.snapshot("org-b")
            await p.reconciler._write([("org-b", late)])
            await p.reconciler._write([("org-b", Snapshot(early.now_ms - 1, early.state, {}, 0))])
            row = await env.snapshot_row("org-b")
            assert row is not None and row["chg"] == int(late.state["chg"])
            usage = await env.rows(tables.usage_totals)
            assert [r["requests"] for r in usage] == [2]

    go(main())


def test_acks_drop_only_what_the_record_holds(empty_db_url: str) -> None:
    """Two processes acknowledging the same batch of events never drop an event that came after it."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            p, q = env.process(), env.process()
            for _ in range(2):
                await p.decide("org-c", "POST", "/exports")  # one warning at 0.5
            first = await p.engine.read_events("org-c")
            second = await q.engine.read_events("org-c")
            await p.decide("org-c", "POST", "/exports")  # the 0.9 warning, after both reads
            await p.engine.ack_events("org-c", len(first.events), through=first.mark)
            await q.engine.ack_events("org-c", len(second.events), through=second.mark)
            left = await p.engine.pending_events("org-c")
            assert [e["data"]["threshold"] for e in left] == [0.9]

    go(main())


def test_touched_billables_reach_the_record_within_the_interval(empty_db_url: str) -> None:
    """A running reconciler flushes what its process touched within one interval (plus the write)."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            p = env.process(interval=0.3)
            p.reconciler.start()
            try:
                await until(lambda: p.reconciler.leader, "the reconciler's first tick")
                billables = [f"org-{i}" for i in range(20)]
                for b in billables:
                    await p.decide(b, "POST", "/projects")
                decided = time.monotonic()
                while True:
                    rows = {r["billable"]: r["chg"] for r in await env.rows(tables.snapshots)}
                    counters = await p.engine.change_counters(billables)
                    if all(rows.get(b) == c for b, c in zip(billables, counters)):
                        break
                    assert time.monotonic() - decided < 0.3 + 1.0, "not flushed within the interval"
                    await asyncio.sleep(0.02)
            finally:
                await p.reconciler.stop()

    go(main())


def test_stop_flushes_once_more(empty_db_url: str) -> None:
    """Stopping a reconciler flushes what was touched since its last tick."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            p = env.process(interval=60)
            p.reconciler.start()
            await until(lambda: p.reconciler.leader, "the reconciler's first tick")
            await p.decide("org-stop", "POST", "/projects")
            await p.reconciler.stop()
            row = await env.snapshot_row("org-stop")
            assert row is not None and json.loads(row["state"])["u:projects"] == "1"

    go(main())


# ---- the sweep and the leader ---------------------------------------------------------------------------


def test_the_sweep_finds_what_a_dead_process_never_reported(empty_db_url: str) -> None:
    """Billables touched by a process that died before flushing are flushed by another process's sweep."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            dead, alive = env.process(), env.process(batch=4, parallel=3)  # many small batches at once
            for i in range(30):
                await dead.decide(f"lost-{i}", "POST", "/projects")
            await alive.decide("kept", "POST", "/projects")
            await alive.reconciler.flush_dirty()
            # `dead` never flushes: its touched set dies with it.
            assert await alive.reconciler.sweep() == 30
            rows = {r["billable"] for r in await env.rows(tables.snapshots)}
            assert rows == {f"lost-{i}" for i in range(30)} | {"kept"}
            assert await alive.reconciler.sweep() == 0  # the record is current now
            assert await alive.reconciler.run_once() == 0

    go(main())


@pytest.mark.cluster
def test_the_sweep_covers_every_cluster_node(empty_db_url: str, redis_cluster: RedisCluster) -> None:
    """On a cluster the sweep finds unreported billables on every primary, whatever their ids; the lease works."""

    async def main() -> None:
        async with environment(empty_db_url, redis_cluster.url) as env:
            dead, alive = env.process(), env.process(batch=7)
            billables = [f"org-{i}" for i in range(40)] + ["a}b", "{x}", "ü:☃", "gw:{evil}"]
            for b in billables:
                await dead.decide(b, "POST", "/projects")
            nodes = {key_slot(dead.engine.keys(b)[0]) * 3 // 16384 for b in billables}
            assert nodes == {0, 1, 2}
            lease = alive.reconciler.lease_key
            assert await env.store.lease(lease, "one", 1000) and not await env.store.lease(lease, "two", 1000)
            assert await alive.reconciler.sweep() == len(billables)
            assert {r["billable"] for r in await env.rows(tables.snapshots)} == set(billables)
            assert await alive.reconciler.sweep() == 0

    go(main())


def test_the_lead_moves_when_its_holder_dies(empty_db_url: str) -> None:
    """One process leads; when it stops renewing (it died), the lease expires and another takes it."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            first = env.process(lease_seconds=0.5)
            second = env.process(lease_seconds=0.5)
            await first.reconciler.tick()
            await second.reconciler.tick()
            assert first.reconciler.leader and not second.reconciler.leader
            await first.reconciler.tick()  # renewal keeps it
            await second.reconciler.tick()
            assert first.reconciler.leader and not second.reconciler.leader
            # `first` dies without giving the lease back. The sleeps are the lease's lifetime, under test.
            await asyncio.sleep(0.3)
            await second.reconciler.tick()
            assert not second.reconciler.leader  # not expired yet
            await asyncio.sleep(0.35)
            await second.reconciler.tick()
            assert second.reconciler.leader
            # A clean stop gives the lead back at once.
            await second.reconciler.stop()
            await first.reconciler.tick()
            assert first.reconciler.leader

    go(main())


def test_only_the_leader_prunes_the_outbox_and_at_most_hourly(empty_db_url: str) -> None:
    """Events older than the retention leave the outbox on the leader's tick; a follower never prunes."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            leader = env.process(events_retention=timedelta(days=1))
            follower = env.process(events_retention=timedelta(days=1))
            old = {"id": f"evt_{uuid.uuid4().hex}", "type": "warning", "billable": "org", "plan": "free",
                   "occurred_at": "2026-11-01T00:00:00Z", "data": {}}  # fmt: skip
            await leader.reconciler.outbox.add([old])
            async with env.db.engine.begin() as conn:
                await conn.execute(sa.update(tables.events_outbox).values(created_at=datetime.now(UTC) - timedelta(days=2)))
            await leader.reconciler.tick()
            assert leader.reconciler.leader and await env.rows(tables.events_outbox) == []
            await leader.reconciler.outbox.add([{**old, "id": f"evt_{uuid.uuid4().hex}"}])
            async with env.db.engine.begin() as conn:
                await conn.execute(sa.update(tables.events_outbox).values(created_at=datetime.now(UTC) - timedelta(days=2)))
            await follower.reconciler.tick()
            await leader.reconciler.tick()  # pruned an hour ago at most: not again yet
            assert not follower.reconciler.leader and len(await env.rows(tables.events_outbox)) == 1

    go(main())


def test_past_months_usage_leaves_redis_once_recorded(empty_db_url: str) -> None:
    """A month's usage counters stay in the billable's Redis hash until the month is over (plus twice the
    hold lifetime, so no late settle can change them) and the record has them; then they are dropped."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            now = [datetime(2026, 10, 20, 12, tzinfo=UTC).timestamp()]
            engine = Engine(env.store, CATALOG, prefix=env.prefix, clock=lambda: now[0], hold_ttl=3600)
            reconciler = Reconciler(engine, env.db)

            async def month_of(moment: datetime) -> dict[str, str]:
                now[0] = moment.timestamp()
                assert (await engine.decide("org", CATALOG.route_for("GET", "/anything"))).admitted
                await reconciler.flush_dirty()
                return {f: v for f, v in (await engine.snapshot("org")).state.items() if f.startswith("qr:")}

            october = await month_of(datetime(2026, 10, 20, 12, tzinfo=UTC))
            assert [f[3:10] for f in october] == ["2026-10"]
            early = await month_of(datetime(2026, 11, 1, 1, tzinfo=UTC))  # within 2 h of the month's start
            assert sorted(f[3:10] for f in early) == ["2026-10", "2026-11"]
            later = await month_of(datetime(2026, 11, 1, 3, tzinfo=UTC))
            assert [f[3:10] for f in later] == ["2026-11"]
            usage = {r["period"]: r["requests"] for r in await env.rows(tables.usage_totals)}
            assert usage == {"2026-10": 1, "2026-11": 2}  # October's total stays in the record
            await reconciler.flush_dirty()  # forgetting changed the state: the snapshot is rewritten without it
            row = await env.snapshot_row("org")
            assert row is not None and not any(f.startswith("qr:2026-10") for f in json.loads(row["state"]))

    go(main())


def test_the_sweep_applies_grants_a_dead_process_recorded_but_never_applied(empty_db_url: str) -> None:
    """Money first: a grant committed to the record by a process that died before applying it reaches Redis."""

    async def main() -> None:
        async with environment(empty_db_url) as env:
            dying, alive = env.process(), env.process()
            await dying.decide("org-g", "GET", "/anything")

            store = dying.engine.store
            run = store.run

            async def crash(name: str, *args: Any) -> Any:  # at the store: the engine may be compiled
                if name == "grant":
                    raise SystemExit("killed between the commit and Redis")
                return await run(name, *args)

            store.run = crash  # type: ignore[method-assign]
            with pytest.raises(SystemExit):
                await dying.grants.grant("org-g", 25, idempotency_key="stranded")
            store.run = run  # type: ignore[method-assign]  # the processes may share a store: only that call died
            assert (await alive.engine.status("org-g"))["credits"]["purchased"] == 0
            assert await alive.reconciler.apply_stranded_grants() == 0  # too recent: its process may be applying it
            assert await alive.reconciler.apply_stranded_grants(older_than=0) == 1
            assert (await alive.engine.status("org-g"))["credits"]["purchased"] == 25
            assert await alive.reconciler.apply_stranded_grants(older_than=0) == 0

    go(main())


# ---- the database down ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PostgresServer]:
    """A Postgres of our own: these tests stop and start it."""
    with PostgresServer() as server:
        yield server


def _reset(pg: PostgresServer) -> str:
    """The private server running, with an empty schema."""
    import asyncpg

    async def main() -> None:
        conn = await asyncpg.connect(pg.url)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()

    pg.start()
    go(main())
    return pg.url


def test_database_down_decisions_go_on_and_snapshots_catch_up(private_pg: PostgresServer) -> None:
    """With Postgres stopped decisions go on, dirty billables coalesce (one each), and all land when it returns."""
    url = _reset(private_pg)

    async def main() -> None:
        async with environment(url) as env:
            p = env.process()
            for i in range(10):
                await p.decide(f"org-{i}", "POST", "/projects")
            await p.reconciler.flush_dirty()
            private_pg.stop()
            try:
                for round_ in range(5):
                    for i in range(10):
                        assert (await p.decide(f"org-{i}", "GET", "/anything")).admitted
                    await p.reconciler.tick()
                assert not p.reconciler.database_ok
                health = p.reconciler.health()
                assert health["database"] == "down" and health["pending"] == 10  # coalesced per billable
                assert health["lag_seconds"] > 0
                with pytest.raises(DatabaseUnavailable):
                    await p.reconciler.flush(["org-1"])
            finally:
                private_pg.start()
            await p.reconciler.tick()
            assert p.reconciler.database_ok and p.reconciler.health()["pending"] == 0
            rows = {r["billable"]: r["chg"] for r in await env.rows(tables.snapshots)}
            billables = [f"org-{i}" for i in range(10)]
            assert rows == dict(zip(billables, await p.engine.change_counters(billables)))

    go(main())


# ---- rehydration ----------------------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.mark.parametrize("loss", ["flushall", "restart"])
def test_rehydration_brings_back_counts_caps_allowances_and_grants(
    empty_db_url: str, own_redis: RedisServer, loss: str
) -> None:
    """After Redis loses everything, the first request restores the record: no fresh quota, no grant lost."""

    async def main() -> None:
        async with environment(empty_db_url, own_redis.url) as env:
            p = env.process()
            await p.grants.grant("org", 50, idempotency_key="g1")
            for _ in range(2):
                assert (await p.decide("org", "POST", "/projects")).admitted
            for _ in range(3):
                assert (await p.decide("org", "POST", "/exports")).admitted
            assert (await p.decide("org", "POST", "/cheap-images")).admitted  # 5 of the 10 period credits
            await p.reconciler.flush_dirty()
            before = await p.engine.status("org")
            # A grant after the last flush: applied in Redis, recorded in the database, not in the snapshot.
            await p.grants.grant("org", 7, idempotency_key="g2")

            if loss == "flushall":
                own_redis.client().flushall()
            else:
                own_redis.stop()
                own_redis.start()
            # A fresh process (empty caches, its own connections), as after a deploy or a failover.
            q = env.process(redis_url=own_redis.url)
            shown = await q.engine.status("org")  # the status restores too: it never shows a fresh quota
            assert shown["limits"]["projects"]["usage"] == 2 and shown["credits"]["purchased"] == 57
            capped = await q.decide("org", "POST", "/projects")
            assert capped.status == 403  # the cap it had used up stays used
            after = await q.engine.status("org")
            assert after["limits"]["projects"]["usage"] == 2
            assert after["limits"]["exports"]["usage"] == before["limits"]["exports"]["usage"] == 3
            assert after["credits"]["period"] == before["credits"]["period"] == 5
            assert after["credits"]["purchased"] == 57  # both grants, each once
            snap = await q.engine.snapshot("org")
            assert snap.state["c:seq"] == "2"
            await q.grants.apply("org")  # nothing left to apply: still once each
            assert (await q.engine.status("org"))["credits"]["purchased"] == 57

    go(main())


def test_concurrent_first_requests_restore_once_and_a_new_billable_starts_empty(
    empty_db_url: str, own_redis: RedisServer
) -> None:
    """A burst of first requests after a loss shares one restore; a billable the record never saw starts at 0."""

    async def main() -> None:
        async with environment(empty_db_url, own_redis.url) as env:
            p = env.process()
            assert (await p.decide("org", "POST", "/projects")).admitted
            await p.reconciler.flush_dirty()
            own_redis.client().flushall()
            calls = 0

            def counted(restore: Restorer) -> Restorer:
                async def counting(billable: str) -> Restored | None:
                    nonlocal calls
                    calls += 1
                    return await restore(billable)

                return counting

            q = env.process(restore=counted)
            results = await asyncio.gather(*(q.decide("org", "POST", "/projects") for _ in range(20)))
            assert calls == 1 and sum(d.admitted for d in results) == 1  # 1 of 2 was used before the loss
            fresh = await q.decide("never-seen", "POST", "/projects")
            assert fresh.admitted and (await q.engine.status("never-seen"))["limits"]["projects"]["usage"] == 1

    go(main())


def test_restores_asked_for_during_a_read_share_the_next_one(empty_db_url: str, own_redis: RedisServer) -> None:
    """After a Redis loss under load, first requests arriving tick after tick are read from the record in a
    few batches (one read in flight at a time), not one read per tick queued on the reader."""

    async def main() -> None:
        async with environment(empty_db_url, own_redis.url) as env:
            q = env.process()
            rehydrator = q.rehydrator
            reads: list[int] = []
            read = rehydrator._read

            async def counting(billables: list[str]) -> dict[str, dict[str, str]]:
                reads.append(len(billables))
                return await read(billables)

            rehydrator._reads.fetch = counting
            decisions = []
            for wave in range(20):
                decisions += [asyncio.ensure_future(q.decide(f"org-{wave}-{i}", "POST", "/projects")) for i in range(5)]
                await asyncio.sleep(0)
            assert all(d.admitted for d in await asyncio.gather(*decisions))
            assert sum(reads) == 100 and len(reads) <= 5, reads

    go(main())


def test_a_settle_or_release_never_writes_over_lost_state(empty_db_url: str, own_redis: RedisServer) -> None:
    """A hold settled after Redis lost the state stays charged, and a release waits for the restore."""

    async def main() -> None:
        async with environment(empty_db_url, own_redis.url) as env:
            p = env.process()
            await p.grants.grant("org", 100, idempotency_key="g")
            held = await p.decide("org", "POST", "/cheap-images")
            for _ in range(2):
                await p.decide("org", "POST", "/projects")
            await p.reconciler.flush_dirty()
            own_redis.client().flushall()
            # A refund for a hold Redis lost: the record's balance is not replaced by a refund to nothing.
            await p.engine.settle(held, give_back_limits=True, credits_owed=0)
            await p.engine.release("org", "free", "projects")  # restores first, then gives one back
            status = await p.engine.status("org")
            assert status["credits"]["purchased"] == 100 and status["credits"]["period"] == 5
            assert status["limits"]["projects"]["usage"] == 1

    go(main())


def test_restore_without_the_database_is_state_unavailable(private_pg: PostgresServer, own_redis: RedisServer) -> None:
    """Redis lost the state and the record cannot be read: the engine raises StateUnavailable."""
    url = _reset(private_pg)

    async def main() -> None:
        async with environment(url, own_redis.url) as env:
            p = env.process()
            await p.decide("org", "POST", "/projects")
            await p.reconciler.flush_dirty()
            own_redis.client().flushall()
            private_pg.stop()
            try:
                with pytest.raises(StateUnavailable):
                    await p.decide("org", "POST", "/projects")
            finally:
                private_pg.start()
            # Restored: the one project made before the loss still counts.
            assert (await p.decide("org", "POST", "/projects")).admitted
            assert (await p.decide("org", "POST", "/projects")).status == 403

    go(main())


# ---- through the running gateway: usage history, health, the CLI ------------------------------------------


@contextlib.contextmanager
def gateway(tmp_path: Path, db_url: str, redis_url: str, interval: float = 0.2) -> Iterator[str]:
    plans = tmp_path / "plans.toml"
    plans.write_text(BASE)
    go(_upgrade(db_url))
    with serve_in_thread(ok_upstream()) as upstream:
        settings = Settings(plans=str(plans), upstream=upstream, redis_url=redis_url, database_url=db_url,
                            admin_token=ADMIN, billable_header="X-Org", reconcile_interval=interval)
        with serve_in_thread(GatewayApp(settings)) as url:
            yield url


def ok_upstream() -> Starlette:
    """An upstream that answers 200 to everything."""

    async def ok(request: Request) -> Response:
        return JSONResponse({"path": request.url.path})

    return Starlette(routes=[Route("/{rest:path}", ok, methods=["GET", "POST", "PUT", "DELETE"])])


async def _upgrade(url: str) -> None:
    db = await Database.connect(url)
    try:
        await db.upgrade()
    finally:
        await db.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_usage_history_from_the_record(tmp_path: Path, empty_db_url: str, own_redis: RedisServer) -> None:
    """The admin endpoint and `gateway usage` answer per route and operation from the record, fresh this month."""
    org = {"X-Org": "org-u"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with gateway(tmp_path, empty_db_url, own_redis.url, interval=60) as url:
        assert [httpx.post(f"{url}/cheap-images", headers=org).status_code for _ in range(3)] == [200, 200, 402]
        assert httpx.post(f"{url}/projects", headers=org).status_code == 200
        assert all(httpx.get(f"{url}/v1/echo", headers=org).status_code == 200 for _ in range(3))
        # No reconcile tick has run since (interval 60 s): the endpoint flushes the billable first.
        r = httpx.get(f"{url}/_gateway/admin/billables/org-u/usage", headers=admin)
        assert r.status_code == 200, r.text
        report = r.json()
        month = current_period(CATALOG.settings.zone, time.time())
        assert report["billable"] == "org-u" and report["period"] == month
        assert report["routes"] == [
            {"route": "* /*", "operation": None, "requests": 3, "units": 0, "credits": 0, "amount_cents": 0,
             "shadow_denials": 0},
            {"route": "POST /cheap-images", "operation": "image", "requests": 2, "units": 0, "credits": 10,
             "amount_cents": 10, "shadow_denials": 0},
            {"route": "POST /projects", "operation": None, "requests": 1, "units": 1, "credits": 0, "amount_cents": 0,
             "shadow_denials": 0},
        ]
        assert report["totals"] == {"requests": 6, "units": 1, "credits": 10, "amount_cents": 10, "shadow_denials": 0}
        assert r.json() == httpx.get(f"{url}/_gateway/admin/billables/org-u/usage?period={month}", headers=admin).json()
        empty = httpx.get(f"{url}/_gateway/admin/billables/org-u/usage?period=2020-01", headers=admin).json()
        assert empty["routes"] == [] and empty["totals"]["requests"] == 0
        bad = httpx.get(f"{url}/_gateway/admin/billables/org-u/usage?period=2026-13", headers=admin)
        assert bad.status_code == 400 and "YYYY-MM" in bad.json()["detail"]
        assert httpx.get(f"{url}/_gateway/admin/billables/org-u/usage", headers=org).status_code == 401

        # Another billable this process has not flushed yet: `gateway reconcile --once` writes it.
        httpx.get(f"{url}/v1/echo", headers={"X-Org": "org-v"})
        plans = str(tmp_path / "plans.toml")
        done = _cli("reconcile", "--once", "--plans", plans, "--redis-url", own_redis.url, "--database-url", empty_db_url)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("flushed 1 billable(s)")

        shown = _cli("usage", "org-u", "--plans", plans, "--database-url", empty_db_url, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout) == report
        table = _cli("usage", "org-u", "--period", month, "--plans", plans, "--database-url", empty_db_url)
        assert "POST /cheap-images" in table.stdout and table.stdout.splitlines()[-1].split()[:2] == ["total", "6"]
        assert _cli("usage", "org-u", "--period", "nope", "--plans", plans, "--database-url", empty_db_url).returncode == 2


def test_health_says_the_database_is_down_and_on_redis_down_applies(
    tmp_path: Path, private_pg: PostgresServer, own_redis: RedisServer
) -> None:
    """Postgres stopped: decisions go on, health says so; a lost state cannot be restored, so on_redis_down
    applies (open for a plain route, closed for a spend); when it returns the record catches up."""
    url_db = _reset(private_pg)
    org = {"X-Org": "org-h"}
    with gateway(tmp_path, url_db, own_redis.url) as url:

        def health_when(condition: Callable[[dict[str, Any]], bool]) -> Callable[[], httpx.Response | None]:
            def check() -> httpx.Response | None:
                r = httpx.get(f"{url}/_gateway/health", headers=ADMIN_HEADERS)
                return r if condition(r.json()) else None

            return check

        def degraded() -> httpx.Response | None:
            r = httpx.get(f"{url}/v1/echo", headers=org)
            return r if "x-gateway-degraded" in r.headers else None

        assert httpx.post(f"{url}/projects", headers=org).status_code == 200
        health = wait_until(health_when(lambda h: h["record"]["pending"] == 0), "the first flush").json()
        assert health["database"] == "up"
        private_pg.stop()
        try:
            assert all(httpx.get(f"{url}/v1/echo", headers=org).status_code == 200 for _ in range(20))
            reported = wait_until(health_when(lambda h: h["database"] == "down"), "the reconciler to find the database down")
            assert reported.status_code == 200  # Redis is up: the gateway serves
            body = reported.json()
            assert body["database"] == "down" and body["status"] == "degraded" and body["record"]["pending"] == 1
            own_redis.client().flushall()
            plain = wait_until(degraded, "the lost state to be found unrestorable, with the record down")
            assert plain.status_code == 200 and plain.headers["x-gateway-degraded"] == "redis"
            spend = httpx.post(f"{url}/cheap-images", headers=org)
            assert spend.status_code == 503 and spend.json()["type"] == "urn:gateway:unavailable"
        finally:
            private_pg.start()
        wait_until(health_when(lambda h: h["database"] == "up"), "the database to be back")
        # Restored from the record: the project made before the outage still counts.
        assert httpx.post(f"{url}/projects", headers=org).status_code == 200
        assert httpx.post(f"{url}/projects", headers=org).status_code == 403
        status = httpx.get(f"{url}/_gateway/admin/billables/org-h", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert status["limits"]["projects"]["usage"] == 2
