"""Kill tests (DESIGN §5): `gateway serve` processes under concurrent load, against a private redis-server and
a private Postgres that the tests kill, restart and stop. Never the machine's shared servers.

(a) SIGKILL a gateway process: no grant lost or doubled; its billables reach the record by another's sweep.
(b) Redis restarted without persistence: every grant once; no billable re-admitted by more than one
    interval's usage, none past a cap it had used up before the last flush.
(c) Postgres stopped for seconds: no decision fails; after it returns the record matches Redis.
(d) The same grant 100 times at once (one idempotency_key) through two processes: applied once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from http_servers import serve_in_thread
from services import PostgresServer, RedisServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from waiting import until, wait_until

from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.store import db as tables
from gateway.store.db import Database
from gateway.store.redis import open_redis
from gateway.usage import rows_from_state

pytestmark = pytest.mark.slow

ADMIN = "kill-admin-for-tests"
INTERVAL = 0.5
CATALOG_TEXT = """
[catalog]
default_plan = "free"
highlighted_plan = "free"
on_redis_down = "closed"

[plans.free]
price = 0
limits.projects = { to = 5 }
limits.exports = { to = 40, per = "month" }

[[routes]]
match = "POST /projects"
limit = "projects"

[[routes]]
match = "POST /exports"
limit = "exports"

[[routes]]
match = "* /*"
"""
CATALOG = parse_catalog(CATALOG_TEXT)


# ---- services and processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def upstream() -> Iterator[str]:
    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/{rest:path}", ok, methods=["GET", "POST", "DELETE"])])
    with serve_in_thread(app) as url:
        yield url


def go(coro: Any) -> Any:
    return asyncio.run(coro)


def fresh_database(pg: PostgresServer) -> str:
    """The private server running, its schema empty and upgraded to the head."""
    pg.start()

    async def main() -> None:
        db = await Database.connect(pg.url)
        try:
            async with db.engine.begin() as conn:
                await conn.execute(sa.text("DROP SCHEMA public CASCADE"))
                await conn.execute(sa.text("CREATE SCHEMA public"))
            await db.upgrade()
        finally:
            await db.close()

    go(main())
    return pg.url


@dataclass
class GatewayProcess:
    """`gateway serve` in a subprocess of its own, which a test may SIGKILL."""

    tmp: Path
    name: str
    upstream: str
    redis_url: str
    database_url: str
    interval: float = INTERVAL
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    catalog: str = CATALOG_TEXT
    billable_header: str | None = "X-Org"  # None: billables are named by API keys

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayProcess:
        plans = self.tmp / "plans.toml"
        plans.write_text(self.catalog)
        env = {
            **os.environ,
            "GATEWAY_PLANS": str(plans),
            "GATEWAY_UPSTREAM": self.upstream,
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_REDIS_URL": self.redis_url,
            "GATEWAY_DATABASE_URL": self.database_url,
            "GATEWAY_RECONCILE_INTERVAL": str(self.interval),
            "GATEWAY_ADMIN_TOKEN": ADMIN,
        }
        env.pop("GATEWAY_BILLABLE_HEADER", None)
        if self.billable_header is not None:
            env["GATEWAY_BILLABLE_HEADER"] = self.billable_header
        log = open(self.tmp / f"{self.name}.log", "ab")  # noqa: SIM115 - the child writes to it until it ends
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/_gateway/health", timeout=1).status_code in (200, 503):
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log()}")
            time.sleep(0.1)

    def health(self) -> dict[str, Any]:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        result: dict[str, Any] = httpx.get(f"{self.url}/_gateway/health", headers=admin, timeout=5).json()
        return result

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return (self.tmp / f"{self.name}.log").read_text(errors="replace")[-5000:]


@contextlib.contextmanager
def gateways(*procs: GatewayProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


# ---- reading the record and Redis -----------------------------------------------------------------------


async def _mismatches(redis_url: str, database_url: str, billables: list[str]) -> list[str]:
    """Billables whose record (snapshot and usage totals) is not what Redis holds now."""
    store = open_redis(redis_url)
    db = await Database.connect(database_url)
    try:
        engine = Engine(store, CATALOG)
        async with db.engine.connect() as conn:
            snaps = {r.billable: r for r in await conn.execute(sa.select(tables.snapshots))}
            usage: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
            for r in await conn.execute(sa.select(tables.usage_totals)):
                usage[r.billable].add((r.period, r.route, r.operation, r.requests, r.units, r.credits, r.amount_cents))
        wrong = []
        for b in billables:
            state = (await engine.snapshot(b)).state
            row = snaps.get(b)
            expected = {(u.period, u.route, u.operation, u.requests, u.units, u.credits, u.amount_cents)
                        for u in rows_from_state(state, CATALOG.settings.credits_per_dollar)}
            if row is None or json.loads(row.state) != state or usage[b] != expected:
                wrong.append(b)
                if os.environ.get("KILL_DEBUG"):
                    recorded = json.loads(row.state) if row is not None else {}
                    diff = {k: (recorded.get(k), state.get(k)) for k in set(recorded) | set(state) if recorded.get(k) != state.get(k)}
                    print("MISMATCH", b, diff, usage[b] ^ expected)
        return wrong
    finally:
        await store.close()
        await db.close()


def mismatches(redis_url: str, database_url: str, billables: list[str]) -> list[str]:
    result: list[str] = go(_mismatches(redis_url, database_url, billables))
    return result


async def _grants(redis_url: str, database_url: str) -> tuple[dict[str, list[tuple[int, int, str]]], dict[str, dict[str, str]]]:
    """The record's grants per billable (seq, amount, key), and each such billable's Redis state."""
    store = open_redis(redis_url)
    db = await Database.connect(database_url)
    try:
        async with db.engine.connect() as conn:
            found: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
            g = tables.credit_grants
            for r in await conn.execute(sa.select(g.c.billable, g.c.seq, g.c.amount, g.c.idempotency_key).order_by(g.c.seq)):
                found[r.billable].append((r.seq, r.amount, r.idempotency_key))
        engine = Engine(store, CATALOG)
        states = {b: (await engine.snapshot(b)).state for b in found}
        return dict(found), states
    finally:
        await store.close()
        await db.close()


def check_grants_once(redis_url: str, database_url: str, acknowledged: dict[str, str]) -> int:
    """Every acknowledged grant is in the record once, and Redis holds each recorded grant exactly once."""
    recorded, states = go(_grants(redis_url, database_url))
    keys = {key: b for b, rows in recorded.items() for _, _, key in rows}
    for key, billable in acknowledged.items():
        assert keys.get(key) == billable, f"grant {key} of {billable} is not in the record"
    for billable, rows in recorded.items():
        assert [seq for seq, _, _ in rows] == list(range(1, len(rows) + 1))  # gapless
        state = states[billable]
        assert int(state.get("c:seq", 0)) == len(rows), f"{billable}: Redis applied {state.get('c:seq')} of {len(rows)}"
        assert int(state.get("c:p", 0)) - int(state.get("c:d", 0)) == sum(a for _, a, _ in rows), billable
    return sum(len(rows) for rows in recorded.values())


# ---- load ------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """What the clients saw: per billable and route, when each request was admitted; every status."""

    admitted: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[str] = field(default_factory=list)
    grants: dict[str, str] = field(default_factory=dict)  # acknowledged idempotency key → billable
    failed_grants: dict[str, tuple[str, int]] = field(default_factory=dict)  # key → (billable, amount)

    async def request(self, client: httpx.AsyncClient, base: str, method: str, path: str, billable: str) -> int | None:
        try:
            r = await client.request(method, f"{base}{path}", headers={"X-Org": billable})
        except httpx.HTTPError as exc:
            self.errors.append(f"{method} {path} @ {base}: {type(exc).__name__}")
            return None
        self.statuses[r.status_code] += 1
        if r.status_code == 200:
            self.admitted[(billable, path)].append(time.monotonic())
        return r.status_code

    async def grant(self, client: httpx.AsyncClient, base: str, billable: str, amount: int, key: str) -> bool:
        try:
            r = await client.post(
                f"{base}/_gateway/admin/billables/{billable}/credits",
                json={"amount": amount, "reason": "kill test", "idempotency_key": key},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
        except httpx.HTTPError:
            r = None
        if r is not None and r.status_code in (200, 201):
            self.grants[key] = billable
            self.failed_grants.pop(key, None)
            return True
        self.failed_grants[key] = (billable, amount)
        return False

    async def retry_failed_grants(self, client: httpx.AsyncClient, base: str, timeout: float = 10) -> None:
        """What a client does with a grant that got no answer: send it again with the same idempotency_key."""
        deadline = time.monotonic() + timeout
        while self.failed_grants:
            assert time.monotonic() < deadline, f"grants still failing: {self.failed_grants}"
            for key, (billable, amount) in list(self.failed_grants.items()):
                await self.grant(client, base, billable, amount, key)
            await asyncio.sleep(0.2)


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


async def run_for(seconds: float, worker: Any, n: int) -> None:
    deadline = time.monotonic() + seconds

    async def loop(i: int) -> None:
        while time.monotonic() < deadline:
            await worker(i)

    await asyncio.gather(*(loop(i) for i in range(n)))


# ---- (a) a gateway process SIGKILLed ---------------------------------------------------------------------


def test_sigkill_a_gateway_process(tmp_path: Path, pg: PostgresServer, redis_server: RedisServer, upstream: str) -> None:
    """SIGKILL the leading process under load: no grant lost or doubled, and the billables only it served
    reach the record through the survivor's sweep once the lease moves."""
    db_url = fresh_database(pg)
    a = GatewayProcess(tmp_path, "a", upstream, redis_server.url, db_url, interval=1.0).start()
    wait_until(lambda: a.health()["record"]["leader"], "a to lead", 10, interval=0.1)
    b = GatewayProcess(tmp_path, "b", upstream, redis_server.url, db_url).start()
    only_a = [f"a-{i}" for i in range(10)]
    shared = [f"s-{i}" for i in range(10)]
    load = Load()

    async def main() -> list[str]:
        async with client() as c:
            killed = asyncio.Event()
            lagging: list[str] = []

            async def decisions(i: int) -> None:
                if i % 2 == 0 and not killed.is_set():
                    billable, base = random.choice(only_a), a.url
                else:
                    billable, base = random.choice(shared), random.choice([a.url, b.url]) if not killed.is_set() else b.url
                await load.request(c, base, random.choice(["GET", "POST"]), "/v1/x" if random.random() < 0.7 else "/exports", billable)

            async def grants(i: int) -> None:
                base = b.url if killed.is_set() or i % 2 else a.url
                await load.grant(c, base, random.choice(shared), 10, f"g-{uuid.uuid4().hex}")
                await asyncio.sleep(0.05)

            async def killer() -> None:
                await asyncio.sleep(1.5)
                # Kill while a has something unflushed (on a loaded machine a second may pass without a request
                # to its billables): what the sweep must then find.
                await until(lambda: _mismatches(redis_server.url, db_url, only_a), "a to hold unflushed changes",
                            timeout=2.0, interval=0.01)
                a.kill()
                killed.set()
                # What the dead process had not flushed yet: the sweep must find it.
                lagging.extend(await _mismatches(redis_server.url, db_url, only_a))

            await asyncio.gather(run_for(4, decisions, 12), run_for(4, grants, 4), killer())
            await load.retry_failed_grants(c, b.url)
            return lagging

    with gateways(a, b):
        lagging = go(main())
        assert lagging, "a flushed everything before it died: the test proved nothing about the sweep"
        wait_until(lambda: not mismatches(redis_server.url, db_url, only_a + shared), "the record to match Redis", 15, interval=0.1)
        assert b.health()["record"]["leader"]
        count = check_grants_once(redis_server.url, db_url, load.grants)
        assert count == len(load.grants) > 20
    assert load.statuses[200] > 200


# ---- (b) Redis restarted without persistence --------------------------------------------------------------


def test_redis_restart_loses_at_most_one_interval(
    tmp_path: Path, pg: PostgresServer, redis_server: RedisServer, upstream: str
) -> None:
    """Redis restarted empty under load: grants come back once each; a cap used up before the last flush
    stays used up; an allowance re-admits at most what was admitted in the interval before the loss."""
    db_url = fresh_database(pg)
    g = GatewayProcess(tmp_path, "g", upstream, redis_server.url, db_url).start()
    capped = [f"cap-{i}" for i in range(8)]
    allowance = [f"allow-{i}" for i in range(8)]
    granted = [f"grant-{i}" for i in range(4)]
    load = Load()
    stopped_at: list[float] = []
    restarted_at: list[float] = []

    async def main() -> None:
        async with client() as c:
            for billable in capped:  # use the cap up: 5 admitted, then 403
                codes = [await load.request(c, g.url, "POST", "/projects", billable) for _ in range(6)]
                assert codes == [200] * 5 + [403]
            for billable in granted:
                assert await load.grant(c, g.url, billable, 10, f"g-{uuid.uuid4().hex}")

            async def decisions(i: int) -> None:
                await load.request(c, g.url, "POST", "/exports", allowance[i % len(allowance)])
                await load.request(c, g.url, "POST", "/projects", capped[i % len(capped)])
                await asyncio.sleep(0.08)

            async def grants(i: int) -> None:
                await load.grant(c, g.url, random.choice(granted), 10, f"g-{uuid.uuid4().hex}")
                await asyncio.sleep(0.1)

            async def restart() -> None:
                began = time.monotonic()

                async def caps_recorded() -> bool:
                    return not await _mismatches(redis_server.url, db_url, capped)

                # The caps were used up long before: the record has them.
                await until(caps_recorded, "the used-up caps to reach the record", interval=0.1)
                await asyncio.sleep(max(0.0, began + 2.5 - time.monotonic()))  # the restart comes 2.5 s into the load
                stopped_at.append(time.monotonic())
                await asyncio.to_thread(redis_server.stop)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(redis_server.start)
                restarted_at.append(time.monotonic())

            await asyncio.gather(run_for(6, decisions, 8), run_for(6, grants, 2), restart())
            await load.retry_failed_grants(c, g.url)
            for billable in granted:  # a state Redis lost comes back with its first request
                await load.request(c, g.url, "GET", "/v1/x", billable)

    with gateways(g):
        go(main())
        stop = stopped_at[0]
        for billable in capped:
            after = [t for t in load.admitted[(billable, "/projects")] if t > stop]
            assert len(load.admitted[(billable, "/projects")]) == 5 and not after, billable
        window = INTERVAL + 0.5  # one interval, and the flush's own time
        for billable in allowance:
            times = load.admitted[(billable, "/exports")]
            recent = [t for t in times if stop - window <= t <= stop]
            assert len(times) <= 40 + len(recent), (billable, len(times), len(recent))
            assert any(t > restarted_at[0] for t in times) or len(times) >= 40, billable  # decisions resumed
        wait_until(lambda: not mismatches(redis_server.url, db_url, capped + allowance + granted),
                   "the record to match Redis", 15, interval=0.1)
        check_grants_once(redis_server.url, db_url, load.grants)
    assert not load.errors
    assert set(load.statuses) <= {200, 403, 429, 503}


# ---- (c) Postgres stopped --------------------------------------------------------------------------------


def test_postgres_stopped_decisions_go_on(tmp_path: Path, pg: PostgresServer, redis_server: RedisServer, upstream: str) -> None:
    """Postgres stopped for three seconds under load on two processes: every decision is answered as
    usual, health says the database is down, and once it is back the record matches Redis."""
    db_url = fresh_database(pg)
    a = GatewayProcess(tmp_path, "a", upstream, redis_server.url, db_url).start()
    b = GatewayProcess(tmp_path, "b", upstream, redis_server.url, db_url).start()
    billables = [f"w-{i}" for i in range(20)]
    load = Load()
    seen_down: list[bool] = []

    async def main() -> None:
        async with client() as c:
            for billable in billables:  # known to Redis before the outage (a first request reads the record)
                assert await load.request(c, a.url, "GET", "/v1/x", billable) == 200

            async def decisions(i: int) -> None:
                path, method = random.choice([("/v1/x", "GET"), ("/exports", "POST"), ("/projects", "POST")])
                await load.request(c, random.choice([a.url, b.url]), method, path, random.choice(billables))

            async def outage() -> None:
                await asyncio.sleep(1.5)  # 1.5 s of load, then three seconds of outage under load: the scenario
                await asyncio.to_thread(pg.stop)
                stopped = time.monotonic()

                async def reported() -> bool:
                    return bool((await c.get(f"{a.url}/_gateway/health", headers={"Authorization": f"Bearer {ADMIN}"})).json()["database"] == "down")

                seen_down.append(await until(reported, "health to say the database is down", interval=0.1))
                await asyncio.sleep(max(0.0, stopped + 3.0 - time.monotonic()))
                await asyncio.to_thread(pg.start)

            await asyncio.gather(run_for(6.5, decisions, 12), outage())

    with gateways(a, b):
        go(main())
        assert seen_down == [True]
        assert not load.errors and set(load.statuses) <= {200, 403, 429}, (load.statuses, load.errors[:5])
        wait_until(lambda: a.health()["database"] == "up" and b.health()["database"] == "up", "health to recover", 10, interval=0.1)
        wait_until(lambda: not mismatches(redis_server.url, db_url, billables), "the record to match Redis", 10, interval=0.1)
    assert load.statuses[200] > 200


# ---- (d) one grant, a hundred times at once --------------------------------------------------------------


def test_the_same_grant_a_hundred_times_at_once(tmp_path: Path, pg: PostgresServer, redis_server: RedisServer, upstream: str) -> None:
    """A hundred concurrent requests with one idempotency_key, through two processes: one grant, applied once."""
    db_url = fresh_database(pg)
    a = GatewayProcess(tmp_path, "a", upstream, redis_server.url, db_url).start()
    b = GatewayProcess(tmp_path, "b", upstream, redis_server.url, db_url).start()

    async def main() -> list[httpx.Response]:
        async with client() as c:
            return list(
                await asyncio.gather(
                    *(
                        c.post(
                            f"{(a, b)[i % 2].url}/_gateway/admin/billables/org-once/credits",
                            json={"amount": 500, "reason": "once", "idempotency_key": "the-one"},
                            headers={"Authorization": f"Bearer {ADMIN}"},
                        )
                        for i in range(100)
                    )
                )
            )

    with gateways(a, b):
        answers = go(main())
        assert all(r.status_code in (200, 201) for r in answers), {r.status_code: r.text for r in answers}
        bodies = [r.json() for r in answers]
        assert {body["sequence"] for body in bodies} == {1}
        assert sum(not body["duplicate"] for body in bodies) == 1
        assert check_grants_once(redis_server.url, db_url, {"the-one": "org-once"}) == 1
        status = httpx.get(f"{a.url}/_gateway/admin/billables/org-once", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert status["credits"]["purchased"] == 500
