"""Idempotency-Key on the way in (issue 21 item 3): a consuming check or a settle retried with the same key
answers the first answer and takes nothing more, also when the retries race each other on a real
redis-server; the same key with another request is 422 with one sentence."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import ADMIN_HEADERS, Served, serving
from services import RedisCluster, RedisServer
from test_check import CATALOG, check, settle, status

CONCURRENT = 16


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def gw(tmp_path: Path, redis_server: RedisServer) -> Iterator[Served]:
    with redis_server.client() as c:
        c.flushall()
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    with serving(tmp_path, CATALOG, redis_port=redis_server.port, db_url=db_url) as served:
        yield served


def keyed(key: str) -> dict[str, str]:
    return {**ADMIN_HEADERS, "Idempotency-Key": key}


async def _together(url: str, path: str, body: dict[str, Any], key: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return list(await asyncio.gather(*(client.post(f"{url}{path}", json=body, headers=keyed(key)) for _ in range(CONCURRENT))))


def test_a_retried_consuming_check_answers_the_first_answer_and_takes_nothing_more(gw: Served) -> None:
    first = check(gw, keyed("k-1"), billable="org_1", route="POST /v1/projects", consume=True)
    assert first.status_code == 200 and first.json()["allowed"], first.text
    assert "idempotent-replayed" not in first.headers
    again = check(gw, keyed("k-1"), billable="org_1", route="POST /v1/projects", consume=True)
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true" and again.headers["ratelimit"] == first.headers["ratelimit"]
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 1
    # The body's member is the same key; a new key takes again.
    member = check(gw, billable="org_1", route="POST /v1/projects", consume=True, idempotency_key="k-1")
    assert member.json() == first.json()
    second = check(gw, keyed("k-2"), billable="org_1", route="POST /v1/projects", consume=True)
    assert second.json()["hold"] != first.json()["hold"]
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 2
    # A denial is an answer too: its retry is the same denial, even once the plan would allow it.
    denied = check(gw, keyed("k-3"), billable="org_1", route="POST /v1/projects", consume=True)
    assert denied.json()["allowed"] is False
    assert settle(gw.url, hold=second.json()["hold"], outcome="failure").status_code == 200
    assert check(gw, keyed("k-3"), billable="org_1", route="POST /v1/projects", consume=True).json() == denied.json()
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 1
    # The record sits under the billable's hash tag (one slot with its state), for 24 h.
    with gw.redis() as client:
        records = sorted(client.scan_iter("gw:{org_1}:once:check:*"))
        assert len(records) == 3  # k-1, k-2, k-3
        assert all(0 < client.ttl(r) <= 86_400 for r in records)


def test_the_same_key_with_another_request_is_refused(gw: Served) -> None:
    first = check(gw, keyed("k-1"), billable="org_1", route="POST /v1/projects", consume=True)
    assert first.status_code == 200
    other = check(gw, keyed("k-1"), billable="org_1", route="POST /v1/images", consume=True)
    assert other.status_code == 422, other.text
    assert other.json()["type"] == "urn:gateway:idempotency-key-reused"
    assert "was used with a different request" in other.json()["detail"]
    assert status(gw, "org_1")["credits"]["balance"] == 100  # the image was not taken
    both = httpx.post(f"{gw.url}/_gateway/check", headers=keyed("k-1"), timeout=10,
                      json={"billable": "org_1", "route": "POST /v1/projects", "consume": True, "idempotency_key": "k-9"})  # fmt: skip
    assert both.status_code == 400 and "differ" in both.json()["detail"]
    long = check(gw, keyed("x" * 256), billable="org_1", route="POST /v1/projects", consume=True)
    assert long.status_code == 400 and "1 to 255" in long.json()["detail"]


def test_concurrent_identical_checks_take_one_hold(gw: Served) -> None:
    body = {"billable": "org_1", "route": "POST /v1/images", "consume": True}
    answers = asyncio.run(_together(gw.url, "/_gateway/check", body, "race-1"))
    assert {r.status_code for r in answers} == {200}
    assert len({r.json()["hold"] for r in answers}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == CONCURRENT - 1
    assert status(gw, "org_1")["credits"]["balance"] == 95  # one image of 5 credits, not 16


def test_a_retried_settle_answers_the_first_answer(gw: Served) -> None:
    hold = check(gw, billable="org_1", route="POST /v1/chat", consume=True).json()["hold"]
    body = {"hold": hold, "outcome": "success", "units": 12}
    answers = asyncio.run(_together(gw.url, "/_gateway/settle", body, "settle-1"))
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    assert {r.json()["balance"] for r in answers} == {88}
    assert status(gw, "org_1")["credits"]["balance"] == 88
    later = settle(gw.url, keyed("settle-1"), **body)
    assert later.status_code == 200 and later.headers["idempotent-replayed"] == "true" and later.json()["balance"] == 88
    # Without the key (or with a new one) a second settle is refused as before.
    assert settle(gw.url, keyed("settle-2"), **body).status_code == 409
    # The key of that settle, for another hold: refused, that hold stays open.
    other = check(gw, billable="org_1", route="POST /v1/images", consume=True).json()["hold"]
    reused = settle(gw.url, keyed("settle-1"), hold=other, outcome="failure")
    assert reused.status_code == 422 and reused.json()["type"] == "urn:gateway:idempotency-key-reused"
    assert status(gw, "org_1")["credits"]["balance"] == 83
    assert settle(gw.url, hold=other, outcome="failure").json()["balance"] == 88


def test_a_retry_of_a_request_that_stopped_before_answering_takes_nothing(gw: Served) -> None:
    """The first request decided (its record and hold made by the script) and its process stopped before
    answering: a retry waits for the answer, then is 409 saying so; nothing more is taken."""
    from gateway.catalog import parse_catalog
    from gateway.engine import Engine
    from gateway.idempotency import once
    from gateway.store.redis import open_redis

    catalog = parse_catalog(CATALOG)

    async def first() -> None:
        store = open_redis(f"redis://127.0.0.1:{gw.redis_port}/0")
        engine = Engine(store, catalog, prefix="gw")
        asked = {"route": "POST /v1/projects", "feature": None, "limit": None, "by": None, "operation": None, "units": None}
        request = once(engine.keys("org_1").state, "check", "stopped", asked)
        decision = await engine.decide("org_1", catalog.route_for("POST", "/v1/projects"), hold=True, once=request)
        assert decision.admitted
        await store.close()

    status(gw, "org_1")  # restored from the record first, as the gateway's first request would
    asyncio.run(first())
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 1
    retry = check(gw, keyed("stopped"), billable="org_1", route="POST /v1/projects", consume=True)
    assert retry.status_code == 409, retry.text
    assert retry.json()["type"] == "urn:gateway:idempotency-key-in-use" and "nothing more was taken" in retry.json()["detail"]
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 1


def test_the_record_shares_the_billables_slot_on_a_cluster(redis_cluster: RedisCluster) -> None:
    """On a Redis Cluster the record is written by the same script call as the state (one slot): a second
    decision with the same key is answered from it, and takes nothing."""
    from engine_support import Harness, harness

    from gateway.idempotency import Decided, once
    from gateway.store.cluster import key_slot

    async def fn(h: Harness) -> None:
        request = once(h.engine.keys("org_c").state, "check", "k", {"route": "POST /projects"})
        assert key_slot(request.record) == key_slot(h.engine.keys("org_c").state)
        route = h.catalog.route_for("POST", "/projects")
        assert (await h.engine.decide("org_c", route, hold=True, once=request)).admitted
        with pytest.raises(Decided):
            await h.engine.decide("org_c", route, hold=True, once=request)
        assert (await h.engine.status("org_c"))["limits"]["projects"]["usage"] == 1

    with harness(redis_cluster.url) as go:
        go(fn)
