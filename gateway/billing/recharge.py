"""Auto-recharge (DESIGN §4): one off-session PaymentIntent when a spend took the recharge lease.

The engine decides when: a spend that takes the balance under the threshold, while no recharge runs,
takes a lease (with an expiry, so a crashed charger cannot block it) and counts one of the month's
`auto_recharge_max_per_month`; the decision then says `recharge`. This module does the charging:

- one PaymentIntent against the customer's default payment method, `off_session` and confirmed at once,
  with an Idempotency-Key fixed by the lease (its month and number) and the attempt, so a retried
  request never charges twice;
- success is the API's answer or the `payment_intent.succeeded` webhook, whichever comes first: both
  credit the grant keyed by the PaymentIntent, so it counts once;
- a decline, or a charge that needs the customer (`requires_action`, 3-D Secure), is a failure: the
  event `auto_recharge_failed`, then another attempt after a backoff, all within the lease;
- the lease is given back when done (kept to expire when a charge went through but could not be
  recorded, so the webhook or the repair pass credits it before anyone charges again).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

import stripe

from gateway.billing.client import idempotency_key, plain
from gateway.billing.customers import Customers
from gateway.billing.payments import Payments, from_payment_intent, pi_key
from gateway.catalog import Catalog
from gateway.decision import Decision
from gateway.engine import Engine
from gateway.envelope import caused_event
from gateway.events import Outbox
from gateway.money import credits_for

log = logging.getLogger("gateway.billing")

Outcome = Literal["succeeded", "pending", "failed", "off"]
# Attempts after the first; all of them fit in the engine's 120 s lease.
DELAYS = (5.0, 20.0, 60.0)


class Recharger:
    def __init__(
        self,
        engine: Engine,
        payments: Payments,
        customers: Customers,
        client: stripe.StripeClient,
        *,
        delays: tuple[float, ...] = DELAYS,
    ) -> None:
        self.engine = engine
        self.payments = payments
        self.customers = customers
        self.client = client
        self.delays = delays
        self._tasks: set[asyncio.Task[Outcome]] = set()

    @property
    def catalog(self) -> Catalog:
        """The catalog running now (a published one replaces it: never kept from the start)."""
        return self.engine.catalog

    def on_decision(self, decision: Decision) -> None:
        """The middleware's hook: start charging for a spend that took the lease (never blocks the request)."""
        if decision.recharge and decision.billable is not None:
            task = asyncio.get_running_loop().create_task(self.run(decision.billable))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Let the running recharges finish (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def run(self, billable: str) -> Outcome:
        release = True
        try:
            settings = (await self.engine.snapshot(billable)).recharge
            amount = settings.amount_cents
            if not settings.enabled or amount <= 0:
                return "off"
            lease = settings.attempt
            credits = credits_for(amount, self.catalog.settings.credits_per_dollar)
            for attempt, delay in enumerate((0.0, *self.delays)):
                if delay:
                    await asyncio.sleep(delay)
                outcome, charged = await self.attempt(billable, amount, credits, idempotency_key("recharge", billable, lease, attempt))
                if charged and outcome != "succeeded":
                    release = False
                if outcome != "failed":
                    return outcome
            return "failed"
        except Exception:
            log.exception("auto-recharge of %r stopped", billable)
            return "failed"
        finally:
            if release:
                try:
                    await self.engine.end_recharge(billable)
                except Exception:  # noqa: BLE001 - the lease expires on its own
                    log.warning("could not give back the auto-recharge lease of %r; it expires by itself", billable)

    async def attempt(self, billable: str, amount: int, credits: int, key: str) -> tuple[Outcome, bool]:
        """One charge; answers the outcome and whether money may have moved."""
        customer = await self.customers.customer_for(billable)
        if customer is None:
            await self.failed(billable, key, amount, "no Stripe customer is linked to this billable")
            return "failed", False
        method = await self.customers.default_payment_method(customer)
        if method is None:
            await self.failed(billable, key, amount, "the Stripe customer has no default payment method")
            return "failed", False
        params: Any = {
            "amount": amount,
            "currency": self.catalog.settings.currency,
            "customer": customer,
            "payment_method": method,
            "off_session": True,
            "confirm": True,
            "description": f"Auto-recharge: {credits} credits",
            "metadata": {"gateway": "auto_recharge", "billable": billable, "credits": str(credits)},
        }
        try:
            pi = plain(await self.client.v1.payment_intents.create_async(params, {"idempotency_key": key}))
        except stripe.CardError as exc:
            body: Any = exc.json_body or {}
            error = body.get("error") or {}
            intent = (error.get("payment_intent") or {}).get("id")
            reason = error.get("decline_code") or exc.code or "card_declined"
            await self.failed(billable, pi_key(intent) if intent else key, amount, str(reason), intent)
            return "failed", False
        except stripe.StripeError as exc:
            await self.failed(billable, key, amount, f"Stripe answered: {exc.user_message or exc}")
            return "failed", False
        if pi.get("status") == "succeeded":
            payment = from_payment_intent(pi)
            assert payment is not None
            try:
                await self.payments.credit(payment, check_refunds=False)
            except Exception:
                log.exception("auto-recharge %s of %r was paid but not yet credited; the webhook will", pi["id"], billable)
                return "pending", True
            return "succeeded", True
        if pi.get("status") == "processing":
            return "pending", True  # the webhook credits it when it settles
        # requires_action (3-D Secure) and the rest: the customer is not here to complete it.
        try:
            await self.client.v1.payment_intents.cancel_async(pi["id"])
        except stripe.StripeError:
            log.warning("could not cancel PaymentIntent %s that needs the customer", pi["id"])
        await self.failed(billable, pi_key(pi["id"]), amount, f"the charge needs the customer ({pi.get('status')})", pi["id"])
        return "failed", False

    async def failed(self, billable: str, reference: str, amount: int, reason: str, payment_intent: str | None = None) -> None:
        log.warning("auto-recharge of %r failed: %s", billable, reason)
        event = caused_event(
            billable,
            "auto_recharge_failed",
            reference,
            await self.payments.plan_name(billable),
            {"amount_cents": amount, "reason": reason, "payment_intent": payment_intent},
        )
        try:
            async with self.payments.db.engine.begin() as conn:
                await Outbox(self.payments.db).add([event], conn)
        except Exception:
            log.exception("could not record auto_recharge_failed for %r", billable)
