"""Restores after a Redis loss: 1,000 billables in the record, Redis emptied, then their first decisions
arrive one after another at a steady rate (as requests do under load, a few per event-loop turn). Prints
the time to serve them all and the latency of those decisions.

    .venv/bin/python bench/restore_burst.py                  # SQLite record, its own redis-server
    .venv/bin/python bench/restore_burst.py --billables 5000 --rate 5000

Each first decision finds its state missing and waits for the record (bench/plans.toml's GET /hello).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from services import RedisServer

from gateway.catalog import load_catalog
from gateway.engine import Engine
from gateway.reconcile import connect
from gateway.store.db import Database
from gateway.store.redis import open_redis


async def decide_all(engine: Engine, billables: list[str], rate: float) -> list[float]:
    """Start one decision per billable, `rate` a second; the latency of each."""
    route = engine.catalog.route_for("GET", "/hello")
    latencies: list[float] = []

    async def one(billable: str) -> None:
        began = time.perf_counter()
        assert (await engine.decide(billable, route)).admitted
        latencies.append(time.perf_counter() - began)

    started, tasks = time.perf_counter(), []
    for i, billable in enumerate(billables):
        tasks.append(asyncio.ensure_future(one(billable)))
        await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
    await asyncio.gather(*tasks)
    return latencies


async def main(n: int, rate: float) -> None:
    with RedisServer() as server:
        db = await Database.connect(f"sqlite:///{tempfile.mkdtemp(prefix='gw-restore-')}/gateway.db", auto_upgrade=True)
        store = open_redis(server.url)
        connected = connect(store, load_catalog(ROOT / "bench" / "plans.toml"), db, prefix="gwrestore")
        engine, reconciler = connected.engine, connected.reconciler
        billables = [f"b-{i:05d}" for i in range(n)]
        await decide_all(engine, billables, rate)
        await reconciler.flush_dirty()  # the record has every billable
        server.client().flushall()
        began = time.perf_counter()
        latencies = sorted(await decide_all(engine, billables, rate))
        took = time.perf_counter() - began
        p: Any = lambda q: latencies[int(q * (len(latencies) - 1))] * 1000
        print(
            f"{n} first decisions after a Redis loss, {rate:,.0f} arriving a second, served in {took:.2f} s; "
            f"latency p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms, max {p(1):.1f} ms, mean {statistics.mean(latencies) * 1000:.1f} ms"
        )
        await store.close()
        await db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--billables", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=3000.0, help="first decisions arriving per second")
    args = parser.parse_args()
    asyncio.run(main(args.billables, args.rate))
