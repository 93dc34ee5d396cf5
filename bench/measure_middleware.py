"""CPU per request of the middleware and the engine alone, in process: no HTTP server, no upstream.

    .venv/bin/python bench/measure_middleware.py            # 20,000 requests, 64 in flight, 3 rounds
    .venv/bin/python bench/measure_middleware.py --profile  # and cProfile's top functions
    .venv/bin/python bench/measure_middleware.py --key-budget   # each billable a key with its own budget
    .venv/bin/python bench/measure_middleware.py --tracing  # and the same traced (bench/traced.py), interleaved

A no-op app behind GatewayMiddleware (billable from X-Api-Key, 1,000 billables), deciding bench/plans.toml's
GET /hello (a rate limit, an allowance and a credit spend) against a private redis-server. Prints the
process's CPU time per request (`time.process_time()`), the same app without the middleware beside it.
With --key-budget each billable is a key with terms of its own (credits and a rate limit: gateway.members,
in a SQLite record) under an org of its own, decided with its org in the same script call.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tempfile

from services import RedisServer

from gateway.catalog import load_catalog
from gateway.engine import Engine
from gateway.members import Members, key_member, set_terms
from gateway.middleware import GatewayMiddleware
from gateway.store.db import Database
from gateway.store.redis import open_redis
from gateway.terms import MemberTerms

IN_FLIGHT = 64
BODY = b'{"hello":"world"}'


async def noop(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(BODY))]})
    await send({"type": "http.response.body", "body": BODY, "more_body": False})


def billable_of(scope: dict[str, Any]) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return value.decode()
    return None


def request(i: int) -> dict[str, Any]:
    return {
        "type": "http", "method": "GET", "path": "/hello", "raw_path": b"/hello", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"x-api-key", f"key{i}".encode())], "scheme": "http",
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "http_version": "1.1", "root_path": "",
    }  # fmt: skip


async def cpu_per_request(app: Any, n: int, profile: cProfile.Profile | None = None) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def worker() -> None:
        for _ in range(n // IN_FLIGHT):
            await app(request(random.randrange(1000)), receive, send)

    began = time.process_time()
    if profile is not None:
        profile.enable()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    if profile is not None:
        profile.disable()
    return (time.process_time() - began) / (n // IN_FLIGHT * IN_FLIGHT) * 1e6


def key_of(scope: dict[str, Any]) -> str | None:
    found = billable_of(scope)
    return key_member(found) if found else None


async def members(folder: str) -> Members:
    """key<i> is a key with terms of its own under org<i>, in a SQLite record."""
    db = await Database.connect(f"sqlite:///{folder}/bench.db")
    await db.upgrade()
    terms = MemberTerms(credits=10**12, rate_limit="1000000/second")
    for i in range(1000):
        await set_terms(db, key_member(f"key{i}"), terms, parent=f"org{i}")
    return Members(db)


async def main(n: int, rounds: int, profile: bool, tracing: bool, key_budget: bool = False) -> None:
    with RedisServer() as server, tempfile.TemporaryDirectory() as folder:
        store = open_redis(server.url)
        chain_of = (await members(folder)).chain if key_budget else None
        engine = Engine(store, load_catalog(ROOT / "bench" / "plans.toml"), prefix="gwmw", chain_of=chain_of)
        app = GatewayMiddleware(noop, engine=engine, billable=key_of if key_budget else billable_of, freeze_gc=False)
        await cpu_per_request(app, n)  # every billable exists, every cache is warm
        spans: Any = None
        if tracing:  # its own store: traced() wraps the store's transport
            import traced

            from gateway.tracing import traced as tracing_of

            traced_engine = Engine(open_redis(server.url), load_catalog(ROOT / "bench" / "plans.toml"), prefix="gwmw")
            spans = tracing_of(GatewayMiddleware(noop, engine=traced_engine, billable=billable_of, freeze_gc=False), traced.provider())
            await cpu_per_request(spans, n)
        gc.collect()
        gc.freeze()
        for r in range(rounds):
            bare = await cpu_per_request(noop, n)
            decided = await cpu_per_request(app, n)
            line = f"round {r + 1}: {decided:.1f} µs CPU per request with the middleware, {bare:.1f} µs without"
            if spans is not None:
                line += f", {await cpu_per_request(spans, n):.1f} µs traced"
            print(line)
        if profile:
            found = cProfile.Profile()
            await cpu_per_request(spans if spans is not None else app, n, found)
            pstats.Stats(found).sort_stats("tottime").print_stats(int(__import__("os").environ.get("PROFILE_TOP", "25")))
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--key-budget", action="store_true", help="each billable a key with its own budget under an org")
    parser.add_argument("--tracing", action="store_true", help="also traced (BENCH_TRACING's provider); --profile profiles it")
    args = parser.parse_args()
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    run(main(args.requests, args.rounds, args.profile, args.tracing, args.key_budget))
