"""Engine measurements on a private redis-server: client commands per decision, the script's own time
per call, and the memory one billable's keys take; and client commands per decision on a private
3-master Redis Cluster.

    .venv/bin/python bench/measure_engine.py          # starts and stops its own redis-server and cluster
    .venv/bin/python bench/measure_engine.py --quick  # 200 decisions instead of 2000: the counts only

Route measured: bench/plans.toml's GET /hello (a rate limit, a monthly allowance and a credit spend).
Memory: one billable of the example plans.toml after a pro-plan workout (every route it has).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from services import RedisCluster

from gateway.catalog import load_catalog
from gateway.engine import Engine
from gateway.store.redis import open_redis

DECISIONS = 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_sent(lines: list[str]) -> list[str]:
    """The commands in MONITOR lines that a client sent (not those a script ran inside Redis)."""
    return [line.split('"')[1] for line in lines if line.startswith("+") and '"' in line and "lua]" not in line]


def monitor(port: int, lines: list[str], stop: threading.Event) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"MONITOR\r\n")
        sock.settimeout(0.2)
        data = b""
        while not stop.is_set():
            try:
                data += sock.recv(1 << 20)
            except TimeoutError:
                continue
        lines.extend(data.decode(errors="replace").splitlines())


async def measure(port: int) -> None:
    url = f"redis://127.0.0.1:{port}/0"
    admin = redis.Redis(port=port, decode_responses=True)
    bench = load_catalog(ROOT / "bench" / "plans.toml")
    engine = Engine(open_redis(url), bench)
    route = bench.route_for("GET", "/hello")
    for i in range(100):  # each billable's plan is cached after its first decision
        await engine.decide(f"b{i}", route)
    admin.config_resetstat()
    started = time.perf_counter()
    for i in range(DECISIONS):
        await engine.decide(f"b{i % 100}", route)
    elapsed = time.perf_counter() - started
    stats = admin.info("commandstats")["cmdstat_evalsha"]
    print(f"decisions: {DECISIONS} one at a time, {elapsed / DECISIONS * 1e6:.0f} us each (wall, client and server)")
    print(f"evalsha usec_per_call (the script's own time inside Redis): {stats['usec_per_call']:.2f}")
    # MONITOR slows Redis down, so the count is taken in a run of its own.
    sent = await commands_per_decision(engine, route, [port])
    print(f"client-sent commands per decision: {len(sent) / DECISIONS:.2f} ({sorted(set(sent))})")

    # Client CPU per script call through the store (pipelined connection, resp.py), alone and 64 at once.
    store = open_redis(url)
    for concurrent in (1, 64):

        async def calls(n: int) -> None:
            for _ in range(n):
                await store.run("_ping", ["k:{a}"], ["x"])

        await calls(100)
        cpu = time.process_time()
        await asyncio.gather(*(calls(4000 // concurrent) for _ in range(concurrent)))
        print(f"client CPU per call, {concurrent} at once: {(time.process_time() - cpu) / 4000 * 1e6:.1f} us")
    await store.close()

    example = load_catalog(ROOT / "plans.toml")
    engine = Engine(open_redis(url), example)
    await engine.set_assignment("org", "pro")
    await engine.apply_grant("org", 1, 5000)
    for method, path in [("POST", "/v1/images"), ("POST", "/v1/chat"), ("POST", "/v1/projects"),
                         ("POST", "/v1/custom-models"), ("GET", "/v1/anything")]:
        for _ in range(3):
            d = await engine.decide("org", example.route_for(method, path))
            if d.hold and d.hold.id:
                await engine.settle(d, give_back_limits=False, credits_owed=300, units=300)
    total = 0
    for key in engine.keys("org"):
        size = admin.memory_usage(key) or 0
        total += size
        print(f"  MEMORY USAGE {key}: {size} bytes")
    fields = admin.hlen(engine.keys("org")[0])
    print(f"one billable of the example plan (pro, every route used): {total} bytes in {fields} state fields")
    await engine.store.close()


async def commands_per_decision(engine: Engine, route: Any, ports: list[int]) -> list[str]:
    """The commands clients sent to these servers (MONITOR on each) during DECISIONS decisions."""
    lines: list[list[str]] = [[] for _ in ports]
    stop = threading.Event()
    watchers = [threading.Thread(target=monitor, args=(port, out, stop)) for port, out in zip(ports, lines, strict=True)]
    for watcher in watchers:
        watcher.start()
    await asyncio.sleep(0.3)
    for i in range(DECISIONS):
        await engine.decide(f"b{i % 100}", route)
    await asyncio.sleep(0.3)
    stop.set()
    for watcher in watchers:
        watcher.join()
    return [command for out in lines for command in client_sent(out)]


async def measure_cluster(url: str, ports: list[int]) -> None:
    """Client commands per decision on a cluster, counted by MONITOR on every master."""
    bench = load_catalog(ROOT / "bench" / "plans.toml")
    store = open_redis(url)
    engine = Engine(store, bench)
    route = bench.route_for("GET", "/hello")
    for i in range(100):
        await engine.decide(f"b{i}", route)
    sent = await commands_per_decision(engine, route, ports)
    print(f"cluster (3 masters), client-sent commands per decision: {len(sent) / DECISIONS:.2f} ({sorted(set(sent))})")
    await store.close()


def main() -> None:
    global DECISIONS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 decisions: the command counts, not the timings")
    if parser.parse_args().quick:
        DECISIONS = 200
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    redis.Redis(port=port).ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            asyncio.run(measure(port))
        finally:
            server.terminate()
            server.wait()
    with RedisCluster() as cluster:
        asyncio.run(measure_cluster(cluster.url, [s.port for s in cluster.masters]))


if __name__ == "__main__":
    main()
