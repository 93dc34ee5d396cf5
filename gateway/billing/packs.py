"""Credit packs (`[packs.NAME]`) sold through Stripe Checkout.

A Checkout Session carries what it sells in its metadata (and its PaymentIntent's): `gateway = "pack"`,
the billable, the pack and its credits (with the bonus). It is fulfilled on payment by the webhook
(`checkout.session.completed`, `checkout.session.async_payment_succeeded`, or the PaymentIntent's
`payment_intent.succeeded`) or by the repair pass, once: see `payments.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import stripe

from gateway.billing.client import plain
from gateway.billing.customers import Customers
from gateway.billing.sync import PriceBook
from gateway.catalog import Catalog, Pack
from gateway.money import to_minor


class UnknownPack(LookupError):
    pass


class Packs:
    def __init__(self, catalog: Callable[[], Catalog], client: stripe.StripeClient, customers: Customers, book: PriceBook) -> None:
        self._catalog = catalog  # the one running now: a published catalog replaces it
        self.client = client
        self.customers = customers
        self.book = book

    @property
    def catalog(self) -> Catalog:
        """The catalog running now (a published one replaces it: never kept from the start)."""
        return self._catalog()

    def credits(self, pack: Pack) -> int:
        return pack.credits + pack.bonus

    async def checkout(self, billable: str, name: str, *, success_url: str, cancel_url: str | None = None) -> dict[str, Any]:
        """A Checkout Session for one pack; answers its id and the URL to send the customer to."""
        pack = self.catalog.packs.get(name)
        if pack is None:
            raise UnknownPack(f'Unknown pack {name!r}: plans.toml has {", ".join(self.catalog.packs) or "no packs"}.')
        customer = await self.customers.ensure(billable)
        metadata = {"gateway": "pack", "billable": billable, "pack": name, "credits": str(self.credits(pack))}
        params: Any = {
            "mode": "payment",
            "customer": customer,
            "client_reference_id": billable,
            "line_items": [await self._line_item(name, pack)],
            "metadata": metadata,
            "payment_intent_data": {"metadata": metadata},
            "success_url": success_url,
            "cancel_url": cancel_url or success_url,
        }
        session = plain(await self.client.v1.checkout.sessions.create_async(params))
        return {"id": session["id"], "url": session.get("url"), "pack": name, "credits": self.credits(pack)}

    async def _line_item(self, name: str, pack: Pack) -> dict[str, Any]:
        if pack.stripe_price:
            return {"price": await self._price_id(name, pack.stripe_price), "quantity": 1}
        assert pack.price is not None, "the catalog requires price or stripe_price"
        currency = self.catalog.settings.currency
        title = pack.name or name.replace("_", " ").title()
        bonus = f" + {pack.bonus:,} bonus" if pack.bonus else ""
        return {
            "price_data": {
                "currency": currency,
                "unit_amount": to_minor(pack.price, currency),
                "product_data": {"name": f"{title}: {pack.credits:,} credits{bonus}"},
            },
            "quantity": 1,
        }

    async def _price_id(self, name: str, ref: str) -> str:
        """A pack's `stripe_price` (an id or lookup_key) as a price id: from the synced snapshot, else Stripe."""
        synced = ((await self.book.current()).get("packs") or {}).get(name)
        if synced:
            return str(synced["price"]["id"])
        found = plain(await self.client.v1.prices.list_async({"lookup_keys": [ref], "active": True, "limit": 1}))
        data = found.get("data") or []
        return str(data[0]["id"]) if data else ref
