"""Bounds on what clients and operators send (DESIGN §3): billable ids at every entry point, whole numbers
within ±(2^53 - 1), JSON bodies at most 1 MiB and 64 levels deep. Each refusal is a 400 (or 413) naming
the field, never a 500 and never a silent float, and it leaves the record and Redis as they were."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from billing_support import add_plan_prices, billing_env, stripe_server
from fake_stripe import FakeStripe
from gateway_support import ADMIN, ADMIN_HEADERS, Served, serving
from services import RedisServer, RedisSpace, raw_redis, shared_redis_url
from starlette.requests import Request

from gateway.bounds import MAX_BODY, MAX_INT, loads, toml_too_deep
from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.errors import BadRequest, Conflict, TooLarge
from gateway.identity import KeyStore
from gateway.middleware import GatewayMiddleware
from gateway.problems import read_body
from gateway.store.db import Database
from gateway.store.redis import open_redis

CATALOG = """
[catalog]
default_plan = "free"

[features]
api_access = "API access"

[operations.priced]
per_unit = 2
units = "request.json:n"

[plans.free]
price = 0
allows = ["api_access"]
limits.projects = { to = 5 }

[plans.pro]
price = 29
allows = ["api_access"]
credits = 1000
limits.projects = { to = 25 }

[[routes]]
match = "POST /v1/priced"
spend = "priced"

[[routes]]
match = "POST /v1/projects"
limit = "projects"

[[routes]]
match = "* /v1/*"
"""

# Outside the id rule: control characters, separators, spaces, too long, non-ASCII, dot segments, a bad first character.
BAD_IDS = ["a\r\nb", "a\nb", "a\rb", "a\x00b", "a/b", "a b", " a", "a\tb", "x" * 129, "é", "org_é", "\u0130",
           ".", "..", "", "-a", "_a", ".a", "a\\b", 'a"b', "a{b}", "a%2Fb", "a,b", "a;b"]
GOOD_IDS = ["org_1", "user+tag@example.com", "550e8400-e29b-41d4-a716-446655440000", "cus_NffrFeUfNV2Hib", "a", "9",
            "x" * 128, "a.b", "a:b=c~d", "A..b"]
# The same bad ids as they travel in a URL path (percent-encoded where they must be).
DOT_SEGMENTS = (".", "..", "%2E", "%2E%2E")
BAD_PATH_IDS = ["a%0D%0Ab", "a%0Ab", "a%0Db", "a%00b", "a%20b", "%20a", "x" * 129, "%C3%A9", "org_%C3%A9", ".", "..",
                "%2E", "%2E%2E", "-a", "_a", "a%5Cb", "a%22b", "a%7Bb%7D", "a%25b"]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def fresh(tmp_path: Path, db_url: str, server: RedisServer, **settings: Any) -> Iterator[Served]:
    """The gateway on a fresh database and the private Redis emptied."""
    with server.client() as c:
        c.flushall()
    with serving(tmp_path, CATALOG, redis_port=server.port, db_url=db_url, **settings) as served:
        yield served


@pytest.fixture
def gw(tmp_path: Path, empty_db_url: str, redis_server: RedisServer) -> Iterator[Served]:
    """A gateway with API keys."""
    yield from fresh(tmp_path, empty_db_url, redis_server, metrics_token="metrics-secret-for-tests")


@pytest.fixture
def trusted(tmp_path: Path, empty_db_url: str, redis_server: RedisServer) -> Iterator[Served]:
    """A gateway that names billables by the trusted header X-Org."""
    yield from fresh(tmp_path, empty_db_url, redis_server, billable_header="X-Org")


def count(gw: Served, table: str) -> int:
    return int(gw.query(f"select count(*) from {table}")[0][0])


def assert_bad_request(r: httpx.Response | tuple[int, dict[str, str], bytes], field: str, why: Any = None) -> None:
    status, headers, body = (r.status_code, dict(r.headers), r.content) if isinstance(r, httpx.Response) else r
    assert status == 400, (why, status, body[:300])
    assert headers["content-type"] == "application/problem+json", why
    problem = json.loads(body)
    assert problem["type"] == "urn:gateway:bad-request" and problem["status"] == 400, (why, problem)
    assert field in problem["detail"], (why, problem["detail"])
    assert len(problem["detail"]) < 400, "a problem never echoes a whole oversized value"


def assert_conflict(r: httpx.Response, field: str, why: Any = None) -> None:
    """A well-formed request the state refuses (a balance it would take past its bound): 409, naming the field."""
    assert r.status_code == 409, (why, r.status_code, r.text[:300])
    problem = r.json()
    assert problem["type"] == "urn:gateway:conflict" and field in problem["detail"], (why, problem)


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with its path sent exactly as given (httpx would normalize dot segments and escapes)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers={**ADMIN_HEADERS, "Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def nested(depth: int) -> str:
    """A JSON array nested `depth` levels deep."""
    return "[" * depth + "]" * depth


# ---- billable ids --------------------------------------------------------------------------------------------


def test_key_creation_refuses_ids_outside_the_rule(gw: Served) -> None:
    """POST /_gateway/admin/keys with an id outside the rule is 400 naming `billable`, and creates no key; ids
    inside it (emails, UUIDs, Stripe ids, 128 characters) get a key that works end to end."""
    for bad in [*BAD_IDS, 12, None, True, ["org_1"], {"id": "org_1"}]:
        r = httpx.post(f"{gw.url}/_gateway/admin/keys", json={"billable": bad, "name": "ci"}, headers=ADMIN_HEADERS)
        assert_bad_request(r, "billable", bad)
    assert count(gw, "api_keys") == 0 and gw.billable_keys() == []

    for good in GOOD_IDS:
        r = httpx.post(f"{gw.url}/_gateway/admin/keys", json={"billable": good, "name": "ci"}, headers=ADMIN_HEADERS)
        assert r.status_code == 201, (good, r.text)
        answer = httpx.get(f"{gw.url}/v1/hello", headers={"Authorization": f"Bearer {r.json()['key']}"})
        assert answer.status_code == 200 and answer.json()["billable"] == good
    assert count(gw, "api_keys") == len(GOOD_IDS)


def test_keystore_create_refuses_ids_outside_the_rule(tmp_path: Path, empty_db_url: str) -> None:
    """KeyStore.create and list (what the CLI calls) refuse the same ids before touching the record."""

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        await db.upgrade()
        try:
            store = KeyStore(db)
            for bad in BAD_IDS:
                with pytest.raises(BadRequest, match="billable"):
                    await store.create(bad)
            assert (await store.create("org_1")).billable == "org_1"
            assert [k.name for k in await store.list("org_1")] == [""]
            for bad in BAD_IDS:
                with pytest.raises(BadRequest, match="billable"):
                    await store.list(bad)
        finally:
            await db.close()

    asyncio.run(main())


def test_admin_paths_refuse_ids_outside_the_rule(gw: Served) -> None:
    """Every admin path with {billable} answers 400 for an id outside the rule, whatever the method, and
    nothing is recorded or created in Redis."""
    grant = json.dumps({"amount": 5, "idempotency_key": "k"}).encode()
    endpoints: list[tuple[str, str, bytes | None]] = [
        ("GET", "", None),
        ("GET", "/keys", None),
        ("PUT", "/plan", b'{"plan": "pro"}'),
        ("DELETE", "/plan", None),
        ("POST", "/credits", grant),
        ("PUT", "/limits/projects", b'{"usage": 1}'),
        ("PUT", "/auto-recharge", b'{"enabled": false}'),
        ("GET", "/overage?plan=free", None),
        ("GET", "/usage", None),
    ]
    # A dot segment is no id: the canonical path (DESIGN §2) removes it before routing.
    for bad in [b for b in BAD_PATH_IDS if b not in DOT_SEGMENTS]:
        for method, tail, body in endpoints:
            answer = raw(gw.url, method, f"/_gateway/admin/billables/{bad}{tail}", body)
            # A control character or a backslash is refused by the canonical path rule, before any route.
            field = "cannot be made canonical" if b"canonical" in answer[2] else "billable"
            assert_bad_request(answer, field, (bad, method, tail))
    # An encoded slash splits the segment: no {billable} route matches it, so it reaches nothing.
    status, _, _ = raw(gw.url, "POST", "/_gateway/admin/billables/a%2Fb/credits", grant)
    assert status in (400, 404)
    # A key id outside the key shape names no key: 404 without asking the record (a NUL broke Postgres).
    for bad in ("a%00b", "a%0D%0Ab", "x" * 300, "%C3%A9" * 6):
        status, _, body = raw(gw.url, "DELETE", f"/_gateway/admin/keys/{bad}")
        # (or 400: a control character is refused by the canonical path rule, before any route)
        expected = {404: "urn:gateway:not-found", 400: "urn:gateway:bad-request"}
        assert status in expected and json.loads(body)["type"] == expected[status], (bad, body)
    assert count(gw, "credit_grants") == 0 and count(gw, "plan_assignments") == 0
    assert gw.billable_keys() == []


def test_trusted_header_refuses_ids_outside_the_rule(trusted: Served) -> None:
    """A trusted header naming an id outside the rule is 400 naming the header, before any decision: the
    upstream never sees it and Redis holds nothing for it. (CR, LF and NUL cannot cross HTTP/1.1: see the
    ASGI test below.)"""
    for bad in [b"a b", b"a/b", b"x" * 129, "é".encode(), b"\xff\xfe", b".", b"..", b"-a", b"a\tb", b"a,b"]:
        r = httpx.get(f"{trusted.url}/v1/hello", headers=[(b"X-Org", bad)])
        assert_bad_request(r, "x-org header", bad)
        r = httpx.post(f"{trusted.url}/v1/priced", headers=[(b"X-Org", bad)], json={"n": 1})
        assert_bad_request(r, "x-org header", bad)
    assert trusted.upstream_saw == [] and trusted.billable_keys() == []
    for good in GOOD_IDS:
        r = httpx.get(f"{trusted.url}/v1/hello", headers={"X-Org": good})
        assert r.status_code == 200 and r.json()["billable"] == good
    assert len(trusted.upstream_saw) == len(GOOD_IDS)


async def _asgi(app: Any, headers: list[tuple[bytes, bytes]], *, kind: str = "http") -> tuple[list[dict[str, Any]], bool]:
    """Drive one request through an ASGI app by hand: the messages it sent, and whether the inner app ran."""
    sent: list[dict[str, Any]] = []
    scope = {"type": kind, "method": "GET", "path": "/v1/hello", "raw_path": b"/v1/hello", "query_string": b"",
             "headers": headers, "scheme": "http", "server": ("test", 80), "client": ("127.0.0.1", 1), "asgi": {"version": "3.0"}}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False} if kind == "http" else {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent, bool(sent and sent[0].get("from_app"))


async def inner_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [], "from_app": True})
    await send({"type": "http.response.body", "body": b"ok"})


def test_middleware_refuses_ids_from_the_header_and_the_callable(key_prefix: str) -> None:
    """In middleware mode the trusted header and the app's callable (sync or async) are checked too, CR, LF
    and NUL included: each a 400 problem, the app never runs, a websocket is closed, Redis untouched."""
    catalog = parse_catalog(CATALOG)
    prefix = f"{key_prefix}ids{uuid.uuid4().hex[:6]}"

    def from_header(scope: dict[str, Any]) -> str | None:
        return next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-org"), None)

    async def from_header_async(scope: dict[str, Any]) -> str | None:
        return from_header(scope)

    async def main() -> None:
        store = open_redis(shared_redis_url())
        engine = Engine(store, catalog, prefix=prefix)
        try:
            apps = [GatewayMiddleware(inner_app, engine=engine, billable_header="X-Org"),
                    GatewayMiddleware(inner_app, engine=engine, billable=from_header),
                    GatewayMiddleware(inner_app, engine=engine, billable=from_header_async)]
            field = ["x-org header", "billable callable", "billable callable"]
            for app, name in zip(apps, field, strict=True):
                for bad in ["a\r\nb", "a\nb", "a\rb", "a\x00b", *BAD_IDS[4:]]:
                    if not bad:
                        continue  # no value: no billable (401), not a bad one
                    sent, reached = await _asgi(app, [(b"x-org", bad.encode("utf-8"))])
                    assert not reached and sent[0]["status"] == 400, (bad, sent)
                    start, body = sent
                    assert_bad_request((start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body["body"]), name, bad)
                    sent, _ = await _asgi(app, [(b"x-org", bad.encode("utf-8"))], kind="websocket")
                    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "urn:gateway:bad-request"}]
                sent, reached = await _asgi(app, [(b"x-org", b"org_1")])
                assert reached and sent[0]["status"] == 200
            not_a_string = GatewayMiddleware(inner_app, engine=engine, billable=lambda scope: 42)  # type: ignore[arg-type, return-value]
            sent, reached = await _asgi(not_a_string, [])
            assert not reached and sent[0]["status"] == 400 and b"not a string" in sent[1]["body"]
            keys = [k async for k in store.scan(f"{prefix}:*")]
            assert keys and all("{org_1}" in k for k in keys)  # only the good id has state
        finally:
            raw_client = raw_redis(shared_redis_url())
            async for key in store.scan(f"{prefix}:*"):
                await raw_client.delete(key)
            await raw_client.aclose()
            await store.close()

    asyncio.run(main())


def test_fastapi_guard_refuses_ids_from_its_callable() -> None:
    """The FastAPI dependencies' callable is an entry point too: an id outside the rule is 400 problem+json."""
    from fastapi import Depends, FastAPI
    from starlette.testclient import TestClient

    from gateway.dependencies import Guard

    engine = Engine(open_redis(None), parse_catalog(CATALOG), prefix=f"gwt{uuid.uuid4().hex[:8]}")
    gate = Guard(engine, billable=lambda request: request.headers.get("x-org"))
    app = FastAPI(exception_handlers=gate.exception_handlers)

    @app.post("/v1/projects", dependencies=[Depends(gate.require_feature("api_access"))])
    async def projects() -> dict[str, bool]:
        return {"ok": True}

    with TestClient(app) as client:
        for bad in ("a b", "a/b", "x" * 129, "..", "-a"):
            r = client.post("/v1/projects", headers={"x-org": bad})
            assert_bad_request(r, "billable callable", bad)
        assert client.post("/v1/projects", headers={"x-org": "org_1"}).json() == {"ok": True}


# ---- whole numbers --------------------------------------------------------------------------------------------

OUT_OF_RANGE = [2**53, 2**53 + 1, 10**20, -(2**53), -(2**63), 10**30]
NOT_WHOLE = [1e20, 1.5, 2.0**53, True, False, "5", None, [5], {"n": 5}]


def test_grant_amounts_are_whole_numbers_within_2_53(gw: Served) -> None:
    """2^53 - 1 is granted exactly (the record and Redis hold the same digits); 2^53 and past, -2^63, floats
    like 1e20 or 1.5, and booleans are 400 naming `amount` (10.0 is 10: some JSON encoders write whole numbers
    so); a grant that would take the balance past
    2^53 - 1 is 409 (the state, not the number, refuses it). After each refusal the record and Redis still agree."""
    org = "org_numbers"
    base = f"{gw.url}/_gateway/admin/billables/{org}"

    def grant(amount: Any, key: str | None = None) -> httpx.Response:
        return httpx.post(f"{base}/credits", json={"amount": amount, "idempotency_key": key or f"k-{uuid.uuid4()}"}, headers=ADMIN_HEADERS)

    def agree(expected: int) -> None:
        total = gw.query("select coalesce(sum(amount), 0) from credit_grants where billable = :b", b=org)[0][0]
        assert int(total) == expected
        assert gw.state(org)["c:p"] == str(expected)  # the digits themselves: no float, no rounding
        assert httpx.get(base, headers=ADMIN_HEADERS).json()["credits"]["balance"] == expected

    first = grant(MAX_INT)
    assert first.status_code == 200 and first.json()["balance"] == MAX_INT, first.text
    assert gw.query("select amount from credit_grants where billable = :b", b=org) == [(MAX_INT,)]
    agree(MAX_INT)
    for bad in [*OUT_OF_RANGE, *NOT_WHOLE, 0]:
        assert_bad_request(grant(bad), "amount", bad)
        agree(MAX_INT)
    assert_conflict(grant(1), "past", "the balance would pass 2^53 - 1")
    agree(MAX_INT)
    assert grant(-3.0).status_code == 200 and grant(2.0).status_code == 200  # whole numbers, as floats
    agree(MAX_INT - 1)
    assert_conflict(grant(2), "past", "the balance would pass 2^53 - 1 again")
    assert grant(-MAX_INT).status_code == 200 and grant(-(MAX_INT - 1)).status_code == 200  # into debt: -(2^53 - 1)
    assert_conflict(grant(-1), "past", "the debt would pass 2^53 - 1")
    state = gw.state(org)
    assert (state["c:p"], state["c:d"]) == ("0", str(MAX_INT))
    assert httpx.get(base, headers=ADMIN_HEADERS).json()["credits"]["balance"] == -MAX_INT

    # With a plan's allowance on top, the live balance is what must stay exact.
    pro = f"{gw.url}/_gateway/admin/billables/org_pro"
    assert httpx.put(f"{pro}/plan", json={"plan": "pro"}, headers=ADMIN_HEADERS).status_code == 200
    r = httpx.post(f"{pro}/credits", json={"amount": MAX_INT, "idempotency_key": "pro-1"}, headers=ADMIN_HEADERS)
    assert_conflict(r, "past", "1000 allowance + 2^53 - 1")
    r = httpx.post(f"{pro}/credits", json={"amount": MAX_INT - 1000, "idempotency_key": "pro-1"}, headers=ADMIN_HEADERS)
    assert r.status_code == 200 and r.json()["balance"] == MAX_INT
    again = httpx.post(f"{pro}/credits", json={"amount": MAX_INT - 1000, "idempotency_key": "pro-1"}, headers=ADMIN_HEADERS)
    assert again.status_code == 200 and again.json()["duplicate"] and again.json()["balance"] == MAX_INT  # a retry is never refused


def test_grants_are_bounded_by_the_record_while_redis_is_down(tmp_path: Path, empty_db_url: str) -> None:
    """With Redis unreachable the live balance cannot be read, so the record bounds what is granted: under
    the billable's sequence lock, its grants' total stays within ±(2^53 - 1)."""
    from gateway.grants import Grants

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        await db.upgrade()
        dead = RedisServer()  # never started: every call fails fast
        store = open_redis(dead.url)
        grants = Grants(db, Engine(store, parse_catalog(CATALOG)))
        try:
            assert not (await grants.grant("org", MAX_INT - 5, idempotency_key="a")).applied
            with pytest.raises(Conflict, match="past"):
                await grants.grant("org", 6, idempotency_key="b")
            assert not (await grants.grant("org", 5, idempotency_key="c")).applied
            async with db.engine.connect() as conn:
                rows = (await conn.execute(sa.text("select idempotency_key, amount from credit_grants order by seq"))).all()
            assert [tuple(r) for r in rows] == [("a", MAX_INT - 5), ("c", 5)]
        finally:
            await store.close()
            await db.close()

    asyncio.run(main())


def test_usage_and_recharge_numbers_are_whole_numbers_within_2_53(gw: Served) -> None:
    """A cap's usage and auto-recharge's amount_cents and threshold: 2^53 - 1 is kept exactly, anything
    else is 400 naming the field; after each refusal Redis and the record (flushed) still agree."""
    org = "org_usage"
    base = f"{gw.url}/_gateway/admin/billables/{org}"
    r = httpx.put(f"{base}/limits/projects", json={"usage": MAX_INT}, headers=ADMIN_HEADERS)
    assert r.status_code == 200 and r.json()["usage"] == MAX_INT, r.text
    assert gw.state(org)["u:projects"] == str(MAX_INT)
    for bad in [*OUT_OF_RANGE, *NOT_WHOLE, -1]:
        assert_bad_request(httpx.put(f"{base}/limits/projects", json={"usage": bad}, headers=ADMIN_HEADERS), "usage", bad)
    assert gw.state(org)["u:projects"] == str(MAX_INT)
    whole = httpx.put(f"{base}/limits/projects", json={"usage": 7.0}, headers=ADMIN_HEADERS)
    assert whole.status_code == 200 and whole.json()["usage"] == 7 and gw.state(org)["u:projects"] == "7", whole.text
    assert httpx.put(f"{base}/limits/projects", json={"usage": MAX_INT}, headers=ADMIN_HEADERS).status_code == 200

    ok = {"enabled": True, "amount_cents": MAX_INT, "threshold": MAX_INT}
    assert httpx.put(f"{base}/auto-recharge", json=ok, headers=ADMIN_HEADERS).json() == ok
    for name in ("amount_cents", "threshold"):
        for bad in [*OUT_OF_RANGE, 1e20, 1.5, True, "5", [1], -1]:
            assert_bad_request(httpx.put(f"{base}/auto-recharge", json={**ok, name: bad}, headers=ADMIN_HEADERS), name, (name, bad))
    assert_bad_request(httpx.put(f"{base}/auto-recharge", json={**ok, "enabled": 1}, headers=ADMIN_HEADERS), "enabled")
    state = gw.state(org)
    assert (state["c:thr"], state["ar:amt"], state["ar:on"]) == (str(MAX_INT), str(MAX_INT), "1")

    # The record takes Redis's state as it is: the same digits, no float.
    assert httpx.get(f"{base}/usage", headers=ADMIN_HEADERS).status_code == 200  # flushes this billable first
    snap = gw.snapshot(org)
    assert (snap["u:projects"], snap["c:thr"], snap["ar:amt"]) == (str(MAX_INT),) * 3
    assert httpx.get(base, headers=ADMIN_HEADERS).json()["limits"]["projects"]["usage"] == MAX_INT


# ---- JSON size and depth ---------------------------------------------------------------------------------------


def test_admin_json_depth_64_is_read_65_is_400(gw: Served) -> None:
    """An admin body 64 levels deep is read; 65, or 1,000 (a RecursionError once), is 400 and grants nothing."""
    base = "/_gateway/admin/billables/org_deep"

    def body(depth: int, key: str) -> bytes:
        return f'{{"amount": 5, "idempotency_key": "{key}", "x": {nested(depth - 1)}}}'.encode()

    status, _, answer = raw(gw.url, "POST", f"{base}/credits", body(64, "deep-64"))
    assert status == 200 and json.loads(answer)["balance"] == 5
    for depth in (65, 1000, 100_000):
        assert_bad_request(raw(gw.url, "POST", f"{base}/credits", body(depth, f"deep-{depth}")), "nested deeper than 64", depth)
    assert_bad_request(raw(gw.url, "POST", "/_gateway/admin/keys", ('{"billable": "org_1", "x": ' + nested(5000) + "}").encode()), "nested")
    assert gw.query("select idempotency_key from credit_grants") == [("deep-64",)]
    assert count(gw, "api_keys") == 0 and gw.state("org_deep")["c:p"] == "5"


def test_admin_body_over_1_mib_is_413_and_never_read_whole(gw: Served) -> None:
    """1 MiB is read; 1 MiB + 1 is 413, with or without Content-Length; a declared 100 MB body is refused
    before a byte of it is read."""
    url = f"{gw.url}/_gateway/admin/billables/org_big/credits"

    def padded(size: int) -> bytes:
        head = b'{"amount": 5, "idempotency_key": "big", "reason": "'
        return head + b"x" * (size - len(head) - 2) + b'"}'

    r = httpx.post(url, content=padded(MAX_BODY), headers=ADMIN_HEADERS)
    assert r.status_code == 200, r.text
    for content in (padded(MAX_BODY + 1), iter([padded(MAX_BODY + 1)[:600_000], padded(MAX_BODY + 1)[600_000:]])):
        r = httpx.post(url, content=content, headers=ADMIN_HEADERS)
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == "urn:gateway:payload-too-large" and "1048576" in r.json()["detail"]

    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /_gateway/admin/billables/org_big/credits HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + ADMIN.encode() + b"\r\nContent-Length: 104857600\r\n\r\n")
        answer = sock.recv(65536)  # no body was sent: the answer can only come from the Content-Length
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert gw.query("select idempotency_key from credit_grants") == [("big",)]


def test_read_body_pulls_no_more_than_the_limit() -> None:
    """The shared reader stops pulling a chunked body as soon as it is over the limit: a 100 MB body is never
    buffered whole."""
    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * (1 << 20), "more_body": pulled < 100}

    async def main() -> None:
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}, receive)
        with pytest.raises(TooLarge):
            await read_body(request)

    asyncio.run(main())
    assert pulled == 2


def test_loads_counts_depth_without_recursion() -> None:
    """Depth is counted on the text, brackets inside strings ignored, escaped quotes included; a body of
    escaped quotes is linear; NaN and Infinity are not JSON."""
    assert loads(nested(64)) == loads(nested(64))
    assert loads('{"a": "[[[[' + "[" * 100 + '", "b": "\\"[[["}') == {"a": "[" * 104, "b": '"[[['}
    for text in (nested(65), '{"a":' * 65 + "1" + "}" * 65, nested(10**6)):
        with pytest.raises(BadRequest, match="nested deeper than 64"):
            loads(text)
    with pytest.raises(BadRequest, match="not JSON"):
        loads('["' + '\\"' * 500_000)
    with pytest.raises(BadRequest):  # 70 brackets: the string pattern runs, and must not go quadratic
        loads("[" * 70 + '"' + '\\"' * 500_000)
    for text in ("NaN", '{"a": Infinity}', "-Infinity", b"\xff"):
        with pytest.raises(BadRequest):
            loads(text)


def test_priced_route_json_depth_64_is_charged_65_is_400(trusted: Served) -> None:
    """A route priced from request.json reads a body 64 levels deep and charges it; 65 or 1,000 is 400, and
    so is a count of units no balance could cover: each charges nothing and never reaches the upstream."""
    org = {"X-Org": "org_priced"}
    grant = {"amount": 100, "idempotency_key": "priced"}
    assert httpx.post(f"{trusted.url}/_gateway/admin/billables/org_priced/credits", json=grant, headers=ADMIN_HEADERS).status_code == 200
    ok = httpx.post(f"{trusted.url}/v1/priced", content=f'{{"n": 3, "x": {nested(63)}}}', headers=org)
    assert ok.status_code == 200 and ok.headers["x-credits-remaining"] == "94"
    for depth in (65, 1000, 200_000):
        r = httpx.post(f"{trusted.url}/v1/priced", content=f'{{"n": 3, "x": {nested(depth - 1)}}}', headers=org)
        assert_bad_request(r, "nested deeper than 64", depth)
    # Units no balance could ever cover are a 400 too (1.7e308 units once overflowed the price: a 500).
    for n in ("1.7e308", "1e300", str(2**60), str(MAX_INT)):
        r = httpx.post(f"{trusted.url}/v1/priced", content=f'{{"n": {n}}}', headers=org)
        assert_bad_request(r, f"would cost more than {MAX_INT} credits", n)
    short = httpx.post(f"{trusted.url}/v1/priced", content=f'{{"n": {MAX_INT // 2}}}', headers=org)  # 2^53 - 2: within
    assert short.status_code == 402 and short.headers["x-credits-remaining"] == "94"
    assert trusted.upstream_saw == ["POST /v1/priced org_priced"]
    assert trusted.state("org_priced")["c:p"] == "94"


@pytest.fixture(scope="module")
def stripe_api() -> Iterator[tuple[FakeStripe, str, dict[str, str]]]:
    with stripe_server() as (fake, url):
        yield fake, url, add_plan_prices(fake)


def test_signed_stripe_webhook_json_depth_64_is_processed_65_is_400(
    stripe_api: tuple[FakeStripe, str, dict[str, str]], tmp_path: Path, redis_server: RedisServer
) -> None:
    """A signed event 64 levels deep is processed; the same event 65 or 1,000 deep is 400 and changes nothing."""
    fake, url, prices = stripe_api

    async def main() -> None:
        space = RedisSpace(redis_server.url, f"gwb{uuid.uuid4().hex[:8]}")
        store = space.store()
        async with billing_env(fake, url, f"sqlite:///{tmp_path}/billing.db", space, store=store) as env:
            billable = env.billable()
            customer = fake.add_customer(billable)
            event = fake.event("customer.subscription.created", fake.subscribe(customer["id"], prices["pro"]))

            event["data"]["object"]["deep"] = "DEEP"

            def deep(depth: int) -> str:  # event (1) > data (2) > object (3) > the arrays
                return json.dumps(event).replace('"DEEP"', nested(depth - 3))

            assert json.loads(deep(64))["data"]["object"]["id"] == event["data"]["object"]["id"]
            for depth in (65, 1000, 100_000):
                r = await env.deliver({}, body=deep(depth))
                assert r.status_code == 400 and "nested deeper than 64" in r.json()["detail"], (depth, r.text)
                assert (await env.status(billable))["plan"] == "free"
            r = await env.deliver({}, body=deep(64))
            assert r.status_code == 200, r.text
            assert (await env.status(billable))["plan"] == "pro"
        await store.close()

    asyncio.run(main())


def test_a_stripe_customer_naming_a_bad_billable_is_treated_as_unlinked(
    stripe_api: tuple[FakeStripe, str, dict[str, str]], tmp_path: Path, redis_server: RedisServer
) -> None:
    """A customer whose metadata.billable is outside the id rule (set by the merchant's own code) maps to no
    billable: its events are answered 200 and change no billable's plan."""
    fake, url, prices = stripe_api

    async def main() -> None:
        space = RedisSpace(redis_server.url, f"gwb{uuid.uuid4().hex[:8]}")
        store = space.store()
        async with billing_env(fake, url, f"sqlite:///{tmp_path}/billing.db", space, store=store) as env:
            customer = fake.add_customer("org\r\nevil")
            event = fake.event("customer.subscription.created", fake.subscribe(customer["id"], prices["pro"]))
            r = await env.deliver(event)
            assert r.status_code == 200, r.text
            async with env.db.engine.connect() as conn:
                linked = (await conn.execute(sa.text("select count(*) from stripe_customers"))).scalar()
            assert linked == 0
            assert [k async for k in store.scan(f"{env.engine.prefix}:*")] == []
        await store.close()

    asyncio.run(main())


# ---- health and metrics ---------------------------------------------------------------------------------------


def test_health_is_public_only_as_status_and_metrics_need_a_token(gw: Served) -> None:
    """Public health answers only {"status"}; the admin token adds Redis, database, record and outbox state
    (a customer key does not). Metrics answer 401 problem+json without the metrics or admin token."""
    key = httpx.post(f"{gw.url}/_gateway/admin/keys", json={"billable": "org_h"}, headers=ADMIN_HEADERS).json()["key"]
    assert httpx.get(f"{gw.url}/v1/x", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    for headers in ({}, {"Authorization": f"Bearer {key}"}, {"Authorization": "Bearer metrics-secret-for-tests"}, {"Authorization": "Bearer nope"}):
        public = httpx.get(f"{gw.url}/_gateway/health", headers=headers)
        assert public.status_code == 200 and public.json() == {"status": "ok"}, headers
    detailed = httpx.get(f"{gw.url}/_gateway/health", headers=ADMIN_HEADERS).json()
    assert detailed["status"] == "ok" and detailed["redis"] == "up" and detailed["database"] == "up"
    assert set(detailed["record"]) == {"pending", "lag_seconds", "leader"} and "waiting" in detailed["events"]

    for headers in ({}, {"Authorization": f"Bearer {key}"}, {"Authorization": "Bearer nope"}, {"X-Api-Key": "metrics-secret-for-tests"}):
        r = httpx.get(f"{gw.url}/_gateway/metrics", headers=headers)
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json", headers
        assert r.json()["type"] == "urn:gateway:unauthorized" and "GATEWAY_METRICS_TOKEN" in r.json()["detail"]
    for token in ("metrics-secret-for-tests", ADMIN):
        r = httpx.get(f"{gw.url}/_gateway/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "gateway_decisions_total" in r.text and "org_h" not in r.text


def test_metrics_without_any_token_set_say_how_to_turn_them_on(tmp_path: Path, redis_server: RedisServer) -> None:
    """With neither token set, metrics are 401 with the setting to use; health stays public."""
    with serving(tmp_path, CATALOG, redis_port=redis_server.port, db_url=f"sqlite:///{tmp_path}/gw.db", admin_token=None) as served:
        r = httpx.get(f"{served.url}/_gateway/metrics")
        assert r.status_code == 401 and "set GATEWAY_METRICS_TOKEN" in r.json()["detail"]
        assert httpx.get(f"{served.url}/_gateway/health").json() == {"status": "ok"}



def test_toml_depth_is_counted_without_recursion() -> None:
    """A TOML text's depth counts tables, dotted keys, arrays and inline tables together, never brackets or dots
    in strings, comments or numbers; the example catalog is well within it, 65 levels any way are not."""
    example = (Path(__file__).resolve().parents[1] / "plans.toml").read_text()
    strings = 'a = "[[[[.{{{{" # [[[[[[[[\nb = [1.5, 2.5]\nc = """' + "[" * 100 + '"""\n' + "d = '" + "{." * 100 + "'\n"
    shallow = [example, strings, "x = [" + "1.5, " * 10_000 + "]", "[t.u]\nx.y = " + "{a.b = " * 30 + "1" + "}" * 30]
    assert not any(map(toml_too_deep, shallow))
    deep = ["x = " + "[" * 65 + "]" * 65, "x = " + "{a = " * 65 + "1" + "}" * 65, ".".join(["a"] * 65) + " = 1",
            "[" + ".".join(["a"] * 66) + "]", "[t]\nx = {" + ".".join(["a"] * 30) + " = " + "{a.a.a = " * 12 + "1" + "}" * 13,
            "x = " + "[" * 10**6]  # fmt: skip
    assert all(map(toml_too_deep, deep))


# ---- text the record cannot keep --------------------------------------------------------------------------

UNRECORDABLE = ["a\x00b", "\x00", "a\ud800b", "\udfff"]


def test_nul_and_lone_surrogates_in_admin_text_are_400_naming_the_field_before_any_write(gw: Served) -> None:
    """A NUL or an unpaired surrogate in a key's name, a suspension's, a grant's or an override's reason, or an
    idempotency key is 400 naming the field (on Postgres too, whose text cannot hold it, not a 503): nothing is
    written, the billable is not suspended, granted or overridden; the same text without it is accepted."""
    org = "org_text"
    base = f"{gw.url}/_gateway/admin/billables/{org}"
    key = httpx.post(f"{gw.url}/_gateway/admin/keys", json={"billable": org, "name": "ok"}, headers=ADMIN_HEADERS).json()["key"]
    bodies: list[tuple[str, str, str, dict[str, Any]]] = []
    for text in UNRECORDABLE:
        bodies += [
            ("POST", f"{gw.url}/_gateway/admin/keys", "name", {"billable": org, "name": text}),
            ("PUT", f"{base}/suspension", "reason", {"reason": text}),
            ("POST", f"{base}/credits", "reason", {"amount": 5, "reason": text, "idempotency_key": f"k-{uuid.uuid4()}"}),
            ("POST", f"{base}/credits", "idempotency_key", {"amount": 5, "reason": "r", "idempotency_key": text}),
            ("PUT", f"{base}/overrides", "reason", {"credits": 5, "reason": text}),
            ("PUT", f"{base}/overrides", "limits", {"limits": {text: {"to": 3}}}),
        ]
    before = [count(gw, t) for t in ("api_keys", "credit_grants", "audit_log")]
    for method, url, field, body in bodies:
        answer = httpx.request(method, url, content=json.dumps(body).encode(), headers={**ADMIN_HEADERS, "Content-Type": "application/json"})
        assert_bad_request(answer, field, (method, url, body))
        assert answer.json()["detail"].startswith(field), answer.json()["detail"]
    assert [count(gw, t) for t in ("api_keys", "credit_grants", "audit_log")] == before
    status = httpx.get(base, headers=ADMIN_HEADERS).json()
    assert status["suspended"] is False and status["overrides"] is None and status["credits"]["purchased"] == 0
    assert httpx.get(f"{gw.url}/v1/x", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    # Text that only looks like it (an escaped backslash, a paired surrogate) is kept as sent.
    kept = httpx.put(f"{base}/suspension", json={"reason": "\\u0000 \U0001f600"}, headers=ADMIN_HEADERS)
    assert kept.status_code == 200 and kept.json()["reason"] == "\\u0000 \U0001f600", kept.text
    assert httpx.get(f"{gw.url}/v1/x", headers={"Authorization": f"Bearer {key}"}).status_code == 403


def test_a_key_given_twice_in_a_body_that_moves_money_is_400(gw: Served) -> None:
    """A grant, a cap's count, overrides (nested too), a check and a settle naming a key twice are 400 naming it,
    before anything is written: the gateway does not guess which of the two amounts was meant."""
    org = "org_twice"
    base = f"{gw.url}/_gateway/admin/billables/{org}"
    cases = [
        ("POST", f"{base}/credits", "amount", '{"amount": 1, "reason": "r", "idempotency_key": "k1", "amount": 1000000}'),
        ("PUT", f"{base}/limits/projects", "usage", '{"usage": 1, "usage": 0}'),
        ("PUT", f"{base}/overrides", "to", '{"limits": {"projects": {"to": 1, "to": 1000}}}'),
        ("PUT", f"{base}/overrides", "credits", '{"credits": 1, "credits": 1000000}'),
        ("POST", f"{gw.url}/_gateway/check", "billable", '{"billable": "org_twice", "route": "POST /v1/projects", "billable": "x"}'),
        ("POST", f"{gw.url}/_gateway/settle", "units", '{"hold": "h", "outcome": "success", "units": 1, "units": 2}'),
    ]
    audited = count(gw, "audit_log")
    for method, url, field, body in cases:
        answer = httpx.request(method, url, content=body.encode(), headers={**ADMIN_HEADERS, "Content-Type": "application/json"})
        assert_bad_request(answer, f"'{field}' is given twice", (url, body))
    assert count(gw, "credit_grants") == 0 and count(gw, "audit_log") == audited
    status = httpx.get(base, headers=ADMIN_HEADERS).json()
    assert status["overrides"] is None and status["credits"]["purchased"] == 0 and status["limits"]["projects"]["usage"] == 0
