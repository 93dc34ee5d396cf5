"""Reconciler measurements against a private redis-server and a private Postgres, started and stopped here.

    .venv/bin/python bench/bench_reconcile.py                      # 100,000 dirty billables, then 20 s of load
    .venv/bin/python bench/bench_reconcile.py --durable            # Postgres with fsync and synchronous_commit on
    .venv/bin/python bench/bench_reconcile.py --billables 20000 --load-seconds 10 --parallel 8 --batch 1000

1. Throughput: N billables are made dirty (one decision each, bench/plans.toml's GET /hello: a rate limit,
   an allowance and a credit spend), then one flush writes them all, timed: first into an empty record
   (inserts), then again after one more decision each (updates, the steady state). Then the leader's
   sweep over the N state hashes while the record is current (scan + compare, nothing to write).
2. Lag: decisions under load across M billables in the same process as a running reconciler (interval
   1 s, as `gateway serve`); for every decision, the time from the script's run (its Redis TIME) to the
   commit of the first snapshot that holds it (the snapshot's Redis TIME is at or after the decision's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from services import PostgresServer, RedisServer

from gateway.catalog import load_catalog
from gateway.engine import Engine
from gateway.reconcile import Reconciler
from gateway.state import Snapshot
from gateway.store.db import Database, snapshots, usage_totals
from gateway.store.redis import open_redis

DURABLE = ("-c", "fsync=on", "-c", "synchronous_commit=on", "-c", "full_page_writes=on")


async def make_dirty(engine: Engine, billables: list[str], concurrency: int = 256) -> float:
    """One decision per billable; returns decisions per second."""
    route = engine.catalog.route_for("GET", "/hello")
    queue = deque(billables)
    began = time.perf_counter()

    async def worker() -> None:
        while queue:
            await engine.decide(queue.popleft(), route)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(billables) / (time.perf_counter() - began)


async def count(db: Database, table: sa.Table) -> int:
    async with db.engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def throughput(engine: Engine, db: Database, n: int, batch: int, parallel: int) -> dict[str, float]:
    billables = [f"bench-{i:06d}" for i in range(n)]
    out: dict[str, float] = {}
    out["decisions_per_s"] = await make_dirty(engine, billables)
    reconciler = Reconciler(engine, db, batch=batch, parallel=parallel)
    for phase in ("insert", "update"):
        if phase == "update":
            await make_dirty(engine, billables)
        began = time.perf_counter()
        flushed = await reconciler.flush_dirty()
        elapsed = time.perf_counter() - began
        assert flushed == n, (phase, flushed)
        out[f"flush_{phase}_s"] = elapsed
        out[f"flush_{phase}_per_s"] = n / elapsed
    assert await count(db, snapshots) == n and await count(db, usage_totals) == n
    began = time.perf_counter()
    assert await reconciler.sweep() == 0
    out["sweep_current_s"] = time.perf_counter() - began
    out["sweep_current_per_s"] = n / out["sweep_current_s"]
    return out


async def lag(engine: Engine, db: Database, m: int, seconds: float, concurrency: int, interval: float) -> dict[str, float]:
    route = engine.catalog.route_for("GET", "/hello")
    billables = [f"lag-{i:06d}" for i in range(m)]
    await make_dirty(engine, billables)  # known to Redis and to the record before the clock starts
    reconciler = Reconciler(engine, db, interval=interval)
    await reconciler.flush_dirty()
    waiting: dict[str, deque[float]] = defaultdict(deque)
    lags: list[float] = []

    def flushed(written: list[tuple[str, Snapshot]]) -> None:
        now = time.time()
        for billable, snap in written:
            answered = waiting.get(billable)
            taken_at = snap.now_ms / 1000
            while answered and answered[0] <= taken_at:
                lags.append(now - answered.popleft())

    reconciler.on_flushed = flushed
    reconciler.start()
    deadline = time.monotonic() + seconds
    decisions = 0

    async def worker() -> None:
        nonlocal decisions
        while time.monotonic() < deadline:
            billable = random.choice(billables)
            decision = await engine.decide(billable, route)
            waiting[billable].append(decision.now)  # Redis TIME in the script: the snapshot's own clock
            decisions += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    await asyncio.sleep(interval * 2)  # the last decisions reach the record
    await reconciler.stop()
    left = sum(len(q) for q in waiting.values())
    lags.sort()
    return {
        "decisions_per_s": decisions / elapsed,
        "decisions": decisions,
        "measured": len(lags),
        "not_flushed": left,
        "lag_p50_ms": 1000 * lags[len(lags) // 2],
        "lag_p99_ms": 1000 * lags[int(len(lags) * 0.99)],
        "lag_max_ms": 1000 * lags[-1],
        "lag_mean_ms": 1000 * statistics.fmean(lags),
    }


async def main(args: argparse.Namespace) -> None:
    catalog = load_catalog(ROOT / "bench" / "plans.toml")
    with RedisServer() as redis_server, PostgresServer(*(DURABLE if args.durable else ())) as pg:
        db = await Database.connect(pg.url)
        await db.upgrade()
        store = open_redis(redis_server.url)
        engine = Engine(store, catalog)
        try:
            results: dict[str, object] = {"billables": args.billables, "batch": args.batch, "parallel": args.parallel,
                                          "durable": args.durable}
            if args.billables:
                results["throughput"] = await throughput(engine, db, args.billables, args.batch, args.parallel)
                print(json.dumps(results["throughput"], indent=2), flush=True)
            if args.load_seconds:
                results["lag"] = await lag(engine, db, args.load_billables, args.load_seconds, args.concurrency, args.interval)
                print(json.dumps(results["lag"], indent=2), flush=True)
            print(json.dumps(results))
        finally:
            await store.close()
            await db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--billables", type=int, default=100_000, help="dirty billables for the throughput run (0: skip)")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=4, help="batches in flight at once")
    parser.add_argument("--durable", action="store_true", help="fsync, synchronous_commit and full_page_writes on")
    parser.add_argument("--load-seconds", type=float, default=20, help="seconds of load for the lag run (0: skip)")
    parser.add_argument("--load-billables", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64, help="decisions in flight during the lag run")
    parser.add_argument("--interval", type=float, default=1.0, help="reconcile interval (s) during the lag run")
    asyncio.run(main(parser.parse_args()))
