"""uvicorn, with what it lacks for clients that are slow on purpose (DESIGN §3).

uvicorn brings the connection cap (`limit_concurrency`: past it a request gets 503) and the keep-alive
timeout, but no deadline for a request's headers and none for a body that stops arriving: GuardedProtocol
adds both to its httptools protocol, arming a timer only when a read leaves a request incomplete (the
common request, whole in one read, arms none).

    async with serving(app, sock, settings, drain=5.0):   app served on a bound socket until the block ends
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import GatewayError
from gateway.settings import LISTEN_BACKLOG, Settings

log = logging.getLogger("gateway")


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the two deadlines it lacks: a request's headers within
    `header_timeout` of its first byte (or of the connection, for its first request), and a body that is
    never idle for `body_timeout`. The common request, whole in one read, arms no timer."""

    header_timeout = 10.0
    body_timeout = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # as uvicorn's
        super().connection_made(transport)
        self._reading: str | None = None  # "headers" or "body" while a request is incomplete
        self._began = self.loop.time()
        self._body_at = 0.0
        self._timer: asyncio.TimerHandle | None = self.loop.call_later(self.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._timer is not None or self._reading is None or self.transport.is_closing():
            return
        if self.transport.get_protocol() is not self:
            return  # upgraded to a WebSocket: its protocol keeps its own time
        if self._reading == "headers":
            self._timer = self.loop.call_at(self._began + self.header_timeout, self._headers_late)
        else:
            self._body_at = self.loop.time()
            self._timer = self.loop.call_later(self.body_timeout, self._body_idle)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading, self._began = "headers", self.loop.time()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._reading = "body"
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_at = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading = None
        super().on_message_complete()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # a pipelined request waits for the one before it: not the client's doing
            self._timer = self.loop.call_later(self.header_timeout, self._headers_late)
            return
        log.debug("closing %s: no request headers within %gs", self.client, self.header_timeout)
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()

    def _body_idle(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._reading != "body":
            return
        now = self.loop.time()
        if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            self._body_at = now  # the app has not taken what came, or not asked for the body yet: not the client's wait
        idle = now - self._body_at
        if idle < self.body_timeout:
            self._timer = self.loop.call_later(self.body_timeout - idle, self._body_idle)
            return
        # The app is reading the body: closing is what it sees as the client leaving (http.disconnect).
        log.debug("closing %s: its request body was idle for %gs", self.client, self.body_timeout)
        self.transport.close()


def guarded(header_timeout: float, body_timeout: float) -> type[GuardedProtocol]:
    return type("GuardedProtocol", (GuardedProtocol,), {"header_timeout": header_timeout, "body_timeout": body_timeout})


class HTTPServer(uvicorn.Server):
    """uvicorn's server without its signal handling (gateway/server.py owns SIGTERM and SIGINT); `task` serves."""

    task: asyncio.Task[None]

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(
    app: Any, sock: socket.socket, settings: Settings | None = None, *, drain: float = 5.0, quiet: bool = False
) -> AsyncIterator[HTTPServer]:
    """Serve `app` on `sock` (limits and deadlines from `settings`) until the block ends; then stop accepting
    and give the requests in flight `drain` seconds before they are cancelled. `quiet`: without uvicorn's
    start and stop lines (a server beside the gateway's, like the demo's API: one set of lines is enough)."""
    limits: dict[str, Any] = {}
    if settings is not None:
        limits = {
            "http": guarded(settings.header_timeout, settings.body_timeout),
            "limit_concurrency": settings.max_connections,
            # uvicorn's proxy_headers would believe a loopback client's X-Forwarded-For about who it is.
            "proxy_headers": settings.trust_forwarded,
        }
    config = uvicorn.Config(
        app, lifespan="off", log_level="info", access_log=False, timeout_graceful_shutdown=max(1, int(drain)),
        backlog=LISTEN_BACKLOG, **limits,
    )  # fmt: skip
    server = HTTPServer(config)
    with _quieted(quiet):
        task = server.task = asyncio.create_task(server.serve(sockets=[sock]), name="gateway-http")
        while not server.started:
            if task.done():
                reason = task.exception() if not task.cancelled() else None
                raise GatewayError(f"the HTTP server did not start on {sock.getsockname()}: {reason or 'it stopped'}")
            await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        with _quieted(quiet):
            await task
        # Requests cancelled at the end of the drain settle as their cancellation unwinds: let them.
        if server.server_state.tasks:
            await asyncio.wait(list(server.server_state.tasks), timeout=1.0)


@contextlib.contextmanager
def _quieted(quiet: bool) -> Iterator[None]:
    """uvicorn's start and stop lines (INFO on "uvicorn.error") left out while the block runs."""
    logger = logging.getLogger("uvicorn.error")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        if quiet:
            logger.setLevel(level)


__all__ = ["GuardedProtocol", "HTTPServer", "guarded", "serving"]
