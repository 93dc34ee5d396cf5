"""`POST /_gateway/check` throughput against the middleware's decisions, in process (no HTTP server).

    .venv/bin/python bench/measure_check.py            # 20,000 requests, 64 in flight, 3 rounds

Both through one GatewayMiddleware on a private redis-server, 1,000 billables, bench/plans.toml's GET
/hello (a rate limit, an allowance and a credit spend): the middleware deciding GET /hello for a no-op
app; a dry check of the same route (admin token, JSON body); a consuming check; a consuming check and
its settle. Prints decisions per second (wall clock) and each as a ratio of the middleware's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from measure_middleware import IN_FLIGHT, billable_of, noop
from services import RedisServer

from gateway.admin import Endpoints
from gateway.catalog import load_catalog
from gateway.engine import Engine
from gateway.metrics import Metrics
from gateway.middleware import GatewayMiddleware
from gateway.store.redis import open_redis

ADMIN = "bench-admin-for-benches"


def scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), *headers], "scheme": "http",
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "http_version": "1.1", "root_path": "",
    }  # fmt: skip


async def call(app: Any, request: dict[str, Any], body: bytes = b"") -> tuple[int, bytes]:
    sent = False
    answer: dict[str, Any] = {"status": 0, "body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await app(request, receive, send)
    return answer["status"], answer["body"]


def check_request(billable: str, consume: bool) -> tuple[dict[str, Any], bytes]:
    body = json.dumps({"billable": billable, "route": "GET /hello", "consume": consume}).encode()
    headers = [(b"authorization", f"Bearer {ADMIN}".encode()), (b"content-type", b"application/json"),
               (b"content-length", b"%d" % len(body))]  # fmt: skip
    return scope("POST", "/_gateway/check", headers), body


async def decide(app: Any) -> None:
    status, _ = await call(app, scope("GET", "/hello", [(b"x-api-key", f"key{random.randrange(1000)}".encode())]))
    assert status == 200, status


async def dry(app: Any) -> None:
    status, body = await call(app, *check_request(f"key{random.randrange(1000)}", False))
    assert status == 200 and json.loads(body)["allowed"], body


async def consume(app: Any) -> None:
    status, body = await call(app, *check_request(f"key{random.randrange(1000)}", True))
    assert status == 200 and json.loads(body)["hold"], body


async def consume_and_settle(app: Any) -> None:
    status, body = await call(app, *check_request(f"key{random.randrange(1000)}", True))
    settle = json.dumps({"hold": json.loads(body)["hold"], "outcome": "success"}).encode()
    headers = [(b"authorization", f"Bearer {ADMIN}".encode()), (b"content-length", b"%d" % len(settle))]
    status, body = await call(app, scope("POST", "/_gateway/settle", headers), settle)
    assert status == 200, body


async def per_second(app: Any, one: Any, n: int) -> float:
    async def worker() -> None:
        for _ in range(n // IN_FLIGHT):
            await one(app)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return n // IN_FLIGHT * IN_FLIGHT / (time.perf_counter() - began)


async def main(n: int, rounds: int) -> None:
    with RedisServer() as server:
        store = open_redis(server.url)
        engine = Engine(store, load_catalog(ROOT / "bench" / "plans.toml"), prefix="gwck")
        app = GatewayMiddleware(noop, engine=engine, billable=billable_of, freeze_gc=False)

        async def identify(request: Any) -> str | None:
            return await app.identify(dict(request.scope))

        app.endpoints = Endpoints(engine=engine, keys=None, db=None, grants=None, metrics=Metrics(), identify=identify,
                                  admin_token=ADMIN)  # fmt: skip
        await per_second(app, decide, n)  # every billable exists, every cache is warm
        gc.collect()
        gc.freeze()
        for r in range(rounds):
            mw = await per_second(app, decide, n)
            rates = {name: await per_second(app, fn, n) for name, fn in
                     (("dry check", dry), ("consuming check", consume), ("check + settle", consume_and_settle))}  # fmt: skip
            shown = ", ".join(f"{name} {rate:,.0f}/s ({rate / mw:.2f}×)" for name, rate in rates.items())
            print(f"round {r + 1}: middleware {mw:,.0f} decisions/s; {shown}")
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    run(main(args.requests, args.rounds))
