"""The ASGI middleware in Starlette and FastAPI apps: decisions, headers once, streaming untouched, settles.

The engine decides on the shared Redis under a key prefix of the test's own; a fast subset runs on the
in-process emulation too (`engine` parametrized "embedded").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from engine_support import BASE
from fastapi import FastAPI
from services import RedisSpace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route as StarletteRoute
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket

from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.middleware import GatewayMiddleware
from gateway.store.redis import open_redis

T = TypeVar("T")


def billable_from_header(scope: dict[str, Any]) -> str | None:
    for k, v in scope["headers"]:
        if k == b"x-org":
            return v.decode()
    return None


async def echo(request: Request) -> Response:
    return JSONResponse(
        {
            "billable": request.headers.get("x-billable-id"),
            "plan": request.headers.get("x-plan"),
            "body": (await request.body()).decode(),
        },
        status_code=int(request.query_params.get("status", 200)),
    )


async def chat(request: Request) -> Response:
    mode = request.query_params.get("mode", "json")
    if mode == "sse":

        async def events() -> AsyncIterator[bytes]:
            yield b'data: {"delta": "hi"}\n\n'
            yield b'data: {"usage": {"total_tokens": 42}}\n\n'
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    if mode == "none":
        return JSONResponse({"text": "no usage"})
    return JSONResponse({"usage": {"total_tokens": int(request.query_params.get("tokens", 30))}},
                        status_code=int(request.query_params.get("status", 200)))


async def delete_project(request: Request) -> Response:
    headers = {"x-gateway-release": "0"} if request.query_params.get("kept") else {}
    return Response(status_code=204, headers=headers)


def starlette_app(engine: Engine, tmp_file: Path | None = None) -> Any:
    async def file(request: Request) -> Response:
        assert tmp_file is not None
        return FileResponse(tmp_file)

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.headers.get("x-billable-id", ""))
        await websocket.close()

    inner = Starlette(
        routes=[
            StarletteRoute("/chat", chat, methods=["POST"]),
            StarletteRoute("/projects", echo, methods=["POST"]),
            StarletteRoute("/projects/{id}", delete_project, methods=["DELETE"]),
            StarletteRoute("/cheap-images", echo, methods=["POST"]),
            StarletteRoute("/priced", echo, methods=["POST"]),
            StarletteRoute("/file", file, methods=["GET"]),
            StarletteRoute("/anything", echo, methods=["GET", "POST"]),
            WebSocketRoute("/ws", ws),
        ]
    )
    return GatewayMiddleware(inner, engine=engine, billable=billable_from_header)


@pytest.fixture
def engine(request: pytest.FixtureRequest, redis_space: RedisSpace) -> Engine:
    """An engine on the shared Redis under this test's prefix; parametrized "embedded", on the emulation."""
    space = redis_space if getattr(request, "param", "redis") == "redis" else RedisSpace(None, redis_space.prefix)
    return space.engine(parse_catalog(BASE))


BOTH = pytest.mark.parametrize("engine", ["redis", "embedded"], indirect=True)


def beside(engine: Engine, fn: Callable[[Engine], Awaitable[T]]) -> T:
    """Run `fn` on an engine of its own over the same Redis and prefix, in an event loop of its own (the
    middleware's store belongs to the TestClient's loop)."""

    async def main() -> T:
        space = RedisSpace(None if engine.store.embedded else engine.store.url, engine.prefix)
        other = space.engine(engine.catalog)
        try:
            return await fn(other)
        finally:
            await other.store.close()

    return asyncio.run(main())


def status_of(engine: Engine, billable: str) -> dict[str, Any]:
    return beside(engine, lambda e: e.status(billable))


@BOTH
def test_admitted_request_gets_headers_and_identity(engine: Engine) -> None:
    """An admitted request reaches the app with X-Billable-Id and X-Plan (client values dropped) and gets the headers."""
    with TestClient(starlette_app(engine)) as client:
        r = client.post("/cheap-images", headers={"x-org": "acme", "x-billable-id": "evil", "x-plan": "enterprise"})
    assert r.status_code == 200
    assert r.json()["billable"] == "acme" and r.json()["plan"] == "free"
    assert r.headers["x-credits-remaining"] == "5"
    assert r.headers["ratelimit-policy"] == '"credits";q=10'
    assert r.headers["ratelimit"] == '"credits";r=5'


def test_no_billable_is_401(engine: Engine) -> None:
    """Without a billable the request is 401 problem+json and the app never runs."""
    with TestClient(starlette_app(engine)) as client:
        r = client.post("/cheap-images")
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "urn:gateway:unauthorized"


@BOTH
def test_non_2xx_gives_the_hold_back(engine: Engine) -> None:
    """A failed answer gives back the limit units it held; a 2xx keeps them."""
    with TestClient(starlette_app(engine)) as client:
        assert client.post("/projects?status=500", headers={"x-org": "a"}).status_code == 500
        assert status_of(engine, "a")["limits"]["projects"]["usage"] == 0
        assert client.post("/projects", headers={"x-org": "a"}).status_code == 200
        assert status_of(engine, "a")["limits"]["projects"]["usage"] == 1


def test_release_on_2xx_unless_upstream_kept_it(engine: Engine) -> None:
    """A delete gives one back on 2xx, but not when the upstream answers X-Gateway-Release: 0."""
    with TestClient(starlette_app(engine)) as client:
        client.post("/projects", headers={"x-org": "a"})
        client.post("/projects", headers={"x-org": "a"})
        client.delete("/projects/1?kept=1", headers={"x-org": "a"})
        assert status_of(engine, "a")["limits"]["projects"]["usage"] == 2
        client.delete("/projects/1", headers={"x-org": "a"})
        assert status_of(engine, "a")["limits"]["projects"]["usage"] == 1


@BOTH
def test_metered_json_answer_settles_to_units(engine: Engine) -> None:
    """A metered operation settles to the units in the JSON answer; an answer with none keeps the reserve."""
    beside(engine, lambda e: e.apply_grant("m", 1, 500))
    with TestClient(starlette_app(engine)) as client:
        r = client.post("/chat?tokens=30", headers={"x-org": "m"})
        assert r.status_code == 200 and r.headers["x-credits-remaining"] == "410"  # 510 - reserve 100
        assert status_of(engine, "m")["credits"]["balance"] == 480
        client.post("/chat?mode=none", headers={"x-org": "m"})
        assert status_of(engine, "m")["credits"]["balance"] == 380
        client.post("/chat?status=500&tokens=7", headers={"x-org": "m"})
        assert status_of(engine, "m")["credits"]["balance"] == 373  # a failed answer reporting units pays those


def test_metered_sse_answer_uses_last_usage_event(engine: Engine) -> None:
    """A streamed answer settles to the units of its last event carrying usage."""
    beside(engine, lambda e: e.apply_grant("s", 1, 500))
    with TestClient(starlette_app(engine)) as client:
        r = client.post("/chat?mode=sse", headers={"x-org": "s"})
    assert r.status_code == 200 and "[DONE]" in r.text
    assert status_of(engine, "s")["credits"]["balance"] == 510 - 42


def test_request_priced_operation_and_malformed_body(engine: Engine) -> None:
    """An operation priced from the request reads its JSON body (replayed to the app); a malformed body is 400."""
    with TestClient(starlette_app(engine)) as client:
        r = client.post("/priced", headers={"x-org": "p"}, content=b'{"n": 2}')
        assert r.status_code == 200 and r.json()["body"] == '{"n": 2}' and r.headers["x-credits-remaining"] == "6"
        bad = client.post("/priced", headers={"x-org": "p"}, content=b"{not json")
        assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"


def test_denial_problem_and_headers(engine: Engine) -> None:
    """A denial is problem+json with the type, sentence, policies and the same rate headers."""
    with TestClient(starlette_app(engine)) as client:
        for _ in range(2):
            client.post("/projects", headers={"x-org": "d"})
        r = client.post("/projects", headers={"x-org": "d"})
    assert r.status_code == 403
    body = r.json()
    assert body["type"] == "urn:gateway:limit-reached" and body["violated_policies"] == ["projects"]
    assert body["detail"].startswith("You've reached your limit of 2 projects (currently using 2).")
    assert r.headers["ratelimit"].startswith('"projects";r=0')


def test_file_response_and_unmatched_route(engine: Engine, tmp_path: Path) -> None:
    """File responses pass untouched (with the headers added) for a request no special route matches."""
    f = tmp_path / "f.txt"
    f.write_bytes(b"x" * 100_000)
    with TestClient(starlette_app(engine, f)) as client:
        r = client.get("/file", headers={"x-org": "f"})
    assert r.status_code == 200 and len(r.content) == 100_000


def test_websocket_admitted_and_refused(engine: Engine) -> None:
    """A WebSocket upgrade passes the same checks; the app sees the billable; no billable is refused."""
    with TestClient(starlette_app(engine)) as client:
        with client.websocket_connect("/ws", headers={"x-org": "w"}) as ws:
            assert ws.receive_text() == "w"
        with pytest.raises(WebSocketDenialResponse) as refused, client.websocket_connect("/ws") as ws:
            ws.receive_text()
        assert refused.value.status_code == 401


async def _raw(app: Any, path: str, method: str = "POST", headers: list[tuple[bytes, bytes]] | None = None) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers or [(b"x-org", b"raw")], "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "http_version": "1.1", "asgi": {"version": "3.0"}}
    await app(scope, receive, send)
    return sent


def test_raw_message_order_streaming_untouched(engine: Engine) -> None:
    """Start is sent once with the headers; each streamed chunk passes through as its own message, unchanged."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": f"chunk{i}".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    sent = asyncio.run(_raw(GatewayMiddleware(app, engine=engine, billable=billable_from_header), "/anything"))
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 4
    assert [m.get("body") for m in sent[1:]] == [b"chunk0", b"chunk1", b"chunk2", b""]
    names = [k for k, _ in sent[0]["headers"]]
    assert names.count(b"content-type") == 1


def test_pathsend_completes_the_answer(engine: Engine) -> None:
    """http.response.pathsend counts as a complete answer: the hold is kept, not charged as cut short."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/dev/null"})

    mw = GatewayMiddleware(app, engine=engine, billable=billable_from_header)
    sent = asyncio.run(_raw(mw, "/projects"))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.pathsend"]
    assert status_of(engine, "raw")["limits"]["projects"]["usage"] == 1


def test_lifespan_passes_through(engine: Engine) -> None:
    """Lifespan events reach the app untouched."""
    started: list[bool] = []

    async def lifespan(app: Any) -> AsyncIterator[None]:
        started.append(True)
        yield

    import contextlib

    inner = Starlette(lifespan=contextlib.asynccontextmanager(lifespan))
    with TestClient(GatewayMiddleware(inner, engine=engine, billable=billable_from_header)):
        pass
    assert started == [True]


def test_fastapi_app_mounts_in_one_line(engine: Engine) -> None:
    """A FastAPI app mounts the middleware with add_middleware and gets the same decisions."""
    api = FastAPI()

    @api.post("/projects")
    async def create() -> dict[str, str]:
        return {"ok": "yes"}

    api.add_middleware(GatewayMiddleware, engine=engine, billable=billable_from_header)  # type: ignore[arg-type]
    with TestClient(api) as client:
        codes = [client.post("/projects", headers={"x-org": "fa"}).status_code for _ in range(3)]
    assert codes == [200, 200, 403]


def test_redis_down_open_and_closed(tmp_path: Path) -> None:
    """With Redis unreachable, a plain route is let through flagged, a spend route is refused with 503."""
    engine = Engine(open_redis("redis://127.0.0.1:1/0"), parse_catalog(BASE), prefix="gwt-down")
    with TestClient(starlette_app(engine)) as client:
        open_ = client.post("/projects", headers={"x-org": "x"})
        closed = client.post("/cheap-images", headers={"x-org": "x"})
    assert open_.status_code == 200 and open_.headers["x-gateway-degraded"] == "redis"
    assert closed.status_code == 503 and closed.json()["type"] == "urn:gateway:unavailable"


@BOTH
def test_real_redis_backend(engine: Engine) -> None:
    """The middleware decides the same way on the real Redis and on the emulation."""
    with TestClient(starlette_app(engine)) as client:
        codes = [client.post("/projects", headers={"x-org": "rr"}).status_code for _ in range(3)]
    assert codes == [200, 200, 403]
    # The client's pool belongs to the TestClient's loop: read back through a new connection.
    assert status_of(engine, "rr")["limits"]["projects"]["usage"] == 2


def test_startup_heap_is_frozen_out_of_the_collector(engine: Engine) -> None:
    """After the app's startup the middleware freezes the heap (gc.freeze), unless told not to."""
    import gc

    gc.unfreeze()
    with TestClient(GatewayMiddleware(Starlette(), engine=engine, billable=billable_from_header, freeze_gc=False)):
        assert gc.get_freeze_count() == 0
    with TestClient(GatewayMiddleware(Starlette(), engine=engine, billable=billable_from_header)):
        assert gc.get_freeze_count() > 0
    gc.unfreeze()


def test_request_header_priced_operation_needs_its_header(redis_space: RedisSpace) -> None:
    """An operation priced from a request header spends its price, and a request without the header is 400."""
    text = BASE.replace('[operations.priced]\nper_unit = 2\nunits = "request.json:n"', '[operations.priced]\nper_unit = 2\nunits = "request.header:X-Units"')
    engine = redis_space.engine(parse_catalog(text))
    with TestClient(starlette_app(engine)) as client:
        ok = client.post("/priced", headers={"x-org": "h", "x-units": "3"})
        missing = client.post("/priced", headers={"x-org": "h"})
    assert ok.status_code == 200 and ok.headers["x-credits-remaining"] == "4"
    assert missing.status_code == 400 and "X-Units" in missing.json()["detail"]
