"""`POST /_gateway/stripe/webhook`: Stripe events, verified, each processed once.

- The `Stripe-Signature` is checked on the raw body with the webhook secret and a tolerance on its
  timestamp; a bad signature, an old timestamp or a malformed body answers 400 with the reason and
  changes nothing.
- An event's copy of its object may be stale and events arrive in any order: the handler fetches the
  object as Stripe has it now, then records its effect in the same transaction as the event id. A
  redelivered event finds its id and only re-applies the record to Redis (idempotent), so a crash
  between the commit and Redis heals on Stripe's retry.
- The database down, Redis down or Stripe's API unreachable: 503, and Stripe delivers again later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import stripe
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.billing.client import each, is_missing, plain
from gateway.billing.customers import Customers
from gateway.billing.payments import (
    Payment,
    Payments,
    from_checkout_session,
    from_payment_intent,
    pi_key,
)
from gateway.billing.subscriptions import Subscriptions, invoice_subscription, read
from gateway.billing.sync import PriceBook, read_stripe, snapshot_of, write_snapshot
from gateway.bounds import loads
from gateway.catalog import Catalog
from gateway.envelope import caused_event
from gateway.errors import BadRequest, DatabaseUnavailable, RedisUnavailable, StateUnavailable, TooLarge
from gateway.events import Outbox
from gateway.grants import Grants, granted
from gateway.problems import problem, read_body
from gateway.store.db import Database, stripe_events

log = logging.getLogger("gateway.billing")

TOLERANCE_S = 300
MAX_BODY = 1 << 20  # Stripe's events are a few KiB; anything this large is not one

Record = Callable[[AsyncConnection], Awaitable[None]]


async def _nothing(conn: AsyncConnection) -> None:
    return None


@dataclass
class Change:
    """What one event does: its record (inside the event's transaction) and whose Redis state follows."""

    billable: str | None = None
    record: Record = _nothing
    report: dict[str, Any] = field(default_factory=dict)


def _problem(status: int, detail: str) -> JSONResponse:
    title = {400: "Bad request", 413: "Payload too large", 503: "Service unavailable"}.get(status, "Error")
    return problem(status, "urn:gateway:stripe-webhook", title, detail)


def _id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return str(value) if value else None


class Webhooks:
    def __init__(
        self,
        *,
        secret: str | None,
        db: Database,
        grants: Grants,
        client: stripe.StripeClient,
        customers: Customers,
        subscriptions: Subscriptions,
        payments: Payments,
        book: PriceBook,
        tolerance: int = TOLERANCE_S,
    ) -> None:
        self.secret = secret
        self.db = db
        self.grants = grants
        self.engine = subscriptions.engine
        self.client = client
        self.customers = customers
        self.subscriptions = subscriptions
        self.payments = payments
        self.book = book
        self.tolerance = tolerance
        self._locks: dict[str, asyncio.Lock] = {}

    # ---- HTTP -------------------------------------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        """The catalog running now (a published one replaces it: never kept from the start)."""
        return self.engine.catalog

    async def endpoint(self, request: Request) -> Response:
        try:
            raw = await read_body(request, MAX_BODY)
        except TooLarge:
            return _problem(413, f"The body is larger than {MAX_BODY} bytes: not a Stripe event.")
        if not self.secret:
            # Not a 400: Stripe keeps the events and retries until the operator sets the secret.
            return _problem(503, "GATEWAY_STRIPE_WEBHOOK_SECRET is not set: events cannot be verified.")
        problem = self.verify(raw, request.headers.get("stripe-signature"))
        if problem is not None:
            log.warning("Stripe webhook refused: %s", problem)
            return _problem(400, problem)
        event = _parse(raw)
        if isinstance(event, str):
            return _problem(400, event)
        try:
            result = await self.process(event)
        except DatabaseUnavailable as exc:
            log.warning("Stripe event %s not processed, the database did not answer: %s", event["id"], exc)
            return _problem(503, "The database did not answer; Stripe will deliver this event again.")
        except (RedisUnavailable, StateUnavailable) as exc:
            return _problem(503, f"Recorded, but Redis did not take it ({exc}); Stripe will deliver it again.")
        except stripe.StripeError as exc:
            log.warning("Stripe event %s not processed, the Stripe API failed: %s", event["id"], exc)
            return _problem(503, "The Stripe API did not answer; Stripe will deliver this event again.")
        return JSONResponse({"received": True, "id": event["id"], "type": event["type"], **result})

    def verify(self, raw: bytes, header: str | None) -> str | None:
        """None when the body is signed by the secret within the tolerance, else the reason it is not."""
        assert self.secret is not None
        if not header:
            return "No Stripe-Signature header."
        try:
            stripe.WebhookSignature.verify_header(raw, header, self.secret, self.tolerance)
        except stripe.SignatureVerificationError as exc:
            return f"Signature check failed: {exc.user_message or exc}"
        except UnicodeDecodeError:
            return "The body is not UTF-8."
        stamp = [p.split("=", 1)[1] for p in header.split(",") if p.startswith("t=")]
        if stamp and int(stamp[0]) > time.time() + self.tolerance:
            return f"Signature check failed: timestamp {stamp[0]} is in the future."
        return None

    # ---- processing ------------------------------------------------------------------------------------------

    async def process(self, event: dict[str, Any]) -> dict[str, Any]:
        async with self.db.engine.connect() as conn:
            seen = (await conn.execute(sa.select(stripe_events).where(stripe_events.c.id == event["id"]))).first()
        if seen is not None:
            await self.reapply(seen.billable)
            return {"duplicate": True}
        change = await self.handle(event)
        fresh = False
        for _ in range(3):
            try:
                async with self.db.engine.begin() as conn:
                    stmt = self.db.insert(stripe_events).values(
                        id=event["id"], type=event["type"], processed_at=datetime.now(UTC), billable=change.billable
                    )
                    result = await conn.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))
                    fresh = result.rowcount == 1
                    if fresh:
                        await change.record(conn)
                break
            except IntegrityError:
                continue  # a concurrent delivery took a grant number: read again
        await self.reapply(change.billable)
        return {"duplicate": not fresh, **change.report}

    async def reapply(self, billable: str | None) -> None:
        """The record's subscription and grants of `billable`, into Redis (a no-op when already there)."""
        if billable:
            await self.subscriptions.apply(billable)
            await self.grants.apply(billable)

    async def handle(self, event: dict[str, Any]) -> Change:
        kind: str = event["type"]
        obj: dict[str, Any] = event["data"]["object"]
        if kind.startswith("customer.subscription."):
            return await self.subscription(obj["id"], event, obj)
        if kind.startswith("invoice."):
            sub = invoice_subscription(obj)
            return await self.subscription(sub, event, None) if sub else Change()
        if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            return await self.checkout_session(obj["id"])
        if kind == "payment_intent.succeeded":
            return await self.payment_intent(obj["id"])
        if kind == "payment_intent.payment_failed":
            return await self.payment_failed(obj["id"])
        if kind in ("charge.refunded", "charge.refund.updated", "refund.created", "refund.updated"):
            return await self.refund(_id(obj.get("payment_intent")))
        if kind.startswith(("product.", "price.")):
            return await self.resync()
        if kind == "entitlements.active_entitlement_summary.updated":
            return await self.entitlements(obj)
        if kind in ("customer.created", "customer.updated"):
            billable = await self.customers.billable_for(obj["id"])
            return Change(billable, report={"billable": billable})
        return Change(report={"ignored": True})

    async def subscription(self, subscription_id: str, event: dict[str, Any], copy: dict[str, Any] | None) -> Change:
        lock = self._locks.setdefault(subscription_id, asyncio.Lock())
        async with lock:
            current = await self.subscriptions.fetch(subscription_id)
            if current is None:
                if copy is None:
                    return Change(report={"subscription": subscription_id, "missing": True})
                current = {**copy, "status": "canceled"}  # Stripe no longer knows it
            products = (await self.book.current()).get("products")
            facts = read(self.catalog, current, products)
            billable = await self.customers.billable_for(facts.customer)
            reported_past_due = event["type"] == "invoice.payment_failed" or (copy or {}).get("status") == "past_due"

            async def record(conn: AsyncConnection) -> None:
                await self.subscriptions.record(
                    conn, facts, billable, reported_at=float(event["created"]), reported_past_due=reported_past_due,
                    cause=event["id"],
                )

            report = {"subscription": facts.id, "billable": billable, "plan": facts.plan, "status": facts.status}
            return Change(billable, record, report)

    async def _payment(self, payment: Payment | None, report: dict[str, Any]) -> Change:
        if payment is None:
            return Change(report={**report, "credited": False})
        refunds = await self.payments.fetch_refunds(payment.payment_intent) if payment.payment_intent else []
        plan = await self.payments.plan_name(payment.billable)

        async def record(conn: AsyncConnection) -> None:
            await self.payments.record(conn, payment, plan)
            if payment.payment_intent and refunds:
                await self.payments.record_refunds(conn, payment.payment_intent, refunds)

        return Change(payment.billable, record, {**report, "billable": payment.billable, "credits": payment.credits})

    async def checkout_session(self, session_id: str) -> Change:
        try:
            session = plain(await self.client.v1.checkout.sessions.retrieve_async(session_id))
        except stripe.StripeError as exc:
            if is_missing(exc):
                return Change(report={"missing": session_id})
            raise
        return await self._payment(from_checkout_session(session), {"checkout_session": session_id})

    async def payment_intent(self, intent_id: str) -> Change:
        try:
            intent = plain(await self.client.v1.payment_intents.retrieve_async(intent_id))
        except stripe.StripeError as exc:
            if is_missing(exc):
                return Change(report={"missing": intent_id})
            raise
        return await self._payment(from_payment_intent(intent), {"payment_intent": intent_id})

    async def payment_failed(self, intent_id: str) -> Change:
        intent = plain(await self.client.v1.payment_intents.retrieve_async(intent_id))
        meta = intent.get("metadata") or {}
        if meta.get("gateway") != "auto_recharge" or not meta.get("billable") or intent.get("status") == "succeeded":
            return Change(report={"payment_intent": intent_id})
        billable = str(meta["billable"])
        error = intent.get("last_payment_error") or {}
        reason = error.get("decline_code") or error.get("code") or "payment_failed"
        data = {"amount_cents": intent.get("amount"), "reason": reason, "payment_intent": intent_id}
        event = caused_event(billable, "auto_recharge_failed", pi_key(intent_id), await self.payments.plan_name(billable), data)

        async def record(conn: AsyncConnection) -> None:
            await Outbox(self.db).add([event], conn)

        return Change(billable, record, {"payment_intent": intent_id, "billable": billable, "failed": reason})

    async def refund(self, intent_id: str | None) -> Change:
        if not intent_id:
            return Change()
        refunds = await self.payments.fetch_refunds(intent_id)

        async def record(conn: AsyncConnection) -> None:
            await self.payments.record_refunds(conn, intent_id, refunds)

        async with self.db.engine.connect() as conn:
            found = await granted(conn, pi_key(intent_id))
        billable = found.billable if found else None  # a payment not credited yet takes its refunds when it is
        return Change(billable, record, {"payment_intent": intent_id, "billable": billable, "refunds": len(refunds)})

    async def resync(self) -> Change:
        state = await read_stripe(self.client)
        body = snapshot_of(self.catalog, state)

        async def record(conn: AsyncConnection) -> None:
            await write_snapshot(self.db, conn, body)
            self.book.forget()

        return Change(record=record, report={"resynced": True})

    async def entitlements(self, summary: dict[str, Any]) -> Change:
        """Stripe's active entitlements against the plan's features: reported, never applied."""
        customer = _id(summary.get("customer"))
        listed = summary.get("entitlements") or {}
        active = list(listed.get("data") or [])
        if listed.get("has_more") and customer:
            active = [e async for e in each(self.client.v1.entitlements.active_entitlements.list_async, {"customer": customer})]
        keys = {str(e.get("lookup_key")) for e in active if e.get("lookup_key")}
        billable = await self.customers.billable_for(customer) if customer else None
        report: dict[str, Any] = {"customer": customer, "billable": billable, "entitlements": sorted(keys)}
        if billable is not None:
            plan = await self.engine.plan_of(billable)
            allows = set((plan.terms or self.catalog.plans[plan.name]).allows)  # overrides add and take features
            report |= {
                "plan": plan.name,
                "only_in_stripe": sorted(keys - allows),
                "only_in_plan": sorted(allows - keys),
            }
            if keys != allows:
                log.warning(
                    "Stripe entitlements of %s (billable %r) differ from plan %s: only in Stripe %s, only in plans.toml %s"
                    " (plans.toml decides)",
                    customer, billable, plan.name, report["only_in_stripe"], report["only_in_plan"],
                )
        return Change(billable=None, report=report)


def _parse(raw: bytes) -> dict[str, Any] | str:
    """The event, or why the body is not one."""
    try:
        event = loads(raw)
    except BadRequest as exc:
        return str(exc)
    if not isinstance(event, dict):
        return "The body is not a Stripe event (a JSON object)."
    data = event.get("data")
    if not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str):
        return "The event has no id or type."
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        return "The event has no data.object."
    if event["type"].startswith(("customer.", "checkout.", "payment_intent.")) and not isinstance(data["object"].get("id"), str):
        return "The event's object has no id."
    if not isinstance(event.get("created"), int):
        event["created"] = int(time.time())
    return event
