"""Hostile headers, both ways, against a real upstream behind `gateway serve`'s app over HTTP.

Upstream-bound: identity the client cannot forge or remove, method overrides dropped, the gateway's key
kept from the upstream, X-Forwarded-* describing the client's connection. Client-bound: a redirect to
the upstream's own address rewritten, and no error body the gateway writes names that address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile_support import (
    ADMIN,
    CATALOG,
    Gateway,
    Seen,
    gateway,
    raw_request,
    recording_upstream,
    websocket_refusal,
)
from http_servers import closed_port, serve_in_thread
from services import RedisServer, free_port, shared_redis_url

from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.middleware import GatewayMiddleware
from gateway.store.redis import open_redis

UPSTREAM_TOKEN = "Bearer sk-upstream-own-token"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, private_redis: RedisServer) -> Iterator[Gateway]:
    with gateway(tmp_path_factory.mktemp("headers"), private_redis.url) as running:
        yield running


def spelled(name: str) -> str:
    return name.lower().replace("_", "-")


def values(entry: dict[str, Any], name: str) -> list[str]:
    """Every value the upstream got under `name`, in any case and with `_` for `-`."""
    return [v for k, v in entry["headers"] if spelled(k) == name]


def only(gw: Gateway, mark: int) -> dict[str, Any]:
    seen = gw.seen.since(mark)
    assert len(seen) == 1, seen
    return seen[0]


def send(gw: Gateway, method: str, path: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
    """One request over a plain socket (so repeated and odd header names go out as written) and what the upstream got."""
    mark = gw.seen.count()
    answer = raw_request(gw.url, method, path.encode(), headers)
    return answer.status, only(gw, mark)


# ---- identity: added after the hop-by-hop pass, never the client's -----------------------------------


@pytest.mark.parametrize("connection", [
    "x-billable-id, x-plan", "keep-alive, X-Billable-Id", "X_Billable_Id, x_plan", "x-plan", " x-billable-id ,close",
])  # fmt: skip
def test_connection_cannot_remove_the_identity(gw: Gateway, connection: str) -> None:
    """A client's Connection naming the identity headers does not strip what the gateway added."""
    billable, key = gw.key()
    status, seen = send(gw, "GET", "/v1/anything", [("Authorization", f"Bearer {key}"), ("Connection", connection)])
    assert status == 200
    assert values(seen, "x-billable-id") == [billable] and values(seen, "x-plan") == ["free"]
    assert all("billable" not in v.lower() and "plan" not in v.lower() for v in values(seen, "connection"))


def test_connection_cannot_remove_the_forwarded_headers(gw: Gateway) -> None:
    """Connection: x-forwarded-for does not remove the X-Forwarded-* the proxy writes."""
    _, key = gw.key()
    _, seen = send(gw, "GET", "/v1/anything", [("Authorization", f"Bearer {key}"),
                                               ("Connection", "x-forwarded-for, x-forwarded-proto, x-forwarded-host")])
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"] and values(seen, "x-forwarded-proto") == ["http"]
    assert values(seen, "x-forwarded-host") == [gw.url.removeprefix("http://")]


FORGED = [("X-Billable-Id", "victim"), ("X_Billable_Id", "victim"), ("x-billable_id", "victim"), ("X-BILLABLE-ID", "victim"),
          ("X-Plan", "enterprise"), ("X_Plan", "enterprise"), ("x_PLAN", "enterprise")]


def test_forged_identity_in_any_spelling_is_dropped(gw: Gateway) -> None:
    """X-Billable-Id and X-Plan the client sent, in any case and with `_` for `-`, never reach the upstream."""
    billable, key = gw.key()
    status, seen = send(gw, "POST", "/v1/cheap", [("Authorization", f"Bearer {key}"), *FORGED])
    assert status == 200
    assert values(seen, "x-billable-id") == [billable] and values(seen, "x-plan") == ["free"]
    assert [k for k, _ in seen["headers"] if spelled(k) in ("x-billable-id", "x-plan")] == ["x-billable-id", "x-plan"]
    assert gw.status(billable)["credits"]["balance"] == 100000 - 2  # charged to the key's billable, not "victim"


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/status"), ("OPTIONS", "/v1/anything")])
def test_public_and_options_get_no_identity_at_all(gw: Gateway, method: str, path: str) -> None:
    """A public route and a preflight reach the upstream without any identity header, forged or not."""
    status, seen = send(gw, method, path, FORGED)
    assert status == 200
    assert values(seen, "x-billable-id") == [] and values(seen, "x-plan") == []


# ---- method overrides ----------------------------------------------------------------------------------

OVERRIDES = ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X_HTTP_Method_Override", "x-http-method-OVERRIDE"]


@pytest.mark.parametrize("header", OVERRIDES)
def test_method_override_is_dropped_and_the_matched_method_forwarded(gw: Gateway, header: str) -> None:
    """A GET saying "I am a POST" is matched and forwarded as a GET; a POST saying GET is charged as a POST."""
    free_billable, free_key = gw.key()
    status, seen = send(gw, "GET", "/v1/images", [("Authorization", f"Bearer {free_key}"), (header, "POST")])
    assert status == 200 and seen["method"] == "GET"  # the Free plan's 403 is for POST only
    assert all(values(seen, spelled(h)) == [] for h in OVERRIDES)
    status, seen = send(gw, "POST", "/v1/cheap", [("Authorization", f"Bearer {free_key}"), (header, "GET")])
    assert status == 200 and seen["method"] == "POST"
    assert all(values(seen, spelled(h)) == [] for h in OVERRIDES)
    assert gw.status(free_billable)["credits"]["balance"] == 100000 - 2
    assert raw_request(gw.url, "POST", b"/v1/images", [("Authorization", f"Bearer {free_key}"), (header, "GET")]).status == 403


# ---- the gateway's key stays at the gateway ------------------------------------------------------------


def assert_key_absent(seen: dict[str, Any], key: str) -> None:
    assert all(key not in v and key not in k for k, v in seen["headers"]), seen["headers"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/anything"), ("POST", "/v1/cheap"), ("GET", "/v1/status"),
                                              ("OPTIONS", "/v1/anything")])
def test_gateway_key_never_reaches_the_upstream(gw: Gateway, method: str, path: str) -> None:
    """A gw_ key in Authorization, X-Api-Key or X_Api_Key is removed on every route, public and OPTIONS included."""
    _, key = gw.key()
    for headers in ([("Authorization", f"Bearer {key}")], [("X-Api-Key", key)], [("authorization", f"bearer  {key}")],
                    [("X-Api-Key", key), ("X_Api_Key", key)]):
        status, seen = send(gw, method, path, headers)
        assert status == 200, (headers, status)
        assert_key_absent(seen, key)
        assert values(seen, "authorization") == [] and values(seen, "x-api-key") == []


def test_the_upstreams_own_authorization_passes(gw: Gateway) -> None:
    """With the gateway key in X-Api-Key, the upstream's own Bearer token (an LLM API's) passes unchanged."""
    billable, key = gw.key()
    status, seen = send(gw, "POST", "/v1/cheap", [("X-Api-Key", key), ("Authorization", UPSTREAM_TOKEN)])
    assert status == 200 and values(seen, "authorization") == [UPSTREAM_TOKEN] and values(seen, "x-api-key") == []
    assert values(seen, "x-billable-id") == [billable]
    assert_key_absent(seen, key)
    # An X-Api-Key that is not the gateway's (Anthropic's SDK sends one) passes too, beside a gateway Bearer.
    status, seen = send(gw, "GET", "/v1/anything", [("Authorization", f"Bearer {key}"), ("X-Api-Key", "sk-ant-own")])
    assert status == 200 and values(seen, "x-api-key") == ["sk-ant-own"] and values(seen, "authorization") == []
    # On a public route too, nobody's key is needed and the upstream's passes.
    status, seen = send(gw, "GET", "/v1/status", [("Authorization", UPSTREAM_TOKEN)])
    assert status == 200 and values(seen, "authorization") == [UPSTREAM_TOKEN]


# ---- X-Forwarded-* ------------------------------------------------------------------------------------

SPOOFED = [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil.example"),
           ("X_Forwarded_For", "7.7.7.7"), ("x_forwarded_host", "evil2.example")]


def test_forwarded_headers_describe_the_connection(gw: Gateway) -> None:
    """Untrusted (the default): what the client sent under X-Forwarded-* (any spelling) is dropped and rewritten."""
    status, seen = send(gw, "GET", "/v1/status", SPOOFED)
    assert status == 200
    assert values(seen, "x-forwarded-for") == ["127.0.0.1"]
    assert values(seen, "x-forwarded-proto") == ["http"]
    assert values(seen, "x-forwarded-host") == [gw.url.removeprefix("http://")]


def test_trusted_forwarded_chain_is_appended_to(tmp_path: Path, private_redis: RedisServer) -> None:
    """With trust_forwarded (behind a load balancer) the balancer's chain is kept; `_` spellings are still dropped."""
    with gateway(tmp_path, private_redis.url, trust_forwarded=True) as trusted:
        status, seen = send(trusted, "GET", "/v1/status", SPOOFED)
    assert status == 200
    chain = values(seen, "x-forwarded-for")
    # uvicorn (trusting its loopback peer, as `gateway serve --trust-forwarded` runs it) already took the
    # client from the chain's end; the proxy does not name it twice.
    assert len(chain) == 1 and chain[0].split(",")[0] == "6.6.6.6" and "7.7.7.7" not in chain[0]
    assert values(seen, "x-forwarded-proto") == ["https"]
    assert values(seen, "x-forwarded-host") == ["evil.example"]


def test_gateway_serve_trust_forwarded_flag(tmp_path: Path) -> None:
    """`gateway serve` drops a client's X-Forwarded-For by default, also from loopback; `--trust-forwarded` keeps it."""
    seen = Seen()
    with serve_in_thread(recording_upstream(seen)) as upstream:
        for flags, expected in (([], "127.0.0.1"), (["--trust-forwarded"], "6.6.6.6")):
            with serve_process(tmp_path, upstream, flags) as url:
                mark = seen.count()
                assert httpx.get(f"{url}/v1/status", headers={"X-Forwarded-For": "6.6.6.6"}).status_code == 200
                (entry,) = seen.since(mark)
                assert values(entry, "x-forwarded-for")[0].split(",")[0] == expected, flags


@contextlib.contextmanager
def serve_process(tmp_path: Path, upstream: str, flags: list[str]) -> Iterator[str]:
    plans = tmp_path / "plans.toml"
    plans.write_text(CATALOG)
    port = free_port()
    env = {**os.environ, "GATEWAY_PLANS": str(plans), "GATEWAY_UPSTREAM": upstream, "GATEWAY_PORT": str(port),
           "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path}/serve-{port}.db", "GATEWAY_ADMIN_TOKEN": ADMIN}
    env.pop("GATEWAY_TRUST_FORWARDED", None)
    env.pop("FORWARDED_ALLOW_IPS", None)
    log = tmp_path / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", *flags], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/_gateway/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ---- what the client gets back ------------------------------------------------------------------------


def test_redirect_to_the_upstream_origin_is_rewritten(gw: Gateway) -> None:
    """Location and Content-Location on the upstream's origin become path-absolute; others are left alone."""
    _, key = gw.key()
    origin = gw.upstream
    host = origin.removeprefix("http://")
    port = host.rsplit(":", 1)[1]
    cases = {
        f"{origin}/v1/next?x=1&y=2": "/v1/next?x=1&y=2",
        f"HTTP://{host.upper()}/v1/next#top": "/v1/next#top",
        f"//{host}/v1/next": "/v1/next",
        f"http://user:pw@{host}/v1/next": "/v1/next",
        f"{origin}": "/",
        f"{origin}//evil.example/x": "/evil.example/x",  # never a scheme-relative URL to another host
        f"{origin}/\\evil.example/x": "/%5Cevil.example/x",
        "https://example.com/v1/next": "https://example.com/v1/next",
        f"https://{host}/v1/next": f"https://{host}/v1/next",  # another origin (scheme)
        f"http://localhost.example:{port}/v1/next": f"http://localhost.example:{port}/v1/next",
        "/v1/next": "/v1/next",
        "next": "next",
    }
    for location, expected in cases.items():
        target = f"/v1/go?{httpx.QueryParams({'location': location})}".encode()
        answer = raw_request(gw.url, "GET", target, [("Authorization", f"Bearer {key}"), ("Host", "attacker.example")])
        assert answer.status == 302, location
        assert answer.header("location") == expected, location
        assert answer.header("content-location") == expected, location


def test_redirect_under_the_upstreams_base_path(tmp_path: Path, private_redis: RedisServer) -> None:
    """With --upstream http://host:port/base, a Location under /base loses the base path too."""
    seen = Seen()
    with serve_in_thread(recording_upstream(seen)) as upstream:
        plans = tmp_path / "plans.toml"
        plans.write_text(CATALOG)
        from gateway.app import GatewayApp
        from gateway.settings import Settings

        settings = Settings(plans=str(plans), upstream=f"{upstream}/base", redis_url=private_redis.url,
                            database_url=f"sqlite:///{tmp_path}/gw.db", admin_token=ADMIN)
        with serve_in_thread(GatewayApp(settings)) as url:
            for location, expected in ((f"{upstream}/base/v1/next?q=1", "/v1/next?q=1"), (f"{upstream}/base", "/"),
                                       (f"{upstream}/elsewhere", "/elsewhere")):
                r = httpx.get(f"{url}/v1/status", params={"location": location}, follow_redirects=False)
                assert r.status_code == 302 and r.headers["location"] == expected, location
    assert {e["raw_path"] for e in seen.requests} == {"/base/v1/status"}


def test_error_bodies_never_name_the_upstream(tmp_path: Path, private_redis: RedisServer) -> None:
    """502 (unreachable), 504 (too slow) and a refused WebSocket answer without the upstream's address."""
    with gateway(tmp_path / "slow", private_redis.url, upstream_timeout=0.5) as slow:
        _, key = slow.key()
        late = httpx.post(f"{slow.url}/v1/cheap", params={"sleep": "3"}, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert late.status_code == 504 and late.json()["type"] == "urn:gateway:upstream-timeout"
        assert slow.upstream.removeprefix("http://") not in late.text
    port = str(closed_port())
    with gateway(tmp_path / "dead", private_redis.url, upstream=f"http://127.0.0.1:{port}") as dead:
        _, key = dead.key()
        for answer in (httpx.get(f"{dead.url}/v1/anything", headers={"Authorization": f"Bearer {key}"}),
                       httpx.get(f"{dead.url}/v1/status")):
            assert answer.status_code == 502 and answer.json()["type"] == "urn:gateway:bad-gateway"
            assert port not in answer.text
        status, raw = websocket_refusal(dead.url, b"/v1/ws", [("Authorization", f"Bearer {key}")])
        assert status == 502 and b"bad-gateway" in raw and port.encode() not in raw


# ---- the middleware alone, in front of a plain ASGI app --------------------------------------------------


def test_middleware_alone_hands_the_app_clean_headers(key_prefix: str) -> None:
    """Without the proxy, the app still sees one identity (the gateway's), no overrides, no gateway key, no
    Connection naming the identity, and the upstream's own Authorization."""
    engine = Engine(open_redis(shared_redis_url()), parse_catalog(CATALOG), prefix=f"{key_prefix}hh")
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def billable(scope: dict[str, Any]) -> str | None:
        return "acme"

    middleware = GatewayMiddleware(app, engine=engine, billable=billable, freeze_gc=False)
    headers = [(b"x-billable-id", b"victim"), (b"X_Plan", b"enterprise"), (b"connection", b"x-billable-id, X_Plan, keep-alive"),
               (b"x-http-method-override", b"DELETE"), (b"x-api-key", b"gw_" + b"a" * 12 + b"_" + b"b" * 32),
               (b"authorization", UPSTREAM_TOKEN.encode())]

    async def call() -> int:
        sent: list[dict[str, Any]] = []
        scope = {"type": "http", "method": "GET", "path": "/v1/anything", "raw_path": b"/v1/anything", "query_string": b"",
                 "headers": headers, "scheme": "http", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await middleware(scope, receive, send)
        status: int = sent[0]["status"]
        return status

    assert asyncio.run(call()) == 200
    (got,) = seen
    assert [(k, v) for k, v in got if spelled(k.decode()) in ("x-billable-id", "x-plan")] == [
        (b"x-billable-id", b"acme"), (b"x-plan", b"free")]
    assert (b"connection", b"keep-alive") in got
    assert not [k for k, _ in got if spelled(k.decode()) in ("x-http-method-override", "x-api-key")]
    assert (b"authorization", UPSTREAM_TOKEN.encode()) in got


def test_trust_forwarded_setting() -> None:
    """GATEWAY_TRUST_FORWARDED reads as a boolean (default off), the flag wins, and a bad value names itself."""
    from gateway.errors import ConfigError
    from gateway.settings import Settings

    assert Settings.load(environ={}).trust_forwarded is False
    assert Settings.load(environ={"GATEWAY_TRUST_FORWARDED": "true"}).trust_forwarded is True
    assert Settings.load(environ={"GATEWAY_TRUST_FORWARDED": "0"}).trust_forwarded is False
    assert Settings.load({"trust_forwarded": True}, environ={"GATEWAY_TRUST_FORWARDED": "off"}).trust_forwarded is True
    with pytest.raises(ConfigError, match="GATEWAY_TRUST_FORWARDED: expected true or false, got 'maybe'"):
        Settings.load(environ={"GATEWAY_TRUST_FORWARDED": "maybe"})


def spellings(key: str) -> list[list[tuple[str, str]]]:
    """A gateway key as a client may send it besides `Bearer <key>` and `X-Api-Key: <key>`."""
    basic = base64.b64encode(f"{key}:".encode()).decode()
    return [[("Authorization", key)], [("Authorization", f"Token {key}")], [("Authorization", f"Bearer\t{key}")],
            [("Authorization", f"bearer {key} extra")], [("X-Api-Key", f"Bearer {key}")], [("X_Api_Key", f" {key}")],
            [("Authorization", f"Basic {basic}")], [("Cookie", f"session=1; gw={key}")], [("X-Upstream-Key", key)],
            [("Proxy-Authorization", f"Bearer {key}")], [("X-Forwarded-Authorization", f"Bearer {key}")]]


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/anything"), ("POST", "/v1/cheap"), ("GET", "/v1/status"),
                                              ("OPTIONS", "/v1/anything")])
def test_gateway_key_in_any_spelling_never_reaches_the_upstream(gw: Gateway, method: str, path: str) -> None:
    """Authorization: gw_..., Token gw_..., Bearer<TAB>gw_..., X-Api-Key: Bearer gw_..., a Basic credential, a cookie
    or any other header holding a gw_ key: removed on every route, public and OPTIONS included, and beside a valid
    X-Api-Key on an authenticated route; the upstream's own Authorization passes."""
    _, key = gw.key()
    _, other = gw.key()
    for headers in spellings(key):
        authenticated = path != "/v1/status" and method != "OPTIONS"
        status, seen = send(gw, method, path, [("X-Api-Key", other), *headers] if authenticated else headers)
        assert status == 200, (headers, status)
        assert_key_absent(seen, key)
        assert_key_absent(seen, other)
    # The upstream's own Authorization (Bearer, Basic) and a header that only mentions gw_ still pass.
    basic = "Basic " + base64.b64encode(b"user:gw_not_a_key").decode()
    for own in (UPSTREAM_TOKEN, basic):
        status, seen = send(gw, method, path, [("X-Api-Key", other), ("Authorization", own), ("X-Note", "gw_short")])
        assert status == 200 and values(seen, "authorization") == [own] and values(seen, "x-note") == ["gw_short"]


def test_middleware_alone_hands_the_app_no_key_in_any_spelling(key_prefix: str) -> None:
    """Without the proxy, an app behind the middleware gets no header holding a gw_ key either, on a billed route
    (the app named the billable) and on a preflight; the upstream's own Authorization still arrives."""
    engine = Engine(open_redis(shared_redis_url()), parse_catalog(CATALOG), prefix=f"{key_prefix}hk")
    key = "gw_" + "a" * 12 + "_" + "b" * 32
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = GatewayMiddleware(app, engine=engine, billable=lambda scope: "acme", freeze_gc=False)

    async def call(method: str, headers: list[tuple[bytes, bytes]]) -> None:
        scope = {"type": "http", "method": method, "path": "/v1/anything", "raw_path": b"/v1/anything", "query_string": b"",
                 "headers": headers, "scheme": "http", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        await middleware(scope, receive, send)

    async def main() -> None:
        try:
            for method in ("GET", "OPTIONS"):
                for headers in spellings(key):
                    await call(method, [(k.lower().encode(), v.encode()) for k, v in headers]
                               + [(b"authorization", UPSTREAM_TOKEN.encode())])  # fmt: skip
        finally:
            await engine.store.close()

    asyncio.run(main())
    assert len(seen) == 2 * len(spellings(key))
    for got in seen:
        assert all(key.encode() not in v for _, v in got), got
        assert (b"authorization", UPSTREAM_TOKEN.encode()) in got


ANSWER_HEADERS = [("X-Gateway-Degraded", "redis"), ("X-Credits-Remaining", "999999"), ("X_Credits_Remaining", "999999"),
                  ("RateLimit", '"rate";r=999'), ("RateLimit-Policy", '"rate";q=999'), ("X-RateLimit-Remaining", "999"),
                  ("x-ratelimit-limit", "999"), ("X-RateLimit-Reset", "1"), ("X-RateLimit-Resource", "rate"),
                  ("Retry-After", "0"), ("X-Gateway-Shadow", "429 rate")]
CLAIMS = [("Forwarded", "for=6.6.6.6;proto=https"), ("X-Real-IP", "6.6.6.6"), ("X_Real_IP", "7.7.7.7")]


def test_headers_the_gateway_answers_with_and_client_claims_never_reach_the_upstream(tmp_path: Path, private_redis: RedisServer) -> None:
    """A client's own X-Gateway-Degraded, X-Credits-Remaining, RateLimit* and the other headers the gateway adds to its
    answers are dropped in every spelling, on a billed and a public route; Forwarded and X-Real-IP pass only with
    --trust-forwarded (as sent, never their `_` spellings)."""
    for trusted in (False, True):
        with gateway(tmp_path / str(trusted), private_redis.url, trust_forwarded=trusted) as gw:
            _, key = gw.key()
            for method, path, auth in (("POST", "/v1/cheap", [("Authorization", f"Bearer {key}")]), ("GET", "/v1/status", [])):
                status, seen = send(gw, method, path, [*auth, *ANSWER_HEADERS, *CLAIMS])
                assert status == 200
                assert all(values(seen, spelled(k)) == [] for k, _ in ANSWER_HEADERS), seen["headers"]
                assert values(seen, "forwarded") == (["for=6.6.6.6;proto=https"] if trusted else [])
                assert values(seen, "x-real-ip") == (["6.6.6.6"] if trusted else []), seen["headers"]
    from gateway.headers import ANSWERED

    assert {spelled(k).encode() for k, _ in ANSWER_HEADERS} == set(ANSWERED)  # every one the gateway answers with
