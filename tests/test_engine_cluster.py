"""The engine on a private 3-master Redis Cluster, and the one-EVALSHA-per-decision rule on a private server."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self

import pytest
from engine_support import Harness, harness
from services import RedisCluster, RedisServer
from waiting import wait_until

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


_END = "gw-monitor-end"


class Monitor:
    """MONITOR on one server, read in a thread: the commands clients send it while the block runs.

    It is ready when the server said +OK; it is over when a marker command sent after the block shows up,
    so nothing sent before is still on its way (no sleep on either side)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(b"MONITOR\r\n")
            sock.settimeout(0.2)
            partial = b""
            while not self._stop.is_set():
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                *complete, partial = (partial + chunk).split(b"\r\n")
                for raw in complete:
                    line = raw.decode(errors="replace")
                    if line == "+OK":
                        self._ready.set()
                    else:
                        self.lines.append(line)

    def __enter__(self) -> Self:
        self._thread.start()
        wait_until(self._ready.is_set, f"MONITOR on port {self.port} to start")
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if t is None:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    sock.sendall(f"ECHO {_END}\r\n".encode())
                    sock.recv(1024)
                wait_until(lambda: any(_END in line for line in self.lines), "MONITOR to show the marker")
        finally:
            self._stop.set()
            self._thread.join()

    def commands(self) -> list[str]:
        """The commands clients sent (not those scripts ran inside Redis), up to the marker."""
        end = next(i for i, line in enumerate(self.lines) if _END in line)
        return [line.split('"')[1].upper() for line in self.lines[:end]
                if line.startswith("+") and "lua]" not in line and '"' in line]


def test_one_evalsha_per_decision_in_steady_state(private_redis: RedisServer) -> None:
    """A decision with a rate limit, an allowance and a credit spend sends exactly one command: EVALSHA."""
    async def fn(h: Harness) -> None:
        await h.engine.set_assignment("org", "pro")
        await h.engine.apply_grant("org", 1, 10_000)
        for _ in range(3):  # warm: plan cached, scripts loaded
            await h.decide("org", "POST", "/exports")
            await h.decide("org", "POST", "/images")
        with Monitor(private_redis.port) as monitor:
            for _ in range(50):
                assert (await h.decide("org", "POST", "/images")).admitted
        commands = monitor.commands()
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
        monitors = [Monitor(m.port) for m in redis_cluster.masters]
        with contextlib.ExitStack() as watching:
            for monitor in monitors:
                watching.enter_context(monitor)
            for b in billables * 5:
                assert (await h.decide(b, "POST", "/images")).admitted
        commands = [command for monitor in monitors for command in monitor.commands()]
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
