"""Billed units to Stripe, exactly once: each outbox row (gateway/billing/outbox.py) is one meter event
(`POST /v1/billing/meter_events`) whose `identifier` is derived from the row's key, so a retry, a crash
between sending and marking it sent, or two processes sending the same row can never bill twice: Stripe
refuses an identifier it has (within 24 h at least), and that refusal marks the row sent.

    sender = MeterSender(db, client)      # its own background task: start() / stop()
    await sender.run_once()               # one batch: claim due rows, send, mark sent or back off

A row is sent once its minute is over by `margin` seconds (no flush adds to it any more); the customer is
the billable's Stripe customer (stripe_customers), the event's name the catalog's Stripe meter of that
meter. A failure backs off (doubling up to 10 minutes) and is retried for as long as it takes: the backlog
is in the record, so it survives restarts.

Above `stream_above` rows due in one claim (GATEWAY_STRIPE_METER_STREAM_ABOVE), the claim goes by the v2
meter event stream instead: a session (`POST /v2/billing/meter_event_session`, the secret key) gives a
token for 15 minutes, renewed before it ends and on a 401; each `POST /v2/billing/meter_event_stream`
carries up to 100 events with the same identifiers, so the same row sent by either path is billed once.
The threshold is rows due in a claim, not a measured rate: the claim is what the sender has in hand when
it chooses, and a backlog (a restart, Stripe away for a while) is exactly when one request per event is
too slow. It is off by default: the stream validates asynchronously (an event Stripe refuses is reported
later, not in the answer), so v1, which answers each event, stays the default below real volume.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import stripe
from stripe.params.billing import MeterEventCreateParams
from stripe.params.v2.billing import MeterEventStreamCreateParams

from gateway.billing.client import each
from gateway.outbox_sender import OutboxSender
from gateway.store.db import Database, meter_outbox, stripe_customers

log = logging.getLogger(__name__)

MARGIN_S = 120.0  # a minute's row is sent this long after the minute ended
STREAM_BATCH = 100  # events in one meter event stream request (Stripe's most)
SESSION_MARGIN_S = 60.0  # a stream session is renewed this long before Stripe says it expires
_DUPLICATE_CODES = frozenset({"duplicate_meter_event"})
_DUPLICATE_MESSAGE = "An event already exists with identifier"


def identifier(billable: str, meter: str, minute: int) -> str:
    """The meter event's identifier of one outbox row: the same row, the same identifier, in any process."""
    digest = hashlib.sha256(f"{billable}\x1f{meter}\x1f{minute}".encode()).hexdigest()[:48]
    return f"gw_{digest}"


def is_duplicate(exc: stripe.StripeError) -> bool:
    """Stripe refused the event because it has one with this identifier: the row was sent before."""
    message = str(getattr(exc, "user_message", None) or exc)
    return exc.code in _DUPLICATE_CODES or _DUPLICATE_MESSAGE in message


@dataclass(frozen=True, slots=True)
class _Row:
    billable: str
    meter: str
    minute: int
    units: int
    attempts: int
    customer: str | None


class MeterSender(OutboxSender[_Row]):
    """Sends due outbox rows, a bounded batch a few at a time; counts what it did (for tests and logs)."""

    name = "meters"

    def __init__(
        self,
        db: Database,
        client: stripe.StripeClient,
        *,
        event_name: Callable[[str], str] = lambda meter: meter,
        batch: int = 200,
        concurrency: int = 16,
        lease: float = 30.0,
        margin: float = MARGIN_S,
        max_backoff: float = 600.0,
        poll: float = 1.0,
        clock: Callable[[], float] | None = None,
        stream_above: int | None = None,
    ) -> None:
        super().__init__(batch=batch, concurrency=concurrency, poll=poll)
        self.stream_above = stream_above
        self._session: tuple[str, float] | None = None  # the stream's token and when to renew it (unix s)
        self._renewing = asyncio.Lock()
        self.streamed = 0  # rows sent by the stream
        self.sessions = 0  # stream sessions created
        self.db = db
        self.client = client
        self.event_name = event_name
        self.margin = margin
        self.max_backoff = max_backoff
        self.clock = clock or (lambda: datetime.now(UTC).timestamp())
        # How long a claim keeps other senders off its rows: one that outlives it (a slow Stripe, a sender
        # killed) is sent again, which Stripe refuses by its identifier, so it only costs a request.
        self.lease = lease
        self.sent = 0
        self.duplicates = 0  # rows Stripe had already (sent before a crash, or by another process)
        self.failed = 0

    @property
    def stop_wait(self) -> float:
        return self.lease  # a claim's own lease: past it, its rows are another sender's anyway

    async def _claim(self) -> list[_Row]:
        o = meter_outbox.c
        now = datetime.fromtimestamp(self.clock(), UTC)
        over = int(self.clock() - self.margin) // 60 * 60 - 60  # the last minute over by `margin`
        due = (
            sa.select(o.billable, o.meter, o.minute, o.units, o.attempts, o.next_attempt_at, stripe_customers.c.customer)
            .select_from(meter_outbox.outerjoin(stripe_customers, stripe_customers.c.billable == o.billable))
            .where(o.sent_at.is_(None), o.next_attempt_at <= now, o.minute <= over)
            .order_by(o.next_attempt_at, o.minute, o.billable, o.meter)
            .limit(self.batch)
        )
        lease_until = now + timedelta(seconds=self.lease)
        claimed: list[_Row] = []
        async with self.db.engine.begin() as conn:
            rows = (await conn.execute(due)).all()
            # Claimed in key order, so two processes claiming overlapping batches cannot deadlock.
            for r in sorted(rows, key=lambda r: (r.billable, r.meter, r.minute)):
                taken = await conn.execute(
                    sa.update(meter_outbox)
                    .where(o.billable == r.billable, o.meter == r.meter, o.minute == r.minute, o.sent_at.is_(None),
                           o.next_attempt_at == r.next_attempt_at)
                    .values(next_attempt_at=lease_until)
                )
                if taken.rowcount == 1:
                    claimed.append(_Row(r.billable, r.meter, r.minute, r.units, r.attempts, r.customer))
        return claimed

    async def _send_all(self, claimed: list[_Row]) -> list[tuple[_Row, str | None]]:
        if self.stream_above is None or len(claimed) <= self.stream_above:
            return await super()._send_all(claimed)
        outcomes: list[tuple[_Row, str | None]] = [(r, _no_customer(r)) for r in claimed if r.customer is None]
        ready = [r for r in claimed if r.customer is not None]
        gate = asyncio.Semaphore(self.concurrency)

        async def send(chunk: list[_Row]) -> list[tuple[_Row, str | None]]:
            async with gate:
                error = await self._stream(chunk)
            return [(r, error) for r in chunk]

        chunks = [ready[i:i + STREAM_BATCH] for i in range(0, len(ready), STREAM_BATCH)]
        for sent in await asyncio.gather(*(send(c) for c in chunks)):
            outcomes += sent
        self.streamed += sum(1 for _, error in outcomes if error is None)
        return outcomes

    async def _stream(self, rows: list[_Row]) -> str | None:
        """One meter event stream request for `rows`; None once Stripe took it (a duplicate identifier it
        drops, as it has that event), else what went wrong. A token Stripe refuses is renewed once."""
        params: MeterEventStreamCreateParams = {"events": [{
            "event_name": self.event_name(r.meter), "identifier": identifier(r.billable, r.meter, r.minute),
            "timestamp": datetime.fromtimestamp(r.minute, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "payload": {"stripe_customer_id": r.customer or "", "value": str(r.units)},
        } for r in rows]}  # fmt: skip
        for renewed in (False, True):
            try:
                token = await self._token()
                await self.client.v2.billing.meter_event_stream.create_async(params, {"api_key": token})
            except (stripe.AuthenticationError, stripe.TemporarySessionExpiredError) as exc:
                self._session = None  # expired or revoked before its time: a new session, then once more
                if renewed:
                    return f"{type(exc).__name__}: {exc}"[:500]
            except stripe.StripeError as exc:
                return f"{type(exc).__name__}: {exc}"[:500]
            except (TimeoutError, OSError) as exc:
                return f"{type(exc).__name__}: {exc}"[:500]
            else:
                return None
        return None  # not reached: the second try answers

    async def _token(self) -> str:
        """The stream session's token, a new session when there is none or it is about to expire."""
        async with self._renewing:
            if self._session is None or self._session[1] <= self.clock():
                made = await self.client.v2.billing.meter_event_session.create_async()
                expires = datetime.fromisoformat(made.expires_at).timestamp()
                self._session = (made.authentication_token, expires - SESSION_MARGIN_S)
                self.sessions += 1
            return self._session[0]

    async def _send(self, row: _Row) -> str | None:
        """One meter event; None when Stripe has it (now, or from before), else what went wrong."""
        if row.customer is None:
            return _no_customer(row)
        params: MeterEventCreateParams = {
            "event_name": self.event_name(row.meter),
            "identifier": identifier(row.billable, row.meter, row.minute),
            "timestamp": row.minute,
            "payload": {"stripe_customer_id": row.customer, "value": str(row.units)},
        }
        try:
            await self.client.v1.billing.meter_events.create_async(params)
        except stripe.StripeError as exc:
            if is_duplicate(exc):
                self.duplicates += 1
                return None
            return f"{type(exc).__name__}: {exc}"[:500]
        except (TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        return None

    async def _record(self, outcomes: list[tuple[_Row, str | None]]) -> None:
        o = meter_outbox.c
        now = datetime.fromtimestamp(self.clock(), UTC)
        sent = [{"b": r.billable, "m": r.meter, "t": r.minute} for r, error in outcomes if error is None]
        async with self.db.engine.begin() as conn:
            if sent:
                await conn.execute(
                    sa.update(meter_outbox)
                    .where(o.billable == sa.bindparam("b"), o.meter == sa.bindparam("m"), o.minute == sa.bindparam("t"))
                    .values(sent_at=now, last_error=None),
                    sent,
                )
            for row, error in outcomes:
                if error is None:
                    continue
                wait = min(self.max_backoff, 2.0 ** min(row.attempts, 20))
                await conn.execute(
                    sa.update(meter_outbox)
                    .where(o.billable == row.billable, o.meter == row.meter, o.minute == row.minute)
                    .values(attempts=row.attempts + 1, next_attempt_at=now + timedelta(seconds=wait), last_error=error)
                )
        self.sent += len(sent)
        failed = len(outcomes) - len(sent)
        if failed:
            self.failed += failed
            log.warning("meters: %d meter event(s) not sent, retried later: %s", failed, next(e for _, e in outcomes if e))

    async def backlog(self) -> int:
        """Rows not sent yet."""
        async with self.db.reader.connect() as conn:
            found = await conn.scalar(sa.select(sa.func.count()).select_from(meter_outbox).where(meter_outbox.c.sent_at.is_(None)))
        return int(found or 0)


def _no_customer(row: _Row) -> str:
    return f"{row.billable} has no Stripe customer yet: its usage is sent once it has one"


@dataclass(frozen=True, slots=True)
class MeterTotal:
    """One customer's units of one meter in a period: the gateway's (sent or not) against Stripe's."""

    billable: str
    customer: str | None
    meter: str
    gateway: int
    unsent: int
    stripe: float | None  # None: not asked (no customer, or no Stripe meter)

    @property
    def differs(self) -> bool:
        return self.stripe is None or self.stripe != self.gateway


def month_bounds(period: str) -> tuple[int, int]:
    """[start, end) of a calendar month "YYYY-MM" in UTC, in unix seconds (how meter events are timed)."""
    try:
        start = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f'--period {period!r} is not a month: write it as "2026-12"') from None
    end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return int(start.timestamp()), int(end.timestamp())


async def compare(db: Database, client: stripe.StripeClient, event_name: Callable[[str], str | None], period: str) -> list[MeterTotal]:
    """The gateway's totals per (billable, meter) in `period` and Stripe's event summaries of them."""
    start, end = month_bounds(period)
    o = meter_outbox.c
    unsent = sa.func.sum(sa.case((o.sent_at.is_(None), o.units), else_=0))
    query = (
        sa.select(o.billable, o.meter, sa.func.sum(o.units), unsent, stripe_customers.c.customer)
        .select_from(meter_outbox.outerjoin(stripe_customers, stripe_customers.c.billable == o.billable))
        .where(o.minute >= start, o.minute < end)
        .group_by(o.billable, o.meter, stripe_customers.c.customer)
        .order_by(o.billable, o.meter)
    )
    async with db.reader.connect() as conn:
        rows = (await conn.execute(query)).all()
    meters: dict[str, str] = {}
    async for meter in _each_meter(client):
        meters[meter["event_name"]] = meter["id"]
    out = []
    for billable, meter, units, waiting, customer in rows:
        name = event_name(meter)
        found = None
        if customer is not None and name is not None and name in meters:
            page = await client.v1.billing.meters.event_summaries.list_async(
                meters[name], {"customer": customer, "start_time": start, "end_time": end}
            )
            found = sum(float(s.aggregated_value) for s in page.data)
        out.append(MeterTotal(billable, customer, meter, int(units), int(waiting or 0), found))
    return out


async def _each_meter(client: stripe.StripeClient) -> AsyncIterator[dict[str, Any]]:
    async for meter in each(client.v1.billing.meters.list_async):
        yield meter


def totals_table(totals: list[MeterTotal]) -> str:
    """The comparison as the CLI prints it: every row, the differing ones marked."""
    head = ["billable", "customer", "meter", "gateway", "unsent", "stripe", ""]
    rows = [head] + [[t.billable, t.customer or "-", t.meter, str(t.gateway), str(t.unsent),
                      "-" if t.stripe is None else f"{t.stripe:g}", "DIFFERS" if t.differs else "ok"] for t in totals]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
