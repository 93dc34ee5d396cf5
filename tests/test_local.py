"""on_redis_down = "local": with Redis unreachable, this process's share of the rate limits, features from
the cached plan, and 503 on routes that limit or spend (DESIGN §6)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_servers import closed_port, serve_in_thread
from services import RedisServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app import GatewayApp
from gateway.catalog import RateLimit, parse_catalog
from gateway.engine import Engine
from gateway.local import LocalLimits
from gateway.middleware import GatewayMiddleware
from gateway.settings import Settings
from gateway.store.redis import open_redis

CATALOG = """
[catalog]
default_plan = "free"
on_redis_down = "local"
[features]
hd = "HD"
[operations.op]
cost = 1
[plans.free]
rate_limit = "10/second"
credits = 100
limits.seats = { to = 5 }
[plans.pro]
allows = ["hd"]
rate_limit = "10/second"
credits = 100
limits.seats = { to = 5 }
[[routes]]
match = "POST /spend"
spend = "op"
[[routes]]
match = "POST /seats"
limit = "seats"
[[routes]]
match = "GET /hd"
features = ["hd"]
[[routes]]
match = "GET /open"
on_redis_down = "open"
[[routes]]
match = "* /*"
"""


def test_gcra_share_of_each_process() -> None:
    """10/second with a burst of 10: one process takes the burst then one per 0.1 s; of two processes,
    each half of both; a denial takes nothing and says when to come back."""
    now = [1000.0]
    rate = RateLimit("rate", 10, 1, 10)
    for processes, burst, interval in ((1, 10, 0.1), (2, 5, 0.2)):
        limits = LocalLimits(processes, clock=lambda: now[0])
        admitted = [limits.decide("b", "free", None, (), [rate]).admitted for _ in range(burst + 3)]
        assert admitted == [True] * burst + [False] * 3
        denied = limits.decide("b", "free", None, (), [rate])
        assert denied.status == 429 and denied.retry_after == 1 and denied.degraded
        assert (b"x-gateway-degraded", b"redis") in denied.headers()
        now[0] += interval
        assert limits.decide("b", "free", None, (), [rate]).admitted
        assert not limits.decide("b", "free", None, (), [rate]).admitted
        assert limits.decide("other", "free", None, (), [rate]).admitted  # each billable its own cell
        now[0] += 10


def test_all_or_nothing_across_rate_limits() -> None:
    """A request denied by one rate limit takes nothing from the others."""
    now = [0.0]
    wide, narrow = RateLimit("rate", 100, 1, 100), RateLimit("rate:GET /x", 1, 60, 1)
    limits = LocalLimits(clock=lambda: now[0])
    assert limits.decide("b", "free", None, (), [wide, narrow]).admitted
    for _ in range(5):
        assert limits.decide("b", "free", None, (), [wide, narrow]).violated_policies == ["rate:GET /x"]
    remaining = {p.name: p.remaining for p in limits.decide("b", "free", None, (), [wide]).policies}
    assert remaining == {"rate": 98}


def test_settings_processes_default_to_the_workers() -> None:
    """GATEWAY_PROCESSES, else the number of workers (GATEWAY_WORKERS), else 1."""
    assert Settings.load(environ={}).processes == 1
    assert Settings.load(environ={"GATEWAY_WORKERS": "3"}).processes == 3
    assert Settings.load(environ={"GATEWAY_WORKERS": "3", "GATEWAY_PROCESSES": "4"}).processes == 4


async def _upstream(request: Request) -> Response:
    return JSONResponse({"plan": request.headers.get("x-plan"), "billable": request.headers.get("x-billable-id")})


@pytest.mark.parametrize("processes", [1, 2])
def test_redis_dead_admits_the_process_share_over_http(tmp_path: Path, processes: int) -> None:
    """Redis unreachable, through uvicorn: a 10/second plan admits about 10/processes a second (at most
    that over the measured wall time plus the burst; not everything), flagged; spend and limit routes 503."""
    plans = tmp_path / "plans.toml"
    plans.write_text(CATALOG)
    settings = Settings(
        plans=str(plans),
        redis_url=f"redis://127.0.0.1:{closed_port()}/0",
        database_url=f"sqlite:///{tmp_path}/gw.db",
        billable_header="x-org",
        processes=processes,
    )
    upstream = Starlette(routes=[Route("/{path:path}", _upstream, methods=["GET", "POST"])])
    app = GatewayApp(settings, upstream_app=upstream)
    headers = {"x-org": "org-1"}
    share, burst = 10 / processes, 10 // processes
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
            for path in ("/spend", "/seats"):
                r = client.post(path)
                assert r.status_code == 503 and r.json()["type"] == "urn:gateway:unavailable", (path, r.text)
            r = client.get("/hd")
            assert r.status_code == 403 and r.headers["x-gateway-degraded"] == "redis"  # free lacks hd
            assert client.get("/open", headers={"x-org": "org-open"}).status_code == 200  # its own policy: open
        statuses, elapsed = asyncio.run(_flood(url, headers, lambda sent, elapsed: sent >= 3 * (share * elapsed + burst)))
    admitted = statuses.count(200)
    print(f"local, {processes} process(es): {admitted} of {len(statuses)} admitted in {elapsed:.2f} s "
          f"(share {share:g}/s, burst {burst})")
    assert admitted <= share * elapsed + burst + 1
    assert admitted >= max(burst, share * elapsed / 2)  # about the share: the client kept asking faster than it
    assert statuses.count(429) == len(statuses) - admitted > 0  # not everything


async def _flood(url: str, headers: dict[str, str], enough: Any) -> tuple[list[int], float]:
    """GET /anything from 16 clients at once for at least 2 s of wall time, until `enough(sent, elapsed)`
    (or 30 s); every answer must be flagged degraded."""
    statuses: list[int] = []
    began = time.monotonic()

    def done() -> bool:
        elapsed = time.monotonic() - began
        return elapsed > 30 or (elapsed >= 2 and enough(len(statuses), elapsed))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:

        async def worker() -> None:
            while not done():
                r = await client.get("/anything")
                assert r.headers["x-gateway-degraded"] == "redis"
                if r.status_code == 200:
                    assert r.json() == {"plan": "free", "billable": headers["x-org"]}
                    assert r.headers["ratelimit-policy"].startswith('"rate";q=')
                else:
                    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
                statuses.append(r.status_code)

        await asyncio.gather(*(worker() for _ in range(16)))
    return statuses, time.monotonic() - began


def test_features_come_from_the_plan_this_process_last_resolved() -> None:
    """Resolved while Redis was up, a pro billable keeps pro's features while it is down; a billable this
    process never saw gets the default plan's."""
    catalog = parse_catalog(CATALOG)

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    def org(scope: dict[str, Any]) -> str | None:
        return dict(scope["headers"]).get(b"x-org", b"").decode() or None

    async def call(app: Any, path: str, who: str, method: str = "GET") -> int:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(b"x-org", who.encode())], "scheme": "http", "server": ("t", 80), "client": ("c", 1),
                 "http_version": "1.1", "asgi": {"version": "3.0"}}
        await app(scope, receive, send)
        return int(sent[0]["status"])

    with RedisServer() as server:

        async def main() -> None:
            store = open_redis(server.url)
            engine = Engine(store, catalog)
            app = GatewayMiddleware(ok, engine=engine, billable=org, freeze_gc=False)
            await engine.set_assignment("vip", "pro")
            assert await call(app, "/hd", "vip") == 200  # decided by Redis: the plan is now cached here
            server.stop()
            assert await call(app, "/hd", "vip") == 200  # pro's feature, from the cached plan
            assert await call(app, "/hd", "stranger") == 403  # never seen: the default plan
            assert await call(app, "/seats", "vip", "POST") == 503
            await store.close()

        asyncio.run(main())
