"""The engine on a private 3-master Redis Cluster, and the one-EVALSHA-per-decision rule on a private server."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from engine_support import Harness, harness
from services import RedisCluster, RedisServer

from gateway.store.cluster import key_slot


@pytest.mark.cluster
def test_cluster_smoke_every_kind_of_state(redis_cluster: RedisCluster) -> None:
    """Decisions, settles, grants, snapshots and status work on a cluster, across billables on many slots."""

    async def fn(h: Harness) -> None:
        billables = [f"org-{i}" for i in range(20)] + ["a}b", "{x}", "ü:☃"]
        for b in billables:
            assert (await h.decide(b, "POST", "/projects")).admitted
            assert (await h.engine.apply_grant(b, 1, 200)).status == "applied"
            d = await h.decide(b, "POST", "/chat")
            assert d.admitted
            await h.engine.settle(d, give_back_limits=False, credits_owed=3)
            status = await h.engine.status(b)
            assert status["limits"]["projects"]["usage"] == 1 and status["credits"]["balance"] == 207
            snap = await h.engine.snapshot(b)
            assert snap.state["c:seq"] == "1"
        slots = {key_slot(h.engine.keys(b)[0]) for b in billables}
        assert len(slots) > 10

    with harness(redis_cluster.url) as go:
        go(fn)


@pytest.mark.cluster
def test_cluster_keys_of_one_billable_share_a_slot(redis_cluster: RedisCluster) -> None:
    """Every key of one billable hashes to one slot (no CROSSSLOT), whatever characters its id holds."""

    async def fn(h: Harness) -> None:
        for b in ["plain", "a}b{c", "gw:{evil}:ev", "日本"]:
            slots = {await h.raw.cluster_keyslot(k) for k in h.engine.keys(b)}  # as the cluster computes it
            assert len(slots) == 1
            # All three keys in one script: a cross-slot set would fail here.
            for _ in range(6):
                await h.decide(b, "POST", "/exports")
            assert [e["type"] for e in await h.engine.pending_events(b)] == ["warning", "warning", "grace_start"]

    with harness(redis_cluster.url) as go:
        go(fn)


def _monitor(port: int, lines: list[str], stop: threading.Event) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"MONITOR\r\n")
        sock.settimeout(0.2)
        buffer = b""
        while not stop.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            buffer += chunk
        lines.extend(buffer.decode(errors="replace").splitlines())


def test_one_evalsha_per_decision_in_steady_state(private_redis: RedisServer) -> None:
    """A decision with a rate limit, an allowance and a credit spend sends exactly one command: EVALSHA."""
    async def fn(h: Harness) -> None:
        await h.engine.set_assignment("org", "pro")
        await h.engine.apply_grant("org", 1, 10_000)
        for _ in range(3):  # warm: plan cached, scripts loaded
            await h.decide("org", "POST", "/exports")
            await h.decide("org", "POST", "/images")
        lines: list[str] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_monitor, args=(private_redis.port, lines, stop))
        watcher.start()
        await asyncio.sleep(0.3)
        for _ in range(50):
            assert (await h.decide("org", "POST", "/images")).admitted
        await asyncio.sleep(0.3)
        stop.set()
        watcher.join()
        sent = [line for line in lines if line.startswith("+") and "[0 lua]" not in line and "lua]" not in line]
        commands = [line.split('"')[1].upper() for line in sent if '"' in line]
        assert commands == ["EVALSHA"] * 50, commands[:10]

    with harness(private_redis.url, _ONE_CALL_CATALOG) as go:
        go(fn)


_ONE_CALL_CATALOG = """
[catalog]
default_plan = "pro"
[operations.image]
cost = 1
[plans.pro]
allows = ["api_access"]
rate_limit = { limit = 100000, per = "1s" }
credits = 1000
limits.exports = { to = 1000000, per = "month" }
[[routes]]
match = "POST /images"
features = ["api_access"]
limit = "exports"
spend = "image"
[[routes]]
match = "POST /exports"
limit = "exports"
"""


@pytest.mark.cluster
def test_one_evalsha_per_decision_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """On a cluster too, a decision sends exactly one command to one master: EVALSHA (no map reads,
    no pings, no ASKING on a settled cluster)."""
    billables = [f"org-{i}" for i in range(12)]

    async def fn(h: Harness) -> None:
        assert len({key_slot(h.engine.keys(b)[0]) * 3 // 16384 for b in billables}) == 3  # every master
        for b in billables:
            await h.engine.set_assignment(b, "pro")
            await h.engine.apply_grant(b, 1, 10_000)
            for _ in range(2):  # warm: plans cached, scripts loaded on every master
                await h.decide(b, "POST", "/images")
        lines: list[list[str]] = [[] for _ in redis_cluster.masters]
        stop = threading.Event()
        watchers = [threading.Thread(target=_monitor, args=(m.port, out, stop)) for m, out in zip(redis_cluster.masters, lines, strict=True)]
        for w in watchers:
            w.start()
        await asyncio.sleep(0.3)
        for b in billables * 5:
            assert (await h.decide(b, "POST", "/images")).admitted
        await asyncio.sleep(0.3)
        stop.set()
        for w in watchers:
            w.join()
        commands = [line.split('"')[1].upper() for out in lines for line in out
                    if line.startswith("+") and "lua]" not in line and '"' in line]
        assert commands == ["EVALSHA"] * len(billables) * 5, commands[:10]

    with harness(redis_cluster.url, _ONE_CALL_CATALOG) as go:
        go(fn)


def test_noscript_after_flush_and_restart_is_transparent(private_redis: RedisServer) -> None:
    """After SCRIPT FLUSH the engine reloads its scripts and the decision goes through once."""

    async def fn(h: Harness) -> None:
        assert (await h.decide("org", "POST", "/images")).admitted
        await h.raw.script_flush()
        assert (await h.decide("org", "POST", "/images")).admitted
        assert await h.field("org", "u:exports") == "2"

    with harness(private_redis.url, _ONE_CALL_CATALOG) as go:
        go(fn)
