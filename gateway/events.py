"""Events: the outbox in the record, their signed delivery to `[events] webhook_url`, and in-process callbacks.

    outbox = Outbox(db)
    await outbox.add(events)                 idempotent by event id; the body is the exact JSON to POST
    deliverer = Deliverer(db, url, secret)
    deliverer.start(); ...; await deliverer.stop()
    await replay(db, dead=True)              dead-lettered events back in the queue (`gateway events replay`)
    verify_signature(secret, request.headers["Gateway-Signature"], body)     for receivers

Delivery is at least once: an event is marked delivered only after its 2xx, so a receiver deduplicates
by `Gateway-Event-Id`. A failure (any other status, a timeout, a dropped connection, a body cut short) is
retried with exponential backoff and jitter; after `max_attempts` the event is dead-lettered (`dead_at`)
until replayed. Any number of gateway processes may deliver from one database: each claims a row by
moving its `next_attempt_at` forward by a lease, compare-and-set on the value it read, before sending it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.decision import Decision
from gateway.outbox_sender import OutboxSender
from gateway.store.db import Database, events_outbox

log = logging.getLogger(__name__)

SIGNATURE_TOLERANCE_S = 300
_ERROR_CHARS = 300  # of a receiver's answer kept in last_error


def event_body(event: dict[str, Any]) -> str:
    """The JSON of an event exactly as it is signed and POSTed (DESIGN §3)."""
    return json.dumps(event, separators=(",", ":"))


# ---- signatures -----------------------------------------------------------------------------------------


def sign(secret: str, body: str | bytes, timestamp: int) -> str:
    """The `Gateway-Signature` value: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    raw = body.encode() if isinstance(body, str) else body
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + raw, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: str, header: str | None, body: str | bytes, tolerance: float = SIGNATURE_TOLERANCE_S, *, now: float | None = None
) -> bool:
    """True when `header` signs `body` with `secret` and its timestamp is within `tolerance` seconds of now.

    For receivers: pass the raw request body, not a re-serialized one. Several `v1=` values are accepted
    (a sender rotating its secret may sign with both).
    """
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    # Compare against every candidate, so the time taken says nothing about which one matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected.encode(), candidate.encode())
    return matched


# ---- the outbox -----------------------------------------------------------------------------------------


class Outbox:
    """Events waiting for delivery, in `events_outbox`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, events: list[dict[str, Any]], conn: AsyncConnection | None = None) -> None:
        """Insert each event once, by its id; adding an event already there changes nothing.

        With `conn`, inside the caller's transaction (with the grant that caused the event)."""
        if not events:
            return
        now = datetime.now(UTC)
        rows = [
            {
                "id": e["id"],
                "billable": e["billable"],
                "type": e["type"],
                "body": event_body(e),
                "created_at": now,
                "next_attempt_at": now,
            }
            for e in events
        ]
        stmt = self.db.insert(events_outbox).on_conflict_do_nothing(index_elements=["id"])
        if conn is not None:
            await conn.execute(stmt, rows)
            return
        async with self.db.engine.begin() as own:
            await own.execute(stmt, rows)

    async def prune(self, older_than: timedelta) -> int:
        """Forget the events emitted more than `older_than` ago, whatever became of them: by then each was
        delivered, dead-lettered (18 attempts take hours) or, with no webhook configured, never sent."""
        cutoff = datetime.now(UTC) - older_than
        async with self.db.engine.begin() as conn:
            result = await conn.execute(sa.delete(events_outbox).where(events_outbox.c.created_at < cutoff))
        return int(result.rowcount)

    async def backlog(self) -> dict[str, Any]:
        """Events still to deliver, dead-lettered ones, and how long the oldest waiting one has waited."""
        t = events_outbox.c
        async with self.db.reader.connect() as conn:
            waiting, oldest = (
                await conn.execute(
                    sa.select(sa.func.count(), sa.func.min(t.created_at)).where(t.delivered_at.is_(None), t.dead_at.is_(None))
                )
            ).one()
            dead = (await conn.execute(sa.select(sa.func.count()).where(t.dead_at.is_not(None)))).scalar_one()
        waited = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0
        return {"waiting": int(waiting), "dead": int(dead), "oldest_waiting_seconds": round(max(waited, 0.0), 3)}


async def replay(db: Database, *, dead: bool = False, since: datetime | None = None, event_id: str | None = None) -> int:
    """Put events out of the queue back in it, due now, with their attempts reset; returns how many.

    With no filter, the dead-lettered events; `since` (created at or after) and `event_id` also match
    delivered ones (to send them again), unless `dead` keeps only the dead-lettered. Events still queued
    are left alone: they are on their way already, perhaps being sent right now.
    """
    t = events_outbox.c
    where: list[sa.ColumnElement[bool]] = []
    if dead or (since is None and event_id is None):
        where.append(t.dead_at.is_not(None))
    else:
        where.append(sa.or_(t.dead_at.is_not(None), t.delivered_at.is_not(None)))
    if since is not None:
        where.append(t.created_at >= since)
    if event_id is not None:
        where.append(t.id == event_id)
    stmt = (
        sa.update(events_outbox)
        .where(*where)
        .values(dead_at=None, delivered_at=None, attempts=0, next_attempt_at=datetime.now(UTC))
    )
    async with db.engine.begin() as conn:
        result = await conn.execute(stmt)
    return int(result.rowcount)


# ---- delivery -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Claimed:
    id: str
    body: str
    attempts: int  # before this one
    lease_until: datetime


class Deliverer(OutboxSender[_Claimed]):
    """POSTs due events from the outbox to the webhook, oldest first, a bounded batch a few at a time."""

    name = "events"

    def __init__(
        self,
        db: Database,
        url: str,
        secret: str | None,
        *,
        batch: int = 50,
        concurrency: int = 8,
        timeout: float = 10.0,
        max_attempts: int = 18,
        backoff: float = 1.0,
        max_backoff: float = 600.0,
        poll: float = 1.0,
    ) -> None:
        super().__init__(batch=batch, concurrency=concurrency, poll=poll)
        self.db = db
        self.url = url
        self.secret = secret
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        # A claim outlives the slowest batch (every send timing out), so no other process takes it meanwhile.
        self.lease = timeout * math.ceil(batch / concurrency) + 30.0
        self.delivered = 0  # counts for this process, for tests and logs
        self.failed = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def stop_wait(self) -> float:
        return self.timeout + 1.0  # the batch in flight: one send timeout

    def start(self) -> None:
        if not self.secret:
            log.warning("events go to %s unsigned: set GATEWAY_WEBHOOK_SECRET so receivers can verify them", self.url)
        super().start()

    async def stop(self) -> None:
        """Let the batch in flight finish (up to one send timeout), then stop; what is left is sent later."""
        await super().stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _claim(self) -> list[_Claimed]:
        t = events_outbox.c
        now = datetime.now(UTC)
        due = (
            sa.select(t.id, t.body, t.attempts, t.next_attempt_at)
            .where(t.delivered_at.is_(None), t.dead_at.is_(None), t.next_attempt_at <= now)
            .order_by(t.next_attempt_at, t.created_at, t.id)
            .limit(self.batch)
        )
        lease_until = now + timedelta(seconds=self.lease)
        claimed: list[_Claimed] = []
        async with self.db.engine.begin() as conn:
            rows = (await conn.execute(due)).all()
            order = {row.id: i for i, row in enumerate(rows)}
            # Rows are locked in id order, so two processes claiming overlapping batches cannot deadlock.
            for row in sorted(rows, key=lambda r: r.id):
                taken = await conn.execute(
                    sa.update(events_outbox)
                    .where(t.id == row.id, t.next_attempt_at == row.next_attempt_at, t.delivered_at.is_(None), t.dead_at.is_(None))
                    .values(next_attempt_at=lease_until)
                )
                if taken.rowcount == 1:
                    claimed.append(_Claimed(row.id, row.body, row.attempts, lease_until))
        claimed.sort(key=lambda c: order[c.id])
        return claimed

    async def _send(self, event: _Claimed) -> str | None:
        """POST one event; None on a 2xx fully received, else what went wrong."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.concurrency),
            )
        headers = {"Content-Type": "application/json", "Gateway-Event-Id": event.id}
        if self.secret:
            headers["Gateway-Signature"] = sign(self.secret, event.body, int(time.time()))
        try:
            async with self._session.post(self.url, data=event.body.encode(), headers=headers, allow_redirects=False) as resp:
                # Read the whole answer: a 2xx whose body is cut short may not have been processed.
                head = b""
                async for chunk in resp.content.iter_chunked(65536):
                    if len(head) < _ERROR_CHARS:
                        head += chunk[: _ERROR_CHARS - len(head)]
                if 200 <= resp.status < 300:
                    return None
                return f"HTTP {resp.status}: {head.decode('utf-8', 'replace')}".rstrip(": ")
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def _record(self, outcomes: list[tuple[_Claimed, str | None]]) -> None:
        t = events_outbox.c
        now = datetime.now(UTC)
        async with self.db.engine.begin() as conn:
            for event, error in outcomes:
                if error is None:
                    self.delivered += 1
                    await conn.execute(
                        sa.update(events_outbox)
                        .where(t.id == event.id, t.delivered_at.is_(None))
                        .values(delivered_at=now, attempts=event.attempts + 1)
                    )
                    continue
                self.failed += 1
                attempts = event.attempts + 1
                values: dict[str, Any] = {"attempts": attempts, "last_error": error[:_ERROR_CHARS]}
                if attempts >= self.max_attempts:
                    values["dead_at"] = now
                    log.warning("event %s dead-lettered after %d attempts: %s", event.id, attempts, error)
                else:
                    values["next_attempt_at"] = now + timedelta(seconds=self.delay(attempts))
                # Only while the claim is still ours: a replay may have requeued it meanwhile.
                await conn.execute(
                    sa.update(events_outbox)
                    .where(t.id == event.id, t.next_attempt_at == event.lease_until, t.delivered_at.is_(None))
                    .values(**values)
                )

    def delay(self, attempts: int) -> float:
        """Seconds before the next try after `attempts` failures: doubling from `backoff`, capped, ±25 % jitter."""
        base = min(self.max_backoff, self.backoff * 2.0 ** min(attempts - 1, 62))
        return min(self.max_backoff, base * random.uniform(0.75, 1.25))


# ---- in-process callbacks (middleware mode) ----------------------------------------------------------------

Callback = Callable[[dict[str, Any]], Any]


class EventCallbacks:
    """Python callables told of events as decisions emit them, registered per event type and optionally limit.

        callbacks = EventCallbacks()

        @callbacks.on("warning", limit="exports")
        async def exports_nearly_used(event: dict[str, Any]) -> None:
            await notify(event["billable"], event["data"])

        @callbacks.on("credits_depleted")
        def depleted(event: dict[str, Any]) -> None:
            log.info("%s is out of credits", event["billable"])

        app = GatewayMiddleware(app, engine=engine, billable=billable_of, on_decision=callbacks)

    A callback gets the event dict (DESIGN §3). Async callbacks run as tasks, after the request goes on;
    sync ones run inline, so keep them quick. A callback that raises is logged and never breaks a request.
    These are immediate and in-process only: an event reaches them once, from the process that decided,
    and not again after a crash; the webhook (the outbox) is the durable channel.
    """

    def __init__(self) -> None:
        self._callbacks: list[tuple[str, str | None, Callback]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def on(self, type: str, *, limit: str | None = None) -> Callable[[Callback], Callback]:
        def register(fn: Callback) -> Callback:
            self._callbacks.append((type, limit, fn))
            return fn

        return register

    def __call__(self, decision: Decision) -> None:
        for event in decision.events:
            limit = (event.get("data") or {}).get("limit")
            for type_, wanted, fn in self._callbacks:
                if type_ == event["type"] and (wanted is None or wanted == limit):
                    self._dispatch(fn, event)

    def _dispatch(self, fn: Callback, event: dict[str, Any]) -> None:
        try:
            result = fn(event)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._done)
        except Exception:
            log.exception("event callback %s failed on %s %s", _name(fn), event["type"], event["id"])

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("an event callback failed", exc_info=task.exception())

    async def join(self) -> None:
        """Wait for the async callbacks still running (at shutdown, or in tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _name(fn: Callback) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
