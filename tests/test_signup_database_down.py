"""A signup during a database incident (DESIGN §5, issue 17): `gateway serve` in trusted-header mode, its
private Postgres behind a loopback relay (tests/tcp_switch.py) that the test holds (a hung record) or closes
(a record gone). Redis is up and keeps its epoch, so a billable never seen before is new: it is decided at
once, with its rate-limit headers, and its usage reaches the record once the record answers again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from http_servers import closed_port
from served import Served, upstream
from services import PostgresServer, RedisServer
from tcp_switch import Switch
from test_kill import fresh_database
from waiting import wait_until

from gateway.store import db as tables
from gateway.store.db import Database

pytestmark = pytest.mark.slow

CATALOG = """
[catalog]
default_plan = "free"
on_redis_down = "closed"

[plans.free]
price = 0
limits.ticks = { to = 100, per = "month" }

[[routes]]
match = "POST /v1/tick"
limit = "ticks"

[[routes]]
match = "* /*"
"""


DB_TIMEOUT = 3.0
MARGIN = 2 * DB_TIMEOUT + 5.0  # gateway.reconcile.census_margin


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def long_up() -> Iterator[RedisServer]:
    """A redis-server of our own, up longer than the census margin: what a gateway usually starts beside."""
    with RedisServer() as server:
        wait_until(lambda: int(server.client().info("server")["uptime_in_seconds"]) > MARGIN, "Redis to be up a while", 60)
        yield server


async def recorded_usage(url: str, billable: str) -> int:
    """The ticks the record holds for `billable` (its usage totals), 0 when it holds none."""
    db = await Database.connect(url)
    try:
        totals = tables.usage_totals
        async with db.engine.connect() as conn:
            query = sa.select(sa.func.coalesce(sa.func.sum(totals.c.requests), 0)).where(totals.c.billable == billable)
            return int((await conn.execute(query)).scalar_one())
    finally:
        await db.close()


def health(gw: Served) -> dict[str, Any]:
    return dict(httpx.get(f"{gw.url}/_gateway/health", headers=gw.admin(), timeout=30).json())


@pytest.mark.parametrize("outage", ["hung", "closed"])
def test_a_new_billable_is_decided_while_the_record_is_down_and_recorded_when_it_returns(
    tmp_path: Path, pg: PostgresServer, long_up: RedisServer, outage: str
) -> None:
    """A gateway just started beside a Redis long up, its first request flushed to the record; then the record
    hangs or goes: a never-seen billable's POST /v1/tick answers 200 with RateLimit headers (it was 503 until
    the census margin had passed since the start); once the record is back its 3 ticks are there."""
    url = fresh_database(pg)
    with Switch(pg.port) as relay, upstream() as up:
        env = {"GATEWAY_REDIS_URL": long_up.url, "GATEWAY_DB_TIMEOUT": str(DB_TIMEOUT),
               "GATEWAY_DATABASE_URL": url.replace(f":{pg.port}/", f":{relay.port}/")}  # fmt: skip
        with Served(tmp_path, up.url, env=env, catalog=CATALOG) as gw:
            gw.start()
            tick = f"{gw.url}/v1/tick"
            assert httpx.post(tick, headers={"X-Org": f"org-old-{outage}"}, timeout=30).status_code == 200
            wait_until(lambda: health(gw)["record"]["pending"] == 0, "the first request in the record", 30)
            if outage == "hung":
                relay.hold()
            else:
                relay.point(closed_port())
            signup = f"org-signup-{outage}"
            answers = [httpx.post(tick, headers={"X-Org": signup}, timeout=30) for _ in range(3)]
            for used, r in enumerate(answers, 1):
                assert r.status_code == 200, (r.text, gw.log()[-3000:])
                assert f";r={100 - used};" in r.headers["ratelimit"] and "x-gateway-degraded" not in r.headers
            assert health(gw)["database"] == "down"
            if outage == "hung":
                relay.release()
            else:
                relay.point(pg.port)
            wait_until(lambda: asyncio.run(recorded_usage(url, signup)) == 3, "the signup's usage in the record", 60)
