"""The missed-webhooks pass: what Stripe says lately, against the record, repaired where they differ.

Stripe retries a webhook for days, but an endpoint that was down longer, a secret rotated at the
wrong moment or an event type not subscribed loses them. Every `interval` seconds this pass lists the
recent subscriptions, invoices (their subscriptions), PaymentIntents, Checkout Sessions and refunds,
plus every subscription the record still counts, and applies them exactly as their webhooks would
have: through the same idempotent record, so a repair and a late webhook never add up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import stripe

from gateway.billing.client import each
from gateway.billing.customers import Customers
from gateway.billing.payments import Payments, from_checkout_session, from_payment_intent
from gateway.billing.subscriptions import Subscriptions, invoice_subscription, read
from gateway.billing.sync import PriceBook
from gateway.grants import Grants, granted

log = logging.getLogger("gateway.billing")

INTERVAL_S = 600.0
LOOKBACK_S = 3 * 86400.0


@dataclass
class Repaired:
    subscriptions: list[str] = field(default_factory=list)
    payments: list[str] = field(default_factory=list)
    refunds: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.subscriptions) + len(self.payments) + len(self.refunds)


class Repair:
    def __init__(
        self,
        *,
        client: stripe.StripeClient,
        customers: Customers,
        subscriptions: Subscriptions,
        payments: Payments,
        grants: Grants,
        book: PriceBook,
        interval: float = INTERVAL_S,
        lookback: float = LOOKBACK_S,
    ) -> None:
        self.client = client
        self.customers = customers
        self.subscriptions = subscriptions
        self.payments = payments
        self.grants = grants
        self.db = payments.db
        self.book = book
        self.interval = interval
        self.lookback = lookback

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                done = await self.run_once()
                if done.total:
                    log.warning("repair pass: %s", done)
            except Exception:
                log.exception("the Stripe repair pass failed")

    async def run_once(self) -> Repaired:
        since = {"gte": int(time.time() - self.lookback)}
        done = Repaired()
        ids = set(await self.subscriptions.known_ids())
        async for sub in each(self.client.v1.subscriptions.list_async, {"status": "all", "created": since}):
            ids.add(sub["id"])
        async for invoice in each(self.client.v1.invoices.list_async, {"created": since}):
            sub_id = invoice_subscription(invoice)
            if sub_id:
                ids.add(sub_id)
        for sub_id in sorted(ids):
            if await self.subscription(sub_id):
                done.subscriptions.append(sub_id)

        async for intent in each(self.client.v1.payment_intents.list_async, {"created": since}):
            payment = from_payment_intent(intent)
            if payment is not None and not await self._granted(payment.key):
                await self.payments.credit(payment)
                done.payments.append(payment.reference)
        async for session in each(self.client.v1.checkout.sessions.list_async, {"created": since}):
            payment = from_checkout_session(session)
            if payment is not None and not await self._granted(payment.key):
                await self.payments.credit(payment)
                done.payments.append(payment.reference)

        intents = set()
        async for refund in each(self.client.v1.refunds.list_async, {"created": since}):
            succeeded = refund.get("status") == "succeeded" and refund.get("payment_intent")
            if succeeded and not await self._granted(f"stripe:refund:{refund['id']}"):
                intents.add(str(refund["payment_intent"]))
                done.refunds.append(refund["id"])
        for intent_id in sorted(intents):
            await self.payments.refund(intent_id)
        return done

    async def subscription(self, subscription_id: str) -> bool:
        """Record the subscription as Stripe has it when the record differs; answers whether it did."""
        current = await self.subscriptions.fetch(subscription_id)
        if current is None:
            return False
        facts = read(self.subscriptions.catalog, current, (await self.book.current()).get("products"))
        row = await self.subscriptions.recorded(subscription_id)
        billable = await self.customers.billable_for(facts.customer)
        period = (
            (row.current_period_start.timestamp(), row.current_period_end.timestamp())
            if row is not None and row.current_period_start is not None and row.current_period_end is not None
            else None
        )
        same = row is not None and (
            (row.status, row.plan, row.cancel_at_period_end, row.billable) == (facts.status, facts.plan, facts.cancel_at_period_end, billable)
            and period == facts.period
        )
        if not same:
            async with self.db.engine.begin() as conn:
                await self.subscriptions.record(conn, facts, billable, reported_at=datetime.now(UTC).timestamp())
        if billable:
            await self.subscriptions.apply(billable)
        return not same

    async def _granted(self, key: str) -> bool:
        async with self.db.engine.connect() as conn:
            return await granted(conn, key) is not None
