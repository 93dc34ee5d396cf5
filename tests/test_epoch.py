"""Redis epochs (DESIGN §5): what a Redis restart or a promoted replica may have lost is never taken for new.

Real redis-servers of our own (restarted, replicated, promoted), real Postgres (a private server the tests
stop) and SQLite; two gateway processes as two KeyStores or engines in one test process, and as two
`gateway serve` subprocesses over HTTP. A loopback switch (tests/tcp_switch.py) stands for a failover as
clients see it, and holds one process's Redis traffic so that it cannot have heard what came before a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from engine_support import BASE
from http_servers import closed_port, serve_in_thread
from services import PostgresServer, RedisCluster, RedisServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tcp_switch import Switch
from test_kill import ADMIN, GatewayProcess, gateways

import gateway.reconcile
from gateway.app import GatewayApp
from gateway.catalog import parse_catalog
from gateway.census import Census
from gateway.engine import Engine
from gateway.errors import RedisUnavailable, StateUnavailable
from gateway.identity import KeyStore
from gateway.reconcile import Reconciler, Rehydrator, connect
from gateway.revocations import RevocationFeed
from gateway.settings import Settings
from gateway.store.cluster import key_slot
from gateway.store.db import Database
from gateway.store.redis import RedisStore, open_redis

CATALOG = parse_catalog(BASE)


def go(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


def wait_until(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


async def answers(store: RedisStore) -> bool:
    """Whether Redis answers this store again (after a restart, its first call finds the connection gone)."""
    try:
        await store.run("epoch", [], [])
    except RedisUnavailable:
        return False
    return True


def url_of(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def replicate(replica: RedisServer, master: RedisServer) -> None:
    """`replica` follows `master` and holds everything written to it so far."""
    replica.client().replicaof("127.0.0.1", master.port)
    wait_until(lambda: replica.client().info("replication").get("master_link_status") == "up", "replica linked", 10)


def caught_up(master: RedisServer) -> None:
    assert master.client().execute_command("WAIT", 1, 5000) == 1, "the replica did not acknowledge the writes"


# ---- the epoch itself -----------------------------------------------------------------------------------


def test_the_epoch_changes_on_a_restart_and_on_a_promotion_and_nowhere_else() -> None:
    """A master answers the same epoch until it restarts; a promoted replica answers one of its own (it may lack
    the last writes); the old master demoted, resynced and promoted again is a new epoch too."""

    async def aged(port: int) -> tuple[str, int]:
        store = open_redis(url_of(port))
        try:
            found = await store.epochs()
            assert list(found) == [f"127.0.0.1:{port}"]  # by the master's address
            via_key = await store.run("epoch", ["gw:{org}"], [])
            assert via_key == found[f"127.0.0.1:{port}"][0]
            return found[f"127.0.0.1:{port}"]
        finally:
            await store.close()

    async def epoch(port: int) -> str:
        return (await aged(port))[0]

    with RedisServer() as a, RedisServer() as b:
        replicate(b, a)
        first = go(epoch(a.port))
        assert first == go(epoch(a.port)) and first.count(":") == 1
        b.client().replicaof("NO", "ONE")
        promoted = go(epoch(b.port))
        assert promoted not in (first, go(epoch(a.port)))
        a.client().replicaof("127.0.0.1", b.port)  # the old master follows the new one, then takes over again
        wait_until(lambda: a.client().info("replication").get("master_link_status") == "up", "a follows b", 10)
        a.client().replicaof("NO", "ONE")
        again, age = go(aged(a.port))
        assert again not in (first, promoted)
        assert age == 0  # promoted: INFO does not tell since when
        a.stop()
        a.start()
        assert go(epoch(a.port)) != again


def test_a_masters_epoch_has_lasted_as_long_as_the_server_has_run() -> None:
    """A master never promoted answers its uptime, less the second it may overstate, as the epoch's age (what
    lets a new process read the census at once, issue 17); the same server restarted starts again from 0."""

    async def aged(port: int) -> tuple[str, int]:
        store = open_redis(url_of(port))
        try:
            return (await store.epochs())[f"127.0.0.1:{port}"]
        finally:
            await store.close()

    with RedisServer() as a:
        wait_until(lambda: int(a.client().info("server")["uptime_in_seconds"]) >= 3, "a to be up 3 s", 10)
        epoch, age = go(aged(a.port))
        assert 2 <= age <= int(a.client().info("server")["uptime_in_seconds"])
        a.stop()
        a.start()
        again, young = go(aged(a.port))
        assert again != epoch and young < age


def test_the_embedded_emulation_has_one_epoch_for_its_life() -> None:
    """fakeredis gives scripts no INFO: its epoch is "" (it lives and dies with its process)."""

    async def main() -> None:
        store = open_redis(None)
        assert await store.epochs() == {"embedded": ("", 0)}
        assert await store.run("epoch", ["gw:{org}"], []) == ""

    go(main())


@pytest.mark.cluster
def test_on_a_cluster_each_master_has_its_epoch_and_a_billable_has_its_slots_master(redis_cluster: RedisCluster) -> None:
    """`epochs()` answers every master; a billable's epoch is the one of the master holding its slot."""

    async def main() -> None:
        store = open_redis(redis_cluster.url)
        engine = Engine(store, CATALOG, prefix="gwepoch")
        try:
            found = await store.epochs()
            assert len(found) == 3 and len({epoch for epoch, _ in found.values()}) == 3
            for billable in ("org-1", "org-2", "org-3", "org-4", "org-5", "org-6"):
                key = engine.keys(billable)[0]
                master = redis_cluster.owner(key_slot(key))
                assert await store.run("epoch", [key], []) == found[f"127.0.0.1:{master.port}"][0]
        finally:
            await store.close()

    go(main())


# ---- revocations across a Redis loss: two KeyStores in one test process ----------------------------------


@dataclass
class Loss:
    """Process A and B reach a master through switches; B is held from `before()` until Redis is back in
    `after()`, which restarts the master (its feed gone) or promotes a replica that never got what came since."""

    kind: str
    master: RedisServer
    replica: RedisServer
    to_a: Switch
    to_b: Switch

    def before(self) -> None:
        if self.kind == "promotion":
            caught_up(self.master)
            self.replica.client().replicaof("NO", "ONE")  # promoted before what follows can reach it
        self.to_b.hold()  # from here B hears nothing from Redis until it is back

    def after(self) -> None:
        self.master.stop()
        if self.kind == "restart":
            self.master.start()
        else:
            self.to_a.point(self.replica.port)
            self.to_b.point(self.replica.port)
        self.to_b.release()


@contextlib.contextmanager
def losing(kind: str) -> Iterator[Loss]:
    with RedisServer() as master, RedisServer() as replica:
        if kind == "promotion":
            replicate(replica, master)
        with Switch(master.port) as to_a, Switch(master.port) as to_b:
            yield Loss(kind, master, replica, to_a, to_b)


@pytest.mark.parametrize("kind", ["restart", "promotion"])
def test_a_key_revoked_just_before_redis_lost_the_feed_is_refused_by_every_process(empty_db_url: str, kind: str) -> None:
    """Process A revokes a key; before B hears of it, Redis restarts (the feed is gone, its sequence at 0 again)
    or a replica that never got the revocation takes over. B trusts answers for 30 s here, so only the new
    epoch can make it ask the record again: it refuses the key within a second; the other key still works."""

    async def main(loss: Loss) -> None:
        store_a, store_b = open_redis(url_of(loss.to_a.port)), open_redis(url_of(loss.to_b.port))
        db_a = await Database.connect(empty_db_url)
        await db_a.upgrade()
        db_b = await Database.connect(empty_db_url)
        a = KeyStore(db_a, feed=RevocationFeed(store_a, interval=0.05))
        b = KeyStore(db_b, feed=RevocationFeed(store_b, interval=0.05), ttl=30.0)
        try:
            revoked, kept = await a.create("org_1", "ci"), await a.create("org_1", "laptop")
            for keys in (a, b):
                assert await keys.authenticate(revoked.key) == "org_1"
                assert await keys.authenticate(kept.key) == "org_1"
            loss.before()
            assert await a.revoke(revoked.id)
            loss.after()

            async def refused() -> bool:
                return await a.authenticate(revoked.key) is None and await b.authenticate(revoked.key) is None

            await eventually(refused, "both processes refuse the revoked key", 1.0)
            assert await a.authenticate(kept.key) == "org_1" and await b.authenticate(kept.key) == "org_1"
        finally:
            for keys, db in ((a, db_a), (b, db_b)):
                await keys.close()
                await db.close()
            await store_a.close()
            await store_b.close()

    with losing(kind) as loss:
        go(main(loss))


# ---- revocations across a Redis loss: two `gateway serve` processes over HTTP -----------------------------


KEYS_CATALOG = """
[catalog]
default_plan = "free"
highlighted_plan = "free"

[plans.free]
price = 0

[[routes]]
match = "* /*"
"""


def status(process: GatewayProcess, key: str) -> int:
    return httpx.get(f"{process.url}/v1/thing", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code


@pytest.fixture
def upstream() -> Iterator[str]:
    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    with serve_in_thread(Starlette(routes=[Route("/{rest:path}", ok, methods=["GET", "POST"])])) as url:
        yield url


async def _upgrade(url: str) -> None:
    db = await Database.connect(url)
    try:
        await db.upgrade()
    finally:
        await db.close()


@pytest.mark.slow
@pytest.mark.parametrize("empty_db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("kind", ["restart", "promotion"])
def test_two_gateway_processes_refuse_a_key_revoked_just_before_redis_lost_it(
    tmp_path: Path, empty_db_url: str, upstream: str, kind: str
) -> None:
    """`DELETE /_gateway/admin/keys/{id}` on one `gateway serve`; the other's Redis traffic is held until Redis
    restarted or a replica that never got the revocation took over: both refuse the key within a second."""
    go(_upgrade(empty_db_url))
    with losing(kind) as loss:
        a, b = (GatewayProcess(tmp_path, name, upstream, url_of(switch.port), empty_db_url, catalog=KEYS_CATALOG,
                               billable_header=None) for name, switch in (("a", loss.to_a), ("b", loss.to_b)))
        with gateways(a, b):
            a.start()
            b.start()
            admin = {"Authorization": f"Bearer {ADMIN}"}
            made = [httpx.post(f"{a.url}/_gateway/admin/keys", json={"billable": "org_1", "name": n}, headers=admin)
                    for n in ("ci", "laptop")]
            assert [r.status_code for r in made] == [201, 201]
            revoked, kept = made[0].json(), made[1].json()
            for p in (a, b):
                assert status(p, revoked["key"]) == 200 and status(p, kept["key"]) == 200
            loss.before()
            assert httpx.delete(f"{a.url}/_gateway/admin/keys/{revoked['id']}", headers=admin).status_code == 204
            loss.after()
            wait_until(lambda: status(a, revoked["key"]) == 401 and status(b, revoked["key"]) == 401,
                       "both processes refuse the revoked key", 1.0)
            assert status(a, kept["key"]) == 200 and status(b, kept["key"]) == 200


# ---- billables Redis lacks while the record is down ------------------------------------------------------


@dataclass
class Recorded:
    """One gateway process's engine connected to the record (census every 50 ms, margin 0.3 s), whose record
    the test can cut (a Database on a closed port) and give back."""

    engine: Engine
    reconciler: Reconciler
    rehydrator: Rehydrator
    census: Census
    db: Database
    down: Database

    def record(self, up: bool) -> None:
        self.census.db = self.rehydrator.db = self.reconciler.db = self.db if up else self.down

    async def decide(self, billable: str, method: str, path: str) -> Any:
        return await self.engine.decide(billable, CATALOG.route_for(method, path))


@contextlib.asynccontextmanager
async def recorded(db_url: str, redis_url: str) -> AsyncIterator[Recorded]:
    db = await Database.connect(db_url)
    await db.upgrade()
    down = await Database.connect(f"postgresql://postgres@127.0.0.1:{closed_port()}/nothing")
    store = open_redis(redis_url)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gateway.reconcile, "census_margin", lambda db: 0.3)
        connected = connect(store, CATALOG, db, prefix="gwepoch", interval=0.1)
    reconciler = connected.reconciler
    assert reconciler.census is not None
    reconciler.census.interval = 0.05
    try:
        yield Recorded(connected.engine, reconciler, connected.rehydrator, reconciler.census, db, down)
    finally:
        await reconciler.stop()
        await store.close()
        await down.close()
        await db.close()


def test_while_the_record_is_down_a_billable_redis_lacks_is_new_only_when_the_census_says_so(empty_db_url: str) -> None:
    """With the record unreachable (a Database on a closed port): a never-seen billable is decided at once; one
    the record holds but no request restored since Redis restarted follows on_redis_down (DESIGN's "same epoch"
    alone would hand it a fresh quota); after a Redis restart during the outage every billable Redis lacks does;
    once the record is back the lost ones are restored (no fresh quota)."""

    async def main(server: RedisServer) -> None:
        async with recorded(empty_db_url, server.url) as p:
            store, census = p.engine.store, p.census

            async def covered_since(moment: float) -> bool:
                return census.read_at > moment

            p.reconciler.start()
            for billable in ("lost", "idle"):
                for _ in range(2):
                    assert (await p.decide(billable, "POST", "/projects")).admitted  # the cap of 2 used up
            await p.reconciler.flush_dirty()

            restarted = time.monotonic()
            server.stop()
            server.start()  # the record is up: Redis lost everything, each billable is restored on first use
            await eventually(lambda: answers(store), "Redis answers again", 10)
            await eventually(lambda: covered_since(restarted), "the census covers the new epoch", 10)
            assert (await p.decide("lost", "GET", "/anything")).admitted  # restored, in this epoch
            assert (await p.decide("lost", "POST", "/projects")).status == 403

            p.record(up=False)
            fresh = await p.decide("fresh", "POST", "/cheap-images")  # a spend: on_redis_down would refuse it
            assert fresh.admitted and fresh.credits == 5
            with pytest.raises(StateUnavailable):
                await p.decide("idle", "POST", "/projects")  # in the record, not restored in this epoch
            assert (await p.decide("lost", "POST", "/projects")).status == 403  # present in Redis: decided

            server.stop()
            server.start()  # Redis loses everything while the record is down
            await eventually(lambda: answers(store), "Redis answers again", 10)
            for billable in ("lost", "fresh", "never-seen"):
                with pytest.raises(StateUnavailable):
                    await p.decide(billable, "POST", "/projects")
            raw = redis.Redis(port=server.port, decode_responses=True)
            assert raw.exists(*(p.engine.keys(b)[0] for b in ("lost", "fresh", "never-seen"))) == 0  # nothing made up

            p.record(up=True)
            for billable in ("lost", "idle"):
                assert (await p.decide(billable, "POST", "/projects")).status == 403  # restored: no fresh quota
                assert (await p.engine.status(billable))["limits"]["projects"]["usage"] == 2
            assert (await p.decide("never-seen", "POST", "/projects")).admitted  # the record never saw it

    with RedisServer() as server:
        go(main(server))


def _admin_get(url: str, path: str) -> Any:
    return httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5).json()


@pytest.mark.slow
def test_through_the_gateway_a_postgres_outage_decides_new_billables_and_keeps_lost_ones_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running gateway, its private Postgres stopped: a never-seen billable is served at once (a spend route
    too); Redis restarted during the outage: a billable it lost follows on_redis_down (503 on a spend, degraded
    on a plain route); Postgres back: that billable is restored from its snapshot, its cap still used up."""
    monkeypatch.setattr(gateway.reconcile, "census_margin", lambda db: 0.3)
    plans = tmp_path / "plans.toml"
    plans.write_text(BASE)

    async def ok(request: Request) -> Response:
        return JSONResponse({"path": request.url.path})

    upstream = Starlette(routes=[Route("/{rest:path}", ok, methods=["GET", "POST"])])
    with PostgresServer() as pg, RedisServer() as own_redis, serve_in_thread(upstream) as upstream_url:
        go(_upgrade(pg.url))
        settings = Settings(plans=str(plans), upstream=upstream_url, redis_url=own_redis.url, database_url=pg.url,
                            admin_token=ADMIN, billable_header="X-Org", reconcile_interval=0.2)
        app = GatewayApp(settings)
        with serve_in_thread(app) as url:
            census = app.gateway.reconciler.census
            assert census is not None

            def post(org: str, path: str) -> httpx.Response:
                return httpx.post(f"{url}{path}", headers={"X-Org": org}, timeout=10)

            assert [post("org-lost", "/projects").status_code for _ in range(2)] == [200, 200]
            wait_until(lambda: _admin_get(url, "/_gateway/health")["record"]["pending"] == 0, "flushed", 10)
            wait_until(lambda: census.read_at > -1e9, "the census read the record", 10)

            pg.stop()
            new = post("org-new", "/cheap-images")
            assert new.status_code == 200 and "x-gateway-degraded" not in new.headers
            assert post("org-lost", "/projects").status_code == 403  # still in Redis: decided as usual

            own_redis.stop()
            own_redis.start()
            (breaker,) = app.gateway.store.breakers().values()
            wait_until(lambda: breaker.failures == 0 and httpx.get(f"{url}/_gateway/health").status_code == 200,
                       "the gateway reaches the restarted Redis", 10)
            spend = post("org-lost", "/cheap-images")
            assert spend.status_code == 503 and spend.json()["type"] == "urn:gateway:unavailable"
            plain = httpx.get(f"{url}/v1/echo", headers={"X-Org": "org-lost"}, timeout=10)
            assert plain.status_code == 200 and plain.headers["x-gateway-degraded"] == "redis"

            pg.start()
            wait_until(lambda: _admin_get(url, "/_gateway/health")["database"] == "up", "the record is back", 15)
            assert post("org-lost", "/projects").status_code == 403  # restored from its snapshot
            assert _admin_get(url, "/_gateway/admin/billables/org-lost")["limits"]["projects"]["usage"] == 2


@pytest.mark.cluster
def test_on_a_cluster_only_the_billables_of_a_restarted_master_are_lost(tmp_path: Path) -> None:
    """A private 3-master cluster, the record down: one master restarts (its data gone, its epoch new). A billable
    never seen on another master is still decided as new; one on the restarted master follows on_redis_down."""

    async def main(cluster: RedisCluster) -> None:
        async with recorded(f"sqlite:///{tmp_path}/gateway.db", cluster.url) as p:
            store = p.engine.store
            await store.epochs()  # the client learns the cluster
            restarted_port = cluster.servers[0].port
            on_restarted: list[str] = []
            elsewhere: list[str] = []
            for i in range(200):
                billable = f"org-{i}"
                port = cluster.owner(key_slot(p.engine.keys(billable)[0])).port
                (on_restarted if port == restarted_port else elsewhere).append(billable)
            p.reconciler.start()

            async def read() -> bool:
                return p.census.read_at > -1e9

            await eventually(read, "the census read the record", 10)
            p.record(up=False)
            cluster.servers[0].stop()
            cluster.servers[0].start()

            async def whole() -> bool:
                try:
                    await store.run("epoch", p.engine.keys(on_restarted[0])[:1], [])
                    await store.run("epoch", p.engine.keys(elsewhere[0])[:1], [])
                except RedisUnavailable:
                    return False
                return True

            await eventually(whole, "the cluster serves every slot again", 20)
            assert (await p.decide(elsewhere[1], "POST", "/cheap-images")).admitted
            with pytest.raises(StateUnavailable):
                await p.decide(on_restarted[1], "POST", "/cheap-images")

    with RedisCluster() as cluster:
        go(main(cluster))
