"""Budgets in the record (issue 20): a team's and a key's own counts are flushed with their org's snapshot
and come back with it after Redis loses everything: nothing lost, nothing counted twice.

A private redis-server (it is flushed and restarted) and a real record: SQLite and Postgres."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
import sqlalchemy as sa
from services import RedisServer, raw_redis
from test_budgets import CATALOG, World, org_team_key, terms

from gateway.decision import Decision
from gateway.members import set_parent
from gateway.reconcile import Connected, connect
from gateway.store.db import Database, snapshots
from gateway.store.redis import open_redis
from gateway.usage import current_period, daily_usage, usage_report


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@asynccontextmanager
async def process(db: Database, redis_url: str, prefix: str) -> AsyncIterator[tuple[World, Connected]]:
    """One gateway process connected to the record: its own connections and caches."""
    store = open_redis(redis_url)
    raw = raw_redis(redis_url)
    connected = connect(store, CATALOG, db, prefix=prefix)
    try:
        yield World(db, store, raw, prefix, connected.engine, CATALOG), connected
    finally:
        await store.close()
        await raw.aclose()


async def recorded_members(db: Database, org: str) -> dict[str, dict[str, str]]:
    async with db.engine.connect() as conn:
        text = (await conn.execute(sa.select(snapshots.c.members).where(snapshots.c.billable == org))).scalar_one()
    return dict(json.loads(text)) if text else {}


@pytest.mark.parametrize("loss", ["flushall", "restart"])
def test_a_key_s_and_a_team_s_counts_come_back_after_redis_loss(empty_db_url: str, own_redis: RedisServer, loss: str) -> None:
    """A key of 10 credits and one project spends 5 and its project; the record takes them with the org's;
    Redis loses everything; the next request of a fresh process finds the key with 5 left (not 10), its
    project used, and the team's and the org's counts as they were."""

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        await db.upgrade()
        prefix = f"gwr{uuid.uuid4().hex[:10]}"
        try:
            async with process(db, own_redis.url, prefix) as (w, p):
                await p.grants.record_assignment("org_1", "pro")  # the record's, as the admin API's
                key = await org_team_key(w, team=terms(credits=100), key=terms(credits=10, limits={"projects": {"to": 1}}))
                assert (await w.decide(key, "POST", "/images")).admitted
                assert (await w.decide(key, "POST", "/projects")).admitted
                await p.reconciler.flush_dirty()
                recorded = await recorded_members(db, "org_1")
                assert recorded[key]["c:s"] == "5" and recorded[key]["u:projects"] == "1"
                assert recorded["team_a"]["c:s"] == "5"
            if loss == "flushall":
                own_redis.client().flushall()
            else:
                own_redis.stop()
                own_redis.start()
            async with process(db, own_redis.url, prefix) as (w, p):
                refused = await w.decide(key, "POST", "/projects")
                assert refused.status == 403 and refused.violated_policies == ["key-projects"]
                assert (await w.decide(key, "POST", "/images")).admitted  # 5 of the key's 10 were left
                denied = await w.decide(key, "POST", "/images")
                assert denied.status == 402 and denied.violated_policies == ["key-credits"]
                assert await w.member_field("org_1", key, "c:s") == "10"
                assert await w.member_field("org_1", "team_a", "c:s") == "10"
                assert await w.org_field("org_1", "c:s") == "10"
                shown = await w.engine.usage(key)
                assert [m["credits"]["spent"] for m in shown["members"]] == [10, 10]
                await p.reconciler.flush_dirty()
                assert (await recorded_members(db, "org_1"))[key]["c:s"] == "10"
        finally:
            await db.close()

    asyncio.run(main())


def test_concurrent_restores_count_a_member_once(empty_db_url: str, own_redis: RedisServer) -> None:
    """After a loss, three processes' first requests race to restore the org: the member's restored counts
    are put back once (the first restore wins, the others keep what it wrote), and each request is counted
    once on top of them; a second loss after a flush brings back exactly that."""

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        await db.upgrade()
        prefix = f"gwr{uuid.uuid4().hex[:10]}"
        try:
            async with process(db, own_redis.url, prefix) as (w, p):
                await p.grants.record_assignment("org_1", "pro")  # the record's, as the admin API's
                key = await org_team_key(w, team=None, key=terms(credits=100))
                for _ in range(4):
                    assert (await w.decide(key, "POST", "/images")).admitted
                await p.reconciler.flush_dirty()
            own_redis.client().flushall()
            async with (
                process(db, own_redis.url, prefix) as (a, pa),
                process(db, own_redis.url, prefix) as (b, _),
                process(db, own_redis.url, prefix) as (c, _),
            ):
                decided = await asyncio.gather(*(x.decide(key, "POST", "/images") for x in (a, b, c)))
                assert all(d.admitted for d in decided)
                assert await a.member_field("org_1", key, "c:s") == "35"  # 20 restored, 3 × 5 since
                assert await a.org_field("org_1", "c:s") == "35"
                await pa.reconciler.flush_dirty()
                await pa.reconciler.flush_dirty()  # a repeated flush changes nothing
            own_redis.client().flushall()
            async with process(db, own_redis.url, prefix) as (w, _):
                assert (await w.engine.usage(key))["members"][0]["credits"]["spent"] == 35
        finally:
            await db.close()

    asyncio.run(main())


def test_usage_history_per_key_and_team_in_the_record(empty_db_url: str, own_redis: RedisServer) -> None:
    """A key's and its team's own usage history reach the record as the org's does (usage_totals and
    usage_daily, under the member's id): requests, units and credits as the org counts them, a failed
    settle's request given back, a metered settle's units and owed credits counted; a repeated flush adds
    nothing to the daily rows."""

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        await db.upgrade()
        prefix = f"gwr{uuid.uuid4().hex[:10]}"
        try:
            async with process(db, own_redis.url, prefix) as (w, p):
                key = await org_team_key(w, team=terms(credits=1000), key=terms(credits=500))
                for path in ("/images", "/images", "/exports"):
                    assert (await w.decide(key, "POST", path)).admitted
                failed = await w.decide(key, "POST", "/chat")
                await w.engine.settle(failed, give_back_limits=True, credits_owed=0)
                metered = await w.decide(key, "POST", "/chat")
                await w.engine.settle(metered, give_back_limits=False, credits_owed=30, units=30)
                await p.reconciler.flush_dirty()
                await p.reconciler.flush(["org_1"], force=True)  # the same totals again: no daily increase
                period = current_period(CATALOG.settings.zone, time.time())
                reports = {b: await usage_report(db, b, period) for b in ("org_1", "team_a", key)}
                for billable, report in reports.items():
                    assert report["totals"] == reports["org_1"]["totals"], billable
                    days = await daily_usage(db, billable, period)
                    assert sum(r["requests"] for r in days) == 4 and sum(r["credits"] for r in days) == 40, billable
                assert {r["route"]: r["requests"] for r in reports[key]["routes"]} == {"POST /images": 2, "POST /exports": 1, "POST /chat": 1}
                totals = reports[key]["totals"]
                assert (totals["requests"], totals["units"], totals["credits"]) == (4, 31, 40)
                mine = (await w.engine.usage(key))["members"][0]["this_month"]
                assert mine == {"requests": 4, "units": 31, "credits": 40}
        finally:
            await db.close()

    asyncio.run(main())


def test_a_team_that_moved_has_one_usage_history(empty_db_url: str, own_redis: RedisServer) -> None:
    """A team with terms spends under org_1, then moves to org_2 (its own counts start again there): its old
    hash, still in org_1's slot, is no longer its history, so flushing both orgs again and again writes the
    new one's counts only, never one over the other (what the record took before the move stays)."""

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        await db.upgrade()
        prefix = f"gwr{uuid.uuid4().hex[:10]}"
        try:
            async with process(db, own_redis.url, prefix) as (w, p):
                await org_team_key(w, team=terms(credits=100), key=None)
                for _ in range(2):
                    assert (await w.decide("team_a", "POST", "/images")).billable == "org_1"
                await p.reconciler.flush_dirty()
                await set_parent(db, "team_a", "org_2")
                await wait_for(lambda: w.decide("team_a", "POST", "/cheap-images"), lambda d: d.billable == "org_2" and d.admitted)
                period = current_period(CATALOG.settings.zone, time.time())
                seen = []
                for _ in range(3):
                    await p.reconciler.flush(["org_1", "org_2"], force=True)
                    team = await usage_report(db, "team_a", period)
                    seen.append((team["totals"], await daily_usage(db, "team_a", period)))
                    # The 2 recorded before the move, and org_2's hash for what it made there since.
                    assert {r["route"]: r["requests"] for r in team["routes"]} == {"POST /images": 2, "POST /cheap-images": 1}
                assert seen[0] == seen[1] == seen[2]  # never one hash's counts over the other's
                assert (await recorded_members(db, "org_2"))["team_a"]["c:s"] == "5"
        finally:
            await db.close()

    asyncio.run(main())


async def wait_for(act: Callable[[], Awaitable[Decision]], done: Callable[[Decision], bool], timeout: float = 30.0) -> None:
    """Repeat `act` until `done` says its answer is the awaited one (a member's parent is cached for a second)."""
    deadline = time.monotonic() + timeout
    while not done(await act()):
        assert time.monotonic() < deadline, "the new parent was never seen"
        await asyncio.sleep(0.05)
