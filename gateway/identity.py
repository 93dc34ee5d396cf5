"""API keys: `gw_<id>_<secret>`, shown once, kept as a keyed hash, checked on every request.

The hot path is `KeyStore.authenticate`: a malformed key is refused without I/O; a known key is answered
from memory for at most TTL seconds (so a revocation anywhere is seen everywhere within that), or for
minutes while this process hears the revocation feed (`gateway.revocations`) less than TTL ago; an
unknown id is remembered for a few seconds; concurrent lookups of one id share one query. When the feed
cannot tell what was revoked (its first poll, a feed that lost track, a new Redis epoch: a restart or a
failover) every key is forgotten and checked against the record on its next use; until the record
answers, such a key is not accepted (a revocation made just before a Redis loss stays in force).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.background import Background
from gateway.coalesce import Coalescer
from gateway.errors import DatabaseUnavailable, RedisReplyError, RedisUnavailable
from gateway.ids import billable as billable_id
from gateway.members import KEY_MEMBER
from gateway.revocations import RevocationFeed
from gateway.store.db import Database, api_keys, billable_members, settings

log = logging.getLogger(__name__)

PREFIX = "gw_"
ID_LENGTH = 12
SECRET_LENGTH = 32
KEY_LENGTH = len(PREFIX) + ID_LENGTH + 1 + SECRET_LENGTH
_ALPHABET = string.ascii_letters + string.digits
KEY_PATTERN = rf"{PREFIX}([A-Za-z0-9]{{{ID_LENGTH}}})_([A-Za-z0-9]{{{SECRET_LENGTH}}})"
_KEY = re.compile(KEY_PATTERN)
_KEY_ID = re.compile(rf"[A-Za-z0-9]{{{ID_LENGTH}}}")
PEPPER_SETTING = "api_key_pepper"

TTL_S = 1.0  # how long a key's answer is trusted: the bound on how late a revocation is seen
LONG_TTL_S = 300.0  # how long while the revocation feed is heard (it tells of revocations sooner)
NEGATIVE_TTL_S = 5.0
NEGATIVE_MAX = 10_000
POSITIVE_MAX = 100_000
TOUCH_EVERY = timedelta(minutes=1)
RETRY_AFTER_FAILURE_S = 1.0
BATCH = 500  # key ids in one query (SQLite caps a statement's parameters)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    id: str
    key: str  # the only time the whole key exists outside the client
    billable: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool


def parse_key(text: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None; no I/O."""
    if len(text) != KEY_LENGTH:
        return None
    found = _KEY.fullmatch(text)
    return (found[1], found[2]) if found else None


def key_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key from `X-Api-Key` or `Authorization: Bearer` (ASGI raw headers, lower-case names).

    A gateway key (`gw_...`) wins, X-Api-Key's first: then a Bearer token beside it is the upstream's
    own (an LLM API's). With no gateway key in either, the Bearer token, else X-Api-Key, is presented.
    """
    api_key = bearer = None
    for name, value in headers:
        if name == b"authorization" and bearer is None:
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                bearer = token.strip().decode("latin-1")
        elif name == b"x-api-key" and api_key is None and value.strip():
            api_key = value.strip().decode("latin-1")
    for candidate in (api_key, bearer):
        if candidate is not None and candidate.startswith(PREFIX):
            return candidate
    return bearer if bearer is not None else api_key


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


class _Known:
    """What the record said about a live key, and when this process last asked and last touched it."""

    __slots__ = ("billable", "fetched_at", "hash", "touched_at")

    def __init__(self, billable: str, hash: str, fetched_at: float, touched_at: float | None) -> None:
        self.billable = billable
        self.hash = hash
        self.fetched_at = fetched_at
        self.touched_at = touched_at


class KeyStore:
    """API keys of one gateway process over the record."""

    def __init__(
        self,
        db: Database,
        *,
        ttl: float = TTL_S,
        negative_ttl: float = NEGATIVE_TTL_S,
        negative_max: int = NEGATIVE_MAX,
        positive_max: int = POSITIVE_MAX,
        feed: RevocationFeed | None = None,
        long_ttl: float = LONG_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.ttl = ttl
        self.feed = feed
        self.long_ttl = long_ttl
        self.negative_ttl = negative_ttl
        self.negative_max = negative_max
        self.positive_max = positive_max
        self.clock = clock
        self._pepper: bytes | None = None
        self._pepper_lock = asyncio.Lock()
        self._known: OrderedDict[str, _Known] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()  # id → when it was found missing or revoked
        self._revoked: OrderedDict[str, tuple[str, datetime]] = OrderedDict()  # id → its hash, when it was revoked
        # One query at a time for each; the ids asked for meanwhile go together in the next one (a query or
        # a write per key, after a start or a lost feed, queued hundreds on SQLite's reader and writer).
        self._lookups: Coalescer[str, _Known] = Coalescer(self._fetch, size=BATCH)
        self._touches: Coalescer[str, None] = Coalescer(self._touch, size=BATCH)
        self._failed_at: float | None = None
        self._following = Background("gateway-key-revocations")
        self._synced_at: float | None = None  # when the last poll of the feed that answered was sent
        self._revoked_at: dict[str, float] = {}  # ids the feed named lately, with when (for lookups in flight)
        self._reset_at = -math.inf  # when the feed last said to forget every key
        # Set once the feed was first asked: a key looked up before its first answer could miss a revocation
        # published between the lookup and that answer (the first poll only learns the current sequence).
        self._polled = asyncio.Event()
        if feed is None:
            self._polled.set()

    # ---- the hot path ----------------------------------------------------------------------------------

    async def authenticate(self, presented: str) -> str | None:
        """The billable of a valid, unrevoked key; None otherwise. Raises DatabaseUnavailable only when
        the record cannot answer and this process has never seen the key."""
        parsed = parse_key(presented)
        if parsed is None:
            return None
        key_id = parsed[0]
        feed = self.feed
        if feed is not None:
            self._following.start(lambda: self._follow(feed))
        if not self._polled.is_set():
            await self._polled.wait()
        now = self.clock()
        known = self._known.get(key_id)
        if known is None or not self._trusted(known, now):
            seen = self._unknown.get(key_id)
            if seen is not None and now - seen < self.negative_ttl:
                return None
            known = await self._lookup(key_id, known)
            if known is None:
                return None
        else:
            self._known.move_to_end(key_id)
        pepper = self._pepper or await self._load_pepper()
        if not hmac.compare_digest(known.hash, _digest(pepper, presented)):
            return None
        if known.touched_at is None or now - known.touched_at >= TOUCH_EVERY.total_seconds():
            known.touched_at = now
            self._touches.add(key_id)
        return known.billable

    async def revoked_at(self, presented: str) -> datetime | None:
        """When the key was revoked, for one `authenticate` refused because the record revoked it and whose
        secret is this key's (a guess learns nothing); else None. No I/O but the pepper's first read."""
        parsed = parse_key(presented)
        revoked = self._revoked.get(parsed[0]) if parsed is not None else None
        if revoked is None or not hmac.compare_digest(revoked[0], _digest(self._pepper or await self._load_pepper(), presented)):
            return None
        return revoked[1]

    def _trusted(self, known: _Known, now: float) -> bool:
        age = now - known.fetched_at
        if age < self.ttl:
            return True
        # Heard the feed less than TTL ago: every revocation older than TTL has reached this process.
        return self._synced_at is not None and now - self._synced_at < self.ttl and age < self.long_ttl

    async def _follow(self, feed: RevocationFeed) -> None:
        """Poll the revocation feed for as long as the store lives; drop each key it names."""
        failing = False
        while True:
            asked = self.clock()
            try:
                revoked, reset = await feed.poll()
            except (RedisUnavailable, RedisReplyError) as exc:
                if not failing:
                    log.warning("cannot hear API key revocations (%s); asking the record about each key every %gs", exc, self.ttl)
                failing = True
            else:
                if failing:
                    log.info("hearing API key revocations again")
                failing = False
                # A lookup asked before this answer may predate a revocation it names (or one it cannot
                # name, on a reset): its answer is used once, not kept.
                answered = self.clock()
                if reset:
                    self._known.clear()
                    self._reset_at = answered
                for key_id in revoked:
                    self._known.pop(key_id, None)
                    self._revoked_at[key_id] = answered
                self._synced_at = asked
                for key_id, at in list(self._revoked_at.items()):
                    if asked - at > 10 * self.ttl:
                        del self._revoked_at[key_id]
            finally:
                self._polled.set()
            await asyncio.sleep(feed.interval)

    async def _lookup(self, key_id: str, stale: _Known | None) -> _Known | None:
        """The record's answer for an id, shared by every caller that asks while it is on its way."""
        if self._failed_at is not None and self.clock() - self._failed_at < RETRY_AFTER_FAILURE_S:
            return self._fallback(key_id, stale, None)
        try:
            return await self._lookups.get(key_id)
        except DatabaseUnavailable as exc:
            return self._fallback(key_id, stale, exc)

    async def _fetch(self, ids: list[str]) -> dict[str, _Known]:
        # The clock is read before asking: the answer is then never trusted past TTL after the question.
        asked_at = self.clock()
        # A key with terms of its own decides as its member (gateway.members): its budget beside its owner's.
        member = billable_members.c.billable
        query = (
            sa.select(api_keys.c.id, api_keys.c.billable, api_keys.c.hash, api_keys.c.revoked_at, member.label("member"))
            .select_from(api_keys.outerjoin(billable_members, member == sa.literal(KEY_MEMBER) + api_keys.c.id))
            .where(api_keys.c.id.in_(ids))
        )
        async with self.db.reader.connect() as conn:
            rows = {row.id: row for row in await conn.execute(query)}
        self._failed_at = None
        found: dict[str, _Known] = {}
        for key_id in ids:
            row = rows.get(key_id)
            if row is not None and row.revoked_at is not None:
                self._revoked[key_id] = (row.hash, row.revoked_at)
                while len(self._revoked) > self.negative_max:
                    self._revoked.popitem(last=False)
            if row is None or row.revoked_at is not None or self._revoked_at.get(key_id, -math.inf) >= asked_at:
                self._forget(key_id)  # (the feed named it while the record was answering: revoked since)
                continue
            stale = self._known.get(key_id)
            known = found[key_id] = _Known(row.member or row.billable, row.hash, asked_at, stale.touched_at if stale else None)
            if self._reset_at >= asked_at:
                continue  # answered, but not kept: the feed lost track while the record was answering
            self._unknown.pop(key_id, None)
            self._known[key_id] = known
            self._known.move_to_end(key_id)
        while len(self._known) > self.positive_max:
            self._known.popitem(last=False)
        return found

    def _fallback(self, key_id: str, stale: _Known | None, exc: BaseException | None) -> _Known | None:
        """The record is down: decisions go on for keys this process knows; an unseen key cannot be checked."""
        if exc is not None:
            self._failed_at = self.clock()
            log.warning(
                "API key lookup failed (%s: %s); using what this process last knew", type(exc).__name__, exc
            )
        if stale is not None:
            return stale
        outage = exc if isinstance(exc, DatabaseUnavailable) else DatabaseUnavailable("")
        raise DatabaseUnavailable(
            f"cannot check API key {key_id}: the database did not answer", url=outage.url, reason=outage.reason
        ) from exc

    def _forget(self, key_id: str) -> None:
        self._known.pop(key_id, None)
        self._unknown[key_id] = self.clock()
        self._unknown.move_to_end(key_id)
        while len(self._unknown) > self.negative_max:
            self._unknown.popitem(last=False)

    async def _touch(self, ids: list[str]) -> dict[str, None]:
        """Record the last use of these keys (it is only informative: a failure is logged, not raised)."""
        now = datetime.now(UTC)
        # The condition keeps it to once a minute across processes too.
        update = (
            api_keys.update()
            .where(
                api_keys.c.id.in_(ids),
                sa.or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at <= now - TOUCH_EVERY),
            )
            .values(last_used_at=now)
        )
        try:
            async with self.db.engine.begin() as conn:
                await conn.execute(update)
        except DatabaseUnavailable as exc:
            log.warning("could not record the last use of %d API keys (it is only informative): %s", len(ids), exc)
        return {}

    # ---- the pepper ------------------------------------------------------------------------------------

    async def _load_pepper(self) -> bytes:
        """This installation's hash key, from the settings table; the first process to need it makes it."""
        async with self._pepper_lock:
            if self._pepper is None:
                try:
                    async with self.db.engine.begin() as conn:
                        await conn.execute(
                            self.db.insert(settings)
                            .values(key=PEPPER_SETTING, value=secrets.token_hex(32))
                            .on_conflict_do_nothing(index_elements=["key"])
                        )
                        value = (
                            await conn.execute(
                                sa.select(settings.c.value).where(settings.c.key == PEPPER_SETTING)
                            )
                        ).scalar_one()
                except DatabaseUnavailable as exc:
                    raise DatabaseUnavailable(f"cannot read the API key pepper: {exc}", url=exc.url, reason=exc.reason) from exc
                self._pepper = bytes.fromhex(value)
            return self._pepper

    # ---- administration --------------------------------------------------------------------------------

    async def create(
        self, billable: str, name: str = "", *, seat: Callable[[AsyncConnection], Awaitable[None]] | None = None
    ) -> CreatedKey:
        """A new key for the billable; the returned `key` is never shown again. BadRequest for an id
        outside the billable id rule (nothing is created). `seat` runs first in the insert's transaction
        (gateway.seats.seat_taker: what it raises is raised, nothing created)."""
        billable_id(billable, "billable")
        pepper = self._pepper or await self._load_pepper()
        for _ in range(3):
            key_id = _random(ID_LENGTH)
            key = f"{PREFIX}{key_id}_{_random(SECRET_LENGTH)}"
            created_at = datetime.now(UTC)
            row = {
                "id": key_id,
                "billable": billable,
                "name": name,
                "hash": _digest(pepper, key),
                "created_at": created_at,
            }
            try:
                async with self.db.engine.begin() as conn:
                    if seat is not None:
                        await seat(conn)
                    await conn.execute(api_keys.insert().values(**row))
            except IntegrityError:
                continue  # 62**12 ids: a collision is a freak, so draw again
            self._unknown.pop(key_id, None)
            return CreatedKey(key_id, key, billable, name, created_at)
        raise RuntimeError("could not draw an unused API key id")

    async def list(self, billable: str) -> list[KeyInfo]:
        """The billable's keys, oldest first, revoked ones included; never a secret or a hash."""
        billable_id(billable, "billable")
        c = api_keys.c
        query = (
            sa.select(c.id, c.name, c.created_at, c.last_used_at, c.revoked_at)
            .where(c.billable == billable)
            .order_by(c.created_at, c.id)
        )
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [KeyInfo(r.id, r.name, r.created_at, r.last_used_at, r.revoked_at is not None) for r in rows]

    async def owner(self, key_id: str) -> tuple[str, bool] | None:
        """The billable a key identifies and whether it is revoked; None when there is no such key."""
        if not _KEY_ID.fullmatch(key_id):
            return None
        query = sa.select(api_keys.c.billable, api_keys.c.revoked_at).where(api_keys.c.id == key_id)
        async with self.db.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else (row.billable, row.revoked_at is not None)

    async def refresh(self, key_id: str) -> None:
        """The key changed in the record (its terms): every process reads it again on its next use (with a
        feed, told at once; else within TTL). RedisUnavailable when the feed cannot take it."""
        self._known.pop(key_id, None)
        if self.feed is not None:
            try:
                await self.feed.publish(key_id)
            except RedisReplyError as exc:
                raise RedisUnavailable(f"Redis did not take the change of {key_id}: {exc}") from exc

    async def revoke(self, key_id: str) -> bool:
        """Revoke the key (again is fine); False when there is no such key. Other processes follow within TTL.

        With a feed the revocation is announced too; when Redis cannot take it this raises RedisUnavailable
        (the record has it: revoking again announces it)."""
        if not _KEY_ID.fullmatch(key_id):
            return False  # no key has that id: answered without I/O (a NUL would not even reach Postgres)
        now = sa.literal(datetime.now(UTC), api_keys.c.revoked_at.type)
        update = (
            api_keys.update()
            .where(api_keys.c.id == key_id)
            .values(revoked_at=sa.func.coalesce(api_keys.c.revoked_at, now))
        )
        async with self.db.engine.begin() as conn:
            found = (await conn.execute(update)).rowcount == 1
        if found:
            self._known.pop(key_id, None)  # the next use reads the record: it says when, for the 401
            if self.feed is not None:
                try:
                    await self.feed.publish(key_id)
                except RedisReplyError as exc:
                    raise RedisUnavailable(f"Redis did not take the revocation of {key_id}: {exc}") from exc
        return found

    async def close(self) -> None:
        """Stop following the feed; wait for the last-used updates still on their way."""
        await self._following.stop()
        self._polled.set()  # a request still waiting for the first poll goes on (and asks the record)
        await self._touches.drain()


def _digest(pepper: bytes, key: str) -> str:
    return hmac.new(pepper, key.encode("ascii"), hashlib.sha256).hexdigest()
