"""Helpers for engine tests: an engine over a chosen backend with a private key prefix."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from services import raw_redis

from gateway.catalog import Catalog, parse_catalog
from gateway.decision import Decision
from gateway.engine import Engine
from gateway.problems import problem_messages
from gateway.store.redis import RedisStore, open_redis

T = TypeVar("T")

BASE = """
[catalog]
default_plan = "free"
highlighted_plan = "pro"
upgrade_url = "https://example.com/pricing"

[features]
api_access = "API access"
hd = "HD images"

[operations.image]
cost = 5

[operations.chat]
per_unit = 1
units = "response.json:usage.total_tokens"
reserve = 100
max_units = 1000

[operations.priced]
per_unit = 2
units = "request.json:n"

[plans.free]
price = 0
allows = ["api_access"]
credits = 10
limits.projects = { to = 2 }
limits.exports = { to = 3, per = "month", after_limit = "grace_then_block", grace = "1h", warn_at = [0.5, 0.9] }
limits.reports = { to = 2, per = "day", after_limit = "just_warn" }
limits.zero = { to = 0 }

[plans.pro]
price = 29
allows = ["api_access", "hd"]
credits = 1000
limits.projects = { to = 25 }
limits.exports = { to = 100, per = "month" }
limits.reports = { to = 50, per = "day" }
limits.zero = { to = 0 }

[plans.enterprise]
price_string = "Contact"
allows = ["api_access", "hd"]
unlimited = ["projects", "exports", "credits"]
limits.reports = { to = 5, per = "day" }

[[routes]]
match = "POST /images"
features = ["api_access", "hd"]
spend = "image"

[[routes]]
match = "POST /cheap-images"
features = ["api_access"]
spend = "image"

[[routes]]
match = "POST /chat"
features = ["api_access"]
spend = "chat"

[[routes]]
match = "POST /priced"
spend = "priced"

[[routes]]
match = "POST /projects"
features = ["api_access"]
limit = "projects"

[[routes]]
match = "POST /big-projects"
limit = "projects"
cost = 3

[[routes]]
match = "DELETE /projects/{id}"
release = "projects"

[[routes]]
match = "POST /exports"
limit = "exports"

[[routes]]
match = "POST /reports"
limit = "reports"

[[routes]]
match = "POST /zero"
limit = "zero"

[[routes]]
match = "GET /limited"
rate_limit = "2/minute"

[[routes]]
match = "* /*"
"""


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


class Harness:
    """An engine on one backend, with a fresh prefix so tests never share keys."""

    def __init__(self, store: RedisStore, catalog: Catalog, prefix: str, raw: Any) -> None:
        self.store = store
        self.raw = raw  # a redis-py client of the same Redis, to look at and change it from outside
        self.catalog = catalog
        self.prefix = prefix
        self.engine = Engine(store, catalog, prefix=prefix)

    def other_engine(self, **kw: Any) -> Engine:
        """A second engine on the same Redis: another gateway process with its own caches (`kw`: Engine's)."""
        return Engine(self.store, self.catalog, prefix=self.prefix, **kw)

    async def decide(self, billable: str, method: str, path: str, *, engine: Engine | None = None, **kw: Any) -> Decision:
        route = self.catalog.route_for(method, path)
        return await (engine or self.engine).decide(billable, route, **kw)

    async def field(self, billable: str, name: str) -> str | None:
        value = await self.raw.hget(self.engine.keys(billable)[0], name)
        return value.decode() if isinstance(value, bytes) else value

    async def set_field(self, billable: str, name: str, value: str | int) -> None:
        """Test-only time travel: move a stored instant, as if it happened earlier."""
        await self.raw.hset(self.engine.keys(billable)[0], name, value)

    async def cleanup(self) -> None:
        async for key in self.store.scan(f"{self.prefix}:*"):
            await self.raw.delete(key)


@contextmanager
def harness(url: str | None, catalog_text: str = BASE) -> Iterator[Callable[[Callable[[Harness], Awaitable[T]]], T]]:
    """Yields `go(fn)`, which runs `fn(harness)` in a fresh event loop against `url`."""
    catalog = parse_catalog(catalog_text)
    prefix = f"gwt{uuid.uuid4().hex[:10]}"

    def go(fn: Callable[[Harness], Awaitable[T]]) -> T:
        async def main() -> T:
            store = open_redis(url)
            h = Harness(store, catalog, prefix, raw_redis(url))
            try:
                return await fn(h)
            finally:
                if url is not None:
                    await h.cleanup()
                await store.close()
                await h.raw.aclose()

        return asyncio.run(main())

    yield go


def body(decision: Decision, catalog: Catalog) -> dict[str, Any]:
    # Through the one builder, as the middleware sends it.
    parsed: dict[str, Any] = json.loads(problem_messages(decision.status, decision.problem(catalog))[1]["body"])
    return parsed


def headers(decision: Decision) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in decision.headers()}
