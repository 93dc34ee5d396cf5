"""GuardedProtocol in process (gateway/serving.py): the deadlines uvicorn lacks, over real sockets, with 1 s
deadlines. A slow client is cut off; a slow app, a client waiting for its 100 Continue, and a body that keeps
arriving are not."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.server import bind
from gateway.serving import serving
from gateway.settings import Settings

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds

SETTINGS = Settings(header_timeout=1.0, body_timeout=1.0)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body (after `?wait=S` seconds) and answers its length."""
    wait = float(dict(part.split("=") for part in scope["query_string"].decode().split("&") if part).get("wait", 0))
    await asyncio.sleep(wait)
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def exchange(port: int, steps: list[bytes | float]) -> tuple[bytes, float]:
    """Send each bytes step, sleep each float step, then read until the server closes (or 10 s): what it sent
    and when it closed, from the connection's opening."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = time.monotonic()
    for step in steps:
        if isinstance(step, float):
            await asyncio.sleep(step)
        else:
            writer.write(step)
    got = b""
    try:
        async with asyncio.timeout(10):
            while chunk := await reader.read(4096):
                got += chunk
    except TimeoutError:
        pass
    writer.close()
    return got, time.monotonic() - opened


def run(*steps: bytes | float) -> tuple[bytes, float]:
    async def main() -> tuple[bytes, float]:
        sock = bind("127.0.0.1", 0)
        async with serving(app, sock, SETTINGS, drain=1.0):
            return await exchange(sock.getsockname()[1], list(steps))

    return asyncio.run(main())


def test_headers_that_do_not_come_in_time_get_408_and_the_connection_closes() -> None:
    """Headers trickling in past the deadline: 408 and closed about a second after the connection opened."""
    got, took = run(b"GET / HTTP/1.1\r\n", 0.4, b"Host: a\r\n", 0.4, b"X-A: 1\r\n", 0.4, b"X-B: 1\r\n")
    assert got.startswith(b"HTTP/1.1 408 ") and 0.9 <= took < 5


def test_a_connection_that_sends_nothing_is_closed() -> None:
    """A connection opened and left silent is closed at the header deadline, with a 408."""
    got, took = run()
    assert got.startswith(b"HTTP/1.1 408 ") and 0.9 <= took < 5


def test_a_body_that_stops_arriving_is_cut_off() -> None:
    """Headers in time, then 10 of 1000 bytes and silence: the connection is closed about a second later."""
    got, took = run(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    assert got == b"" and 0.9 <= took < 5


def test_a_body_that_keeps_arriving_and_a_slow_app_are_served() -> None:
    """A body sent in pieces 0.4 s apart (never idle for the deadline), and an app slower than both deadlines: 200."""
    pieces: list[bytes | float] = [b"POST /?wait=1.5 HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nConnection: close\r\n\r\n"]
    for _ in range(4):
        pieces += [0.4, b"x" * 10]
    got, _ = run(*pieces)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\n40")


def test_a_client_waiting_for_100_continue_is_not_idle() -> None:
    """Expect: 100-continue, and an app that asks for the body after 1.5 s: the client waits for the 100 (not idle
    on its part), then sends the body and gets its answer."""

    async def main() -> bytes:
        sock = bind("127.0.0.1", 0)
        async with serving(app, sock, SETTINGS, drain=1.0):
            reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            writer.write(b"POST /?wait=1.5 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                         b"Connection: close\r\n\r\n")
            async with asyncio.timeout(10):
                interim = await reader.readuntil(b"\r\n\r\n")
                assert interim.startswith(b"HTTP/1.1 100 ")
                writer.write(b"hello")
                answer = await reader.read()
            writer.close()
            return answer

    assert asyncio.run(main()).startswith(b"HTTP/1.1 200 ")
