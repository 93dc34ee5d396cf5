"""Hostile paths: each is charged exactly as its canonical route, or refused with 400 and nothing charged.

The same table runs through `gateway serve`'s app over real HTTP (uvicorn, a recording upstream, a
private redis-server) and through GatewayMiddleware around a plain ASGI app (raw ASGI messages, so
the raw path reaches the middleware byte for byte, on the shared Redis under this run's prefix).
For every case, the canonical path is sent too, and the two outcomes (status, problem type, credits
spent, units held, what the upstream or the gateway's endpoints received) must be the same.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hostile_support import ADMIN, CATALOG, gateway, raw_request, websocket_handshake
from services import RedisServer, shared_redis_url

from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.middleware import GatewayMiddleware
from gateway.paths import canonical
from gateway.store.redis import open_redis

BAD_REQUEST = "urn:gateway:bad-request"


@dataclass(frozen=True)
class Case:
    method: str
    raw: bytes
    canonical: str | None  # None: refused with 400
    who: str = "free"  # free, pro (an API key of that plan), admin (the admin token), anon (nothing)
    # Over HTTP the server may already change the target (httptools drops a raw "#fragment"): the
    # outcome of this canonical path is then accepted too.
    wire: str | None = None


CASES = [
    # dot segments, plain and encoded: the Free plan must still get its 403 on POST /v1/images
    Case("POST", b"/v1/./images", "/v1/images"),
    Case("POST", b"/v1/x/../images", "/v1/images"),
    Case("POST", b"/v1/%2e/images", "/v1/images"),
    Case("POST", b"/v1/%2E/images", "/v1/images"),
    Case("POST", b"/v1/x/.%2e/images", "/v1/images"),
    Case("POST", b"/v1/x/%2e%2E/images", "/v1/images"),
    Case("POST", b"/v1/images/.", "/v1/images/"),
    Case("POST", b"/v1/images/x/..", "/v1/images/"),
    Case("POST", b"/v1/./images", "/v1/images", who="pro"),
    Case("POST", b"/v1/a/b/../../images", "/v1/images", who="pro"),
    # repeated slashes
    Case("POST", b"/v1//images", "/v1/images"),
    Case("POST", b"//v1/images", "/v1/images", who="pro"),
    Case("POST", b"/v1///images//", "/v1/images/", who="pro"),
    # unreserved characters encoded
    Case("POST", b"/v1/%69mages", "/v1/images"),
    Case("POST", b"/%76%31/images", "/v1/images", who="pro"),
    Case("POST", b"/v1/%63heap", "/v1/cheap"),
    Case("POST", b"/v1/cheap/%2e", "/v1/cheap/"),
    Case("POST", b"/v1/x/%2e%2e//cheap", "/v1/cheap"),
    Case("POST", b"/v1/.//./cheap", "/v1/cheap"),
    Case("POST", b"/v1/%70rojects", "/v1/projects", who="pro"),
    Case("POST", b"/v1/projects/x/..", "/v1/projects/", who="pro"),
    # other escapes stay: a different route, charged as that route
    Case("POST", b"/v1/images%20", "/v1/images%20"),
    Case("GET", b"/v1/%7e/items", "/v1/~/items"),
    # encoded "/", "\", "?", "#", ";": refused
    Case("POST", b"/v1/x/..%2Fimages", None),
    Case("POST", b"/v1%2fimages", None),
    Case("POST", b"/v1/x%2F..%2F..%2Fimages", None),
    Case("POST", b"/v1%5Cimages", None),
    Case("POST", b"/v1/x/..%5cimages", None),
    Case("POST", b"/v1/images%3F", None),
    Case("POST", b"/v1/images%23", None),
    Case("POST", b"/v1/images%3bx=1", None),
    # a raw backslash, "#" and ";" parameters
    Case("POST", b"/v1\\images", None),
    Case("POST", b"/v1/x/..\\images", None),
    Case("POST", b"/v1/images#x", None, wire="/v1/images"),
    Case("POST", b"/v1/x/../images?x=1", "/v1/images"),
    Case("POST", b"/v1/images\\?/../../cheap", None),
    Case("POST", b"/v1/images;x=1", None),
    Case("POST", b"/v1;x=1/images", None),
    Case("POST", b"/v1/images/;", None),
    # NUL and other control characters, encoded and raw
    Case("POST", b"/v1/images%00", None),
    Case("POST", b"/v1/images%00.json", None),
    Case("POST", b"/v1/images%0a", None),
    Case("POST", b"/v1/images%7F", None),
    Case("POST", b"/v1/images\x00", None),
    Case("POST", b"/v1/images\x01", None),
    Case("POST", b"/v1/images\x7f", None),
    Case("POST", b"/v1/images%C2%85", None),
    # ".." above the root
    Case("POST", b"/..", None),
    Case("POST", b"/../v1/images", None),
    Case("POST", b"/v1/../../images", None),
    Case("POST", b"/v1/%2e%2e/%2E%2E/images", None),
    # overlong and invalid UTF-8, in escapes and raw
    Case("POST", b"/v1/%c0%ae%c0%ae/images", None),
    Case("POST", b"/v1/x/%c0%af../images", None),
    Case("POST", b"/v1/%e0%80%ae/images", None),
    Case("POST", b"/v1/%ff/images", None),
    Case("POST", b"/v1/%ed%a0%80/images", None),
    Case("POST", b"/v1/\xff/images", None),
    # a route's path in another case (an upstream may read paths in any case): refused, never forwarded uncharged
    Case("POST", b"/V1/images", None),
    Case("POST", b"/v1/IMAGES", None, who="pro"),
    Case("POST", b"/v1/Cheap", None),
    Case("POST", b"/v1/%43heap/", None),
    Case("GET", b"/V1/status", None, who="anon"),
    Case("GET", b"/v1/anything/AbC", "/v1/anything/AbC"),  # only a route's {id} or * part differs: itself
    # a bad escape
    Case("POST", b"/v1/images%", None),
    Case("POST", b"/v1/images%zz", None),
    # /_gateway spellings: the endpoint is reached exactly as by its canonical path, never forwarded
    Case("POST", b"/_gateway/../v1/images", "/v1/images"),
    Case("GET", b"/%5fgateway/health", "/_gateway/health", who="anon"),
    Case("GET", b"/%5Fgateway/health", "/_gateway/health", who="anon"),
    Case("GET", b"//_gateway/health", "/_gateway/health", who="anon"),
    Case("GET", b"/_gateway/./health", "/_gateway/health", who="anon"),
    Case("GET", b"/_gatewa%79/health", "/_gateway/health", who="anon"),
    Case("GET", b"/v1/../_gateway/metrics", "/_gateway/metrics", who="anon"),
    Case("GET", b"/x/../_gateway/admin/billables/{pro}", "/_gateway/admin/billables/{pro}", who="admin"),
    Case("GET", b"/%5fgateway/admin/billables/{pro}", "/_gateway/admin/billables/{pro}", who="anon"),
    Case("POST", b"/%5fgateway/admin/keys", "/_gateway/admin/keys", who="anon"),
    Case("GET", b"/_gateway/admin/billables/x/../{pro}", "/_gateway/admin/billables/{pro}", who="admin"),
    Case("GET", b"/_gateway%2Fhealth", None, who="anon"),
    Case("GET", b"/_gateway/admin/billables/..%2F..%2Fhealth", None, who="admin"),
    Case("GET", b"/_gateway/../../_gateway/health", None, who="anon"),
    Case("GET", b"/_gateway;/health", None, who="anon"),
    # a public route is not a way in: what follows its prefix is matched as itself
    Case("GET", b"/v1/./status", "/v1/status", who="anon"),
    Case("GET", b"/v1/status/../images", "/v1/images", who="anon"),
    Case("GET", b"/v1/status/..%2Fimages", None, who="anon"),
    Case("GET", b"/v1/status;/../images", None, who="anon"),
    Case("OPTIONS", b"/v1/x/../images", "/v1/images", who="anon"),
    # not a path at all
    Case("GET", b"v1/images", None),
]


@dataclass(frozen=True)
class Outcome:
    """What one request did: to the client, to the billable's balance and count, and past the gateway."""

    status: int
    problem: str | None
    answer: str  # the body's shape: its JSON keys (lag, counts and such change between two calls)
    credits_spent: int
    units_held: int
    reached: tuple[tuple[str, str, str], ...]  # (where, method, raw path) past the gateway

    @property
    def charged(self) -> bool:
        return self.credits_spent != 0 or self.units_held != 0


@dataclass
class Tally:
    cases: int = 0
    same_as_canonical: int = 0
    charged: int = 0
    refused: int = 0
    refused_by_server: int = 0  # the HTTP server's own 400 (a raw control byte), before the gateway ran
    bypasses: int = 0

    def line(self) -> str:
        return (f"cases={self.cases} same-as-canonical={self.same_as_canonical} (charged={self.charged})"
                f" refused={self.refused} (by the HTTP server itself: {self.refused_by_server})"
                f" bypasses={self.bypasses}")


def judge(tally: Tally, case: Case, got: Outcome, expected: Outcome | None, alternative: Outcome | None) -> str | None:
    """Count the case; answer why it is a bypass, or None."""
    tally.cases += 1
    if case.canonical is None and got.status == 400 and not got.charged and not got.reached:
        tally.refused += 1
        tally.refused_by_server += got.problem != BAD_REQUEST
        return None
    for want in (expected, alternative):
        if want is not None and got == want:
            tally.same_as_canonical += 1
            tally.charged += got.charged
            return None
    tally.bypasses += 1
    return f"{case}: got {got}, canonical gave {expected or alternative}"


def assert_canonical_upstream(seen_paths: list[str]) -> None:
    """The upstream only ever sees canonical paths, never one of the gateway's own."""
    for raw in seen_paths:
        assert canonical(raw.encode("latin-1")) is None, raw
        assert not raw.startswith("/_gateway"), raw


def check_table(run: Callable[[Case, bytes], Outcome], label: str) -> Tally:
    tally = Tally()
    bypasses = []
    for case in CASES:
        expected = run(case, case.canonical.encode()) if case.canonical is not None else None
        alternative = run(case, case.wire.encode()) if case.wire is not None else None
        got = run(case, case.raw)
        if (why := judge(tally, case, got, expected, alternative)) is not None:
            bypasses.append(why)
    print(f"hostile paths through {label}: {tally.line()}")
    assert not bypasses, "\n".join(bypasses)
    assert tally.cases >= 40 and tally.bypasses == 0
    # The table is worth something only if both kinds of answer occur, and charging among them.
    assert tally.refused >= 30 and tally.same_as_canonical >= 30 and tally.charged >= 10
    return tally


# ---- through `gateway serve`'s app over HTTP -----------------------------------------------------------


def test_hostile_paths_through_the_proxy(tmp_path: Path, private_redis: RedisServer) -> None:
    """Over real HTTP: every hostile path is charged as its canonical route or refused; the upstream sees canonical paths."""
    with gateway(tmp_path, private_redis.url) as gw:
        billables = {"free": gw.key("free"), "pro": gw.key("pro")}

        def run(case: Case, target: bytes) -> Outcome:
            who = "pro" if case.who == "pro" else "free"
            billable, key = billables[who]
            headers = {"free": [("Authorization", f"Bearer {key}")], "pro": [("Authorization", f"Bearer {key}")],
                       "admin": [("Authorization", f"Bearer {ADMIN}")], "anon": []}[case.who]
            target = target.replace(b"{pro}", billables["pro"][0].encode())
            before, mark = gw.status(billable), gw.seen.count()
            answer = raw_request(gw.url, case.method, target, headers)
            after = gw.status(billable)
            reached = tuple(("upstream", r["method"], r["raw_path"]) for r in gw.seen.since(mark))
            return Outcome(answer.status, problem_type(answer.body, answer.header("content-type")), shape(answer.body),
                           spent(before, after), held(before, after), reached)

        tally = check_table(run, "the proxy (gateway serve over HTTP)")
        assert_canonical_upstream([r["raw_path"] for r in gw.seen.requests])
        assert tally.bypasses == 0


def shape(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return f"text:{body[:20]!r}"
    return ",".join(sorted(doc)) if isinstance(doc, dict) else type(doc).__name__


def problem_type(body: bytes, content_type: str | None) -> str | None:
    if content_type != "application/problem+json":
        return None
    found: str = json.loads(body)["type"]
    return found


def spent(before: dict[str, Any], after: dict[str, Any]) -> int:
    return int(before["credits"]["balance"]) - int(after["credits"]["balance"])


def held(before: dict[str, Any], after: dict[str, Any]) -> int:
    return int(after["limits"]["projects"]["usage"]) - int(before["limits"]["projects"]["usage"])


def test_hostile_websocket_paths_through_the_proxy(tmp_path: Path, private_redis: RedisServer) -> None:
    """A WebSocket's path is made canonical too: dot segments reach the upstream resolved, an encoded "/" is refused."""
    with gateway(tmp_path, private_redis.url) as gw:
        _, key = gw.key("free")
        auth = [("Authorization", f"Bearer {key}")]
        mark = gw.seen.count()
        assert websocket_handshake(gw.url, b"/v1/x/../ws/%2e/live", auth) == 101
        assert [(r["type"], r["raw_path"]) for r in gw.seen.since(mark)] == [("websocket", "/v1/ws/live")]
        mark = gw.seen.count()
        assert websocket_handshake(gw.url, b"/v1/x/..%2Fws", auth) == 400
        assert websocket_handshake(gw.url, b"/%5fgateway/../v1/ws;x", auth) == 400
        assert gw.seen.since(mark) == []


# ---- through GatewayMiddleware around a plain ASGI app (raw ASGI) ----------------------------------------


class Recorder:
    """A plain ASGI app (or the gateway's endpoints) noting the path and raw_path it was called with."""

    def __init__(self, where: str, reached: list[tuple[str, str, str, str]]) -> None:
        self.where = where
        self.reached = reached

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.reached.append((self.where, scope["method"], scope["path"], scope["raw_path"].decode("latin-1")))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


async def call_asgi(app: Any, method: str, target: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, str | None]:
    """One request as uvicorn would hand it over: `path` decoded from the raw path, `raw_path` as sent."""
    raw, _, query = target.partition(b"?")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": unquote(raw.decode("latin-1")), "raw_path": raw,
        "query_string": query, "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    requests = [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    content_type = next((v.decode() for k, v in start["headers"] if k == b"content-type"), None)
    return start["status"], body, content_type


def test_hostile_paths_through_the_middleware(key_prefix: str) -> None:
    """Raw ASGI: the middleware refuses or canonicalizes every path; the app and endpoints see only the canonical form."""
    engine = Engine(open_redis(shared_redis_url()), parse_catalog(CATALOG), prefix=f"{key_prefix}hp{uuid.uuid4().hex[:6]}")
    reached: list[tuple[str, str, str, str]] = []

    def billable(scope: dict[str, Any]) -> str | None:
        found = dict(scope["headers"]).get(b"x-test-billable")
        return found.decode() if found else None

    app = GatewayMiddleware(Recorder("app", reached), engine=engine, billable=billable,
                            endpoints=Recorder("endpoint", reached), freeze_gc=False)
    billables = {"free": f"free-{uuid.uuid4().hex[:8]}", "pro": f"pro-{uuid.uuid4().hex[:8]}"}

    async def main() -> Tally:
        await engine.set_assignment(billables["pro"], "pro")
        outcomes: dict[tuple[Case, bytes], Outcome] = {}
        for case in CASES:
            targets = [t for t in (case.canonical, case.wire) if t is not None]
            for target in [*(t.encode() for t in targets), case.raw]:
                who = "pro" if case.who == "pro" else "free"
                headers = [(b"x-test-billable", billables[who].encode())] if case.who in ("free", "pro") else []
                path = target.replace(b"{pro}", billables["pro"].encode())
                before, mark = await engine.status(billables[who]), len(reached)
                status, body, content_type = await call_asgi(app, case.method, path, headers)
                after = await engine.status(billables[who])
                went = tuple((where, method, raw) for where, method, _, raw in reached[mark:])
                outcomes[case, target] = Outcome(status, problem_type(body, content_type), shape(body),
                                                 spent(before, after), held(before, after), went)
        tally = Tally()
        bypasses = [why for case in CASES if (why := judge(
            tally, case, outcomes[case, case.raw],
            outcomes.get((case, case.canonical.encode())) if case.canonical else None,
            outcomes.get((case, case.wire.encode())) if case.wire else None,
        )) is not None]  # fmt: skip
        assert not bypasses, "\n".join(bypasses)
        return tally

    tally = asyncio.run(main())
    print(f"hostile paths through the middleware (raw ASGI): {tally.line()}")
    assert tally.cases >= 40 and tally.bypasses == 0 and tally.refused >= 30 and tally.charged >= 10
    # Raw ASGI hands every byte to the gateway: each refusal is its own problem+json, nothing reached the app.
    for where, _, path, raw in reached:
        assert canonical(raw.encode("latin-1")) is None and unquote(raw) == path, (where, path, raw)
        assert (where == "endpoint") == (path == "/_gateway" or path.startswith("/_gateway/")), (where, path)


@pytest.mark.parametrize("case", [c for c in CASES if c.canonical is None], ids=lambda c: repr(c.raw))
def test_each_refusal_names_the_part_of_the_path(case: Case) -> None:
    """A refused path is a 400 urn:gateway:bad-request naming the part of the path, decided before identity."""
    engine = Engine(open_redis(None), parse_catalog(CATALOG))
    reached: list[tuple[str, str, str, str]] = []

    def identity_is_not_asked(scope: dict[str, Any]) -> str:
        raise AssertionError("a path is judged before identity")

    app = GatewayMiddleware(Recorder("app", reached), engine=engine, billable=identity_is_not_asked,
                            endpoints=Recorder("endpoint", reached), freeze_gc=False)
    status, body, content_type = asyncio.run(call_asgi(app, case.method, case.raw, []))
    problem = json.loads(body)
    assert (status, content_type, problem["type"]) == (400, "application/problem+json", BAD_REQUEST)
    assert problem["detail"].startswith("The path ") and ('segment "' in problem["detail"] or "start with" in problem["detail"])
    assert problem["error"] == {"message": problem["detail"], "type": "bad-request", "code": 400}
    assert reached == []
