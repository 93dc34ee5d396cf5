"""Grants that cannot be doubled (DESIGN §3, §5): POST /_gateway/admin/billables/{id}/credits needs an
idempotency_key; 200 with the balance once applied, 202 "recorded" when the record has it but Redis does
not, 503 only when nothing was recorded; and a recorded grant reaches Redis exactly once, by a retry, a
restore or the reconciler's stranded-grant pass."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from gateway_support import ADMIN_HEADERS, Served, serving
from services import RedisServer

CATALOG = """
[catalog]
default_plan = "free"

[plans.free]
price = 0

[[routes]]
match = "* /v1/*"
"""


def wait_until(check: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def grant(gw: Served, billable: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{gw.url}/_gateway/admin/billables/{billable}/credits", json=body, headers=ADMIN_HEADERS, timeout=30)


def balance(gw: Served, billable: str) -> int:
    r = httpx.get(f"{gw.url}/_gateway/admin/billables/{billable}", headers=ADMIN_HEADERS, timeout=30)
    assert r.status_code == 200, r.text
    value: int = r.json()["credits"]["balance"]
    return value


def test_a_grant_without_an_idempotency_key_is_refused(tmp_path: Path, empty_db_url: str, own_redis: RedisServer) -> None:
    """No key (or an empty, oversized or non-string one) is 400 naming idempotency_key; nothing is recorded.
    A key reused for a different grant is 409; the same grant again is 200 and applied once."""
    with serving(tmp_path, CATALOG, redis_port=own_redis.port, db_url=empty_db_url) as gw:
        for body in ({"amount": 5}, {"amount": 5, "idempotency_key": ""}, {"amount": 5, "idempotency_key": None},
                     {"amount": 5, "idempotency_key": 7}, {"amount": 5, "idempotency_key": "k" * 256},
                     {"amount": 5, "idempotency_key": "a\nb"}):
            r = grant(gw, "org_k", body)
            assert r.status_code == 400 and r.json()["type"] == "urn:gateway:bad-request", (body, r.text)
            assert "idempotency_key is required" in r.json()["detail"]
        assert gw.query("select count(*) from credit_grants") == [(0,)]
        first = grant(gw, "org_k", {"amount": 5, "idempotency_key": "k" * 255})
        again = grant(gw, "org_k", {"amount": 5, "idempotency_key": "k" * 255})
        assert first.status_code == again.status_code == 200 and again.json()["duplicate"]
        assert first.json()["balance"] == again.json()["balance"] == 5
        for other in (("org_k", 6), ("org_other", 5)):
            r = grant(gw, other[0], {"amount": other[1], "idempotency_key": "k" * 255})
            assert r.status_code == 409 and "send a new key" in r.json()["detail"], r.text
        assert balance(gw, "org_k") == 5 and gw.query("select count(*) from credit_grants") == [(1,)]


def test_recorded_while_redis_is_down_is_202_then_200_once(tmp_path: Path, empty_db_url: str, own_redis: RedisServer) -> None:
    """Redis down: the grant is recorded and answered 202 {"status": "recorded"}; once Redis is back (empty: it
    restarted), a retry with the same key answers 200 with the balance, the grant applied once."""
    with serving(tmp_path, CATALOG, redis_port=own_redis.port, db_url=empty_db_url) as gw:
        assert grant(gw, "org_r", {"amount": 100, "idempotency_key": "first"}).status_code == 200
        own_redis.stop()
        try:
            for _ in range(3):
                r = grant(gw, "org_r", {"amount": 500, "idempotency_key": "during"})
                assert r.status_code == 202, r.text
                assert {k: r.json()[k] for k in ("status", "idempotency_key")} == {"status": "recorded", "idempotency_key": "during"}
            assert gw.query("select amount, applied_at is null from credit_grants where idempotency_key = 'during'") == [(500, True)]
        finally:
            own_redis.start()
        wait_until(lambda: grant(gw, "org_r", {"amount": 500, "idempotency_key": "during"}).status_code == 200, "Redis back", 30)
        r = grant(gw, "org_r", {"amount": 500, "idempotency_key": "during"})
        assert r.status_code == 200 and r.json()["balance"] == 600 and r.json()["duplicate"]
        assert gw.state("org_r")["c:p"] == "600" and gw.state("org_r")["c:seq"] == "2"
        assert gw.query("select count(*) from credit_grants where applied_at is null") == [(0,)]


def test_the_reconciler_applies_a_grant_recorded_while_redis_was_down(tmp_path: Path, empty_db_url: str) -> None:
    """Redis unreachable but not emptied (it keeps its data across the restart): the 202 grant reaches Redis
    with no retry at all, through the reconciler's stranded-grant pass, once."""
    with RedisServer("--appendonly", "yes", "--appendfsync", "always") as server, \
            serving(tmp_path, CATALOG, redis_port=server.port, db_url=empty_db_url, reconcile_interval=0.2) as gw:
        assert grant(gw, "org_s", {"amount": 100, "idempotency_key": "before"}).status_code == 200
        server.stop()
        try:
            assert grant(gw, "org_s", {"amount": 40, "idempotency_key": "stranded"}).status_code == 202
        finally:
            server.start()
        assert gw.state("org_s")["c:p"] == "100"  # Redis kept what it had: only the pass can bring the 40
        wait_until(lambda: gw.state("org_s").get("c:p") == "140", "the stranded grant to be applied", 60)
        assert gw.state("org_s")["c:seq"] == "2"
        wait_until(lambda: gw.query("select count(*) from credit_grants where applied_at is null") == [(0,)], "applied_at", 30)
        assert balance(gw, "org_s") == 140


def test_fifty_concurrent_retries_across_a_redis_outage_apply_once(
    tmp_path: Path, empty_db_url: str, own_redis: RedisServer
) -> None:
    """50 clients send the same grant while Redis is down (each answered 202), and keep retrying until Redis
    is back (restarted, empty) and they get 200: the record has it once, Redis applied it once."""
    with serving(tmp_path, CATALOG, redis_port=own_redis.port, db_url=empty_db_url) as gw:
        assert grant(gw, "org_c", {"amount": 100, "idempotency_key": "seed"}).status_code == 200
        statuses: Counter[int] = Counter()
        balances: list[int] = []
        answered = asyncio.Event()
        first_answers = 0

        async def client(c: httpx.AsyncClient) -> None:
            nonlocal first_answers
            counted = False
            while True:
                r = await c.post(f"{gw.url}/_gateway/admin/billables/org_c/credits",
                                 json={"amount": 500, "reason": "retried", "idempotency_key": "the-one"}, headers=ADMIN_HEADERS)
                statuses[r.status_code] += 1
                if not counted:
                    counted, first_answers = True, first_answers + 1
                    if first_answers == 50:
                        answered.set()
                if r.status_code == 200:
                    balances.append(r.json()["balance"])
                    return
                await asyncio.sleep(0.1)

        async def main() -> None:
            limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
            async with httpx.AsyncClient(timeout=30, limits=limits) as c:
                tasks = [asyncio.create_task(client(c)) for _ in range(50)]
                await asyncio.wait_for(answered.wait(), 60)
                await asyncio.to_thread(own_redis.start)
                await asyncio.wait_for(asyncio.gather(*tasks), 60)

        own_redis.stop()
        try:
            asyncio.run(main())
        finally:
            own_redis.start()
        assert set(statuses) <= {200, 202} and statuses[202] >= 50, statuses
        assert len(balances) == 50 and set(balances) == {600}, balances
        assert gw.query("select amount, seq from credit_grants where idempotency_key = 'the-one'") == [(500, 2)]
        assert gw.query("select count(*) from credit_grants where billable = 'org_c'") == [(2,)]
        state = gw.state("org_c")
        assert (state["c:p"], state["c:seq"]) == ("600", "2")
        assert balance(gw, "org_c") == 600
