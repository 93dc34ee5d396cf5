"""BENCH_OVERRIDES=1: every bench billable (key1 ... key<BENCH_KEYS>) gets per-billable overrides at start-up,
so the gateway lines of ../shared/bench measure deciding with overrides present against none."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.engine import Engine
from gateway.overrides import Overrides

ASGI = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
TERMS = Overrides.model_validate(
    {"limits": {"hellos": {"to": 2_000_000_000}}, "rate_limit": "2000000/minute", "credits": 2_000_000_000, "reason": "bench"}
)


def wanted() -> bool:
    return os.environ.get("BENCH_OVERRIDES") == "1"


async def override_every_key(engine: Engine) -> None:
    for i in range(1, int(os.environ.get("BENCH_KEYS", "1000")) + 1):
        await engine.set_overrides(f"key{i}", TERMS)


def on_startup(app: ASGI, engine: Callable[[], Engine]) -> ASGI:
    """`app` whose lifespan startup completes only once every bench billable has its overrides."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                await override_every_key(engine())
            await send(message)

        await app(scope, receive, sending)

    return wrapped
