"""Payments that buy credits (packs, auto-recharge) and refunds that take them back, money first.

Every paid PaymentIntent credits its billable once: the grant's idempotency key is `stripe:pi:<id>`,
whether the API's answer, a webhook (of the PaymentIntent or its Checkout Session) or the repair pass
sees it first. A refund takes back credits in proportion to the amount refunded, one negative grant per
Stripe refund (`stripe:refund:<id>`); when they are already spent, the balance goes into debt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import stripe
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.billing.client import each
from gateway.engine import Engine
from gateway.envelope import caused_event
from gateway.events import Outbox
from gateway.grants import GrantRecord, Grants, granted
from gateway.store.db import Database

log = logging.getLogger("gateway.billing")

KINDS = frozenset({"pack", "auto_recharge"})


def pi_key(payment_intent: str) -> str:
    return f"stripe:pi:{payment_intent}"


@dataclass(frozen=True)
class Payment:
    """A paid Stripe payment that buys `credits` for `billable`."""

    key: str
    billable: str
    credits: int
    amount_cents: int
    kind: str
    payment_intent: str | None
    reference: str  # the PaymentIntent or Checkout Session id, for people


def _id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return str(value) if value else None


def _ours(metadata: dict[str, Any]) -> tuple[str, str, int] | None:
    kind, billable, credits = metadata.get("gateway"), metadata.get("billable"), metadata.get("credits")
    if kind not in KINDS or not billable or not str(credits or "").isdigit():
        return None
    return str(kind), str(billable), int(str(credits))


def from_payment_intent(pi: dict[str, Any]) -> Payment | None:
    ours = _ours(pi.get("metadata") or {})
    if ours is None or pi.get("status") != "succeeded":
        return None
    kind, billable, credits = ours
    amount = int(pi.get("amount_received") or pi.get("amount") or 0)
    return Payment(pi_key(pi["id"]), billable, credits, amount, kind, pi["id"], pi["id"])


def from_checkout_session(session: dict[str, Any]) -> Payment | None:
    ours = _ours(session.get("metadata") or {})
    if ours is None or session.get("status") != "complete":
        return None
    if session.get("payment_status") not in ("paid", "no_payment_required"):
        return None  # a delayed method: checkout.session.async_payment_succeeded comes later
    kind, billable, credits = ours
    pi = _id(session.get("payment_intent"))
    key = pi_key(pi) if pi else f"stripe:cs:{session['id']}"
    return Payment(key, billable, credits, int(session.get("amount_total") or 0), kind, pi, session["id"])


class Payments:
    def __init__(self, db: Database, engine: Engine, grants: Grants, client: stripe.StripeClient) -> None:
        self.db = db
        self.engine = engine
        self.grants = grants
        self.client = client

    async def plan_name(self, billable: str) -> str | None:
        try:
            return (await self.engine.plan_of(billable)).name
        except Exception:  # noqa: BLE001 - an event's plan is a courtesy; Redis may be away
            return None

    async def record(self, conn: AsyncConnection, payment: Payment, plan: str | None) -> GrantRecord:
        """Record the payment's credits (once per key) inside the caller's transaction."""
        what = "credit pack" if payment.kind == "pack" else "auto-recharge"
        record = await self.grants.record(
            conn,
            payment.billable,
            payment.credits,
            idempotency_key=payment.key,
            reason=f"{what} {payment.reference}",
            source=payment.kind,
            amount_cents=payment.amount_cents,
        )
        if payment.kind == "auto_recharge" and not record.duplicate:
            data = {"amount_cents": payment.amount_cents, "credits": payment.credits, "payment_intent": payment.payment_intent}
            await Outbox(self.db).add([caused_event(payment.billable, "auto_recharge_succeeded", payment.key, plan, data)], conn)
        return record

    async def credit(self, payment: Payment, *, check_refunds: bool = True) -> GrantRecord:
        """Record and apply a payment on its own (the API's answer, the repair pass)."""
        plan = await self.plan_name(payment.billable)
        async with self.db.engine.begin() as conn:
            record = await self.record(conn, payment, plan)
        await self.grants.apply(payment.billable)
        if check_refunds and payment.payment_intent and not record.duplicate:
            await self.refund(payment.payment_intent)  # a refund seen before its payment was credited
        return record

    async def fetch_refunds(self, payment_intent: str) -> list[dict[str, Any]]:
        return [r async for r in each(self.client.v1.refunds.list_async, {"payment_intent": payment_intent})]

    async def record_refunds(self, conn: AsyncConnection, payment_intent: str, refunds: list[dict[str, Any]]) -> str | None:
        """Take back credits for each succeeded refund of a credited payment; answers its billable."""
        grant = await granted(conn, pi_key(payment_intent))
        if grant is None or grant.amount <= 0:
            return None
        paid = int(grant.amount_cents)
        if paid <= 0:
            return None
        done = sorted((r for r in refunds if r.get("status") == "succeeded"), key=lambda r: (r.get("created") or 0, r["id"]))
        refunded = 0
        for refund in done:
            before, refunded = refunded, min(paid, refunded + int(refund.get("amount") or 0))
            # Cumulative rounding: the refunds of one payment never take back more than it bought.
            take = grant.amount * refunded // paid - grant.amount * before // paid
            if take <= 0:
                continue
            await self.grants.record(
                conn,
                grant.billable,
                -take,
                idempotency_key=f"stripe:refund:{refund['id']}",
                reason=f"refund {refund['id']} of {payment_intent}",
                source="refund",
                amount_cents=-int(refund.get("amount") or 0),
            )
        return str(grant.billable)

    async def refund(self, payment_intent: str) -> None:
        refunds = await self.fetch_refunds(payment_intent)
        if not refunds:
            return
        async with self.db.engine.begin() as conn:
            billable = await self.record_refunds(conn, payment_intent, refunds)
        if billable is not None:
            await self.grants.apply(billable)
