"""Waiting in tests: poll a condition until it holds, with a deadline, instead of sleeping and hoping.

    wait_until(lambda: server.ready(), "the server to start")                 from a test's own thread
    await until(lambda: keys.seen > 0, "the feed to answer")                  inside an event loop
    status = await until(settled, "the settle to land")                       the condition's value is returned

The condition is checked once more after the deadline, so a slow machine only costs time, never a wrong
failure while the condition holds. Deadlines are generous (seconds): they bound a broken test, they do not
measure anything.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

TIMEOUT_S = 10.0


def wait_until(check: Callable[[], T], what: str, timeout: float = TIMEOUT_S, interval: float = 0.02) -> T:
    """Call `check` until it returns something true (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


async def until(
    check: Callable[[], T | Awaitable[T]], what: str, timeout: float = TIMEOUT_S, interval: float = 0.02
) -> T:
    """`wait_until` inside an event loop: `check` may be a plain function or a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)
