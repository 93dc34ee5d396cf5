"""Settling when something went wrong (DESIGN §4): the app failed before answering, the client left before
the answer, Redis went away before the settle.

- The app raises before `http.response.start`: nothing was delivered, so the limit units and credits it held
  are given back (and the exception still reaches the server, which answers 500).
- The client leaves before the answer: charged as held (the upstream may have done the work).
- Redis is gone when the answer is settled: the hold stays as charged, the answer is still delivered, and no
  exception escapes the middleware.

The engine decides on the real Redis: the shared one under a prefix of the test's own, or a private
redis-server with an append-only file where the test kills it and reads back what it kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from engine_support import BASE
from fastapi import FastAPI
from http_servers import serve_in_thread
from services import RedisServer, RedisSpace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.grants import Grants
from gateway.metrics import Metrics
from gateway.middleware import GatewayMiddleware
from gateway.proxy import Proxy
from gateway.reconcile import Reconciler, Rehydrator
from gateway.store import db as tables
from gateway.store.db import Database
from gateway.store.redis import open_redis

CATALOG = parse_catalog(BASE)
Message = dict[str, Any]


def billable_from_header(scope: dict[str, Any]) -> str | None:
    return next((v.decode() for k, v in scope["headers"] if k == b"x-org"), None)


def scope_of(method: str, path: str, billable: str) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": [(b"x-org", billable.encode())], "scheme": "http", "server": ("t", 80),
            "client": ("c", 1), "http_version": "1.1", "asgi": {"version": "3.0"}}  # fmt: skip


async def held(engine: Engine, billable: str) -> tuple[int, int, int]:
    """(projects in use, credit balance, credits held) as the status shows them."""
    status = await engine.status(billable)
    return status["limits"]["projects"]["usage"], status["credits"]["balance"], status["credits"]["held"]


# ---- the app fails before answering, the client leaves before the answer ---------------------------------


async def fails_before_answering(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    raise RuntimeError("the app failed before answering")


async def client_leaves(scope: Any, receive: Any, send: Any) -> None:
    """An app that waits for the client, which is gone: it returns without an answer."""
    while (await receive())["type"] != "http.disconnect":
        pass


def incoming() -> Callable[[], Any]:
    """The server's receive: the request, then the client leaving."""
    messages: list[Message] = [{"type": "http.disconnect"}, {"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        return messages.pop() if len(messages) > 1 else messages[0]

    return receive


@pytest.mark.parametrize(
    ("method", "path", "given_back", "charged"),
    [  # (projects in use, balance, held) after; the balance is the plan's 10 and a grant of 500
        ("POST", "/projects", (0, 510, 0), (1, 510, 0)),  # a limit's unit
        ("POST", "/cheap-images", (0, 510, 0), (0, 505, 0)),  # a cost in credits
        ("POST", "/chat", (0, 510, 0), (0, 410, 100)),  # a metered reserve: held, settled by nothing
    ],
    ids=["limit", "cost", "reserve"],
)
def test_an_app_that_fails_before_answering_gives_back_and_a_client_that_left_is_charged(
    redis_space: RedisSpace, method: str, path: str, given_back: tuple[int, int, int], charged: tuple[int, int, int]
) -> None:
    """The app raising before http.response.start gives back everything the request held (the exception goes
    on to the server); the client leaving before the answer, with the app returning quietly, keeps it all."""

    async def main() -> None:
        engine = redis_space.engine(CATALOG)
        try:
            await engine.apply_grant("a", 1, 500)
            await engine.apply_grant("b", 1, 500)
            failing = GatewayMiddleware(fails_before_answering, engine=engine, billable=billable_from_header)
            sent: list[Message] = []

            async def send(message: Message) -> None:
                sent.append(message)

            with pytest.raises(RuntimeError, match="failed before answering"):
                await failing(scope_of(method, path, "a"), incoming(), send)
            assert sent == []
            assert await held(engine, "a") == given_back

            leaving = GatewayMiddleware(client_leaves, engine=engine, billable=billable_from_header)
            await leaving(scope_of(method, path, "b"), incoming(), send)
            assert sent == []
            assert await held(engine, "b") == charged
        finally:
            await engine.store.close()

    asyncio.run(main())


def test_a_fastapi_endpoint_that_raises_gives_the_hold_back_and_the_client_gets_500(redis_space: RedisSpace) -> None:
    """Mounted with add_middleware, the gateway runs inside Starlette's error handler: an endpoint that raises
    reaches it before any answer, so it gives the project and the credits back; the client still gets 500."""
    api = FastAPI()

    @api.post("/projects")
    async def create() -> dict[str, str]:
        raise RuntimeError("the app failed before answering")

    @api.post("/cheap-images")
    async def image() -> dict[str, str]:
        raise RuntimeError("the app failed before answering")

    async def main() -> None:
        engine = redis_space.engine(CATALOG)
        api.add_middleware(GatewayMiddleware, engine=engine, billable=billable_from_header)  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                for path in ("/projects", "/cheap-images"):
                    r = await client.post(path, headers={"x-org": "f"})
                    assert r.status_code == 500
            assert await held(engine, "f") == (0, 10, 0)
        finally:
            await engine.store.close()

    asyncio.run(main())


def test_a_client_that_leaves_while_the_upstream_is_slow_is_charged_as_held(redis_space: RedisSpace) -> None:
    """Through the proxy to a real upstream: the client leaves before the slow upstream answers; the proxy
    abandons the upstream request and answers nothing; what the request held stays charged."""
    arrived = threading.Event()

    async def slow(request: Request) -> Response:
        arrived.set()
        await asyncio.sleep(3)  # slower than the client's patience: the thing under test
        return JSONResponse({"usage": {"total_tokens": 1}})

    upstream = Starlette(routes=[Route("/{rest:path}", slow, methods=["POST"])])

    async def main(url: str) -> None:
        engine = redis_space.engine(CATALOG)
        proxy = Proxy(url)
        try:
            await engine.apply_grant("slow", 1, 500)
            app = GatewayMiddleware(proxy, engine=engine, billable=billable_from_header)
            request_sent = False

            async def receive() -> Message:
                nonlocal request_sent
                if not request_sent:
                    request_sent = True
                    return {"type": "http.request", "body": b"{}", "more_body": False}
                await asyncio.to_thread(arrived.wait, 10)  # the upstream has the request: now the client leaves
                return {"type": "http.disconnect"}

            sent: list[Message] = []

            async def send(message: Message) -> None:
                sent.append(message)

            for path in ("/projects", "/chat"):
                arrived.clear()
                request_sent = False
                await app(scope_of("POST", path, "slow"), receive, send)
                assert arrived.is_set() and sent == []
            assert await held(engine, "slow") == (1, 510 - 100, 100)  # the project, and chat's reserve held
        finally:
            await proxy.aclose()
            await engine.store.close()

    with serve_in_thread(upstream) as url:
        asyncio.run(main(url))


# ---- Redis gone before the settle ------------------------------------------------------------------------


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A private redis-server that writes every change to its append-only file: killed and started again,
    it has everything it answered before the kill."""
    with RedisServer("--appendonly", "yes", "--appendfsync", "always") as server:
        yield server


@pytest.mark.parametrize(
    ("method", "path", "status", "kept"),
    [  # one project made before, a grant of 500: (projects in use, balance, held) once Redis is back
        ("POST", "/projects", 500, (2, 510, 0)),  # the failed answer would have given this project back
        ("DELETE", "/projects/1", 204, (1, 510, 0)),  # the delete the app confirmed would have released one
        ("POST", "/chat", 200, (1, 410, 100)),  # the 7 units reported would have settled the reserve of 100
    ],
    ids=["give-back", "release", "settle"],
)
def test_a_settle_with_redis_gone_keeps_the_hold_and_still_delivers_the_answer(
    durable_redis: RedisServer, caplog: pytest.LogCaptureFixture, method: str, path: str, status: int,
    kept: tuple[int, int, int],
) -> None:
    """Redis dies while the app works: its answer is delivered as it was sent, no exception escapes the
    middleware, and the hold stays as charged (Redis, back, shows what was taken at admission)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        durable_redis.stop()  # SIGKILL, while the request is with the app
        body = b'{"usage": {"total_tokens": 7}}'
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": body if status != 204 else b"", "more_body": False})

    space = RedisSpace(durable_redis.url, "gwt-durable")

    async def setup() -> None:
        engine = space.engine(CATALOG)
        try:
            await engine.apply_grant("d", 1, 500)
            assert (await engine.decide("d", CATALOG.route_for("POST", "/projects"))).admitted  # a release would show
        finally:
            await engine.store.close()

    async def request() -> httpx.Response:
        engine = space.engine(CATALOG)
        metrics = Metrics()
        middleware = GatewayMiddleware(app, engine=engine, billable=billable_from_header, metrics=metrics)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as client:
                answer = await client.request(method, path, headers={"x-org": "d"})
            assert metrics.redis_errors == 1
            return answer
        finally:
            await engine.store.close()

    async def after() -> tuple[int, int, int]:
        engine = space.engine(CATALOG)
        try:
            return await held(engine, "d")
        finally:
            await engine.store.close()

    asyncio.run(setup())
    with caplog.at_level(logging.WARNING, logger="gateway.middleware"):
        answer = asyncio.run(request())
    assert answer.status_code == status and answer.headers["x-app"] == "1"
    if status != 204:
        assert answer.json() == {"usage": {"total_tokens": 7}}
    assert "could not settle a hold" in caplog.text
    durable_redis.start()
    assert asyncio.run(after()) == kept


# ---- an answer reporting more units than anything can hold ----------------------------------------------


@pytest.mark.parametrize("reported", ["1e30", str(10**30), "9007199254740993"], ids=["1e30", "10**30", "2**53+1"])
def test_huge_reported_units_charge_at_most_max_units_and_the_record_catches_up(
    tmp_path: Path, private_redis: RedisServer, reported: str
) -> None:
    """A metered answer reporting 1e30 (or 10**30) tokens is charged max_units on a real redis-server: the settle
    bumps `chg`, emits credits_depleted, the record takes the settled balance, and a Redis loss gives nothing back."""

    async def main() -> None:
        db = await Database.connect(f"sqlite:///{tmp_path}/gw.db", auto_upgrade=True)
        stores = [open_redis(private_redis.url), open_redis(private_redis.url)]

        def process(store: Any) -> tuple[Engine, Reconciler]:
            rehydrator = Rehydrator(db)
            engine = Engine(store, CATALOG, restore=rehydrator.restore, grants_after=rehydrator.grants_after)
            grants = Grants(db, engine)
            return engine, Reconciler(engine, db, grants=grants)

        try:
            private_redis.client().flushall()
            engine, reconciler = process(stores[0])
            await Grants(db, engine).grant("org", 990, idempotency_key="pack")  # 10 a month + 990: 1000
            await reconciler.flush_dirty()
            changes: list[str] = []

            async def answers_huge_usage(scope: Any, receive: Any, send: Any) -> None:
                changes.append(private_redis.client().hget("gw:{org}", "chg") or "0")  # after the decision
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"usage": {"total_tokens": %s}}' % reported.encode()})

            sent: list[Message] = []

            async def send(message: Message) -> None:
                sent.append(message)

            app = GatewayMiddleware(answers_huge_usage, engine=engine, billable=billable_from_header, freeze_gc=False)
            await app(scope_of("POST", "/chat", "org"), incoming(), send)
            assert sent[0]["status"] == 200
            credits = (await engine.status("org"))["credits"]
            assert (credits["balance"], credits["held"]) == (0, 0)  # max_units = 1000 tokens at 1 credit each
            snap = await engine.snapshot("org")
            assert int(snap.state["chg"]) > int(changes[0]) and not snap.holds
            assert [e["type"] for e in await engine.pending_events("org")] == ["credits_depleted"]

            await reconciler.flush_dirty()
            async with db.engine.connect() as conn:
                row = (await conn.execute(sa.select(tables.snapshots.c.chg).where(tables.snapshots.c.billable == "org"))).scalar()
                outbox = [json.loads(b) for b in (await conn.execute(sa.select(tables.events_outbox.c.body))).scalars()]
            assert row == int(snap.state["chg"])  # the record caught up with the settle
            assert [e["type"] for e in outbox] == ["credits_depleted"]
            usage = await db_usage(db, "org")
            assert usage == {"requests": 1, "units": 1000, "credits": 1000}

            private_redis.client().flushall()  # Redis loses everything: the record gives nothing back
            restored, _ = process(stores[1])
            assert (await restored.status("org"))["credits"]["balance"] == 0
        finally:
            for store in stores:
                await store.close()
            await db.close()

    asyncio.run(main())


async def db_usage(db: Database, billable: str) -> dict[str, int]:
    t = tables.usage_totals.c
    async with db.engine.connect() as conn:
        row = (await conn.execute(sa.select(t.requests, t.units, t.credits).where(t.billable == billable, t.route == "POST /chat"))).one()
    return dict(row._mapping)
