"""Money first: a grant is committed in the record, then applied to Redis in order, exactly once.

Each grant gets a gapless per-billable sequence number, allocated under a row lock in the same
transaction that records it with its idempotency key. Redis applies numbers strictly in order and
remembers the last one, so a crash anywhere between the two steps, or a retry of either, neither
loses nor doubles a grant: the next `apply` pushes whatever the record has that Redis lacks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.bounds import MAX_INT
from gateway.engine import Engine
from gateway.errors import Conflict, DatabaseUnavailable, GatewayError, RedisUnavailable, StateUnavailable
from gateway.store import db as tables
from gateway.store.db import Database, answering

log = logging.getLogger("gateway.grants")


@dataclass(frozen=True, slots=True)
class GrantRecord:
    billable: str
    sequence: int
    amount: int
    idempotency_key: str
    duplicate: bool
    applied: bool = False  # Redis holds it; False: recorded, and applied by the next apply of the billable
    amount_cents: int = 0  # what was paid for it (negative: a refund)


class GrantConflict(GatewayError):
    """The idempotency key names an earlier grant with another billable or amount."""


class Grants:
    def __init__(self, db: Database, engine: Engine) -> None:
        self.db = db
        self.engine = engine
        self._applying: dict[str, asyncio.Lock] = {}

    async def grant(
        self,
        billable: str,
        amount: int,
        *,
        idempotency_key: str,
        reason: str = "",
        source: str = "admin",
        amount_cents: int = 0,
    ) -> GrantRecord:
        """Record the grant (once per idempotency key), then apply it. A retry returns the first result.

        DatabaseUnavailable when nothing was recorded. Recorded but not applied (Redis, or the record,
        did not answer the apply): `applied` is False, and the grant reaches Redis with the next apply of
        this billable (a retry with the same key, a restore, or the reconciler's stranded-grant pass)."""
        for _ in range(5):
            try:
                with answering(self.db.shown, undone="the grant was not made. Retry with the same idempotency_key."):
                    record = await self._record(billable, amount, idempotency_key, reason, source, amount_cents)
                break
            except IntegrityError:
                continue  # a concurrent grant took the key or the number: read what it wrote
        else:
            raise DatabaseUnavailable(
                "The grant could not be recorded after several concurrent conflicts; retry with the same idempotency_key.",
                url=self.db.shown,
                reason="concurrent conflicts",
            )
        if record.duplicate and (record.billable, record.amount) != (billable, amount):
            raise GrantConflict(
                f"idempotency_key {idempotency_key!r} was used for a grant of {record.amount} to {record.billable}: "
                "send a new key for a different grant."
            )
        try:
            await self.apply(billable)
        except (RedisUnavailable, StateUnavailable, DatabaseUnavailable) as exc:
            log.warning("grant %s to %s is recorded, not yet applied: %s", idempotency_key, billable, exc)
            return replace(record, applied=False)
        return replace(record, applied=True)

    async def _record(self, billable: str, amount: int, key: str, reason: str, source: str, amount_cents: int) -> GrantRecord:
        async with self.db.engine.begin() as conn:
            return await self.record(conn, billable, amount, idempotency_key=key, reason=reason, source=source, amount_cents=amount_cents)

    async def record(
        self,
        conn: AsyncConnection,
        billable: str,
        amount: int,
        *,
        idempotency_key: str,
        reason: str = "",
        source: str = "admin",
        amount_cents: int = 0,
    ) -> GrantRecord:
        """Record a grant inside the caller's transaction (with what caused it); `apply` it after the commit.

        A concurrent grant with the same key or number makes the transaction fail with IntegrityError."""
        grants = tables.credit_grants
        key = idempotency_key
        found = await granted(conn, key)
        if found is not None:
            return found
        seq = await self._next_sequence(conn, billable)
        # Under the sequence row's lock: what the record has granted this billable stays within ±MAX_INT.
        total = (await conn.execute(sa.select(sa.func.coalesce(sa.func.sum(grants.c.amount), 0)).where(grants.c.billable == billable))).scalar()
        if abs(int(total or 0) + amount) > MAX_INT:
            raise Conflict(
                f"amount: this grant would take the credits granted to {billable} to {int(total or 0) + amount}, "
                f"past ±{MAX_INT}."
            )
        await conn.execute(
            grants.insert().values(
                billable=billable,
                seq=seq,
                amount=amount,
                reason=reason,
                idempotency_key=key,
                amount_cents=amount_cents,
                source=source,
                created_at=datetime.now(UTC),
            )
        )
        return GrantRecord(billable, seq, amount, key, duplicate=False)

    async def find(self, idempotency_key: str) -> GrantRecord | None:
        """The grant recorded under this key, if any."""
        with answering(self.db.shown, undone="the grant was not made."):
            async with self.db.engine.connect() as conn:
                return await granted(conn, idempotency_key)

    async def _next_sequence(self, conn: AsyncConnection, billable: str) -> int:
        sequences = tables.grant_sequences
        locked = sa.select(sequences.c.last_seq).where(sequences.c.billable == billable).with_for_update()
        last = (await conn.execute(locked)).scalar()
        if last is None:
            # The first grant of a billable creates its row; a concurrent first grant fails on the key and retries.
            await conn.execute(sequences.insert().values(billable=billable, last_seq=1))
            return 1
        await conn.execute(sequences.update().where(sequences.c.billable == billable).values(last_seq=last + 1))
        return int(last) + 1

    async def apply(self, billable: str) -> None:
        """Push the record's grants that Redis lacks, in sequence order."""
        lock = self._applying.setdefault(billable, asyncio.Lock())
        async with lock:
            grants = tables.credit_grants
            async with self.db.engine.connect() as conn:
                pending = (
                    await conn.execute(
                        sa.select(grants.c.seq, grants.c.amount)
                        .where(grants.c.billable == billable, grants.c.applied_at.is_(None))
                        .order_by(grants.c.seq)
                    )
                ).all()
            for seq, amount in pending:
                result = await self.engine.apply_grant(billable, seq, amount)
                if result.status == "gap":
                    # Redis is behind the record (restored from an older snapshot): replay from what it holds.
                    await self.engine.replay(billable, result.last_sequence, self.after_sequence)
            if pending:
                async with self.db.engine.begin() as conn:
                    await conn.execute(
                        grants.update()
                        .where(grants.c.billable == billable, grants.c.seq.in_([seq for seq, _ in pending]))
                        .values(applied_at=datetime.now(UTC))
                    )

    async def after_sequence(self, billable: str, after: int) -> list[tuple[int, int]]:
        """The grants numbered above `after`, as (sequence, amount) in order."""
        async with self.db.engine.connect() as conn:
            return await grants_after(conn, billable, after)

    async def stranded(self, since: datetime) -> list[str]:
        """The billables with grants recorded before `since` and still not applied to Redis."""
        grants = tables.credit_grants
        async with self.db.engine.connect() as conn:
            found = await conn.execute(
                sa.select(grants.c.billable).where(grants.c.applied_at.is_(None), grants.c.created_at < since).distinct()
            )
            return list(found.scalars())

    async def record_assignment(self, billable: str, plan: str | None) -> None:
        """A manual plan assignment is part of the record before Redis sees it."""
        assignments = tables.plan_assignments
        with answering(self.db.shown, undone="the plan was not changed."):
            async with self.db.engine.begin() as conn:
                await conn.execute(assignments.delete().where(assignments.c.billable == billable))
                if plan is not None:
                    await conn.execute(assignments.insert().values(billable=billable, plan=plan, updated_at=datetime.now(UTC)))


async def granted(conn: AsyncConnection, key: str) -> GrantRecord | None:
    """The grant recorded under an idempotency key, read inside the caller's transaction."""
    grants = tables.credit_grants
    found = (await conn.execute(sa.select(grants).where(grants.c.idempotency_key == key))).first()
    if found is None:
        return None
    applied = found.applied_at is not None
    return GrantRecord(found.billable, found.seq, found.amount, key, duplicate=True, applied=applied, amount_cents=found.amount_cents)


def granted_billables() -> sa.Select[tuple[str]]:
    """The billables the record has granted credits to, as a query to compose."""
    return sa.select(tables.credit_grants.c.billable)


async def grants_after(conn: AsyncConnection, billable: str, after: int) -> list[tuple[int, int]]:
    """The billable's grants numbered above `after`, as (sequence, amount) in order."""
    grants = tables.credit_grants
    found = await conn.execute(
        sa.select(grants.c.seq, grants.c.amount).where(grants.c.billable == billable, grants.c.seq > after).order_by(grants.c.seq)
    )
    return [(int(seq), int(amount)) for seq, amount in found]


def numbered_grants(billables: Sequence[str]) -> sa.Select[tuple[str, int, int]]:
    """The grants of these billables as (billable, seq, amount) rows, as a query to compose."""
    grants = tables.credit_grants
    return sa.select(grants.c.billable, grants.c.seq, grants.c.amount).where(grants.c.billable.in_(billables))
