"""Events: the outbox, signed webhook delivery with retries and dead letters, replay, and in-process callbacks."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from engine_support import BASE
from http_servers import closed_port, serve_in_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from waiting import until

from gateway import cli
from gateway.app import Prepared
from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.events import Deliverer, EventCallbacks, Outbox, event_body, sign, verify_signature
from gateway.middleware import GatewayMiddleware
from gateway.settings import Settings
from gateway.store.db import Database, events_outbox
from gateway.store.redis import open_redis

SECRET = "whsec_test"
FAST = {"timeout": 0.3, "backoff": 0.02, "max_backoff": 0.1, "poll": 0.02}


def event(n: int = 0, *, type: str = "warning", billable: str = "org_1") -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": type,
        "billable": billable,
        "plan": "free",
        "occurred_at": "2026-11-22T10:00:00Z",
        "data": {"limit": "exports", "threshold": 0.8, "usage": n},
    }


@asynccontextmanager
async def database(url: str) -> AsyncIterator[Database]:
    db = await Database.connect(url)
    try:
        await db.upgrade()
        yield db
    finally:
        await db.close()


async def rows(db: Database) -> dict[str, Any]:
    async with db.engine.connect() as conn:
        return {r.id: r for r in (await conn.execute(sa.select(events_outbox))).all()}


async def all_settled(db: Database) -> bool:
    return all(r.delivered_at is not None or r.dead_at is not None for r in (await rows(db)).values())


@asynccontextmanager
async def delivering(db: Database, url: str, **kw: Any) -> AsyncIterator[Deliverer]:
    deliverer = Deliverer(db, url, SECRET, **(FAST | kw))
    deliverer.start()
    try:
        yield deliverer
    finally:
        await deliverer.stop()


# ---- a real receiver -------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook endpoint that fails each event's first attempts in turn, then accepts; thread-safe records."""

    failures: list[str] = field(default_factory=list)  # per attempt: "500", "timeout", "close"; then 200
    always_fail: bool = False
    slow: float = 0.0
    attempts: Counter[str] = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    in_flight: set[str] = field(default_factory=set)
    overlaps: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def hook(scope: Scope, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            body = await request.body()
            event_id = request.headers.get("gateway-event-id", "")
            with self.lock:
                self.requests.append((dict(request.headers), body))
                self.attempts[event_id] += 1
                attempt = self.attempts[event_id]
                if event_id in self.in_flight:
                    self.overlaps.append(event_id)
                self.in_flight.add(event_id)
            try:
                await asyncio.sleep(self.slow)
                mode = "500" if self.always_fail else (self.failures[attempt - 1] if attempt <= len(self.failures) else "ok")
                if mode == "500":
                    await Response("boom", status_code=500)(scope, receive, send)
                elif mode == "timeout":
                    while (await receive())["type"] != "http.disconnect":
                        pass
                elif mode == "close":
                    # A 200 whose body never fully arrives: uvicorn drops the connection when we return.
                    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
                    await send({"type": "http.response.body", "body": b"partial", "more_body": True})
                else:
                    with self.lock:
                        self.accepted.append(event_id)
                    await JSONResponse({"ok": True})(scope, receive, send)
            finally:
                with self.lock:
                    self.in_flight.discard(event_id)

        class Raw:
            async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
                await hook(scope, receive, send)

        return Starlette(routes=[Route("/hooks", Raw(), methods=["POST"])])


@contextmanager
def receiving(receiver: Receiver) -> Iterator[str]:
    with serve_in_thread(receiver.app()) as url:
        yield f"{url}/hooks"


# ---- the outbox ------------------------------------------------------------------------------------------


def test_add_twice_is_one_row(empty_db_url: str) -> None:
    """Adding the same event twice (and twice in one call) leaves one row whose body is the event's exact JSON."""

    async def main() -> None:
        async with database(empty_db_url) as db:
            e, other = event(1), event(2)
            await Outbox(db).add([e, e])
            await Outbox(db).add([e, other])
            await Outbox(db).add([])
            found = await rows(db)
            assert set(found) == {e["id"], other["id"]}
            row = found[e["id"]]
            assert row.body == event_body(e) and json.loads(row.body) == e
            assert (row.billable, row.type, row.attempts, row.delivered_at, row.dead_at) == ("org_1", "warning", 0, None, None)

    asyncio.run(main())


def test_backlog_counts_and_prune_forgets_old_events_whatever_became_of_them(empty_db_url: str) -> None:
    """The backlog (shown by /_gateway/health) counts waiting and dead events; pruning drops events older than
    the retention, delivered, dead or never sent, and keeps the recent ones."""

    async def main() -> None:
        async with database(empty_db_url) as db:
            outbox = Outbox(db)
            assert await outbox.backlog() == {"waiting": 0, "dead": 0, "oldest_waiting_seconds": 0.0}
            old = [event(i) for i in range(3)]
            recent = [event(10), event(11)]
            await outbox.add(old + recent)
            t = events_outbox.c
            long_ago = datetime.now(UTC) - timedelta(days=8)
            async with db.engine.begin() as conn:
                await conn.execute(sa.update(events_outbox).where(t.id.in_([e["id"] for e in old])).values(created_at=long_ago))
                await conn.execute(sa.update(events_outbox).where(t.id == old[0]["id"]).values(delivered_at=long_ago))
                await conn.execute(sa.update(events_outbox).where(t.id == old[1]["id"]).values(dead_at=long_ago))
                await conn.execute(sa.update(events_outbox).where(t.id == recent[0]["id"]).values(dead_at=datetime.now(UTC)))
            backlog = await outbox.backlog()
            assert (backlog["waiting"], backlog["dead"]) == (2, 2)  # old[2] and recent[1] wait; old[1], recent[0] dead
            assert 8 * 86400 - 60 < backlog["oldest_waiting_seconds"] < 8 * 86400 + 60
            assert await outbox.prune(timedelta(days=7)) == 3
            assert set(await rows(db)) == {e["id"] for e in recent}
            assert await outbox.prune(timedelta(days=7)) == 0

    asyncio.run(main())


# ---- delivery --------------------------------------------------------------------------------------------


def test_delivery_survives_failures_and_signs_every_request(empty_db_url: str) -> None:
    """Against a receiver that answers 500, then times out, then drops the connection, every event arrives once, signed."""
    receiver = Receiver(failures=["500", "timeout", "close"])
    events = [event(n) for n in range(5)]

    async def main() -> None:
        async with database(empty_db_url) as db:
            await Outbox(db).add(events)
            with receiving(receiver) as url:
                async with delivering(db, url, concurrency=3, batch=4):
                    await until(lambda: all_settled(db), "every event delivered or dead")
            found = await rows(db)
        for e in events:
            row = found[e["id"]]
            assert row.delivered_at is not None and row.dead_at is None and row.attempts == 4
            assert row.last_error is not None and row.last_error.startswith("ClientPayloadError")  # the cut-short 200

    asyncio.run(main())
    assert sorted(receiver.accepted) == sorted(e["id"] for e in events)  # each id accepted exactly once
    assert all(receiver.attempts[e["id"]] == 4 for e in events)
    by_id = {e["id"]: event_body(e).encode() for e in events}
    for headers, body in receiver.requests:
        assert headers["content-type"] == "application/json"
        assert body == by_id[headers["gateway-event-id"]]
        assert json.loads(body)["id"] == headers["gateway-event-id"]
        assert verify_signature(SECRET, headers["gateway-signature"], body)
        assert not verify_signature("another secret", headers["gateway-signature"], body)


def test_last_error_says_what_failed(empty_db_url: str) -> None:
    """Each failed attempt leaves its reason in last_error and schedules the next try in the future."""
    receiver = Receiver(always_fail=True)

    async def main() -> None:
        async with database(empty_db_url) as db:
            e = event()
            await Outbox(db).add([e])
            with receiving(receiver) as url:
                deliverer = Deliverer(db, url, SECRET, backoff=60, max_backoff=600)
                try:
                    assert await deliverer.run_once() == 1
                    assert await deliverer.run_once() == 0  # not due again for about a minute
                finally:
                    await deliverer.stop()
            row = (await rows(db))[e["id"]]
            assert row.attempts == 1 and row.last_error == "HTTP 500: boom" and row.delivered_at is None
            wait = (row.next_attempt_at - row.created_at).total_seconds()
            assert 45 <= wait <= 75

    asyncio.run(main())


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    """The delay doubles from the base with ±25 % jitter and never exceeds the cap."""
    deliverer = Deliverer(None, "http://x", None, backoff=1.0, max_backoff=600.0)  # type: ignore[arg-type]
    for attempts, nominal in [(1, 1), (2, 2), (3, 4), (10, 512)]:
        assert all(0.75 * nominal <= deliverer.delay(attempts) <= 1.25 * nominal for _ in range(50))
    assert all(450 <= deliverer.delay(n) <= 600 for n in (11, 12, 40, 200) for _ in range(20))


def test_dead_letter_after_last_attempt_and_replay(empty_db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """After the last attempt an event is dead-lettered; `gateway events replay` queues it again and it is delivered."""
    receiver = Receiver(always_fail=True)
    doomed, fine = event(1), event(2)

    async def fail_then_settle(db_url: str) -> None:
        async with database(db_url) as db:
            await Outbox(db).add([doomed])
            with receiving(receiver) as url:
                async with delivering(db, url, max_attempts=3):
                    await until(lambda: all_settled(db), "every event delivered or dead")
            row = (await rows(db))[doomed["id"]]
            assert row.dead_at is not None and row.delivered_at is None and row.attempts == 3
            assert row.last_error == "HTTP 500: boom"

    async def deliver(db_url: str) -> dict[str, Any]:
        async with database(db_url) as db:
            with receiving(receiver) as url:
                async with delivering(db, url, max_attempts=3):
                    await until(lambda: all_settled(db), "every event delivered or dead")
            return await rows(db)

    asyncio.run(fail_then_settle(empty_db_url))
    assert receiver.attempts[doomed["id"]] == 3
    receiver.always_fail = False
    assert cli.main(["events", "replay", "--database-url", empty_db_url]) == 0
    assert "1 event(s)" in capsys.readouterr().out
    found = asyncio.run(deliver(empty_db_url))
    assert found[doomed["id"]].delivered_at is not None and found[doomed["id"]].dead_at is None
    assert receiver.accepted == [doomed["id"]]

    # Nothing is dead any more; --id and --since also send delivered events again.
    assert cli.main(["events", "replay", "--dead", "--database-url", empty_db_url]) == 0
    assert "0 event(s)" in capsys.readouterr().out

    async def add_fine() -> None:
        async with database(empty_db_url) as db:
            await Outbox(db).add([fine])

    asyncio.run(add_fine())
    asyncio.run(deliver(empty_db_url))
    assert cli.main(["events", "replay", "--id", doomed["id"], "--database-url", empty_db_url]) == 0
    assert "1 event(s)" in capsys.readouterr().out
    assert cli.main(["events", "replay", "--since", "2000-01-01T00:00:00", "--database-url", empty_db_url]) == 0
    assert "1 event(s)" in capsys.readouterr().out  # fine; doomed is queued already and left alone
    asyncio.run(deliver(empty_db_url))
    assert Counter(receiver.accepted) == {doomed["id"]: 2, fine["id"]: 2}
    assert cli.main(["events", "replay", "--since", "yesterday", "--database-url", empty_db_url]) == 2
    assert "--since" in capsys.readouterr().err


def test_two_deliverers_never_send_one_event_at_once(empty_db_url: str) -> None:
    """Two deliverers (two processes) on one database share the work; no event is sent twice or concurrently."""
    receiver = Receiver(slow=0.05)
    events = [event(n) for n in range(40)]

    async def main() -> None:
        async with database(empty_db_url) as db_a, database(empty_db_url) as db_b:
            await Outbox(db_a).add(events)
            with receiving(receiver) as url:
                async with delivering(db_a, url, batch=5, concurrency=3, poll=0.01) as a, delivering(
                    db_b, url, batch=5, concurrency=3, poll=0.01
                ) as b:
                    await until(lambda: all_settled(db_a), "every event delivered or dead", timeout=20)
                assert a.delivered + b.delivered == len(events)
                assert a.failed == b.failed == 0

    asyncio.run(main())
    assert receiver.overlaps == []
    assert sorted(receiver.accepted) == sorted(e["id"] for e in events)


def test_database_down_is_logged_once_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """With the database unreachable the deliverer logs one warning, keeps trying, and stops cleanly."""

    async def main() -> None:
        db = await Database.connect(f"postgresql://postgres@127.0.0.1:{closed_port()}/nothing")
        deliverer = Deliverer(db, "http://127.0.0.1:1/hooks", SECRET, poll=0.01)
        try:
            with caplog.at_level(logging.WARNING, logger="gateway.events"):
                deliverer.start()
                await asyncio.sleep(0.5)  # dozens of failing polls (every 10 ms), under test: one warning for all
                assert deliverer._task is not None and not deliverer._task.done()
        finally:
            await deliverer.stop()
            await db.close()

    asyncio.run(main())
    warnings = [r for r in caplog.records if r.name == "gateway.events" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot reach the outbox" in warnings[0].getMessage()


def test_gateway_starts_the_deliverer_and_warns_without_a_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With `[events] webhook_url` the gateway delivers the outbox; without GATEWAY_WEBHOOK_SECRET it says so."""
    receiver = Receiver()
    plans = tmp_path / "plans.toml"

    async def main(url: str) -> None:
        plans.write_text(BASE + f'\n[events]\nwebhook_url = "{url}"\n')
        settings = Settings(plans=str(plans), database_url=f"sqlite:///{tmp_path}/gw.db")
        with caplog.at_level(logging.WARNING, logger="gateway.events"):
            gateway = await Prepared.from_settings(settings).start()
        try:
            assert gateway.deliverer is not None
            gateway.deliverer.poll = 0.02
            e = event()
            await Outbox(gateway.db).add([e])
            await until(lambda: all_settled(gateway.db), "every event delivered or dead")
        finally:
            await gateway.stop()

    with receiving(receiver) as url:
        asyncio.run(main(url))
    assert len(receiver.accepted) == 1
    assert "gateway-signature" not in receiver.requests[0][0]
    assert "unsigned" in caplog.text


# ---- signatures ------------------------------------------------------------------------------------------


def test_verify_signature() -> None:
    """A signature verifies only with its secret, its exact body and a timestamp within the tolerance."""
    body = b'{"id":"evt_1"}'
    now = int(time.time())
    header = sign(SECRET, body, now)
    assert verify_signature(SECRET, header, body) and verify_signature(SECRET, header, body.decode())
    assert not verify_signature("other", header, body)
    assert not verify_signature(SECRET, header, body + b" ")
    old = sign(SECRET, body, now - 301)
    assert not verify_signature(SECRET, old, body) and verify_signature(SECRET, old, body, tolerance=400)
    rotated = f"{header},v1={'0' * 64}"
    assert verify_signature(SECRET, rotated, body)
    for bad in (None, "", "t=abc,v1=00", f"t={now}", "v1=00", "garbage"):
        assert not verify_signature(SECRET, bad, body)


# ---- callbacks in middleware mode ----------------------------------------------------------------------------


def test_callbacks_by_type_and_limit_and_a_failing_one_breaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Callbacks run per event type and per limit, sync and async; one that raises is logged and the request succeeds."""
    callbacks = EventCallbacks()
    seen: list[tuple[str, str, Any]] = []

    @callbacks.on("warning", limit="exports")
    async def exports_warning(e: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        seen.append(("exports", e["type"], e["data"]["threshold"]))

    @callbacks.on("warning")
    def any_warning(e: dict[str, Any]) -> None:
        seen.append(("any", e["type"], e["data"]["limit"]))

    @callbacks.on("grace_start")
    def grace(e: dict[str, Any]) -> None:
        seen.append(("grace", e["type"], e["data"]["limit"]))

    @callbacks.on("warning", limit="reports")
    def broken(e: dict[str, Any]) -> None:
        raise RuntimeError("callback bug")

    @callbacks.on("warning", limit="reports")
    async def broken_async(e: dict[str, Any]) -> None:
        raise RuntimeError("async callback bug")

    @callbacks.on("block", limit="nothing-like-this")
    def never(e: dict[str, Any]) -> None:
        seen.append(("never", e["type"], None))

    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    engine = Engine(open_redis(None), parse_catalog(BASE), prefix=f"gwt{uuid.uuid4().hex[:10]}")
    inner: Any = Starlette(routes=[Route("/exports", ok, methods=["POST"]), Route("/reports", ok, methods=["POST"])])
    app: Any = GatewayMiddleware(inner, engine=engine, billable=lambda scope: "acme", on_decision=callbacks)

    async def main() -> list[int]:
        statuses = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for path in ["/exports"] * 4 + ["/reports"] * 2:
                statuses.append((await client.post(path)).status_code)
        await callbacks.join()
        return statuses

    with caplog.at_level(logging.ERROR, logger="gateway.events"):
        statuses = asyncio.run(main())
    assert statuses == [200] * 6
    # exports: to 3, warn_at 0.5 and 0.9: the 2nd request crosses 0.5, the 3rd 0.9, the 4th starts grace.
    assert [s for s in seen if s[0] == "exports"] == [("exports", "warning", 0.5), ("exports", "warning", 0.9)]
    assert ("grace", "grace_start", "exports") in seen
    assert {s[2] for s in seen if s[0] == "any"} == {"exports", "reports"}
    assert not [s for s in seen if s[0] == "never"]
    assert "callback bug" in caplog.text and "async callback bug" in caplog.text
