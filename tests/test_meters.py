"""Billed units reach Stripe exactly once (issue 21 item 2): the reconciler sums each billable's billed
units per meter and minute into the record's outbox (a repeated flush adds nothing); the sender posts one
meter event per row whose identifier is the row's, so a crash between sending and marking, or two senders
on one backlog, bill nothing twice (the fake Stripe de-duplicates identifiers as Stripe does); a sender
killed with SIGKILL in the middle of a backlog leaves Stripe's totals equal to the gateway's; and
`gateway stripe meters` compares the two."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fake_stripe import FakeStripe
from http_servers import serve_in_thread
from services import raw_redis, shared_redis_url
from waiting import until, wait_until

from gateway.billing.client import close_client, stripe_client
from gateway.billing.meters import MeterSender, compare, identifier
from gateway.catalog import parse_catalog
from gateway.reconcile import connect
from gateway.settings import Settings
from gateway.state import keys
from gateway.store.db import Database, meter_outbox, stripe_customers
from gateway.store.redis import open_redis

CATALOG = """
[catalog]
default_plan = "free"

[meters.api_requests]
stripe_meter = "api_requests"

[plans.free]
price = 0
limits.calls = { to = 3, per = "month", after_limit = "bill", overage = { unit_price = "0.002", meter = "api_requests" } }

[[routes]]
match = "POST /calls"
limit = "calls"
"""
LATER = 180.0  # the sender's clock is this far ahead: the rows' minutes are over


@pytest.fixture
def fake() -> Iterator[tuple[FakeStripe, str]]:
    stripe = FakeStripe()
    stripe.add_meter("api_requests")
    with serve_in_thread(stripe.app()) as url:
        yield stripe, url


async def _record(where: Path | str) -> Database:
    db = await Database.connect(where if isinstance(where, str) else f"sqlite:///{where}")
    await db.upgrade()
    return db


async def _link(db: Database, fake: FakeStripe, billable: str) -> str:
    customer: str = fake.add_customer(billable)["id"]
    async with db.engine.begin() as conn:
        await conn.execute(sa.insert(stripe_customers).values(customer=customer, billable=billable))
    return customer


async def _outbox(db: Database) -> list[tuple[Any, ...]]:
    async with db.engine.connect() as conn:
        o = meter_outbox.c
        return [tuple(r) for r in await conn.execute(sa.select(o.billable, o.meter, o.minute, o.units, o.sent_at).order_by(o.minute))]


def _sender(db: Database, url: str, **kw: Any) -> MeterSender:
    return MeterSender(db, stripe_client(Settings(stripe_api_key="sk_test_fake", stripe_api_base=url)),
                       clock=lambda: time.time() + LATER, poll=0.05, **kw)  # fmt: skip


def test_the_reconciler_sums_billed_units_into_the_outbox_and_each_row_is_billed_once(empty_db_url: str, fake: tuple[FakeStripe, str]) -> None:
    stripe, url = fake
    catalog = parse_catalog(CATALOG)
    route = catalog.route_for("POST", "/calls")

    async def main() -> None:
        db = await _record(empty_db_url)
        store = open_redis(shared_redis_url())
        prefix = f"gwt{uuid.uuid4().hex[:8]}"
        connected = connect(store, catalog, db, prefix=prefix)
        sender = _sender(db, url)
        try:
            customer = await _link(db, stripe, "org_1")
            for _ in range(7):  # 3 within the limit, 4 billed
                assert (await connected.engine.decide("org_1", route)).admitted
            for _ in range(2):  # a flush repeated adds nothing
                await connected.reconciler.flush(["org_1"], force=True)
            rows = await _outbox(db)
            assert [(r[0], r[1], r[3], r[4]) for r in rows] == [("org_1", "api_requests", 4, None)]
            for _ in range(2):
                await connected.engine.decide("org_1", route)
            await connected.reconciler.flush(["org_1"], force=True)
            assert sum(r[3] for r in await _outbox(db)) == 6
            assert await sender.run_once() == len(await _outbox(db))
            assert stripe.metered_total("api_requests", customer) == 6
            assert {e["identifier"] for e in stripe.meter_events} == {identifier("org_1", "api_requests", r[2]) for r in await _outbox(db)}
            # A crash between sending and marking sent: the rows come due again, Stripe refuses them, none is billed twice.
            async with db.engine.begin() as conn:
                await conn.execute(sa.update(meter_outbox).values(sent_at=None, next_attempt_at=datetime.now(UTC)))
            await sender.run_once()
            assert sender.duplicates == len(await _outbox(db)) and stripe.metered_total("api_requests", customer) == 6
            assert all(r[4] is not None for r in await _outbox(db))
            period = datetime.now(UTC).strftime("%Y-%m")
            totals = await compare(db, sender.client, catalog.stripe_meter, period)
            assert [(t.billable, t.customer, t.meter, t.gateway, t.unsent, t.stripe, t.differs) for t in totals] == [
                ("org_1", customer, "api_requests", 6, 0, 6.0, False)]  # fmt: skip
        finally:
            await raw_redis(shared_redis_url()).delete(*keys(prefix, "org_1").all())
            await close_client(sender.client)
            await store.close()
            await db.close()

    asyncio.run(main())


def _backlog(db: Database, rows: int, billables: list[str]) -> list[dict[str, Any]]:
    start = int(time.time()) // 60 * 60 - 3600 - 60 * (rows // len(billables))  # every minute over, due now
    return [{"billable": billables[i % len(billables)], "meter": "api_requests", "minute": start + 60 * (i // len(billables)),
             "units": 1 + i % 7, "next_attempt_at": datetime.now(UTC)} for i in range(rows)]  # fmt: skip


async def _fill(db: Database, rows: list[dict[str, Any]]) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(sa.insert(meter_outbox), rows)


def test_failures_back_off_and_two_senders_bill_each_row_once(empty_db_url: str, fake: tuple[FakeStripe, str]) -> None:
    stripe, url = fake

    async def main() -> None:
        db = await _record(empty_db_url)
        one, two = _sender(db, url, batch=25, concurrency=4), _sender(db, url, batch=25, concurrency=4)
        try:
            customers = {b: await _link(db, stripe, b) for b in ("org_a", "org_b", "org_c")}
            rows = _backlog(db, 300, list(customers))
            await _fill(db, rows)
            stripe.fail_next = [503] * 60  # Stripe down for a moment (past the client's own retries): those rows back off
            await asyncio.gather(*(s.run_once() for s in (one, two)))
            assert one.failed + two.failed > 0
            async with db.engine.begin() as conn:  # the back-off over
                await conn.execute(sa.update(meter_outbox).where(meter_outbox.c.sent_at.is_(None)).values(next_attempt_at=datetime.now(UTC)))
            one.start()
            two.start()
            await until(lambda: len(stripe.meter_events) == len(rows), "every row to reach Stripe", timeout=120)
            for s in (one, two):
                await s.stop()
            for billable, customer in customers.items():
                assert stripe.metered_total("api_requests", customer) == sum(r["units"] for r in rows if r["billable"] == billable)
            assert len({e["identifier"] for e in stripe.meter_events}) == len(rows)
            assert await one.backlog() == 0
        finally:
            for s in (one, two):
                await close_client(s.client)
            await db.close()

    asyncio.run(main())


def test_the_stream_sends_what_v1_would_renews_its_token_and_bills_nothing_twice(empty_db_url: str, fake: tuple[FakeStripe, str]) -> None:
    """Above stream_above rows a claim goes by the v2 meter event stream: a backlog partly sent by v1 and
    then all sent again by the stream (a crash between sending and marking) has the gateway's totals, each
    identifier once (one store of events for both APIs); an expired session is renewed on Stripe's 401."""
    stripe, url = fake

    async def main() -> None:
        db = await _record(empty_db_url)
        v1, streamed = _sender(db, url, batch=120), _sender(db, url, batch=200, stream_above=50)
        try:
            customers = {b: await _link(db, stripe, b) for b in ("org_a", "org_b", "org_c")}
            rows = _backlog(db, 700, list(customers))
            await _fill(db, rows)
            assert await v1.run_once() == 120 and len(stripe.meter_events) == 120 and stripe.stream_requests == 0
            async with db.engine.begin() as conn:  # v1's rows were never marked: the stream sends them again
                await conn.execute(sa.update(meter_outbox).values(sent_at=None, next_attempt_at=datetime.now(UTC)))
            assert await streamed.run_once() == 200 and stripe.stream_requests == 2 and streamed.sessions == 1
            stripe.expire_sessions()
            while await streamed.run_once():
                pass
            assert streamed.sessions == 2 and streamed.failed == 0  # renewed on the 401, nothing backed off
            for billable, customer in customers.items():
                assert stripe.metered_total("api_requests", customer) == sum(r["units"] for r in rows if r["billable"] == billable)
            assert len(stripe.meter_events) == len({e["identifier"] for e in stripe.meter_events}) == len(rows)
            assert stripe.duplicate_meter_events == 120 and stripe.stream_errors == [] and await streamed.backlog() == 0
            assert {e["identifier"] for e in stripe.meter_events} == {identifier(r["billable"], r["meter"], r["minute"]) for r in rows}
            assert {e["timestamp"] for e in stripe.meter_events} == {r["minute"] for r in rows}
        finally:
            for s in (v1, streamed):
                await close_client(s.client)
            await db.close()

    asyncio.run(main())


@pytest.mark.parametrize(("rows_in_backlog", "sending"), [
    (1500, {}),  # v1, an event a request
    (10_000, {"GATEWAY_STRIPE_METER_STREAM_ABOVE": "1", "GATEWAY_STRIPE_METER_LEASE": "2"}),  # the v2 stream
], ids=["v1", "stream"])  # fmt: skip
def test_a_sender_killed_mid_backlog_bills_every_row_once(tmp_path: Path, fake: tuple[FakeStripe, str], rows_in_backlog: int, sending: dict[str, str]) -> None:
    """`gateway stripe send-meters` in a process of its own, SIGKILLed once part of a backlog is in Stripe;
    a second one sends the rest: Stripe's totals are the gateway's, no identifier twice."""
    stripe, url = fake
    db_path = tmp_path / "gw.db"
    plans = tmp_path / "plans.toml"
    plans.write_text(CATALOG)
    rows: list[dict[str, Any]] = []
    customers: dict[str, str] = {}

    async def prepare() -> None:
        db = await _record(db_path)
        customers.update({b: await _link(db, stripe, b) for b in ("org_a", "org_b")})
        rows.extend(_backlog(db, rows_in_backlog, list(customers)))
        await _fill(db, rows)
        await db.close()

    asyncio.run(prepare())
    env = {**os.environ, "GATEWAY_PLANS": str(plans), "GATEWAY_DATABASE_URL": f"sqlite:///{db_path}",
           "GATEWAY_STRIPE_API_KEY": "sk_test_fake", "GATEWAY_STRIPE_API_BASE": url, **sending}  # fmt: skip
    command = [sys.executable, "-m", "gateway.cli", "stripe", "send-meters"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(stripe.meter_events) >= len(rows) // 8 or first.poll() is not None, "the sender to be under way", timeout=120)
        assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = len(stripe.meter_events)
    assert killed_at < len(rows)  # killed in the middle
    second = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Rows the killed one had claimed come due when their lease ends; the rest are sent at once.
        wait_until(lambda: len(stripe.meter_events) == len(rows), "the second sender to send the rest", timeout=240)
    finally:
        second.terminate()
        second.wait(timeout=30)
    for billable, customer in customers.items():
        assert stripe.metered_total("api_requests", customer) == sum(r["units"] for r in rows if r["billable"] == billable)
    assert len({e["identifier"] for e in stripe.meter_events}) == len(stripe.meter_events) == len(rows)
    assert stripe.stream_errors == []
    print(f"killed at {killed_at} of {len(rows)} rows; {stripe.duplicate_meter_events} sent again and refused as duplicates")


GATEWAY = str(Path(sys.executable).parent / "gateway")
UNMAPPED = CATALOG.replace('[meters.api_requests]\nstripe_meter = "api_requests"\n', "")


def _gateway(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([GATEWAY, *args], cwd=folder, env={**clean, **env}, capture_output=True, text=True, timeout=120, check=False)


def test_check_explains_each_billed_limit_and_needs_a_stripe_meter_with_stripe(tmp_path: Path) -> None:
    (tmp_path / "mapped.toml").write_text(CATALOG)
    (tmp_path / "unmapped.toml").write_text(UNMAPPED)
    done = _gateway(tmp_path, "check", "mapped.toml")
    assert done.returncode == 0, done.stderr
    assert "free.calls: past 3 per month, each unit 0.002 USD on meter api_requests (Stripe meter api_requests); no spend cap" in done.stdout
    assert _gateway(tmp_path, "check", "unmapped.toml").returncode == 0  # without Stripe, nothing is sent
    (tmp_path / "payg.toml").write_text('[operations.chat]\nmetered = { meter = "tokens", unit_price = "0.00001" }\n'
                                        'units = "response.json:usage.total_tokens"\n[plans.free]\nprice = 0\n')
    payg = _gateway(tmp_path, "check", "payg.toml")
    assert "operations.chat: every unit 0.00001 USD on meter tokens (the units its answer reports; no Stripe meter)" in payg.stdout
    assert "operations.chat.metered.meter" in _gateway(tmp_path, "check", "payg.toml", GATEWAY_STRIPE_API_KEY="sk_test_fake").stderr
    refused = _gateway(tmp_path, "check", "unmapped.toml", GATEWAY_STRIPE_API_KEY="sk_test_fake")
    assert refused.returncode == 1
    assert ('plans.free.limits.calls.overage.meter: meter "api_requests" has no Stripe meter: add [meters.api_requests] '
            'stripe_meter = "<the event_name of a meter in Stripe>"') in refused.stderr  # fmt: skip


def test_stripe_meters_prints_each_total_and_fails_on_a_difference(tmp_path: Path, fake: tuple[FakeStripe, str]) -> None:
    stripe, url = fake
    (tmp_path / "plans.toml").write_text(CATALOG)
    now = int(time.time()) // 60 * 60 - 3600

    async def prepare() -> None:
        db = await _record(tmp_path / "gw.db")
        await _link(db, stripe, "org_a")
        await _link(db, stripe, "org_b")
        await _fill(db, [{"billable": b, "meter": "api_requests", "minute": now, "units": 5, "next_attempt_at": datetime.now(UTC)}
                         for b in ("org_a", "org_b")])  # fmt: skip
        sender = _sender(db, url)
        await sender.run_once()
        await close_client(sender.client)
        async with db.engine.begin() as conn:  # 2 units more for org_b, not sent yet
            await conn.execute(sa.insert(meter_outbox).values(billable="org_b", meter="api_requests", minute=now + 60, units=2,
                                                              next_attempt_at=datetime.now(UTC)))  # fmt: skip
        await db.close()

    asyncio.run(prepare())
    env = {"GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'gw.db'}", "GATEWAY_STRIPE_API_KEY": "sk_test_fake", "GATEWAY_STRIPE_API_BASE": url}
    period = datetime.fromtimestamp(now, UTC).strftime("%Y-%m")
    done = _gateway(tmp_path, "stripe", "meters", "--period", period, **env)
    assert done.returncode == 1, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert lines[1][0] == "org_a" and lines[1][2:] == ["api_requests", "5", "0", "5", "ok"]
    assert lines[2][0] == "org_b" and lines[2][2:] == ["api_requests", "7", "2", "5", "DIFFERS"]
    assert "1 of 2 total(s) differ" in done.stdout
    bad = _gateway(tmp_path, "stripe", "meters", "--period", "December", **env)
    assert bad.returncode == 2 and "'December' is not a month" in bad.stderr


CAPPED = CATALOG.replace('overage = { unit_price = "0.002", meter = "api_requests" }',
                         'overage = { unit_price = "0.002", meter = "api_requests", max_per_period = "0.10" }')  # 50 units


def _decide_many(url: str, prefix: str, requests: int) -> tuple[int, int]:
    async def main() -> tuple[int, int]:
        from gateway.engine import Engine

        store = open_redis(url)
        catalog = parse_catalog(CAPPED)
        engine = Engine(store, catalog, prefix=prefix)
        route = catalog.route_for("POST", "/calls")
        decided = [await engine.decide("org_cap", route) for _ in range(requests)]
        await store.close()
        return sum(d.admitted for d in decided), sum(d.status == 402 for d in decided)

    return asyncio.run(main())


def test_three_processes_over_a_spend_cap_bill_exactly_the_cap(tmp_path: Path, fake: tuple[FakeStripe, str]) -> None:
    import multiprocessing

    stripe, url = fake
    prefix = f"gwt{uuid.uuid4().hex[:8]}"
    redis_url = shared_redis_url()
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        counts = pool.starmap(_decide_many, [(redis_url, prefix, 40)] * 3)
    assert sum(c[0] for c in counts) == 3 + 50 and sum(c[1] for c in counts) == 120 - 53

    async def main() -> None:
        db = await _record(tmp_path / "gw.db")
        store = open_redis(redis_url)
        sender = _sender(db, url)
        try:
            customer = await _link(db, stripe, "org_cap")
            await connect(store, parse_catalog(CAPPED), db, prefix=prefix).reconciler.flush(["org_cap"], force=True)
            while await sender.run_once():
                pass
            assert stripe.metered_total("api_requests", customer) == 50
        finally:
            await raw_redis(redis_url).delete(*keys(prefix, "org_cap").all())
            await close_client(sender.client)
            await store.close()
            await db.close()

    asyncio.run(main())
