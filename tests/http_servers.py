"""Real servers for tests: uvicorn in a thread, and a small upstream app that records what it saw."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect


@contextmanager
def serve_in_thread(app: ASGIApp, port: int | None = None, **config: Any) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a loopback port; yield its base URL (no trailing slash)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port or 0))
    settings: dict[str, Any] = {"log_level": "warning", "loop": "asyncio", "timeout_graceful_shutdown": 2}
    server = uvicorn.Server(uvicorn.Config(app, **(settings | config)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server did not start")
            threading.Event().wait(0.001)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def closed_port() -> int:
    """A loopback port nothing listens on (free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Record:
    """What the upstream saw, readable from the test thread."""

    paths: list[str] = field(default_factory=list)
    upload_started: threading.Event = field(default_factory=threading.Event)
    uploads_completed: int = 0
    stream_cancelled: threading.Event = field(default_factory=threading.Event)
    hang_disconnected: threading.Event = field(default_factory=threading.Event)
    ws_close_codes: list[int] = field(default_factory=list)
    ws_closed: threading.Event = field(default_factory=threading.Event)


def upstream_app(record: Record | None = None) -> Starlette:
    """An upstream with an endpoint per behaviour a proxy must pass through or survive."""
    record = record if record is not None else Record()

    async def echo(request: Request) -> Response:
        record.paths.append(request.url.path)
        body = await request.body()
        return JSONResponse(
            {
                "method": request.method,
                "path": request.url.path,
                "raw_path": request.scope["raw_path"].decode("latin-1"),
                "query": request.scope["query_string"].decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]],
                "body": body.decode("latin-1"),
            },
            status_code=int(request.query_params.get("status", "200")),
        )

    async def upload(request: Request) -> Response:
        digest, size, chunks = hashlib.sha256(), 0, 0
        try:
            async for chunk in request.stream():
                if chunk:
                    record.upload_started.set()
                    digest.update(chunk)
                    size += len(chunk)
                    chunks += 1
        except ClientDisconnect:
            return Response(status_code=499)
        record.uploads_completed += 1
        return JSONResponse({"size": size, "sha256": digest.hexdigest(), "chunks": chunks})

    async def sse(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            await asyncio.sleep(1.0)
            yield b"data: two\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def chunks(request: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            for part in (b"a" * 10, b"b" * 10, b"c" * 10):
                yield part
                await asyncio.sleep(0.01)

        return StreamingResponse(parts(), media_type="text/plain")

    async def forever(request: Request) -> Response:
        async def ticks() -> AsyncIterator[bytes]:
            try:
                for _ in range(200):
                    yield b"tick\n"
                    await asyncio.sleep(0.05)
            except BaseException:
                record.stream_cancelled.set()
                raise

        return StreamingResponse(ticks(), media_type="text/plain")

    async def cookies(request: Request) -> Response:
        response = PlainTextResponse("two cookies")
        response.set_cookie("session", "s3cr3t")
        response.set_cookie("theme", "dark")
        return response

    async def hop(request: Request) -> Response:
        return PlainTextResponse(
            "hop",
            headers={
                "connection": "x-hop-named",
                "x-hop-named": "1",
                "keep-alive": "timeout=5",
                "proxy-authenticate": "Basic",
                "trailer": "x-checksum",
                "x-end-to-end": "kept",
            },
        )

    async def slow(request: Request) -> Response:
        await asyncio.sleep(2.0)
        return PlainTextResponse("late")

    async def ws_echo(websocket: WebSocket) -> None:
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=offered[0] if offered else None)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    record.ws_close_codes.append(message.get("code", 1000))
                    return
                if (text := message.get("text")) is not None:
                    if text == "close-4001":
                        await websocket.close(code=4001, reason="asked to")
                        return
                    if text == "whoami":
                        await websocket.send_json(
                            {
                                "path": websocket.scope["raw_path"].decode(),
                                "query": websocket.scope["query_string"].decode(),
                                "headers": {k.decode(): v.decode() for k, v in websocket.scope["headers"]},
                            }
                        )
                        continue
                    await websocket.send_text(text)
                else:
                    await websocket.send_bytes(message.get("bytes") or b"")
        except WebSocketDisconnect as exc:
            record.ws_close_codes.append(exc.code)
        finally:
            record.ws_closed.set()

    async def ws_refuse(websocket: WebSocket) -> None:
        await websocket.close(code=1008)

    app = Starlette(
        routes=[
            Route("/echo/{rest:path}", echo, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
            Route("/upload", upload, methods=["POST", "PUT"]),
            Route("/sse", sse),
            Route("/chunks", chunks),
            Route("/forever", forever),
            Route("/cookies", cookies),
            Route("/hop", hop),
            Route("/slow", slow),
            Route("/die", _Raw(die)),
            Route("/hang", _Raw(_hang(record))),
            WebSocketRoute("/ws/echo", ws_echo),
            WebSocketRoute("/ws/refuse", ws_refuse),
        ]
    )
    app.state.record = record
    return app


class _Raw:
    """A raw ASGI endpoint for a Starlette Route (a non-function endpoint is called as an ASGI app)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def die(scope: Scope, receive: Receive, send: Send) -> None:
    """Promise a body, send part of it, then drop the connection (uvicorn closes it on return)."""
    chunked = b"chunked" in scope["query_string"]
    headers = [(b"content-type", b"text/plain")]
    if not chunked:
        headers.append((b"content-length", b"1000"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
    await asyncio.sleep(0.05)


def _hang(record: Record) -> ASGIApp:
    async def hang(scope: Scope, receive: Receive, send: Send) -> None:
        """Never answer; note when the caller goes away."""
        while (await receive())["type"] != "http.disconnect":
            pass
        record.hang_disconnected.set()

    return hang
