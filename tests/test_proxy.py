from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from gateway.proxy import Proxy
from tests.http_servers import Record, closed_port, serve_in_thread, upstream_app

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds


@pytest.fixture
def upstream() -> Iterator[tuple[str, Record]]:
    record = Record()
    with serve_in_thread(upstream_app(record)) as url:
        yield url, record


@pytest.fixture
def proxy_url(upstream: tuple[str, Record]) -> Iterator[str]:
    with serve_in_thread(Proxy(upstream[0])) as url:
        yield url


def header_values(echoed: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echoed["headers"] if k == name]


def test_get_forwards_method_path_and_raw_query(proxy_url: str) -> None:
    """A GET reaches the upstream with its method, percent-encoded path and query string byte for byte."""
    response = httpx.get(f"{proxy_url}/echo/a%2Fb/c%7e?x=1&y=%20&y=2&flag")
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["method"] == "GET"
    assert echoed["raw_path"] == "/echo/a%2Fb/c%7e"
    assert echoed["query"] == "x=1&y=%20&y=2&flag"
    assert echoed["body"] == ""
    assert not header_values(echoed, "content-length")


def test_post_forwards_body_headers_and_status(upstream: tuple[str, Record], proxy_url: str) -> None:
    """A POST's body and headers (repeated ones too) reach the upstream, and its status comes back."""
    response = httpx.post(
        f"{proxy_url}/echo/items?status=201",
        content=b"hello body",
        headers=[("x-custom", "1"), ("x-multi", "a"), ("x-multi", "b"), ("content-type", "text/plain")],
    )
    assert response.status_code == 201
    echoed = response.json()
    assert echoed["method"] == "POST"
    assert echoed["body"] == "hello body"
    assert header_values(echoed, "x-custom") == ["1"]
    assert header_values(echoed, "x-multi") == ["a", "b"]
    assert header_values(echoed, "content-type") == ["text/plain"]
    assert header_values(echoed, "content-length") == ["10"]
    assert header_values(echoed, "host") == [upstream[0].removeprefix("http://")]
    assert header_values(echoed, "user-agent") == [response.request.headers["user-agent"]]


def test_no_auto_headers_added(proxy_url: str) -> None:
    """The proxy adds no User-Agent, Accept or Accept-Encoding of its own to a bare request."""
    with httpx.Client() as client:
        request = client.build_request("POST", f"{proxy_url}/echo/bare", content=b"x")
        for name in ("user-agent", "accept", "accept-encoding"):
            del request.headers[name]
        echoed = client.send(request).json()
    names = {name for name, _ in echoed["headers"]}
    assert not names & {"user-agent", "accept", "accept-encoding", "content-type"}


def test_large_upload_is_streamed(upstream: tuple[str, Record], proxy_url: str) -> None:
    """An 8 MB chunked upload arrives intact, its start reaching the upstream before the rest is sent."""
    record = upstream[1]
    part = bytes(range(256)) * 256  # 64 KiB
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        yield part
        digest.update(part)
        # A proxy that buffered the body would never let the upstream see this first part.
        assert record.upload_started.wait(5), "the upstream did not see the start of the body"
        for _ in range(127):
            digest.update(part)
            yield part

    response = httpx.post(f"{proxy_url}/upload", content=body(), timeout=30)
    assert response.status_code == 200
    assert response.json()["size"] == 128 * len(part)
    assert response.json()["sha256"] == digest.hexdigest()

    # The same body with a Content-Length arrives in pieces too, and is passed on in pieces.
    response = httpx.post(f"{proxy_url}/upload", content=part * 128, timeout=30)
    assert response.json()["sha256"] == digest.hexdigest()
    assert response.json()["chunks"] > 1


def test_server_sent_events_are_streamed(proxy_url: str) -> None:
    """The first server-sent event reaches the client while the upstream is still writing the next one."""
    started = time.monotonic()
    with httpx.stream("GET", f"{proxy_url}/sse", timeout=5) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = response.iter_bytes()
        first = next(chunks)
        first_at = time.monotonic() - started
        rest = b"".join(chunks)
    assert first.startswith(b"data: one")
    assert first_at < 0.5
    assert b"data: two" in first + rest
    assert time.monotonic() - started >= 0.9


def test_repeated_set_cookie_headers_are_kept(proxy_url: str) -> None:
    """Two Set-Cookie headers from the upstream reach the client as two headers."""
    response = httpx.get(f"{proxy_url}/cookies")
    cookies = response.headers.get_list("set-cookie")
    assert len(cookies) == 2
    assert cookies[0].startswith("session=s3cr3t")
    assert cookies[1].startswith("theme=dark")


def test_cookies_are_never_shared_between_clients(proxy_url: str) -> None:
    """A cookie set in one client's answer is never sent upstream on another client's request."""
    assert httpx.get(f"{proxy_url}/cookies").headers.get_list("set-cookie")
    echoed = httpx.get(f"{proxy_url}/echo/other").json()
    assert header_values(echoed, "cookie") == []
    echoed = httpx.get(f"{proxy_url}/echo/mine", headers={"cookie": "mine=1"}).json()
    assert header_values(echoed, "cookie") == ["mine=1"]


def test_hop_by_hop_headers_are_dropped_both_ways(proxy_url: str) -> None:
    """Connection, the headers it names, Keep-Alive, Proxy-*, TE and Trailer go neither up nor down."""
    echoed = httpx.get(
        f"{proxy_url}/echo/hop",
        headers={
            "connection": "keep-alive, x-drop-me",
            "x-drop-me": "1",
            "keep-alive": "timeout=5",
            "proxy-authorization": "Basic eDp5",
            "te": "trailers",
            "trailer": "x-checksum",
            "x-end-to-end": "kept",
        },
    ).json()
    names = {name for name, _ in echoed["headers"]}
    assert not names & {"x-drop-me", "keep-alive", "proxy-authorization", "te", "trailer"}
    assert header_values(echoed, "connection") in ([], ["keep-alive"])  # aiohttp's own, at most
    assert header_values(echoed, "x-end-to-end") == ["kept"]

    response = httpx.get(f"{proxy_url}/hop")
    assert response.text == "hop"
    for name in ("x-hop-named", "keep-alive", "proxy-authenticate", "trailer"):
        assert name not in response.headers
    assert response.headers["x-end-to-end"] == "kept"
    assert len(response.headers.get_list("date")) == 1
    assert len(response.headers.get_list("server")) == 1


def test_forwarded_headers(upstream: tuple[str, Record]) -> None:
    """X-Forwarded-For, -Proto and -Host describe the client's connection: what the client sent is dropped."""
    sent = {"x-forwarded-for": "10.0.0.1", "x-forwarded-proto": "https", "x-forwarded-host": "evil"}
    with serve_in_thread(Proxy(upstream[0]), proxy_headers=False) as url:
        echoed = httpx.get(f"{url}/echo/fwd", headers=sent).json()
    assert header_values(echoed, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(echoed, "x-forwarded-proto") == ["http"]
    assert header_values(echoed, "x-forwarded-host") == [url.removeprefix("http://")]


def test_forwarded_headers_trusted(upstream: tuple[str, Record]) -> None:
    """With trust_forwarded the client's chain gets the client appended, and its -Proto and -Host are kept."""
    sent = {"x-forwarded-for": "10.0.0.1", "x-forwarded-proto": "https", "x-forwarded-host": "api.example"}
    with serve_in_thread(Proxy(upstream[0], trust_forwarded=True), proxy_headers=False) as url:
        echoed = httpx.get(f"{url}/echo/fwd", headers=sent).json()
    assert header_values(echoed, "x-forwarded-for") == ["10.0.0.1, 127.0.0.1"]
    assert header_values(echoed, "x-forwarded-proto") == ["https"]
    assert header_values(echoed, "x-forwarded-host") == ["api.example"]


def test_forwarded_for_behind_a_trusted_proxy(proxy_url: str) -> None:
    """Behind a proxy uvicorn trusts (loopback, by default) the client it resolved is not named twice."""
    sent = {"x-forwarded-for": "10.0.0.1", "x-forwarded-proto": "https"}
    echoed = httpx.get(f"{proxy_url}/echo/fwd", headers=sent).json()
    assert header_values(echoed, "x-forwarded-for") == ["10.0.0.1"]
    assert header_values(echoed, "x-forwarded-proto") == ["https"]


def test_scope_headers_are_forwarded_as_a_wrapper_left_them(upstream: tuple[str, Record]) -> None:
    """A wrapper that rewrites scope["headers"] decides what the upstream gets."""
    proxy = Proxy(upstream[0])

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k != b"x-billable-id"]
            scope = {**scope, "headers": [*headers, (b"x-billable-id", b"org_1"), (b"x-plan", b"pro")]}
        await proxy(scope, receive, send)

    with serve_in_thread(wrapper) as url:
        echoed = httpx.get(f"{url}/echo/w", headers={"x-billable-id": "forged"}).json()
    assert header_values(echoed, "x-billable-id") == ["org_1"]
    assert header_values(echoed, "x-plan") == ["pro"]


def test_413_by_content_length_before_contacting_upstream(upstream: tuple[str, Record]) -> None:
    """A Content-Length over the limit gets a 413 problem and the upstream never hears of it."""
    with serve_in_thread(Proxy(upstream[0], max_body=1000)) as url:
        response = httpx.post(f"{url}/echo/big", content=b"x" * 2000)
        assert httpx.post(f"{url}/echo/small", content=b"x" * 1000).status_code == 200
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:gateway:payload-too-large"
    assert problem["status"] == 413
    assert problem["title"]
    assert upstream[0].removeprefix("http://") not in problem["detail"]  # the log names it, the answer never
    assert "2000" in problem["detail"]
    assert upstream[1].paths == ["/echo/small"]


def test_413_by_a_growing_chunked_body(upstream: tuple[str, Record]) -> None:
    """A chunked body that grows past the limit gets a 413 and the upstream request is abandoned."""

    def body() -> Iterator[bytes]:
        for _ in range(10):
            yield b"y" * 200
            time.sleep(0.02)

    with serve_in_thread(Proxy(upstream[0], max_body=1000)) as url:
        response = httpx.post(f"{url}/upload", content=body())
    assert response.status_code == 413
    assert response.json()["type"] == "urn:gateway:payload-too-large"
    assert upstream[0].removeprefix("http://") not in response.json()["detail"]
    assert upstream[1].uploads_completed == 0


def test_504_when_the_upstream_is_slow(upstream: tuple[str, Record]) -> None:
    """No answer within the timeout is a 504 problem, without the upstream's address."""
    with serve_in_thread(Proxy(upstream[0], timeout=0.5)) as url:
        started = time.monotonic()
        response = httpx.get(f"{url}/slow", timeout=5)
        elapsed = time.monotonic() - started
    assert response.status_code == 504
    problem = response.json()
    assert problem["type"] == "urn:gateway:upstream-timeout"
    assert upstream[0].removeprefix("http://") not in problem["detail"]
    assert "0.5 seconds" in problem["detail"]
    assert 0.4 < elapsed < 1.5


def test_502_when_the_upstream_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    """A closed port is a 502 problem; the log names the upstream, the answer does not."""
    target = f"http://127.0.0.1:{closed_port()}"
    with caplog.at_level(logging.WARNING, logger="gateway.proxy"), serve_in_thread(Proxy(target)) as url:
        response = httpx.get(f"{url}/anything")
    assert any(target in record.getMessage() for record in caplog.records)
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:gateway:bad-gateway"
    assert target.removeprefix("http://") not in problem["detail"]


@pytest.mark.parametrize("query", ["", "?chunked=1"])
def test_upstream_dying_mid_stream_truncates_the_answer(proxy_url: str, query: str) -> None:
    """An upstream that dies mid-answer leaves the client with a cut-short body, not a clean end."""
    with httpx.stream("GET", f"{proxy_url}/die{query}") as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()


def test_client_disconnect_mid_stream_cancels_upstream(upstream: tuple[str, Record], proxy_url: str) -> None:
    """A client that leaves mid-stream makes the proxy drop the upstream stream at once."""
    with httpx.stream("GET", f"{proxy_url}/forever") as response:
        assert next(response.iter_bytes()).startswith(b"tick")
    assert upstream[1].stream_cancelled.wait(2)


def test_client_disconnect_while_waiting_cancels_upstream(
    upstream: tuple[str, Record], proxy_url: str
) -> None:
    """A client that gives up before the upstream answered makes the proxy drop the upstream request."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{proxy_url}/hang", timeout=0.3)
    assert upstream[1].hang_disconnected.wait(2)


def test_websocket_echo_and_close_codes(upstream: tuple[str, Record], proxy_url: str) -> None:
    """Text and bytes cross with path, query and subprotocol intact, and close codes cross both ways."""
    ws_url = proxy_url.replace("http://", "ws://")
    with connect(f"{ws_url}/ws/echo?room=1", subprotocols=["chat"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"
        ws.send("hello")
        assert ws.recv(timeout=2) == "hello"
        ws.send(b"\x00\x01\x02")
        assert ws.recv(timeout=2) == b"\x00\x01\x02"
        ws.send("whoami")
        seen = json.loads(ws.recv(timeout=2))
        assert seen["path"] == "/ws/echo"
        assert seen["query"] == "room=1"
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert seen["headers"]["host"] == upstream[0].removeprefix("http://")
        ws.close(code=4002)
    assert upstream[1].ws_closed.wait(2)
    assert upstream[1].ws_close_codes == [4002]

    with connect(f"{ws_url}/ws/echo") as ws:
        ws.send("close-4001")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=2)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4001


def test_refused_upstream_websocket_is_a_502(proxy_url: str) -> None:
    """An upstream refusing the WebSocket handshake makes the proxy refuse the client with a 502 problem."""
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{proxy_url.replace('http://', 'ws://')}/ws/refuse")
    assert refused.value.response.status_code == 502
    assert json.loads(refused.value.response.body or b"")["type"] == "urn:gateway:bad-gateway"


# -- raw ASGI: the messages a wrapping middleware sees ---------------------------------------------


def http_scope(path: str, method: str = "GET") -> Scope:
    raw, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": raw,
        "raw_path": raw.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"gateway.test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


async def run_http(
    proxy: Proxy, path: str, disconnect_after: float | None = None, close: bool = True
) -> list[Message]:
    """Call the proxy like a server would; the client disconnects after `disconnect_after` seconds."""
    sent: list[Message] = []
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        if requests:
            return requests.pop()
        if disconnect_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(disconnect_after or 0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    try:
        await proxy(http_scope(path), receive, send)
    finally:
        if close:
            await proxy.aclose()
    return sent


def assert_one_start_then_bodies(sent: list[Message]) -> None:
    assert [m["type"] for m in sent[:1]] == ["http.response.start"]
    assert all(m["type"] == "http.response.body" for m in sent[1:])
    assert all(m.get("more_body", False) for m in sent[1:-1])
    assert sent[-1]["type"] == "http.response.body"
    assert sent[-1]["more_body"] is False


def test_asgi_messages_for_a_streamed_answer(upstream: tuple[str, Record]) -> None:
    """A streamed answer is one start, bodies with more_body=True, and one final more_body=False."""
    sent = asyncio.run(run_http(Proxy(upstream[0]), "/chunks"))
    assert_one_start_then_bodies(sent)
    assert len(sent) >= 3
    assert b"".join(m["body"] for m in sent[1:]) == b"a" * 10 + b"b" * 10 + b"c" * 10


def test_asgi_messages_for_a_sized_answer(upstream: tuple[str, Record]) -> None:
    """An answer with a Content-Length ends with a final message that carries its last bytes."""
    sent = asyncio.run(run_http(Proxy(upstream[0]), "/echo/sized?q=1"))
    assert_one_start_then_bodies(sent)
    body = b"".join(m["body"] for m in sent[1:])
    assert sent[-1]["body"]
    assert json.loads(body)["query"] == "q=1"
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(body)).encode()


def test_asgi_messages_for_a_proxy_error() -> None:
    """A 502 the proxy makes itself is one start and one final body."""
    sent = asyncio.run(run_http(Proxy(f"http://127.0.0.1:{closed_port()}"), "/x"))
    assert_one_start_then_bodies(sent)
    assert sent[0]["status"] == 502
    assert len(sent) == 2


def test_asgi_upstream_dying_mid_stream_sends_no_final_message(upstream: tuple[str, Record]) -> None:
    """An upstream dying mid-answer ends the call with no final more_body=False message, raising nothing."""
    for path in ("/die", "/die?chunked=1"):
        sent = asyncio.run(run_http(Proxy(upstream[0]), path))
        assert sent[0]["type"] == "http.response.start"
        assert sent[0]["status"] == 200
        assert sent[1:]
        assert all(m["more_body"] is True for m in sent[1:])


def test_asgi_disconnect_while_waiting_returns_promptly(upstream: tuple[str, Record]) -> None:
    """An http.disconnect while the upstream has not answered ends the call at once, with nothing sent."""
    started = time.monotonic()
    sent = asyncio.run(run_http(Proxy(upstream[0]), "/hang", disconnect_after=0.2))
    assert sent == []
    assert time.monotonic() - started < 1.5
    assert upstream[1].hang_disconnected.wait(2)


def test_asgi_refused_websocket_without_the_response_extension_closes_1011(
    upstream: tuple[str, Record],
) -> None:
    """Without the websocket.http.response extension, a refused upstream WebSocket becomes a 1011 close."""
    sent: list[Message] = []

    async def main() -> None:
        proxy = Proxy(upstream[0])
        incoming = [{"type": "websocket.connect"}]

        async def receive() -> Message:
            if incoming:
                return incoming.pop()
            await asyncio.Event().wait()
            raise AssertionError

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {**http_scope("/ws/refuse"), "type": "websocket", "scheme": "ws", "subprotocols": []}
        del scope["method"]
        try:
            await proxy(scope, receive, send)
        finally:
            await proxy.aclose()

    asyncio.run(main())
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert sent[1]["code"] == 1011


def test_lifespan_is_answered_and_closes_the_session(upstream: tuple[str, Record]) -> None:
    """The proxy answers lifespan startup and shutdown itself, closing its upstream session."""

    async def main() -> list[str]:
        proxy = Proxy(upstream[0])
        incoming = [{"type": "lifespan.shutdown"}, {"type": "lifespan.startup"}]
        sent: list[str] = []

        async def receive() -> Message:
            if len(incoming) == 1:  # between startup and shutdown: serve a request
                sent.append(str(await run_http(proxy, "/echo/in-between", close=False)))
            return incoming.pop()

        async def send(message: Message) -> None:
            sent.append(message["type"])

        await proxy({"type": "lifespan"}, receive, send)
        assert proxy._session is None
        return sent

    sent = asyncio.run(main())
    assert sent[0] == "lifespan.startup.complete"
    assert "in-between" in sent[1]
    assert sent[2] == "lifespan.shutdown.complete"


def test_head_passes_through(proxy_url: str) -> None:
    """A HEAD gets the upstream's status and headers, Content-Length included, and no body."""
    response = httpx.head(f"{proxy_url}/echo/head")
    assert response.status_code == 200
    assert int(response.headers["content-length"]) > 0
    assert response.content == b""


def test_asgi_client_leaving_mid_upload_abandons_the_upstream_request(upstream: tuple[str, Record]) -> None:
    """A client leaving mid-upload ends the call with nothing sent and the upstream request abandoned."""
    sent: list[Message] = []

    async def main() -> None:
        proxy = Proxy(upstream[0])
        incoming: list[Message] = [
            {"type": "http.disconnect"},
            {"type": "http.request", "body": b"z" * 100, "more_body": True},
        ]

        async def receive() -> Message:
            if len(incoming) == 1:
                await asyncio.sleep(0.2)
            return incoming.pop()

        async def send(message: Message) -> None:
            sent.append(message)

        try:
            await proxy(http_scope("/upload", method="POST"), receive, send)
        finally:
            await proxy.aclose()

    asyncio.run(main())
    assert sent == []
    assert upstream[1].upload_started.wait(2)
    assert upstream[1].uploads_completed == 0
