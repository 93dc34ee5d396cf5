"""Stripe customers ↔ billables, by the customer's `metadata.billable`.

The admin link endpoint writes `metadata.billable` on the customer (creating one when asked with no
body) and records the pair in `stripe_customers`. A customer the merchant's own code created with
`metadata.billable` maps all the same: the first webhook that names it reads the metadata and records it.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
import stripe

from gateway.billing.client import idempotency_key, is_missing, plain
from gateway.billing.subscriptions import relink
from gateway.errors import BadRequest
from gateway.ids import billable as billable_id
from gateway.store.db import Database
from gateway.store.db import stripe_customers as table

log = logging.getLogger("gateway.billing")


class CustomerConflict(Exception):
    """The customer is already linked to another billable."""


class UnknownCustomer(Exception):
    """Stripe has no such customer (or it was deleted)."""


class Customers:
    def __init__(self, db: Database, client: stripe.StripeClient) -> None:
        self.db = db
        self.client = client

    async def linked(self, billable: str) -> str | None:
        """The billable's customer as the record has it (no Stripe call)."""
        async with self.db.engine.connect() as conn:
            found = (await conn.execute(sa.select(table.c.customer).where(table.c.billable == billable))).scalar()
        return None if found is None else str(found)

    async def customer_for(self, billable: str) -> str | None:
        """The billable's customer: from the record, else the one Stripe finds by `metadata.billable`."""
        async with self.db.engine.connect() as conn:
            found = (await conn.execute(sa.select(table.c.customer).where(table.c.billable == billable))).scalar()
        if found:
            return str(found)
        quoted = billable.replace("\\", "\\\\").replace("'", "\\'")
        result = plain(await self.client.v1.customers.search_async({"query": f"metadata['billable']:'{quoted}'", "limit": 1}))
        data = result.get("data") or []
        if not data:
            return None
        customer = str(data[0]["id"])
        async with self.db.engine.begin() as conn:
            await conn.execute(self.db.insert(table).values(customer=customer, billable=billable).on_conflict_do_nothing())
        return customer

    async def billable_for(self, customer: str) -> str | None:
        """The billable of a Stripe customer: from the record, else from its `metadata.billable`."""
        async with self.db.engine.connect() as conn:
            found = (await conn.execute(sa.select(table.c.billable).where(table.c.customer == customer))).scalar()
        if found:
            return str(found)
        try:
            data = plain(await self.client.v1.customers.retrieve_async(customer))
        except stripe.StripeError as exc:
            if is_missing(exc):
                return None
            raise
        billable = (data.get("metadata") or {}).get("billable")
        if not billable or data.get("deleted"):
            return None
        try:
            billable_id(billable, f"metadata.billable of Stripe customer {customer}")
        except BadRequest as exc:
            log.warning("%s: the customer is treated as unlinked", exc)
            return None
        # A billable may have more than one customer; the record keeps the first as the one to charge.
        async with self.db.engine.begin() as conn:
            await conn.execute(self.db.insert(table).values(customer=customer, billable=billable).on_conflict_do_nothing())
        return str(billable)

    async def ensure(self, billable: str) -> str:
        """The billable's customer, created (with `metadata.billable`) when it has none."""
        return await self.link(billable, None)

    async def link(self, billable: str, customer: str | None) -> str:
        """Link `customer` to the billable (writing `metadata.billable`), or create one; answers its id."""
        if customer is None:
            existing = await self.customer_for(billable)
            if existing:
                return existing
            made = plain(
                await self.client.v1.customers.create_async(
                    {"metadata": {"billable": billable}, "description": f"billable {billable}"},
                    {"idempotency_key": idempotency_key("customer", billable)},
                )
            )
            customer = str(made["id"])
        else:
            try:
                data = plain(await self.client.v1.customers.retrieve_async(customer))
            except stripe.StripeError as exc:
                if is_missing(exc):
                    raise UnknownCustomer(f"Stripe has no customer {customer!r}.") from None
                raise
            if data.get("deleted"):
                raise UnknownCustomer(f"Stripe customer {customer!r} was deleted.")
            other = (data.get("metadata") or {}).get("billable")
            if other and other != billable:
                raise CustomerConflict(f"Stripe customer {customer} belongs to billable {other!r} (its metadata.billable).")
            if other != billable:
                await self.client.v1.customers.update_async(
                    customer,
                    {"metadata": {"billable": billable}},
                    {"idempotency_key": idempotency_key("link", customer, billable)},
                )
        async with self.db.engine.begin() as conn:
            await conn.execute(table.delete().where(sa.or_(table.c.billable == billable, table.c.customer == customer)))
            await conn.execute(table.insert().values(customer=customer, billable=billable))
            await relink(conn, customer, billable)
        log.info("Stripe customer %s linked to billable %r", customer, billable)
        return customer

    async def default_payment_method(self, customer: str) -> str | None:
        data: dict[str, Any] = plain(await self.client.v1.customers.retrieve_async(customer))
        method = (data.get("invoice_settings") or {}).get("default_payment_method") or data.get("default_source")
        if isinstance(method, dict):
            method = method.get("id")
        return str(method) if method else None
