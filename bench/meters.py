"""Billed units to Stripe, measured (issue 21): against the project's fake Stripe (tests/fake_stripe.py) in
this process, a record of its own (SQLite in a temporary folder, or --database-url), and for `cap` the
shared Redis at 127.0.0.1:6379 under a key prefix of its own (deleted after).

    .venv/bin/python bench/meters.py kill                   # 10,000 outbox rows; `gateway stripe send-meters`
                                                            # SIGKILLed half-way, a second one sends the rest
    .venv/bin/python bench/meters.py kill --rows 2000 --kill-at 0.3
    .venv/bin/python bench/meters.py kill --stream --lease 2  # the same by the v2 meter event stream
    .venv/bin/python bench/meters.py cap                    # 3 processes over a spend cap on one billable

kill: prints the send rate (meter events/s of the first sender, until it is killed, and of the second),
how many Stripe refused as duplicates (sent before the kill, marked after it never), and whether Stripe's
totals per customer equal the outbox's, with no identifier twice.

cap: 3 processes each send --requests decisions for one billable whose limit bills past `to` up to a
spend cap; then one flush and one sender. Prints admitted, refused (402), the billed counter, the outbox,
and Stripe's total, which must all be the cap.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_stripe import FakeStripe
from http_servers import serve_in_thread

from gateway.billing.client import close_client, stripe_client
from gateway.billing.meters import MeterSender
from gateway.catalog import parse_catalog
from gateway.reconcile import connect
from gateway.settings import Settings
from gateway.state import keys
from gateway.store.db import Database, meter_outbox, stripe_customers
from gateway.store.redis import open_redis

REDIS = "redis://127.0.0.1:6379/0"
TO, CAP_UNITS = 100, 500  # the limit, and the spend cap in units ("1.00" at "0.002")
CATALOG = f"""
[catalog]
default_plan = "free"

[meters.api_requests]
stripe_meter = "api_requests"

[plans.free]
price = 0
limits.calls = {{ to = {TO}, per = "month", after_limit = "bill", overage = {{ unit_price = "0.002", meter = "api_requests", max_per_period = "1.00" }} }}

[[routes]]
match = "POST /calls"
limit = "calls"
"""


async def _record(url: str) -> Database:
    db = await Database.connect(url)
    await db.upgrade()
    return db


async def _link(db: Database, fake: FakeStripe, billables: list[str]) -> dict[str, str]:
    customers = {b: fake.add_customer(b)["id"] for b in billables}
    async with db.engine.begin() as conn:
        await conn.execute(sa.insert(stripe_customers), [{"customer": c, "billable": b} for b, c in customers.items()])
    return customers


def _wait(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def kill(args: argparse.Namespace) -> int:
    fake = FakeStripe()
    fake.add_meter("api_requests")
    with tempfile.TemporaryDirectory() as tmp, serve_in_thread(fake.app()) as api:
        url = args.database_url or f"sqlite:///{tmp}/gw.db"
        plans = Path(tmp) / "plans.toml"
        plans.write_text(CATALOG)
        billables = [f"org_{i}" for i in range(20)]
        start = int(time.time()) // 60 * 60 - 86400
        rows = [{"billable": billables[i % len(billables)], "meter": "api_requests", "minute": start + 60 * (i // len(billables)),
                 "units": 1 + i % 9, "next_attempt_at": datetime.now(UTC)} for i in range(args.rows)]  # fmt: skip

        async def prepare() -> dict[str, str]:
            db = await _record(url.replace("sqlite:///", "sqlite+aiosqlite:///"))
            customers = await _link(db, fake, billables)
            async with db.engine.begin() as conn:
                for i in range(0, len(rows), 1000):
                    await conn.execute(sa.insert(meter_outbox), rows[i : i + 1000])
            await db.close()
            return customers

        customers = asyncio.run(prepare())
        env = {**os.environ, "GATEWAY_PLANS": str(plans), "GATEWAY_DATABASE_URL": url,
               "GATEWAY_STRIPE_API_KEY": "sk_test_bench", "GATEWAY_STRIPE_API_BASE": api,
               "GATEWAY_STRIPE_METER_LEASE": str(args.lease)}  # fmt: skip
        if args.stream:  # every claim of more than one row by the v2 meter event stream
            env["GATEWAY_STRIPE_METER_STREAM_ABOVE"] = "1"
        command = [sys.executable, "-m", "gateway.cli", "stripe", "send-meters"]
        first = subprocess.Popen(command, env=env)
        began = time.monotonic()
        _wait(lambda: fake.meter_events, "the first meter event", 60)
        t0, n0 = time.monotonic(), len(fake.meter_events)
        _wait(lambda: len(fake.meter_events) >= args.kill_at * len(rows) or first.poll() is not None, "the sender", 600)
        first.send_signal(signal.SIGKILL)
        first.wait()
        t1, n1 = time.monotonic(), len(fake.meter_events)
        print(f"first sender: started in {t0 - began:.1f} s, {n1 - n0} events in {t1 - t0:.1f} s = {(n1 - n0) / (t1 - t0):.0f} events/s; "
              f"SIGKILL at {n1} of {len(rows)}")  # fmt: skip
        second = subprocess.Popen(command, env=env)
        t2 = time.monotonic()
        _wait(lambda: len(fake.meter_events) == len(rows), "the second sender to send the rest", 900)
        t3 = time.monotonic()
        second.terminate()
        second.wait()
        print(f"second sender: {len(rows) - n1} events in {t3 - t2:.1f} s (rows claimed by the killed one wait out their {args.lease:g} s lease); "
              f"{fake.duplicate_meter_events} refused by Stripe as duplicates")  # fmt: skip
        wrong = 0
        for billable, customer in customers.items():
            want = sum(r["units"] for r in rows if r["billable"] == billable)
            got = fake.metered_total("api_requests", customer)
            wrong += got != want
        identifiers = [e["identifier"] for e in fake.meter_events]
        twice = len(identifiers) - len(set(identifiers))
        print(f"Stripe's totals equal the outbox's for {len(customers) - wrong} of {len(customers)} customers; "
              f"{len(identifiers)} events for {len(rows)} rows, {twice} identifier(s) twice")  # fmt: skip
        return 0 if wrong == 0 and twice == 0 and len(identifiers) == len(rows) else 1


def _decide(prefix: str, requests: int, out: Any) -> None:
    async def main() -> tuple[int, int]:
        store = open_redis(REDIS)
        from gateway.engine import Engine

        catalog = parse_catalog(CATALOG)
        engine = Engine(store, catalog, prefix=prefix)
        route = catalog.route_for("POST", "/calls")
        admitted = refused = 0
        for _ in range(requests):
            d = await engine.decide("org_cap", route)
            if d.admitted:
                admitted += 1
            elif d.status == 402:
                refused += 1
        await store.close()
        return admitted, refused

    out.put(asyncio.run(main()))


def cap(args: argparse.Namespace) -> int:
    prefix = f"gwbench{uuid.uuid4().hex[:8]}"
    fake = FakeStripe()
    fake.add_meter("api_requests")
    catalog = parse_catalog(CATALOG)
    results: Any = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_decide, args=(prefix, args.requests, results)) for _ in range(3)]
    began = time.monotonic()
    for p in procs:
        p.start()
    counts = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.monotonic() - began
    admitted, refused = sum(c[0] for c in counts), sum(c[1] for c in counts)
    print(f"3 processes x {args.requests} decisions in {elapsed:.1f} s: {admitted} admitted ({TO} within the limit), {refused} refused 402")

    raw = redis.Redis.from_url(REDIS, decode_responses=True, socket_timeout=30)

    async def settle() -> int:
        with tempfile.TemporaryDirectory() as tmp, serve_in_thread(fake.app()) as api:
            db = await _record(f"sqlite+aiosqlite:///{tmp}/gw.db")
            store = open_redis(REDIS)
            client = stripe_client(Settings(stripe_api_key="sk_test_bench", stripe_api_base=api))
            try:
                customers = await _link(db, fake, ["org_cap"])
                connected = connect(store, catalog, db, prefix=prefix)
                await connected.reconciler.flush(["org_cap"], force=True)
                fields = raw.hgetall(keys(prefix, "org_cap").state)
                billed = {k: v for k, v in fields.items() if k.startswith("o:")}
                async with db.engine.connect() as conn:
                    outbox = await conn.scalar(sa.select(sa.func.sum(meter_outbox.c.units)))
                sender = MeterSender(db, client, margin=0, clock=lambda: time.time() + 180)
                while await sender.run_once():
                    pass
                total = fake.metered_total("api_requests", customers["org_cap"])
                print(f"billed counter {billed}, outbox {outbox}, Stripe {total:g}; the cap is {CAP_UNITS} units")
                ok = admitted == TO + CAP_UNITS and list(billed.values()) == [str(CAP_UNITS)] and outbox == CAP_UNITS == total
                print("overage billed exactly: yes" if ok else "overage billed exactly: NO")
                return 0 if ok else 1
            finally:
                raw.delete(*keys(prefix, "org_cap").all())
                await close_client(client)
                await store.close()
                await db.close()

    return asyncio.run(settle())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    k = commands.add_parser("kill")
    k.add_argument("--rows", type=int, default=10_000)
    k.add_argument("--kill-at", type=float, default=0.5, help="the share of the rows in Stripe when the first sender is killed")
    k.add_argument("--database-url", help="the record (default: SQLite in a temporary folder)")
    k.add_argument("--stream", action="store_true", help="send by the v2 meter event stream (100 events a request), not v1")
    k.add_argument("--lease", type=float, default=30.0, help="GATEWAY_STRIPE_METER_LEASE: how long a claim is held")
    c = commands.add_parser("cap")
    c.add_argument("--requests", type=int, default=400, help="decisions per process")
    args = parser.parse_args()
    return kill(args) if args.command == "kill" else cap(args)


if __name__ == "__main__":
    sys.exit(main())
