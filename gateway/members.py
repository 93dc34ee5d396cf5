"""Members: a billable's parent (org → team → key, two levels at most) and a member's own terms.

    await set_parent(db, "team_a", "org_1")      BadRequest naming the problem (a cycle, a third level)
    await set_terms(db, key_member(key_id), owner, terms)   a key with terms is a member of its owner
    chain = await Members(db).chain("team_a")    Chain(root="org_1", levels=(team_a,)), cached per process

The record is the truth; every gateway process caches each billable's chain for TTL_S (so a new parent or
new terms apply everywhere within that). The org (the root) is the billable that has a plan, a record and
the usage history; a member's own state lives under the root's hash tag (gateway.state.member_key).

A key with terms decides as the member `key:<key id>` (its parent is the key's owner): the key stays a
credential of its owner, and its own budget is counted beside the owner's and the org's."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from gateway.coalesce import Coalescer
from gateway.errors import BadRequest, Conflict, DatabaseUnavailable
from gateway.ids import billable as billable_id
from gateway.store.db import Database, billable_members, billable_overrides
from gateway.terms import MemberTerms

log = logging.getLogger(__name__)

KEY_MEMBER = "key:"
TTL_S = 1.0
BATCH = 500  # billables in one query (SQLite caps a statement's parameters)
KNOWN_MAX = 100_000


def key_member(key_id: str) -> str:
    """The member id a key with terms decides as."""
    return KEY_MEMBER + key_id


def level_word(member: str) -> str:
    """How headers and sentences name a member's level: "key" or "team"."""
    return "key" if member.startswith(KEY_MEMBER) else "team"


@dataclass(frozen=True, slots=True)
class Level:
    id: str
    word: str  # "key" | "team"
    terms: MemberTerms | None
    suspended: bool = False  # PUT .../suspension on the member: its requests are refused, its org's go on


@dataclass(frozen=True, slots=True)
class Chain:
    """A member's org and the levels between, nearest first (one or two)."""

    root: str
    levels: tuple[Level, ...]


# ---- the record ------------------------------------------------------------------------------------


async def parent_of(db: Database, billable: str) -> tuple[str, MemberTerms | None] | None:
    t = billable_members.c
    async with db.engine.connect() as conn:
        row = (await conn.execute(sa.select(t.parent, t.terms).where(t.billable == billable))).first()
    return None if row is None else (row.parent, MemberTerms.from_json(row.terms) if row.terms else None)


async def root_of(db: Database, billable: str) -> str:
    """The org `billable` belongs to, as the record says now: itself, its parent, or its parent's parent."""
    found = await parent_of(db, billable)
    if found is None:
        return billable
    above = await parent_of(db, found[0])
    return found[0] if above is None else above[0]


async def set_parent(db: Database, billable: str, parent: str | None) -> None:
    """Make `billable` a team of `parent` (None: a billable of its own again, its terms dropped)."""
    billable_id(billable, "billable")
    t = billable_members
    if billable.startswith(KEY_MEMBER):
        raise BadRequest(f'{billable} is a key\'s budget: its parent is the key\'s owner (PUT /_gateway/admin/keys/{{id}}/terms)')
    if parent is None:
        async with db.engine.begin() as conn:
            await conn.execute(t.delete().where(t.c.billable == billable))
        return
    billable_id(parent, "parent")
    if parent == billable:
        raise Conflict(f"parent: {billable} cannot be its own parent (a cycle of one).")
    async with db.engine.begin() as conn:
        above = (await conn.execute(sa.select(t.c.parent).where(t.c.billable == parent))).scalar_one_or_none()
        if above == billable:
            raise Conflict(f"parent: {parent} is a member of {billable} already: making {billable} its member would be a cycle.")
        if above is not None:
            raise Conflict(
                f"parent: {parent} is itself a member of {above}: two levels at most (org → team → key); "
                f"give {billable} the parent {above}."
            )
        teams = (await conn.execute(
            sa.select(t.c.billable).where(t.c.parent == billable, ~t.c.billable.startswith(KEY_MEMBER)).limit(3)
        )).scalars().all()  # fmt: skip
        if teams:
            raise Conflict(
                f"parent: {billable} has members of its own ({', '.join(teams)}): two levels at most (org → team → key)."
            )
        insert = db.insert(t).values(billable=billable, parent=parent, updated_at=datetime.now(UTC))
        await conn.execute(insert.on_conflict_do_update(index_elements=[t.c.billable], set_={"parent": parent, "updated_at": insert.excluded.updated_at}))


async def set_terms(db: Database, member: str, terms: MemberTerms | None, *, parent: str | None = None) -> None:
    """A member's own terms (None removes them). A key's member row is made with its owner as `parent`;
    a team must have a parent already."""
    t = billable_members
    now = datetime.now(UTC)
    async with db.engine.begin() as conn:
        if parent is not None:
            if terms is None:
                await conn.execute(t.delete().where(t.c.billable == member))
                return
            insert = db.insert(t).values(billable=member, parent=parent, terms=terms.to_json(), updated_at=now)
            await conn.execute(insert.on_conflict_do_update(index_elements=[t.c.billable], set_={"terms": insert.excluded.terms, "updated_at": now}))
            return
        found = (await conn.execute(t.update().where(t.c.billable == member).values(terms=terms.to_json() if terms else None, updated_at=now))).rowcount
    if found != 1:
        raise Conflict(f"{member} has no parent: give it one first (PUT /_gateway/admin/billables/{member}/parent).")


# ---- the serving cache -----------------------------------------------------------------------------


class Members:
    """Each billable's chain as the record said about TTL_S ago; the lookups asked for while one is on its
    way share the next query (gateway.coalesce: a query per billable and second queued hundreds). Only a
    billable's first lookup waits for the record: after that a request gets what is known at once, and a
    chain older than TTL_S is read again behind it (so a slow or hung record never holds a request up)."""

    def __init__(self, db: Database, *, ttl: float = TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.ttl = ttl
        self.clock = clock
        self._known: dict[str, tuple[float, Chain | None]] = {}
        self._lookups: Coalescer[str, Chain] = Coalescer(self._fetch, size=BATCH)
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    def forget(self, billable: str) -> None:
        self._known.pop(billable, None)

    async def chain(self, billable: str) -> Chain | None:
        """The billable's org and the levels up to it; None for a billable of its own (it is the root)."""
        known = self._known.get(billable)
        if known is not None and self.ttl > 0:  # ttl 0: no cache, every lookup reads the record
            if self.clock() - known[0] >= self.ttl and billable not in self._refreshing:
                self._refreshing[billable] = asyncio.get_running_loop().create_task(self._refresh(billable))
            return known[1]
        try:
            return await self._lookups.get(billable)
        except DatabaseUnavailable as exc:
            if known is not None:
                return known[1]
            if billable.startswith(KEY_MEMBER):
                raise
            log.warning("cannot read the parent of %s (%s): deciding it as a billable of its own", billable, exc)
            return None

    async def _refresh(self, billable: str) -> None:
        try:
            await self._lookups.get(billable)
        except DatabaseUnavailable as exc:  # what is known stands until the record answers
            log.debug("cannot read the parent of %s again (%s): the last one read stands", billable, exc)
        except Exception:
            log.exception("reading the parent of %s again failed", billable)
        finally:
            self._refreshing.pop(billable, None)

    async def _fetch(self, billables: list[str]) -> dict[str, Chain]:
        asked = self.clock()
        a, b = billable_members.alias("a"), billable_members.alias("b")
        sa_, sb = billable_overrides.alias("sa"), billable_overrides.alias("sb")
        query = (
            sa.select(
                a.c.billable, a.c.parent, a.c.terms, b.c.parent.label("root"), b.c.terms.label("parent_terms"),
                sa_.c.suspension.label("suspended"), sb.c.suspension.label("parent_suspended"),
            )
            .select_from(
                a.outerjoin(b, b.c.billable == a.c.parent)
                .outerjoin(sa_, sa_.c.billable == a.c.billable)
                .outerjoin(sb, sb.c.billable == a.c.parent)
            )
            .where(a.c.billable.in_(billables))
        )
        async with self.db.reader.connect() as conn:
            rows = (await conn.execute(query)).all()
        found: dict[str, Chain] = {}
        for row in rows:
            own = Level(row.billable, level_word(row.billable), MemberTerms.from_json(row.terms) if row.terms else None,
                        row.suspended is not None)  # fmt: skip
            if row.root is None:
                found[row.billable] = Chain(row.parent, (own,))
            else:
                team_terms = MemberTerms.from_json(row.parent_terms) if row.parent_terms else None
                found[row.billable] = Chain(row.root, (own, Level(row.parent, "team", team_terms, row.parent_suspended is not None)))
        for billable in billables:
            self._known[billable] = (asked, found.get(billable))
        while len(self._known) > KNOWN_MAX:
            self._known.pop(next(iter(self._known)))
        return found
