"""Redis Cluster as a first-class store, on private clusters started here: exact under concurrency from
one process and from two, a dead master degrades only its own slots (and the gateway follows the
failover within a second of the cluster), MOVED/ASK/TRYAGAIN of a slot migration and NOSCRIPT on one
master are handled without a degraded answer."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from services import RedisCluster, RedisServer, raw_redis
from waiting import until

from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.errors import RedisUnavailable
from gateway.store.cluster import key_slot
from gateway.store.redis import open_redis

CATALOG = """
[catalog]
default_plan = "free"
[operations.op]
cost = 1
[operations.metered]
per_unit = 1
units = "response.json:n"
reserve = 1
[plans.free]
credits = 100
limits.seats = { to = 250 }
limits.calls = { to = 250, per = "month" }
limits.open = { to = 1000000000 }
limits.tiny = { to = 1 }
[[routes]]
match = "POST /seats"
limit = "seats"
[[routes]]
match = "POST /calls"
limit = "calls"
[[routes]]
match = "POST /spend"
spend = "op"
[[routes]]
match = "POST /open"
limit = "open"
[[routes]]
match = "POST /metered"
spend = "metered"
[[routes]]
match = "POST /tiny"
limit = "tiny"
"""
CAPS = {"/seats": 250, "/calls": 250, "/spend": 100}


def _billable_on(slots: range, name: str) -> str:
    """A billable id whose keys hash into `slots` (a master's share of the fixture's cluster)."""
    return next(f"{name}-{i}" for i in range(100_000) if key_slot(f"gw:{{{name}-{i}}}") in slots)


def _third(i: int) -> range:
    return range(i * 16384 // 3, (i + 1) * 16384 // 3)


def _targets() -> dict[str, str]:
    """One billable per kind of policy, each on another of the three masters."""
    return {path: _billable_on(_third(i), path.strip("/")) for i, path in enumerate(CAPS)}


async def _fire(
    url: str, prefix: str, targets: dict[str, str], per_kind: int, ready: Any = None
) -> dict[str, Counter[str]]:
    """`per_kind` decisions for each target, all in flight at once; outcomes counted per route."""
    catalog = parse_catalog(CATALOG)
    store = open_redis(url)
    engine = Engine(store, catalog, prefix=prefix)
    await store.ping()  # the cluster's map is read before the burst, as a running gateway has it
    if ready is not None:
        ready.wait(timeout=60)

    async def one(path: str, billable: str) -> tuple[str, str]:
        try:
            decision = await engine.decide(billable, catalog.route_for("POST", path))
        except RedisUnavailable:
            return path, "degraded"
        return path, "admitted" if decision.admitted else "denied"

    outcomes = await asyncio.gather(*(one(p, b) for p, b in targets.items() for _ in range(per_kind)))
    await store.close()
    counts: dict[str, Counter[str]] = {path: Counter() for path in targets}
    for path, outcome in outcomes:
        counts[path][outcome] += 1
    return counts


def _fire_in_process(url: str, prefix: str, targets: dict[str, str], per_kind: int, ready: Any, out: Any) -> None:
    out.put(asyncio.run(_fire(url, prefix, targets, per_kind, ready)))


async def _clean(url: str, prefix: str) -> None:
    store, raw = open_redis(url), raw_redis(url)
    async for key in store.scan(f"{prefix}:*"):
        await raw.delete(key)
    await store.close()
    await raw.aclose()


def _check_exact(counts: dict[str, Counter[str]], concurrent: int, processes: int) -> None:
    for path, cap in CAPS.items():
        expected = min(concurrent, cap)
        over = counts[path]["admitted"] - expected
        print(f"cluster, {processes} process(es), {concurrent} concurrent {path} (cap {cap}): "
              f"over-admitted {over}, degraded {counts[path]['degraded']}")
    for path, cap in CAPS.items():
        assert counts[path]["degraded"] == 0, (path, counts[path])
        assert counts[path]["admitted"] == min(concurrent, cap), (path, counts[path])


@pytest.mark.cluster
@pytest.mark.parametrize("concurrent", [50, 200, 600])
def test_exact_on_a_healthy_cluster_from_one_process(redis_cluster: RedisCluster, concurrent: int) -> None:
    """`concurrent` requests at once against a cap of 250, an allowance of 250 and 100 credits, each on
    another master: exactly min(concurrent, cap) admitted, and never a degraded answer (waiting is not down)."""
    prefix = f"gwt{uuid.uuid4().hex[:10]}"
    try:
        counts = asyncio.run(_fire(redis_cluster.url, prefix, _targets(), concurrent))
    finally:
        asyncio.run(_clean(redis_cluster.url, prefix))
    _check_exact(counts, concurrent, 1)


async def _clean_billables(url: str, billables: Any) -> None:
    raw = raw_redis(url)
    engine = Engine(open_redis(None), parse_catalog(CATALOG))
    for billable in billables:
        await raw.delete(*engine.keys(billable))
    await raw.aclose()


@pytest.mark.cluster
@pytest.mark.slow
def test_exact_on_a_healthy_cluster_from_two_processes(redis_cluster: RedisCluster) -> None:
    """600 requests per policy from two processes at once (300 each): exactly 250/250/100, none degraded."""
    prefix = f"gwt{uuid.uuid4().hex[:10]}"
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(3)  # both processes have read the cluster's map, and the test: go
    out: Any = ctx.Queue()
    procs = [ctx.Process(target=_fire_in_process, args=(redis_cluster.url, prefix, _targets(), 300, ready, out))
             for _ in range(2)]
    try:
        for p in procs:
            p.start()
        ready.wait(timeout=60)
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
        asyncio.run(_clean(redis_cluster.url, prefix))
    counts = {path: sum((r[path] for r in results), Counter()) for path in CAPS}
    _check_exact(counts, 600, 2)


@pytest.mark.cluster
def test_key_slot_is_the_clusters(redis_cluster: RedisCluster) -> None:
    """The slot the store computes for a key is the one the cluster computes (hash tags included)."""
    keys = ["plain", "gw:{org-1}", "gw:{org-1}:ev", "a{}b", "{}", "x{y", "x}y{z}", "gw:{a%7Db}:holds", "日本{語}"]
    with redis_cluster.servers[0].client() as c:
        assert [key_slot(k) for k in keys] == [c.execute_command("CLUSTER", "KEYSLOT", k) for k in keys]


@pytest.mark.cluster
def test_noscript_on_one_master_of_the_cluster(redis_cluster: RedisCluster) -> None:
    """SCRIPT FLUSH on one master: its billables' next decisions load the script and go through, once."""
    targets = {i: _billable_on(_third(i), f"flush{uuid.uuid4().hex[:6]}") for i in range(3)}
    catalog = parse_catalog(CATALOG)
    route = catalog.route_for("POST", "/open")

    async def main() -> None:
        store = open_redis(redis_cluster.url)
        engine = Engine(store, catalog)
        for b in targets.values():
            assert (await engine.decide(b, route)).admitted
        with redis_cluster.masters[1].client() as c:
            c.script_flush()
        for b in targets.values():
            assert (await engine.decide(b, route)).admitted
        for b in targets.values():
            assert (await engine.snapshot(b)).state["u:open"] == "2"  # each ran exactly twice
        await store.close()

    try:
        asyncio.run(main())
    finally:
        asyncio.run(_clean_billables(redis_cluster.url, targets.values()))


# ---- slot migration: MOVED, ASK, TRYAGAIN ---------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[RedisCluster]:
    """A 3-master cluster of this module's own: its slots are moved around."""
    with RedisCluster() as cluster:
        yield cluster


def _node_id(server: RedisServer) -> str:
    with server.client() as c:
        return str(c.execute_command("CLUSTER", "MYID"))


def _migrate(cluster: RedisCluster, slot: int, target: RedisServer, *, finish: bool = True) -> RedisServer:
    """Move `slot` (its keys, then, with `finish`, its ownership) to `target`; returns where it was."""
    source = cluster.owner(slot)
    src, dst = source.client(), target.client()
    with src, dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", _node_id(source))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", _node_id(target))
        keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        if finish:
            _finish(cluster, slot, target)
    return source


def _finish(cluster: RedisCluster, slot: int, target: RedisServer) -> None:
    owner = _node_id(target)
    for server in cluster.masters:
        with server.client() as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)


def _errors(server: RedisServer, code: str) -> int:
    """How many `code` error replies (MOVED, ASK, TRYAGAIN ...) the server has sent."""
    with server.client() as c:
        return int(c.info("errorstats").get(f"errorstat_{code}", {}).get("count", 0))


async def _decide_many(engine: Engine, billable: str, path: str, n: int) -> None:
    route = engine.catalog.route_for("POST", path)
    for _ in range(n):
        assert (await engine.decide(billable, route)).admitted


@pytest.mark.cluster
def test_moved_after_a_slot_migration(own_cluster: RedisCluster) -> None:
    """A billable's slot moved to another master: the old one answers MOVED, the decision goes to the new
    one and continues the same state, with no degraded answer; the map follows."""
    billable = _billable_on(_third(0), "moved")
    slot = key_slot(f"gw:{{{billable}}}")

    async def main() -> None:
        store = open_redis(own_cluster.url)
        engine = Engine(store, parse_catalog(CATALOG))
        await _decide_many(engine, billable, "/open", 3)  # the map says masters[0]
        _migrate(own_cluster, slot, own_cluster.masters[2])
        moved = _errors(own_cluster.masters[0], "MOVED")
        await _decide_many(engine, billable, "/open", 3)
        assert (await engine.snapshot(billable)).state["u:open"] == "6"
        assert _errors(own_cluster.masters[0], "MOVED") == moved + 1  # then the map knew
        _migrate(own_cluster, slot, own_cluster.masters[0])  # and back: the fixture's thirds again
        await _decide_many(engine, billable, "/open", 1)
        assert (await engine.snapshot(billable)).state["u:open"] == "7"
        await store.close()

    asyncio.run(main())


@pytest.mark.cluster
def test_ask_and_tryagain_during_a_slot_migration(own_cluster: RedisCluster) -> None:
    """Halfway through a migration: a billable whose keys all moved is asked for on the importing master
    (ASK, ASKING); one whose keys are split waits (TRYAGAIN) until the migration ends. No degraded answer."""
    catalog = parse_catalog(CATALOG)
    whole = _billable_on(_third(1), "ask")  # it will have all three keys: state, events, holds
    slot = key_slot(f"gw:{{{whole}}}")
    split = next(f"split-{i}" for i in range(100_000) if key_slot(f"gw:{{split-{i}}}") == slot and f"split-{i}" != whole)

    async def main() -> None:
        store = open_redis(own_cluster.url)
        engine = Engine(store, catalog)
        await engine.apply_grant(whole, 1, 10)
        held = await engine.decide(whole, catalog.route_for("POST", "/metered"))  # a hold: the holds hash
        assert held.admitted
        await _decide_many(engine, whole, "/tiny", 1)  # warnings: the events list
        await _decide_many(engine, split, "/open", 1)  # only its state hash exists
        # Every key of the slot moves to masters[0]; the slot itself not yet.
        _migrate(own_cluster, slot, own_cluster.masters[0], finish=False)
        await _decide_many(engine, whole, "/open", 1)  # ASK: masters[1] has none of its keys now
        # `split` lacks two of its keys on both sides: TRYAGAIN until the migration is finished.
        asyncio.get_running_loop().call_later(0.1, _finish, own_cluster, slot, own_cluster.masters[0])
        await _decide_many(engine, split, "/open", 1)
        assert (await engine.snapshot(split)).state["u:open"] == "2"
        assert (await engine.snapshot(whole)).state["u:open"] == "1"
        await engine.settle(held, give_back_limits=False, credits_owed=1)
        assert _errors(own_cluster.masters[1], "ASK") > 0 and _errors(own_cluster.masters[0], "TRYAGAIN") > 0
        _migrate(own_cluster, slot, own_cluster.masters[1])  # back where it was
        await store.close()

    asyncio.run(main())


@pytest.mark.cluster
def test_a_restarted_master_is_used_again_within_a_second(own_cluster: RedisCluster) -> None:
    """A master without a replica dies and comes back (empty): meanwhile only its billables are degraded,
    and once it serves writes again the gateway uses it within a second, not after a breaker's cool-down."""
    catalog = parse_catalog(CATALOG)
    route = catalog.route_for("POST", "/open")
    victim = own_cluster.masters[2]
    down, up = _billable_on(_third(2), "down"), _billable_on(_third(0), "up")

    def serving() -> float:
        deadline = time.monotonic() + 60
        with redis.Redis(port=victim.port, socket_timeout=1) as c:
            while time.monotonic() < deadline:
                try:
                    c.set(f"probe:{{{down}}}", "1")  # CLUSTERDOWN until the node takes writes again
                    return time.monotonic()
                except redis.RedisError:
                    time.sleep(0.005)
        raise AssertionError("the restarted master never served its slots")

    async def main() -> tuple[float, float]:
        store = open_redis(own_cluster.url)
        engine = Engine(store, catalog)
        for b in (down, up):
            assert (await engine.decide(b, route)).admitted
        victim.stop()
        breaker = store.breakers()[f"127.0.0.1:{victim.port}"]
        deadline = time.monotonic() + 30
        while breaker.cooldown < 2.0:  # its probes fail: the breaker alone would now wait 2 s and more
            assert time.monotonic() < deadline, "the breaker never backed off"
            with pytest.raises(RedisUnavailable):
                await engine.decide(down, route)
            assert (await engine.decide(up, route)).admitted  # the other masters do not notice
            await asyncio.sleep(0.01)
        victim.start()
        served = asyncio.ensure_future(asyncio.to_thread(serving))
        while True:
            try:
                if (await engine.decide(down, route)).admitted:
                    break
            except RedisUnavailable:
                await asyncio.sleep(0.01)
        decided = time.monotonic()
        await store.close()
        return await served, decided

    served, decided = asyncio.run(main())
    print(f"restarted master: serving writes, then used by the gateway {decided - served:+.2f} s later")
    assert decided - served <= 1.0


# ---- a master dies: failover under load ------------------------------------------------------------------


def _cluster_healed(cluster: RedisCluster, victim: RedisServer, tag: str) -> float:
    """Wait until the victim's slot takes a write on its promoted replica (the cluster's own recovery)."""
    replica = cluster.replicas[cluster.masters.index(victim)]
    deadline = time.monotonic() + 60
    with redis.Redis(port=replica.port, socket_timeout=1, decode_responses=True) as c:
        while time.monotonic() < deadline:
            try:
                c.set(f"probe:{{{tag}}}", "1")  # MOVED (to the dead master) until it is promoted
                return time.monotonic()
            except redis.RedisError:
                time.sleep(0.005)
    raise AssertionError("the cluster did not fail over within 60 s")


@pytest.mark.cluster
@pytest.mark.slow
def test_a_dead_master_degrades_only_its_slots_and_recovers_with_the_cluster() -> None:
    """3 masters + 3 replicas under load; one master is killed (SIGKILL). Billables on the other masters
    are never degraded; the dead master's are degraded until the cluster has failed over, plus at most a
    second; no grant is lost (each applied exactly once, none out of order)."""
    catalog = parse_catalog(CATALOG)
    route = catalog.route_for("POST", "/open")
    with RedisCluster(replicas=1, node_timeout_ms=1000) as cluster:
        victim = cluster.masters[0]
        dead = [_billable_on(_third(0), f"dead{i}") for i in range(8)]
        alive = [_billable_on(_third(1 + i % 2), f"alive{i}") for i in range(8)]
        dead_tag = dead[0]
        outcomes: list[tuple[float, str, str]] = []
        granted: dict[str, int] = dict.fromkeys(dead + alive, 0)
        problems: list[str] = []

        async def main() -> tuple[float, float]:
            store = open_redis(cluster.url)
            engine = Engine(store, catalog)
            for b in dead + alive:
                assert (await engine.decide(b, route)).admitted
            stop = asyncio.Event()

            async def worker(billables: list[str]) -> None:
                i = 0
                while not stop.is_set():
                    b = billables[i % len(billables)]
                    i += 1
                    try:
                        ok = (await engine.decide(b, route)).admitted
                        outcomes.append((time.monotonic(), b, "admitted" if ok else "denied"))
                        await asyncio.sleep(0)
                    except RedisUnavailable:
                        outcomes.append((time.monotonic(), b, "degraded"))
                        await asyncio.sleep(0.002)

            async def granter() -> None:
                while not stop.is_set():
                    for b, last in list(granted.items()):
                        try:
                            result = await engine.apply_grant(b, last + 1, 1)
                        except RedisUnavailable:
                            continue  # recorded but not applied: the same grant is sent again later
                        if result.status == "gap":
                            problems.append(f"{b}: grant {last + 1} found a gap (Redis lost a grant)")
                        granted[b] = result.last_sequence
                    await asyncio.sleep(0.01)

            tasks = [asyncio.ensure_future(worker(dead + alive)) for _ in range(12)] + [asyncio.ensure_future(granter())]
            await until(lambda: len(outcomes) > 500, "load before the kill", interval=0.01)
            killed = time.monotonic()
            victim.stop()  # SIGKILL by PID
            healed = await asyncio.to_thread(_cluster_healed, cluster, victim, dead_tag)
            # Load goes on until the dead master's billables have been decided for 1.5 s past the healing.
            await until(lambda: outcomes[-1][0] > healed + 1.5, "load after the failover", timeout=30, interval=0.01)
            stop.set()
            await asyncio.gather(*tasks)
            for b, count in granted.items():
                snap = await engine.snapshot(b)
                if int(snap.state.get("c:seq", 0)) != count or int(snap.state.get("c:p", 0)) != count:
                    problems.append(f"{b}: {count} grants applied, Redis holds {snap.state.get('c:seq')}")
            await store.close()
            return killed, healed

        killed, healed = asyncio.run(main())

    alive_degraded = [o for o in outcomes if o[1] in alive and o[2] == "degraded"]
    dead_degraded = [o for o in outcomes if o[1] in dead and o[2] == "degraded"]
    last_degraded = max((o[0] for o in dead_degraded), default=killed)
    cluster_s, gateway_s = healed - killed, last_degraded - killed
    print(f"failover: the cluster healed {cluster_s:.2f} s after the kill, the gateway {gateway_s:.2f} s "
          f"(degraded answers: {len(dead_degraded)} on the dead master's billables, {len(alive_degraded)} elsewhere; "
          f"{sum(granted.values())} grants applied)")
    assert not alive_degraded, alive_degraded[:5]
    assert not problems, problems
    assert all(n > 0 for n in granted.values())
    assert gateway_s <= cluster_s + 1.0
    # Every dead-master billable is decided again after the healing.
    assert {o[1] for o in outcomes if o[0] > healed + 1.0 and o[2] == "admitted"} >= set(dead)


def test_health_with_one_master_down_is_degraded_for_that_master_only(tmp_path: Any) -> None:
    """On a private 3-master cluster, one master stopped: health answers 200 "degraded" (the other masters still
    decide their slots), names that master down and the others up, and a billable on a live master is decided."""
    import httpx
    from hostile_support import gateway

    with RedisCluster() as cluster, gateway(tmp_path, cluster.url) as gw:
        answer = httpx.get(f"{gw.url}/_gateway/health", headers=gw.admin(), timeout=10)
        assert answer.status_code == 200 and answer.json()["redis"] == "up", answer.text
        healthy = answer.json()
        victim = cluster.masters[1]
        victim.stop()
        answer = httpx.get(f"{gw.url}/_gateway/health", headers=gw.admin(), timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["status"], body["redis"]) == ("degraded", "degraded"), body
        assert body["redis_masters"] == {f"127.0.0.1:{s.port}": "down" if s is victim else "up" for s in cluster.masters}
        assert healthy["redis_masters"] == {f"127.0.0.1:{s.port}": "up" for s in cluster.masters}
        public = httpx.get(f"{gw.url}/_gateway/health", timeout=10)
        assert (public.status_code, public.json()) == (200, {"status": "degraded"})
        live = next(f"org-{i}" for i in range(1000) if key_slot(f"gw:{{org-{i}}}") < 16384 // 3)  # the first master's
        assert httpx.get(f"{gw.url}/v1/status").status_code == 200
        assert httpx.get(f"{gw.url}/_gateway/admin/billables/{live}", headers=gw.admin(), timeout=10).status_code == 200
