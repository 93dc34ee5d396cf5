"""A streaming reverse proxy: every HTTP and WebSocket request goes to one upstream.

The proxy knows nothing about plans or limits; the gateway middleware wraps it and reads the ASGI
messages it sends. What a wrapper can rely on, for every HTTP request:

- `http.response.start` is sent at most once, before any body message.
- Then `http.response.body` messages with `more_body=True`, then exactly one with `more_body=False`.
  The final one may carry the last bytes (when the upstream's Content-Length says they are the last),
  so count the body of every message, the final one included.
- When the proxy answers itself (413, 502, 504) the answer is `application/problem+json` in the same
  shape: one start, one final body. The upstream was not reached (502, 413 by Content-Length), did not
  answer in time (504), or was abandoned (413 for a body that grew too large).
- When the upstream dies or goes idle after the response started, the call returns WITHOUT the final
  message: that is how a wrapper tells a truncated answer from a complete one.
- When the client goes away, the call returns quietly (maybe with nothing sent at all) and the upstream
  request is abandoned. To notice this while waiting, a request still running WATCH_AFTER seconds after
  its body was read calls `receive()` once more, from a separate task, and expects it to block until
  `http.disconnect` (as a server's does): a wrapper that replays a body must then delegate to the
  server's `receive`, never return further empty `http.request` messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import aiohttp
from starlette.types import Receive, Scope, Send
from yarl import URL

from gateway.headers import spelled
from gateway.problems import problem_body, problem_messages
from gateway.settings import DEFAULT_MAX_BODY

logger = logging.getLogger("gateway.proxy")

POOL_LIMIT = 256
# Shorter than the 5 s idle limit of uvicorn, Node and many other upstreams, so the proxy drops an idle
# connection before the upstream does instead of racing it with a new request.
KEEPALIVE_TIMEOUT = 4.0
# How long a request may run before the proxy starts listening for the client's disconnect.
WATCH_AFTER = 0.1

Headers = list[tuple[bytes, bytes]]

_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade"}
)
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# What else says who the client is: only a trusted balancer's pass (as sent), a client's never.
_CLIENT_CLAIMS = frozenset({b"forwarded", b"x-real-ip"})
# Request headers the proxy handles itself: hop-by-hop ones, and those it sets.
_REQUEST_SPECIAL = _HOP_BY_HOP | _FORWARDED | _CLIENT_CLAIMS | {
    b"host",
    b"content-length",
    # uvicorn already answered the client's 100-continue; the upstream gets the body straight away.
    b"expect",
    # CGI upstreams read a "Proxy" header as the HTTP_PROXY variable ("httpoxy").
    b"proxy",
}
# aiohttp writes its own handshake; the client's key and offers are for the client's hop only.
_WEBSOCKET_SPECIAL = _REQUEST_SPECIAL | {
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-protocol",
    b"sec-websocket-extensions",
    b"sec-websocket-accept",
}
# The ASGI server adds its own Date and Server (as nginx does); passing the upstream's would double them.
_RESPONSE_DROP = _HOP_BY_HOP | {b"date", b"server"}
# Response headers naming a URL, rewritten when it is the upstream's so a client stays behind the gateway.
_LOCATIONS = frozenset({b"location", b"content-location"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Headers aiohttp would add on its own: a proxy sends only what the client sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_URL_SAFE = "!$&'()*+,;=:@/?%~-._"
_FORWARDED_PROTO = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_WEBSOCKET_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0)
_BAD_WIRE_CODES = frozenset({1004, 1005, 1006, 1015})
_WEBSOCKET_ENDS = frozenset({aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR})


class Proxy:
    """An ASGI app forwarding http and websocket requests to `upstream`, streaming both ways.

    The upstream's address stays behind it: a Location or Content-Location on the upstream's origin
    comes back path-absolute, and its own error answers name the upstream only in the log.
    """

    def __init__(
        self,
        upstream: str,
        *,
        timeout: float = 60.0,
        max_body: int = DEFAULT_MAX_BODY,
        connect_timeout: float = 5.0,
        trust_forwarded: bool = False,
    ) -> None:
        url = URL(upstream)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"the upstream must be an http:// or https:// URL, not {upstream!r}")
        self.timeout = timeout
        self.max_body = max_body
        self.connect_timeout = connect_timeout
        # Behind a load balancer the client's X-Forwarded-* are the balancer's: appended to, not dropped.
        self.trust_forwarded = trust_forwarded
        # A base path on the upstream ("http://api:8000/v2") prefixes every forwarded path.
        self._base = url.raw_path.rstrip("/")
        self._prefix = str(url.origin()) + self._base
        self.upstream = self._prefix  # for the log only: no credentials, no trailing slash
        self._origin = (url.scheme, url.host.lower(), url.port)
        self._timeouts = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=connect_timeout, sock_read=timeout
        )
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def aclose(self) -> None:
        """Close the upstream connections; a later request opens a new session."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _open(self) -> aiohttp.ClientSession:
        # Created on first use because a session belongs to the running loop.
        self._session = session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=POOL_LIMIT, keepalive_timeout=KEEPALIVE_TIMEOUT),
            # A shared jar would hand one client's cookies to the next; the Cookie header passes as is.
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=self._timeouts,
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
        )
        return session

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- http ---------------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers, length = self._request_headers(scope, _REQUEST_SPECIAL)
        if length > self.max_body:
            await _problem(
                send, 413, "payload-too-large", "Payload Too Large",
                f"The request body of {length} bytes is over the {self.max_body}-byte limit,"
                " so it was not sent upstream.",
            )  # fmt: skip
            return
        message = await receive()
        if message["type"] != "http.request":
            return
        body: bytes = message.get("body", b"")
        task = asyncio.current_task()
        assert task is not None
        call = _Call(task, receive)
        data: bytes | AsyncIterator[bytes] | None
        if message.get("more_body", False):
            data = self._stream_body(call, body)
        elif len(body) > self.max_body:
            await self._too_large(send)
            return
        else:
            data = body or None
            call.watch_soon()
        try:
            await self._exchange(scope, send, call, headers, data)
        except asyncio.CancelledError:
            if not call.gone:
                raise
            call.task.uncancel()
            logger.debug("client left %s %s; upstream request abandoned", scope["method"], scope["path"])
        finally:
            call.finish()

    async def _exchange(
        self,
        scope: Scope,
        send: Send,
        call: _Call,
        headers: list[tuple[str, str]],
        data: bytes | AsyncIterator[bytes] | None,
    ) -> None:
        session = self._session or self._open()
        url = URL(self._target(scope), encoded=True)
        try:
            response = await session.request(
                scope["method"], url, headers=headers, data=data, allow_redirects=False
            )
        except (aiohttp.ClientError, OSError) as exc:  # aiohttp's timeouts are OSErrors too
            await self._failed(send, call, exc)
            return

        complete = False
        try:
            status = response.status
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": _response_headers(response.raw_headers, status, self._relocated),
                }
            )
            # The upstream's Content-Length tells which chunk is the last, saving an empty final message.
            remaining = response.content_length
            if remaining is None or status in (204, 304) or scope["method"] == "HEAD":
                remaining = -1
            content = response.content
            while chunk := await content.readany():
                remaining -= len(chunk)
                if remaining == 0:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            call.done = True
            await send({"type": "http.response.body", "body": chunk, "more_body": False})
            complete = True
        except (aiohttp.ClientError, OSError) as exc:
            # A bare OSError comes from `send`: the client is gone, which is not the upstream's fault.
            if isinstance(exc, aiohttp.ClientError) and not call.gone:
                logger.warning(
                    "%s %s: the upstream %s stopped mid-answer (%s); the response is cut short",
                    scope["method"], scope["path"], self.upstream, _reason(exc),
                )  # fmt: skip
        finally:
            if complete:
                response.release()
            else:
                response.close()

    async def _stream_body(self, call: _Call, first: bytes) -> AsyncIterator[bytes]:
        receive, limit = call.receive, self.max_body
        size = len(first)
        if size > limit:
            call.too_large = True
            raise _Abandon
        if first:
            yield first
        while True:
            message = await receive()
            if message["type"] != "http.request":
                call.gone = True
                raise _Abandon
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                call.too_large = True
                raise _Abandon
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                break
        call.watch_soon()

    async def _failed(self, send: Send, call: _Call, exc: BaseException) -> None:
        """Answer for an upstream request that produced no response."""
        if call.gone:
            return
        if call.too_large:
            await self._too_large(send)
            return
        status, kind, title, detail = self._failure(exc)
        await _problem(send, status, kind, title, detail)

    def _failure(self, exc: BaseException) -> tuple[int, str, str, str]:
        """The answer for a failed upstream request; the log names the upstream, the answer never does."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            status, kind, title = 504, "upstream-timeout", "Gateway Timeout"
            detail = "The upstream did not accept a connection in time."
        elif isinstance(exc, TimeoutError):
            status, kind, title = 504, "upstream-timeout", "Gateway Timeout"
            detail = f"The upstream did not answer within {self.timeout:g} seconds."
        elif isinstance(exc, aiohttp.ServerDisconnectedError):
            status, kind, title = 502, "bad-gateway", "Bad Gateway"
            detail = "The upstream closed the connection without answering."
        else:
            status, kind, title = 502, "bad-gateway", "Bad Gateway"
            detail = "The upstream could not be reached."
        logger.warning("%s from the upstream %s: %s", title, self.upstream, _reason(exc))
        return status, kind, title, detail

    async def _too_large(self, send: Send) -> None:
        await _problem(
            send, 413, "payload-too-large", "Payload Too Large",
            f"The request body grew past the {self.max_body}-byte limit,"
            " so the request upstream was abandoned.",
        )  # fmt: skip

    # -- websocket ----------------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        headers, _ = self._request_headers(scope, _WEBSOCKET_SPECIAL)
        session = self._session or self._open()
        try:
            upstream = await session.ws_connect(
                URL(self._target(scope), encoded=True),
                protocols=scope.get("subprotocols") or (),
                headers=headers,
                timeout=_WEBSOCKET_TIMEOUT,
                max_msg_size=self.max_body,
            )
        except aiohttp.WSServerHandshakeError as exc:
            detail = f"The upstream answered {exc.status} instead of accepting the WebSocket."
            logger.warning("websocket %s refused: the upstream %s answered %s", scope["path"], self.upstream, exc.status)
            await self._refuse(scope, send, 502, "bad-gateway", "Bad Gateway", detail)
            return
        except (aiohttp.ClientError, OSError) as exc:
            await self._refuse(scope, send, *self._failure(exc))
            return

        client_gone = client_closed = False

        async def close_client(code: int, reason: str = "") -> None:
            nonlocal client_closed
            if not (client_gone or client_closed):
                client_closed = True
                await send({"type": "websocket.close", "code": code, "reason": reason})

        async def client_to_upstream() -> None:
            nonlocal client_gone
            while True:
                message = await receive()
                if message["type"] == "websocket.receive":
                    if (text := message.get("text")) is not None:
                        await upstream.send_str(text)
                    else:
                        await upstream.send_bytes(message.get("bytes") or b"")
                elif message["type"] == "websocket.disconnect":
                    client_gone = True
                    code = _wire_code(message.get("code"), 1000)
                    await upstream.close(code=code, message=(message.get("reason") or "").encode())
                    return

        async def upstream_to_client() -> None:
            while True:
                msg = await upstream.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await send({"type": "websocket.send", "text": msg.data})
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    await send({"type": "websocket.send", "bytes": msg.data})
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    await close_client(_wire_code(msg.data, 1000), msg.extra or "")
                    return
                elif msg.type in _WEBSOCKET_ENDS:
                    # CLOSING: the client's close is under way in the other pump. Otherwise the upstream
                    # vanished without a close frame, which to the client is a server error.
                    await close_client(_wire_code(upstream.close_code, 1011))
                    return

        await send({"type": "websocket.accept", "subprotocol": upstream.protocol})
        to_upstream = asyncio.create_task(client_to_upstream())
        to_client = asyncio.create_task(upstream_to_client())
        try:
            await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
            if client_gone:
                # Cancelling it now would cut the close handshake that carries the client's code.
                await asyncio.wait((to_upstream,))
        finally:
            to_upstream.cancel()
            to_client.cancel()
            for outcome in await asyncio.gather(to_upstream, to_client, return_exceptions=True):
                if isinstance(outcome, Exception) and not isinstance(outcome, OSError):
                    logger.warning("websocket %s: %r", scope["path"], outcome)
            await upstream.close()
            with contextlib.suppress(Exception):
                # A pump that failed (the upstream reset mid-send) left the client open.
                await close_client(1011)

    async def _refuse(
        self, scope: Scope, send: Send, status: int, kind: str, title: str, detail: str
    ) -> None:
        if "websocket.http.response" in (scope.get("extensions") or {}):
            start, body = problem_messages(status, problem_body(status, f"urn:gateway:{kind}", title, detail), websocket=True)
            await send(start)
            await send(body)
        else:
            # Without the extension a refusal before accept is a bare 403; 1011 says more.
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1011, "reason": title})

    # -- shared -------------------------------------------------------------------------------------

    def _request_headers(self, scope: Scope, special: frozenset[bytes]) -> tuple[list[tuple[str, str]], int]:
        """The headers to send upstream, and the request's Content-Length (-1 when it has none)."""
        out: list[tuple[str, str]] = []
        length = -1
        host = connection = None
        chain: dict[bytes, bytes] = {}  # the client's X-Forwarded-*, kept only when trusted
        for name, value in scope["headers"]:
            # WSGI and CGI upstreams read "X_Forwarded_For" as X-Forwarded-For: any spelling is special.
            key = spelled(name)
            if key in special or key.startswith(b"proxy-"):
                if name == b"content-length":
                    length = int(value)
                    out.append(("content-length", value.decode("latin-1")))
                elif name == b"host":
                    host = value
                elif name == b"connection":
                    connection = value if connection is None else connection + b"," + value
                elif name in _FORWARDED and self.trust_forwarded:
                    chain[name] = value if name not in chain else chain[name] + b", " + value
                elif name in _CLIENT_CLAIMS and self.trust_forwarded:
                    out.append((name.decode("latin-1"), value.decode("latin-1")))
                continue
            out.append((name.decode("latin-1"), value.decode("latin-1")))
        if connection is not None:
            out = _without_named(out, connection)
        # Added after the hop-by-hop pass: a client's Connection cannot remove them.
        forwarded_for = chain.get(b"x-forwarded-for")
        client = scope.get("client")
        if client:
            address = client[0].encode("latin-1")
            if forwarded_for is None:
                forwarded_for = address
            # A server trusting its own proxy (uvicorn's proxy_headers) already took the client from
            # the list's end; appending it again would name it twice.
            elif forwarded_for.rpartition(b",")[2].strip() != address:
                forwarded_for += b", " + address
        if forwarded_for is not None:
            out.append(("x-forwarded-for", forwarded_for.decode("latin-1")))
        proto = chain.get(b"x-forwarded-proto") or _FORWARDED_PROTO.get(scope.get("scheme", "http"), "http").encode()
        out.append(("x-forwarded-proto", proto.decode("latin-1")))
        forwarded_host = chain.get(b"x-forwarded-host") or host
        if forwarded_host is not None:
            out.append(("x-forwarded-host", forwarded_host.decode("latin-1")))
        return out, length

    def _relocated(self, value: bytes) -> bytes:
        """A URL on the upstream's origin (and under its base path) as a path-absolute reference."""
        try:
            url = urlsplit(value.decode("latin-1").strip())
            scheme = (url.scheme or self._origin[0]).lower()
            port = url.port or _DEFAULT_PORTS.get(scheme)
        except ValueError:  # not a URL we can read: not one we could have written either
            return value
        if not url.netloc or (scheme, (url.hostname or "").lower(), port) != self._origin:
            return value
        path = url.path or "/"
        if self._base and (path == self._base or path.startswith(self._base + "/")):
            path = path[len(self._base) :] or "/"
        # "//host" or "/\host" would be read as another origin: one slash, backslashes encoded.
        path = "/" + path.lstrip("/").replace("\\", "%5C")
        if url.query:
            path += "?" + url.query
        if url.fragment:
            path += "#" + url.fragment
        return path.encode("latin-1")

    def _target(self, scope: Scope) -> str:
        raw = scope.get("raw_path")
        path = _ascii(raw) if raw else quote_from_bytes(scope["path"].encode(), safe=_URL_SAFE)
        query = scope.get("query_string")
        if query:
            return f"{self._prefix}{path}?{_ascii(query)}"
        return self._prefix + path


class _Call:
    """One HTTP request's shared state: the proxying task, the body pump and the disconnect watcher."""

    __slots__ = ("done", "gone", "receive", "task", "timer", "too_large", "watcher")

    def __init__(self, task: asyncio.Task[Any], receive: Receive) -> None:
        self.task = task
        self.receive = receive
        self.gone = False
        self.too_large = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.watcher: asyncio.Task[None] | None = None

    def watch_soon(self) -> None:
        """Once the body is read, arrange to notice http.disconnect while the upstream is slow.

        A watcher task for every request would cost about a fifth of the proxy's time per request,
        and most answers are over before WATCH_AFTER; a client that left earlier is noticed then.
        """
        if not self.done:
            self.timer = self.task.get_loop().call_later(WATCH_AFTER, self._watch_now)

    def _watch_now(self) -> None:
        if not self.done:
            self.watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        message = await self.receive()
        if message["type"] == "http.disconnect" and not self.done:
            self.gone = True
            self.task.cancel()

    def finish(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


class _Abandon(Exception):
    """Raised inside the request body stream to make aiohttp drop the upstream request."""


def _response_headers(
    raw: Iterable[tuple[bytes, bytes]], status: int, relocated: Callable[[bytes], bytes]
) -> Headers:
    out: Headers = []
    connection = None
    for name, value in raw:
        name = name.lower()
        if name in _RESPONSE_DROP or name.startswith(b"proxy-"):
            if name == b"connection":
                connection = value
            continue
        if name in _LOCATIONS:
            value = relocated(value)
        out.append((name, value))
    if connection is not None:
        named = _connection_tokens(connection)
        out = [(name, value) for name, value in out if name.decode("latin-1") not in named]
    if status in (204, 304):
        # uvicorn would wait for that many body bytes, which these statuses never have.
        out = [(name, value) for name, value in out if name != b"content-length"]
    return out


def _without_named(headers: list[tuple[str, str]], connection: bytes) -> list[tuple[str, str]]:
    named = _connection_tokens(connection)
    return [(name, value) for name, value in headers if name not in named]


def _connection_tokens(value: bytes) -> set[str]:
    return {token.strip().lower() for token in value.decode("latin-1").split(",")}


def _ascii(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return quote_from_bytes(raw, safe=_URL_SAFE)


def _wire_code(code: int | None, default: int) -> int:
    """A close code that may be sent in a close frame (1005, 1006 and 1015 only describe one)."""
    if code is None or code < 1000 or code >= 5000 or code in _BAD_WIRE_CODES:
        return default
    return code


def _reason(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        # asyncio's "Connect call failed (...)" hides the errno's own words ("Connection refused").
        if error.errno and error.errno > 0:
            return os.strerror(error.errno)
        return error.strerror or str(error) or type(error).__name__
    return str(exc) or type(exc).__name__


async def _problem(send: Send, status: int, kind: str, title: str, detail: str) -> None:
    start, body = problem_messages(status, problem_body(status, f"urn:gateway:{kind}", title, detail))
    await send(start)
    await send(body)
