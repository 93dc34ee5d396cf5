"""Issue 20's measure: 3 `gateway serve` processes, one org of 1,000 credits with 10 keys of 150 each, 3,000
requests at once with 20% upstream 500s: no key over 150, the org not over 1,000, the record equal to Redis,
and EVALSHA per decision; on a private redis-server and on a private 3-master cluster.

    .venv/bin/python bench/measure_budgets.py                 # both
    .venv/bin/python bench/measure_budgets.py --only server   # or --only cluster

The record is a database of its own on the shared Postgres (GATEWAY_TEST_POSTGRES_URL, else
postgresql://postgres@127.0.0.1:5432/postgres), dropped after. A 500 is settled by the middleware (its
credits given back; a 2xx keeps them without a call), so decisions = EVALSHA calls in the burst - the 500s'
settles - what the processes run on their own meanwhile (the revocation feed's polls, their rate read over
an idle 5 s before), from INFO commandstats on every master. The reconciler's interval is set past the
burst; its flush at SIGTERM brings the record level, read after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import aiohttp
import asyncpg
import httpx
import redis
import sqlalchemy as sa
from http_servers import serve_in_thread
from services import RedisCluster, RedisServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.identity import KeyStore
from gateway.members import key_member, set_terms
from gateway.store.db import Database, snapshots
from gateway.terms import MemberTerms

ADMIN = "bench-admin-for-budgets"
PG_ADMIN = os.environ.get("GATEWAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CATALOG = """
[catalog]
default_plan = "team"

[operations.work]
cost = 1

[plans.team]
price = 10
credits = 1000

[[routes]]
match = "POST /work"
spend = "work"

[[routes]]
match = "* /*"
"""
KEYS, KEY_BUDGET, REQUESTS, FAILING = 10, 150, 3000, 0.2
IDLE_S = 5.0


def upstream(rng: random.Random) -> Starlette:
    async def work(request: Request) -> Response:
        await request.body()
        return JSONResponse({"failed": True}, status_code=500) if rng.random() < FAILING else JSONResponse({"ok": True})

    return Starlette(routes=[Route("/{rest:path}", work, methods=["POST"])])


def _pg(sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=30)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextmanager
def database() -> Iterator[str]:
    name = f"gwbench_{secrets.token_hex(5)}"
    _pg(f'CREATE DATABASE "{name}"')
    try:
        yield sa.engine.make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    finally:
        _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def make_keys(db_url: str) -> list[str]:
    db = await Database.connect(db_url)
    await db.upgrade()
    keys = KeyStore(db)
    made = []
    for i in range(KEYS):
        created = await keys.create("org_1", f"key-{i}")
        await set_terms(db, key_member(created.id), MemberTerms(credits=KEY_BUDGET), parent="org_1")
        made.append(created.key)
    await keys.close()
    await db.close()
    return made


def evalsha_calls(clients: list[redis.Redis]) -> int:
    return sum(int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)) for c in clients)


def serve(plans: Path, redis_url: str, db_url: str, up: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": ADMIN}
    command = [str(ROOT / ".venv/bin/gateway"), "serve", "--plans", str(plans), "--upstream", up, "--port", str(port),
               "--redis-url", redis_url, "--database-url", db_url, "--reconcile-interval", "3600"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_up(url: str, deadline: float) -> None:
    while True:
        try:
            if httpx.get(f"{url}/_gateway/health", timeout=5).status_code in (200, 503):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not start")
        time.sleep(0.2)


async def burst(urls: list[str], keys: list[str], rng: random.Random) -> dict[int, int]:
    """Every request started at once (aiohttp: httpx's pool is quadratic in the requests waiting for it)."""
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=600)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def one(i: int) -> None:
            headers = {"Authorization": f"Bearer {rng.choice(keys)}"}
            async with session.post(f"{urls[i % len(urls)]}/work", headers=headers) as answer:
                await answer.read()
                statuses[answer.status] = statuses.get(answer.status, 0) + 1

        await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    return statuses


def measure(name: str, redis_url: str, masters: list[redis.Redis], raw: Any) -> dict[str, Any]:
    rng = random.Random(20)
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        db_url = stack.enter_context(database())
        plans = Path(tmp) / "plans.toml"
        plans.write_text(CATALOG)
        keys = asyncio.run(make_keys(db_url))
        up = stack.enter_context(serve_in_thread(upstream(rng)))
        ports = [free_port() for _ in range(3)]
        gateways = [serve(plans, redis_url, db_url, up, p, Path(tmp) / f"gw{p}.log") for p in ports]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        try:
            for url in urls:
                wait_up(url, time.monotonic() + 60)
            # Warm: every process resolves the org's plan and reads each key once (not counted).
            for url in urls:
                httpx.get(f"{url}/warm", headers={"Authorization": f"Bearer {keys[0]}"}, timeout=30)
            # The scripts the processes run meanwhile on their own (the revocation feed's polls): their rate.
            idle = evalsha_calls(masters)
            time.sleep(IDLE_S)
            background = (evalsha_calls(masters) - idle) / IDLE_S
            before = evalsha_calls(masters)
            started = time.perf_counter()
            statuses = asyncio.run(burst(urls, keys, rng))
            seconds = time.perf_counter() - started
            calls = evalsha_calls(masters) - before
        finally:
            for gw in gateways:
                gw.terminate()  # SIGTERM: requests finished, the record flushed
            for gw in gateways:
                gw.wait(timeout=60)
        settles = statuses.get(500, 0)  # a 2xx keeps the cost of this route as charged: no settle
        prefix = "gw"
        spent = [int(raw.hget(f"{prefix}:{{org_1}}:m:{key_member(k.split('_')[1]).replace(':', '%3A')}", "c:s") or 0) for k in keys]
        org = int(raw.hget(f"{prefix}:{{org_1}}", "c:s") or 0)

        async def recorded() -> int:
            db = await Database.connect(db_url)
            async with db.engine.connect() as conn:
                state = (await conn.execute(sa.select(snapshots.c.state).where(snapshots.c.billable == "org_1"))).scalar_one()
            await db.close()
            return int(json.loads(state).get("c:s", 0))

        record = asyncio.run(recorded())
    return {
        "redis": name, "requests": REQUESTS, "seconds": round(seconds, 2), "statuses": dict(sorted(statuses.items())),
        "max_key_spent": max(spent), "keys_spent": spent, "org_spent": org, "record_org_spent": record,
        "record_equals_redis": record == org, "evalsha_in_burst": calls, "settles": settles,
        "background_evalsha": round(background * seconds), "evalsha_per_decision": round((calls - settles - background * seconds) / REQUESTS, 3),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["server", "cluster"])
    args = parser.parse_args()
    results = []
    if args.only in (None, "server"):
        with RedisServer() as server:
            client = redis.Redis(port=server.port)
            results.append(measure("redis-server", f"redis://127.0.0.1:{server.port}/0", [client], client))
    if args.only in (None, "cluster"):
        with RedisCluster(3) as cluster:
            masters = [redis.Redis(port=s.port) for s in cluster.servers]
            raw = redis.RedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
            results.append(measure("3-master cluster", cluster.url, masters, raw))
    for result in results:
        print(json.dumps(result))
        ok = result["max_key_spent"] <= KEY_BUDGET and result["org_spent"] <= 1000 and result["record_equals_redis"]
        print(f"{result['redis']}: {'OK' if ok else 'VIOLATED'}", file=sys.stderr)


if __name__ == "__main__":
    main()
