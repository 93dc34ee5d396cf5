"""Billing tests' harness: the fake Stripe under uvicorn, and a gateway's billing over it.

One fake Stripe serves a whole test module (`stripe_server`); each test builds its own record (a SQLite
file, or Postgres: `empty_db_url`), an engine on the shared Redis under the test's own prefix (`redis_space`),
and `Billing` with the real StripeClient pointed at the fake. Webhooks go through the real endpoints over an
in-process ASGI client.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa
from fake_stripe import FakeStripe, sign
from http_servers import serve_in_thread
from services import RedisSpace
from starlette.requests import Request

from gateway.admin import Endpoints
from gateway.billing import Billing
from gateway.billing.sync import PriceBook
from gateway.catalog import Catalog, parse_catalog
from gateway.engine import Engine
from gateway.grants import Grants
from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store.db import Database, events_outbox
from gateway.store.redis import RedisStore
from gateway.web.pricing import pricing_route

SECRET = "whsec_test_secret"
ADMIN = "admin-token-for-tests"

CATALOG = """
[catalog]
default_plan = "free"
highlighted_plan = "pro"
upgrade_url = "https://example.com/pricing"
past_due_grace = "3d"
credits_per_dollar = 100
currency = "usd"
auto_recharge_max_per_month = 10

[features]
api_access = "API access"
hd = "HD images"

[operations.image]
cost = 10

[plans.free]
name = "Free"
description = "Enough to start."
price = 0
bullets = ["1 project", "100 credits a month"]
allows = ["api_access"]
credits = 100
limits.projects = { to = 1 }

[plans.pro]
name = "Pro"
description = "For growing teams."
stripe_price = "pro_monthly"
price = 29
bullets = ["HD images", "25 projects", "1,000 credits per billing period"]
allows = ["api_access", "hd"]
credits = 1000
credits_per = "billing_cycle"
limits.projects = { to = 25 }

[plans.scale]
name = "Scale"
stripe_price = { month = "scale_monthly", year = "scale_yearly" }
price = 99
price_yearly = 990
allows = ["api_access", "hd"]
credits = 5000
credits_per = "billing_cycle"
limits.projects = { to = 100 }

[plans.enterprise]
price_string = "Contact"
allows = ["api_access", "hd"]
unlimited = ["projects", "credits"]

[packs.starter]
credits = 1000
bonus = 100
price = 9

[[routes]]
match = "POST /images"
features = ["api_access"]
spend = "image"

[[routes]]
match = "POST /projects"
features = ["api_access"]
limit = "projects"
"""


def catalog() -> Catalog:
    return parse_catalog(CATALOG)


@contextmanager
def stripe_server() -> Iterator[tuple[FakeStripe, str]]:
    fake = FakeStripe()
    with serve_in_thread(fake.app()) as url:
        yield fake, url


class Clock:
    """The engine's clock, movable (Redis TIME still decides windows; this decides past_due grace)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Env:
    fake: FakeStripe
    api_base: str
    db: Database
    engine: Engine
    grants: Grants
    billing: Billing
    http: httpx.AsyncClient
    clock: Clock
    store: RedisStore

    def billable(self) -> str:
        return f"org-{uuid.uuid4().hex[:10]}"

    async def deliver(self, event: dict[str, Any], *, secret: str = SECRET, timestamp: int | None = None,
                      body: str | None = None) -> httpx.Response:
        payload = body if body is not None else json.dumps(event)
        headers = {"Stripe-Signature": sign(payload, secret, timestamp), "Content-Type": "application/json"}
        return await self.http.post("/_gateway/stripe/webhook", content=payload.encode(), headers=headers)

    async def admin(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return await self.http.request(method, path, json=body, headers={"Authorization": f"Bearer {ADMIN}"})

    async def link(self, billable: str, customer: str | None = None) -> str:
        r = await self.admin("PUT", f"/_gateway/admin/billables/{billable}/stripe-customer",
                             {"customer": customer} if customer else None)
        assert r.status_code == 200, r.text
        return str(r.json()["customer"])

    async def status(self, billable: str) -> dict[str, Any]:
        return await self.engine.status(billable)

    async def outbox(self, billable: str) -> list[str]:
        async with self.db.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(events_outbox.c.type).where(events_outbox.c.billable == billable).order_by(events_outbox.c.created_at)
            )
            return [r[0] for r in rows]

    async def decide(self, billable: str, match: str) -> Any:
        route = next(r for r in self.engine.catalog.routes if r.match == match)
        return await self.engine.decide(billable, route)


@asynccontextmanager
async def billing_env(
    fake: FakeStripe,
    api_base: str,
    db_url: str,
    redis: RedisSpace,
    *,
    recharge_delays: tuple[float, ...] = (0.05, 0.05),
    store: RedisStore | None = None,
    upgrade: bool = True,
) -> AsyncIterator[Env]:
    """A gateway's billing over the record at `db_url` and the Redis of `redis` (or `store`, on its prefix)."""
    settings = Settings(
        stripe_api_key="sk_test_fake", stripe_webhook_secret=SECRET, stripe_api_base=api_base, admin_token=ADMIN
    )
    db = await Database.connect(db_url)
    if upgrade:
        await db.upgrade()
    clock = Clock()
    store = store or redis.store()
    engine = Engine(store, catalog(), prefix=redis.prefix, clock=clock)
    grants = Grants(db, engine)
    billing = Billing(settings=settings, db=db, engine=engine, grants=grants, book=PriceBook(db, ttl=0),
                      recharge_delays=recharge_delays, repair_interval=3600)

    async def identify(request: Request) -> str | None:
        return request.headers.get("x-test-billable")

    endpoints = Endpoints(
        engine=engine, keys=None, db=db, grants=grants, metrics=Metrics(), identify=identify, admin_token=ADMIN,
        extra_routes=[pricing_route(lambda: engine.catalog, billing.book), *billing.routes(identify)],
        extra_admin_routes=billing.admin_routes(),
    )
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=endpoints), base_url="http://gateway")
    try:
        yield Env(fake, api_base, db, engine, grants, billing, http, clock, store)
    finally:
        await http.aclose()
        await billing.stop()
        await db.close()
        await store.close()


def add_plan_prices(fake: FakeStripe) -> dict[str, str]:
    """Stripe prices for the catalog's plans, as a merchant's dashboard would have them: name → price id."""
    pro = fake.put("products", {"name": "Pro", "active": True, "metadata": {"plan": "pro"}, "description": None})
    scale = fake.put("products", {"name": "Scale", "active": True, "metadata": {"plan": "scale"}, "description": None})
    return {
        "pro": fake.add_price("pro_monthly", 2900, product=pro["id"])["id"],
        "scale": fake.add_price("scale_monthly", 9900, product=scale["id"])["id"],
        "scale_yearly": fake.add_price("scale_yearly", 99000, interval="year", product=scale["id"])["id"],
        "other": fake.add_price("not_in_catalog", 500)["id"],
    }
