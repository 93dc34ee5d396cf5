"""Billing through Stripe: plan sync, customers, webhooks, credit packs, auto-recharge, the repair pass.

`Billing` connects them for one gateway process (built by `gateway.app` when GATEWAY_STRIPE_API_KEY is
set) and gives the endpoints they answer:

    POST /_gateway/stripe/webhook                                  Stripe events (public, signed)
    POST /_gateway/usage/packs/{pack}/checkout                     a pack's Checkout link (the client's key)
    PUT  /_gateway/admin/billables/{id}/stripe-customer            link or create the Stripe customer
    POST /_gateway/admin/billables/{id}/packs/{pack}/checkout      a pack's Checkout link (admin)

and the customer portal's link (`portal`) for the usage page's "Manage billing".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import audit
from gateway.background import Background
from gateway.billing.client import close_client, each, plain, stripe_client
from gateway.billing.customers import CustomerConflict, Customers, UnknownCustomer
from gateway.billing.meters import MeterSender
from gateway.billing.packs import Packs, UnknownPack
from gateway.billing.payments import Payments
from gateway.billing.recharge import DELAYS, Recharger
from gateway.billing.repair import INTERVAL_S, Repair
from gateway.billing.subscriptions import Subscriptions
from gateway.billing.sync import PriceBook
from gateway.billing.webhooks import Webhooks
from gateway.catalog import Catalog
from gateway.decision import Decision
from gateway.engine import Engine
from gateway.grants import Grants
from gateway.problems import bad_request, json_body, problem
from gateway.settings import Settings
from gateway.store.db import Database

log = logging.getLogger("gateway.billing")

Identify = Callable[[Request], Awaitable[str | None]]


def _stripe_down(exc: stripe.StripeError) -> JSONResponse:
    return problem(502, "urn:gateway:stripe", "Stripe error", f"Stripe answered: {exc.user_message or exc}")


class Billing:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        engine: Engine,
        grants: Grants,
        book: PriceBook | None = None,
        client: stripe.StripeClient | None = None,
        repair_interval: float = INTERVAL_S,
        recharge_delays: tuple[float, ...] = DELAYS,
    ) -> None:
        self.engine = engine
        self.db = db
        self.client = client or stripe_client(settings)
        self.book = book or PriceBook(db)
        self.customers = Customers(db, self.client)
        self.subscriptions = Subscriptions(db, engine, self.client)
        self.payments = Payments(db, engine, grants, self.client)
        self.packs = Packs(lambda: engine.catalog, self.client, self.customers, self.book)
        self.recharger = Recharger(engine, self.payments, self.customers, self.client, delays=recharge_delays)
        self.webhooks = Webhooks(
            secret=settings.stripe_webhook_secret,
            db=db,
            grants=grants,
            client=self.client,
            customers=self.customers,
            subscriptions=self.subscriptions,
            payments=self.payments,
            book=self.book,
        )
        self.repair = Repair(
            client=self.client,
            customers=self.customers,
            subscriptions=self.subscriptions,
            payments=self.payments,
            grants=grants,
            book=self.book,
            interval=repair_interval,
        )
        self._repairing = Background("gateway-billing-repair")
        # Billed units (overage) to Stripe's meters, to the Stripe meter of the catalog running at each send.
        self.meters = MeterSender(db, self.client, event_name=lambda meter: self.catalog.stripe_meter(meter) or meter,
                                  stream_above=settings.stripe_meter_stream_above, lease=settings.stripe_meter_lease)  # fmt: skip
        if not settings.stripe_webhook_secret:
            log.warning("GATEWAY_STRIPE_WEBHOOK_SECRET is not set: Stripe webhooks are refused (503) until it is")

    @property
    def catalog(self) -> Catalog:
        """The catalog running now (a published one replaces it: never kept from the start)."""
        return self.engine.catalog

    def on_decision(self, decision: Decision) -> None:
        self.recharger.on_decision(decision)

    async def start(self) -> None:
        self._repairing.start(self.repair.loop)
        self.meters.start()

    async def stop(self) -> None:
        await self.meters.stop()
        await self._repairing.stop()
        await self.recharger.stop()
        await close_client(self.client)

    async def portal(self, billable: str, return_url: str) -> str:
        """The URL of a Stripe customer portal session for `billable` (its customer created when it has none)."""
        customer = await self.customers.ensure(billable)
        params: Any = {"customer": customer, "return_url": return_url}
        return str(plain(await self.client.v1.billing_portal.sessions.create_async(params))["url"])

    # ---- endpoints ----------------------------------------------------------------------------------

    def routes(self, identify: Identify) -> list[Route]:
        """Public endpoints: the webhook, and the client's own pack checkout (its API key)."""

        async def client_checkout(request: Request) -> Response:
            billable = await identify(request)
            if billable is None:
                return problem(401, "urn:gateway:unauthorized", "Unauthorized",
                                "A valid API key is required: send Authorization: Bearer <key> or X-Api-Key: <key>.")
            return await self._checkout(request, billable)

        return [
            Route("/_gateway/stripe/webhook", self.webhooks.endpoint, methods=["POST"]),
            Route("/_gateway/usage/packs/{pack}/checkout", client_checkout, methods=["POST"]),
        ]

    def admin_routes(self) -> list[Route]:
        """Endpoints behind the admin token."""

        async def admin_checkout(request: Request) -> Response:
            return await self._checkout(request, request.path_params["billable"])

        return [
            Route("/_gateway/admin/billables/{billable}/stripe-customer", self.link_customer, methods=["PUT"]),
            Route("/_gateway/admin/billables/{billable}/packs/{pack}/checkout", admin_checkout, methods=["POST"]),
        ]

    async def link_customer(self, request: Request) -> Response:
        billable = request.path_params["billable"]
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        customer = body.get("customer")
        if customer is not None and (not isinstance(customer, str) or not customer.startswith("cus_")):
            return bad_request('Send {"customer": "cus_..."} to link a customer, or no body to create one.')
        try:
            before = await self.customers.linked(billable)
            linked = await self.customers.link(billable, customer)
            # Subscriptions that arrived before the link now have their billable.
            async for sub in each(self.client.v1.subscriptions.list_async, {"customer": linked, "status": "all"}):
                await self.repair.subscription(sub["id"])
        except UnknownCustomer as exc:
            return problem(404, "urn:gateway:not-found", "Not found", str(exc))
        except CustomerConflict as exc:
            return problem(409, "urn:gateway:conflict", "Conflict", str(exc))
        except stripe.StripeError as exc:
            return _stripe_down(exc)
        if linked != before:
            await audit.record(self.db, token=request.state.token, action="stripe_customer.link", billable=billable,
                               before={"customer": before}, after={"customer": linked})  # fmt: skip
        return JSONResponse({"customer": linked, "billable": billable})

    async def _checkout(self, request: Request, billable: str) -> Response:
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        success = body.get("success_url") or self.catalog.settings.upgrade_url
        cancel = body.get("cancel_url")
        if not isinstance(success, str) or not success.startswith(("http://", "https://")):
            return bad_request('Send {"success_url": "https://..."} (where Checkout returns the customer); plans.toml names no upgrade_url.')
        if cancel is not None and (not isinstance(cancel, str) or not cancel.startswith(("http://", "https://"))):
            return bad_request("cancel_url must be an http(s) URL.")
        try:
            session = await self.packs.checkout(billable, request.path_params["pack"], success_url=success, cancel_url=cancel)
        except UnknownPack as exc:
            return problem(404, "urn:gateway:not-found", "Not found", str(exc))
        except stripe.StripeError as exc:
            return _stripe_down(exc)
        return JSONResponse(session, status_code=201)


__all__ = ["Billing"]
