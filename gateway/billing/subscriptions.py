"""Stripe subscriptions → the record → the billable's plan and billing window in Redis.

A subscription is read from Stripe (never trusted from an event's copy, which may be stale or out of
order), recorded as one row of `subscriptions`, and the billable's Redis state is then derived from its
rows alone (`apply`), so applying twice, or after a crash, gives the same answer:

- the plan is the one whose Stripe price (id or lookup_key, or `metadata.plan`) an item carries;
- `active` and `trialing` subscribe; `past_due` keeps the plan for the catalog's `past_due_grace`,
  counted from the Stripe event that reported it; `incomplete` changes nothing; anything else
  (canceled, paused, unpaid) falls back to the default plan;
- the billing window is the item's current period while the subscription counts (the engine extends
  it by its own length when Stripe's renewal is late); without one, the calendar month.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import stripe
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.billing.client import is_missing, plain
from gateway.catalog import Catalog
from gateway.engine import ACTIVE_STATUSES, Engine, ResolvedPlan
from gateway.envelope import caused_event
from gateway.errors import RedisUnavailable, StateUnavailable
from gateway.events import Outbox
from gateway.state import Subscription
from gateway.store.db import Database
from gateway.store.db import subscriptions as table

log = logging.getLogger("gateway.billing")

IGNORED = frozenset({"incomplete", "incomplete_expired"})
COUNTS = ACTIVE_STATUSES | {"past_due"}


@dataclass(frozen=True)
class Facts:
    """What the record keeps of one Stripe subscription."""

    id: str
    customer: str
    plan: str | None
    price: str | None
    status: str
    period: tuple[float, float] | None
    cancel_at_period_end: bool
    trial_end: float | None


def _id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return str(value) if value else None


def _ts(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value else None


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def plan_of_price(catalog: Catalog, price: dict[str, Any], products: dict[str, str] | None = None) -> str | None:
    """The catalog plan a Stripe price stands for: by id, by lookup_key, by `metadata.plan`, by its product."""
    for ref in (price.get("id"), price.get("lookup_key")):
        if ref:
            found = catalog.plan_for_price(ref)
            if found:
                return found
    named = (price.get("metadata") or {}).get("plan")
    if named in catalog.plans:
        return str(named)
    product = price.get("product")
    if isinstance(product, dict):
        named = (product.get("metadata") or {}).get("plan")
        if named in catalog.plans:
            return str(named)
        product = product.get("id")
    if products and product in products:
        return products[product]
    return None


def read(catalog: Catalog, sub: dict[str, Any], products: dict[str, str] | None = None) -> Facts:
    items = (sub.get("items") or {}).get("data") or []
    plan = price_id = None
    period = None
    for item in items:
        price = item.get("price") or item.get("plan") or {}
        found = plan_of_price(catalog, price, products)
        if found is not None or plan is None:
            plan, price_id = found, price.get("id")
            # Since Stripe API 2025-03-31 the period lives on the items; before, on the subscription.
            start = _ts(item.get("current_period_start")) or _ts(sub.get("current_period_start"))
            end = _ts(item.get("current_period_end")) or _ts(sub.get("current_period_end"))
            period = (start, end) if start is not None and end is not None and end > start else None
        if found is not None:
            break
    customer = sub.get("customer")
    return Facts(
        id=sub["id"],
        customer=str(customer["id"] if isinstance(customer, dict) else customer),
        plan=plan,
        price=price_id,
        status=str(sub.get("status") or "canceled"),
        period=period,
        cancel_at_period_end=bool(sub.get("cancel_at_period_end")),
        trial_end=_ts(sub.get("trial_end")),
    )


def invoice_subscription(invoice: dict[str, Any]) -> str | None:
    # Before Stripe API 2025-03-31 an invoice named its subscription; since, its parent does.
    found = _id(invoice.get("subscription"))
    if found:
        return found
    details = ((invoice.get("parent") or {}).get("subscription_details") or {})
    return _id(details.get("subscription"))


class Subscriptions:
    def __init__(self, db: Database, engine: Engine, client: stripe.StripeClient) -> None:
        self.db = db
        self.engine = engine
        self.client = client

    @property
    def catalog(self) -> Catalog:
        """The catalog running now (a published one replaces it: never kept from the start)."""
        return self.engine.catalog

    async def fetch(self, subscription_id: str) -> dict[str, Any] | None:
        """The subscription as Stripe has it now; None when Stripe no longer knows it."""
        try:
            return plain(await self.client.v1.subscriptions.retrieve_async(subscription_id))
        except stripe.StripeError as exc:
            if is_missing(exc):
                return None
            raise

    async def record(
        self,
        conn: AsyncConnection,
        facts: Facts,
        billable: str | None,
        *,
        reported_at: float,
        reported_past_due: bool = False,
        cause: str | None = None,
    ) -> None:
        """Upsert the row inside the caller's transaction, with a `plan_changed` event when the billable's plan
        moves because of it (`cause`, the Stripe event id, makes that event's id: once however often seen).

        `reported_at` is when the Stripe event that brought this was created: a past_due grace runs from
        the first event that reported past_due (or an earlier one that did, arriving late)."""
        before = await self._plan_now(billable) if billable else None
        found = (await conn.execute(sa.select(table).where(table.c.id == facts.id))).first()
        since: datetime | None = None
        if facts.status == "past_due":
            reported = datetime.fromtimestamp(reported_at, UTC)
            since = reported
            if found is not None and found.status == "past_due" and found.past_due_since is not None:
                since = min(found.past_due_since, reported) if reported_past_due else found.past_due_since
        values = {
            "billable": billable if billable is not None else (found.billable if found is not None else None),
            "customer": facts.customer,
            "plan": facts.plan,
            "price": facts.price,
            "status": facts.status,
            "current_period_start": _dt(facts.period[0]) if facts.period else None,
            "current_period_end": _dt(facts.period[1]) if facts.period else None,
            "cancel_at_period_end": facts.cancel_at_period_end,
            "trial_end": _dt(facts.trial_end),
            "past_due_since": since,
            "updated_at": datetime.now(UTC),
        }
        stmt = self.db.insert(table).values(id=facts.id, **values)
        await conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=values))
        if billable and before is not None and before.source != "assignment":
            after = self._effective((await self.state_of(billable, conn))[0])
            if after != before.name:
                source = "subscription" if after != self.catalog.settings.default_plan else "default"
                data = {"from": before.name, "to": after, "source": source, "subscription": facts.id}
                reference = cause or f"{facts.id}:{facts.status}:{facts.plan}:{reported_at}"
                await Outbox(self.db).add([caused_event(billable, "plan_changed", reference, after, data)], conn)

    async def _plan_now(self, billable: str) -> ResolvedPlan | None:
        try:
            return await self.engine.plan_of(billable)
        except (RedisUnavailable, StateUnavailable):
            return None  # no plan_changed then; the subscription itself is still recorded

    def _effective(self, sub: Subscription | None) -> str:
        """The plan the engine resolves for this subscription now (no manual assignment)."""
        if sub is not None and sub.status in ACTIVE_STATUSES:
            return sub.plan
        grace = self.catalog.settings.past_due_grace_seconds
        if sub is not None and sub.status == "past_due" and sub.past_due_since is not None and (
            self.engine.clock() < sub.past_due_since + grace
        ):
            return sub.plan
        return self.catalog.settings.default_plan

    async def state_of(
        self, billable: str, conn: AsyncConnection | None = None
    ) -> tuple[Subscription | None, tuple[float, float] | None]:
        """What the record says the billable subscribes to, and its billing window."""
        query = sa.select(table).where(table.c.billable == billable)
        if conn is not None:
            rows = (await conn.execute(query)).all()
        else:
            async with self.db.engine.connect() as own:
                rows = (await own.execute(query)).all()
        counted = [r for r in rows if r.plan in self.catalog.plans and r.status in COUNTS]
        if not counted:
            return None, None
        best = min(
            counted,
            key=lambda r: (
                0 if r.status in ACTIVE_STATUSES else 1,
                -(r.current_period_end.timestamp() if r.current_period_end else 0),
                -r.updated_at.timestamp(),
            ),
        )
        since = best.past_due_since.timestamp() if best.status == "past_due" and best.past_due_since else None
        if best.status == "past_due" and since is None:
            since = best.updated_at.timestamp()
        period = None
        if best.current_period_start is not None and best.current_period_end is not None:
            period = (best.current_period_start.timestamp(), best.current_period_end.timestamp())
        return Subscription(best.plan, best.status, since), period

    async def apply(self, billable: str) -> None:
        """Make the billable's Redis state say what the record says (a no-op when it already does)."""
        sub, period = await self.state_of(billable)
        same_sub, same_period = (await self.engine.snapshot(billable)).says(sub, period)
        if not same_sub:
            await self.engine.set_subscription(billable, sub)
        if not same_period:
            await self.engine.set_billing_period(billable, period)

    async def known_ids(self) -> list[str]:
        """Subscriptions the record holds that may still change (not canceled for good)."""
        async with self.db.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(table.c.id).where(table.c.status.not_in(["canceled", "incomplete_expired"]))
            )
            return [r[0] for r in rows]

    async def recorded(self, subscription_id: str) -> Any:
        async with self.db.engine.connect() as conn:
            return (await conn.execute(sa.select(table).where(table.c.id == subscription_id))).first()


async def relink(conn: AsyncConnection, customer: str, billable: str) -> None:
    """A customer linked to `billable`: its recorded subscriptions follow it, in the caller's transaction."""
    await conn.execute(table.update().where(table.c.customer == customer).values(billable=billable))
