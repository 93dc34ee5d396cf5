"""Seats: a plan's `seats = { to = 10 }` is how many live API keys an org may have, its teams' included.

A key made beyond it is refused 403 with the upgrade sentence (NoSeat); a revoked key gives its seat back.
The count is read from the record when a key is made (two makes at the same instant may both pass: a
seat is a commercial count, not a budget the decision script guards)."""

from __future__ import annotations

import sqlalchemy as sa

from gateway.catalog import Catalog
from gateway.errors import GatewayError
from gateway.members import KEY_MEMBER
from gateway.store.db import Database, api_keys, billable_members


class NoSeat(GatewayError):
    """A key beyond the plan's seats: answered 403 urn:gateway:no-seat with this sentence."""


async def root_of(db: Database, billable: str) -> str:
    """The org a billable belongs to (itself when it has no parent)."""
    t = billable_members.c
    async with db.engine.connect() as conn:
        parent = (await conn.execute(sa.select(t.parent).where(t.billable == billable))).scalar_one_or_none()
    return parent if parent is not None else billable


async def seats_used(db: Database, root: str) -> int:
    """Live API keys of the org and of its teams."""
    t, k = billable_members.c, api_keys.c
    teams = sa.select(t.billable).where(t.parent == root, ~t.billable.startswith(KEY_MEMBER))
    query = sa.select(sa.func.count()).select_from(api_keys).where(k.revoked_at.is_(None), sa.or_(k.billable == root, k.billable.in_(teams)))
    async with db.engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def check_seat(db: Database, catalog: Catalog, plan: str, root: str) -> None:
    """NoSeat when `root`, on `plan`, has every seat in use."""
    seats = catalog.plans[plan].seats if plan in catalog.plans else None
    if seats is None:
        return
    used = await seats_used(db, root)
    if used < seats.to:
        return
    title = catalog.plan_title(plan)
    more = [n for n in catalog.plans_by_price() if n != plan and not catalog.plans[n].archived
            and catalog.plans[n].sort_price >= catalog.plans[plan].sort_price
            and ((s := catalog.plans[n].seats) is None or s.to > used)]  # fmt: skip
    upgrade = f" Upgrade to {catalog.plan_title(more[0])} for more seats, or revoke a key." if more else " Revoke a key to free one."
    raise NoSeat(f"Your current plan ({title}) includes {seats.to} seat{'s' if seats.to != 1 else ''}, all in use by {root}'s keys.{upgrade}")
