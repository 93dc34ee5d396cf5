"""Seats: a plan's `seats = { to = 10 }` is how many live API keys an org may have, its teams' included.

A key made beyond it is refused 403 with the upgrade sentence (NoSeat); a revoked key gives its seat back.
The seats in use are counted in the key's insert transaction, under a lock on the org (`take_seat`: on
Postgres a transaction-scoped advisory lock on the org's id, on SQLite the write lock BEGIN IMMEDIATE
takes), so two makes at the same instant never both take the last seat."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.catalog import Catalog
from gateway.errors import GatewayError
from gateway.members import KEY_MEMBER
from gateway.store.db import Database, api_keys, billable_members


class NoSeat(GatewayError):
    """A key beyond the plan's seats: answered 403 urn:gateway:no-seat with this sentence."""


async def seats_used(conn: AsyncConnection, root: str) -> int:
    """Live API keys of the org and of its teams."""
    t, k = billable_members.c, api_keys.c
    teams = sa.select(t.billable).where(t.parent == root, ~t.billable.startswith(KEY_MEMBER))
    query = sa.select(sa.func.count()).select_from(api_keys).where(k.revoked_at.is_(None), sa.or_(k.billable == root, k.billable.in_(teams)))
    return int((await conn.execute(query)).scalar_one())


def seat_taker(db: Database, catalog: Catalog, plan: str, root: str) -> Callable[[AsyncConnection], Awaitable[None]]:
    """What a key's insert transaction runs first (gateway.identity.KeyStore.create): `take_seat` for `root`."""

    async def take(conn: AsyncConnection) -> None:
        await take_seat(conn, db, catalog, plan, root)

    return take


async def take_seat(conn: AsyncConnection, db: Database, catalog: Catalog, plan: str, root: str) -> None:
    """NoSeat when `root`, on `plan`, has every seat in use; else the seat is the transaction's until it
    commits (another make for the same org waits on the lock, then counts this one's key)."""
    seats = catalog.plans[plan].seats if plan in catalog.plans else None
    if seats is None:
        return
    if not db.is_sqlite:  # SQLite's writer holds the database's write lock from BEGIN IMMEDIATE
        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtextextended(root, 0))))
    used = await seats_used(conn, root)
    if used < seats.to:
        return
    title = catalog.plan_title(plan)
    more = [n for n in catalog.plans_by_price() if n != plan and not catalog.plans[n].archived
            and catalog.plans[n].sort_price >= catalog.plans[plan].sort_price
            and ((s := catalog.plans[n].seats) is None or s.to > used)]  # fmt: skip
    upgrade = f" Upgrade to {catalog.plan_title(more[0])} for more seats, or revoke a key." if more else " Revoke a key to free one."
    raise NoSeat(f"Your current plan ({title}) includes {seats.to} seat{'s' if seats.to != 1 else ''}, all in use by {root}'s keys.{upgrade}")
