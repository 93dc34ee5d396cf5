"""Holds that end (DESIGN §5): a hold whose settle never came leaves its billable's holds hash once past
GATEWAY_HOLD_TTL, kept as charged: on the billable's next request (decide.lua), or in the leader's sweep
(expire.lua) for a billable that makes none. On a real redis-server and the embedded emulation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from engine_support import BASE, Harness, harness
from served import Served, upstream
from services import RedisServer, raw_redis, shared_redis_url
from waiting import wait_until

from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.reconcile import Reconciler
from gateway.store.db import Database

Go = Callable[[Callable[[Harness], Awaitable[Any]]], Any]


@pytest.fixture(params=["redis", "embedded"])
def go(request: pytest.FixtureRequest) -> Any:
    url = shared_redis_url() if request.param == "redis" else None
    with harness(url) as runner:
        yield runner


async def holds(h: Harness, billable: str) -> dict[str, dict[str, Any]]:
    raw = await h.raw.hgetall(h.engine.keys(billable)[2])
    return {str(k): json.loads(v) for k, v in raw.items()}


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.1)


async def age(h: Harness, billable: str, hold_ids: list[str], by_ms: int) -> None:
    """Test-only time travel: these holds (and the billable's earliest expiry) as if taken `by_ms` earlier."""
    key = h.engine.keys(billable)[2]
    for hold_id in hold_ids:
        hold = json.loads(await h.raw.hget(key, hold_id))
        hold["exp"] -= by_ms
        await h.raw.hset(key, hold_id, json.dumps(hold))
    hx = int(await h.field(billable, "hx") or 0)
    await h.set_field(billable, "hx", hx - by_ms)


def test_an_expired_hold_leaves_on_the_next_request_kept_as_charged(go: Go) -> None:
    """Three reserves never settled, lifetime 1 s: the billable's next request (not metered) empties its holds;
    the reserves stay spent, a settle arriving after that changes nothing, and the earliest expiry is gone."""

    async def fn(h: Harness) -> None:
        engine = h.other_engine(hold_ttl=1)
        await engine.apply_grant("org", 1, 400)
        taken = [await h.decide("org", "POST", "/chat", engine=engine) for _ in range(3)]
        assert all(d.admitted for d in taken) and taken[-1].credits == 410 - 300
        assert len(await holds(h, "org")) == 3
        assert await h.field("org", "hx") is not None

        async def emptied() -> bool:
            assert (await h.decide("org", "GET", "/v1/anything", engine=engine)).admitted
            return not await holds(h, "org")

        await until(emptied, "the expired holds to leave on the next request")
        credits = (await engine.status("org"))["credits"]
        assert credits["balance"] == 110 and credits["held"] == 0  # kept as charged
        assert await h.field("org", "hx") is None
        assert await engine.settle(taken[0], give_back_limits=True, credits_owed=0) is None  # too late: charged
        assert (await engine.status("org"))["credits"]["balance"] == 110

    go(fn)


def test_only_the_expired_holds_leave_and_the_next_expiry_moves_to_the_oldest_left(go: Go) -> None:
    """Of five holds, the two past their lifetime leave; the three in flight stay and settle as usual, and
    `hx` names the oldest of them (nothing is read again until it is due)."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 1000)
        taken = [await h.decide("org", "POST", "/chat") for _ in range(5)]
        ids = [d.hold.id for d in taken if d.hold is not None]
        await age(h, "org", ids[:2], 3_600_000 + 1000)
        before = int(await h.field("org", "chg") or 0)
        assert (await h.decide("org", "POST", "/projects")).admitted
        left = await holds(h, "org")
        assert set(left) == set(ids[2:])
        assert int(await h.field("org", "hx") or 0) == min(hold["exp"] for hold in left.values())
        assert int(await h.field("org", "chg") or 0) >= before + 2  # the expiry is a change the record takes
        for d in taken[2:]:
            assert await h.engine.settle(d, give_back_limits=False, credits_owed=10) is not None
        assert not await holds(h, "org")
        # 10 allowance + 1000 purchased - 2 reserves kept (200) - 3 settled to 10 each
        assert (await h.engine.status("org"))["credits"]["balance"] == 780

    go(fn)


def test_holds_never_grow_without_bound(go: Go) -> None:
    """A billable whose process dies with every request in flight, again and again: its holds hash holds only the
    holds taken within the lifetime, however many were abandoned before."""

    async def fn(h: Harness) -> None:
        await h.engine.apply_grant("org", 1, 100_000)
        for _ in range(4):  # four crashed rounds of 50 requests, each round older than the lifetime
            taken = [await h.decide("org", "POST", "/chat") for _ in range(50)]
            await age(h, "org", [d.hold.id for d in taken if d.hold is not None], 3_600_000 + 1000)
        assert len(await holds(h, "org")) <= 50 + 1

    go(fn)


def test_the_sweep_ends_the_holds_of_a_billable_that_makes_no_request(tmp_path: Path) -> None:
    """A billable whose process died mid-stream and which never comes back: the leader's sweep drops its expired
    holds (kept as charged) and flushes the change; billables with live holds or none are left alone."""
    catalog = parse_catalog(BASE)
    prefix = f"gwt{uuid.uuid4().hex[:10]}"

    async def main() -> None:
        from gateway.store.redis import open_redis

        store = open_redis(shared_redis_url())
        db = await Database.connect(f"sqlite:///{tmp_path}/gw.db", auto_upgrade=True)
        h = Harness(store, catalog, prefix, raw_redis(shared_redis_url()))
        try:
            dead = Engine(store, catalog, prefix=prefix, hold_ttl=1)
            live = Engine(store, catalog, prefix=prefix)
            for billable in ("gone", "live"):
                await (dead if billable == "gone" else live).apply_grant(billable, 1, 500)
                assert (await (dead if billable == "gone" else live).decide(billable, catalog.route_for("POST", "/chat"))).admitted
            assert (await live.decide("plain", catalog.route_for("POST", "/projects"))).admitted
            sweeper = Reconciler(Engine(store, catalog, prefix=prefix), db)

            async def swept() -> bool:
                await sweeper.sweep()
                return not await holds(h, "gone")

            await until(swept, "the sweep to drop the expired holds")
            assert len(await holds(h, "live")) == 1
            snap = await sweeper.engine.snapshot("gone")
            assert "hx" not in snap.state and (await sweeper.engine.status("gone"))["credits"]["balance"] == 410
            async with db.engine.connect() as conn:
                import sqlalchemy as sa

                from gateway.store.db import snapshots

                row = (await conn.execute(sa.select(snapshots.c.chg).where(snapshots.c.billable == "gone"))).scalar()
            assert row == int(snap.state["chg"])  # the expiry reached the record
        finally:
            await h.cleanup()
            await h.raw.aclose()
            await store.close()
            await db.close()

    asyncio.run(main())


@pytest.mark.slow
def test_sigkill_with_ten_streams_in_flight_keeps_them_charged_and_their_holds_end(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """SIGKILL of a `gateway serve` with 10 metered streams in flight: their reserves stay charged (its settle never
    comes), and with GATEWAY_HOLD_TTL=2 the billable's holds hash is empty within seconds of its next request
    through another gateway; the balance is what it was, the reserves kept."""
    env = {"GATEWAY_REDIS_URL": private_redis.url, "GATEWAY_HOLD_TTL": "2"}
    with upstream() as up, Served(tmp_path, up.url, env=env, name="a") as a, Served(tmp_path, up.url, env=env, name="b") as b:
        a.start()
        r = httpx.post(f"{a.url}/_gateway/admin/billables/s/credits", headers=a.admin(), timeout=10,
                       json={"amount": 1000, "reason": "streams", "idempotency_key": "streams"})
        assert r.status_code == 200, r.text

        async def streams() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                async def one() -> None:
                    with contextlib.suppress(httpx.HTTPError):
                        async with client.stream("GET", f"{a.url}/stream", headers={"X-Org": "s"}) as response:
                            assert response.status_code == 200
                            async for _ in response.aiter_bytes():
                                pass  # until the gateway dies

                running = [asyncio.create_task(one()) for _ in range(10)]
                await asyncio.to_thread(wait_until, lambda: up.in_flight == 10, "10 streams in flight", 30)
                with private_redis.client() as c:
                    assert c.hlen("gw:{s}:holds") == 10
                a.signal(signal.SIGKILL)
                await asyncio.gather(*running)

        asyncio.run(streams())
        a.exit_status(timeout=10)
        with private_redis.client() as c:
            assert int(c.hget("gw:{s}", "c:p") or 0) == 1000 - 10 * 20  # the reserves, kept as charged
        b.start()

        def emptied() -> bool:
            assert httpx.get(f"{b.url}/v1/x", headers={"X-Org": "s"}, timeout=10).status_code == 200
            with private_redis.client() as c:
                return c.hlen("gw:{s}:holds") == 0

        wait_until(emptied, "the holds of the dead process to end", 15)
        with private_redis.client() as c:
            assert int(c.hget("gw:{s}", "c:p") or 0) == 800 and c.hget("gw:{s}", "hx") is None
