"""End to end through real HTTP: uvicorn serving `gateway serve`'s app, a real upstream, real Redis and SQLite."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import redis
from http_servers import serve_in_thread
from services import RedisServer, shared_redis_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from waiting import wait_until

from gateway.app import GatewayApp
from gateway.client import parse_limits
from gateway.engine import Engine
from gateway.periods import calendar_bounds
from gateway.settings import Settings

ADMIN = "admin-secret-for-tests"

CATALOG = """
[catalog]
default_plan = "free"
highlighted_plan = "pro"
upgrade_url = "https://example.com/pricing"
{unmatched}

[features]
api_access = "API access"
hd = "HD images"

[operations.image]
cost = 5

[operations.chat]
per_unit = 1
units = "response.json:usage.total_tokens"
reserve = 50
max_units = 1000

[operations.stream]
per_unit = 1
units = "response.json:usage.total_tokens"
reserve = 15

[plans.free]
price = 0
allows = ["api_access"]
credits = 20
rate_limit = {{ limit = 50, per = "1s" }}
limits.projects = {{ to = 2 }}
limits.exports = {{ to = 2, per = "month" }}

[plans.pro]
price = 29
allows = ["api_access", "hd"]
credits = 1000
limits.projects = {{ to = 25 }}
limits.exports = {{ to = 100, per = "month" }}

[[routes]]
match = "POST /v1/images"
features = ["api_access", "hd"]
spend = "image"

[[routes]]
match = "POST /v1/cheap"
features = ["api_access"]
spend = "image"

[[routes]]
match = "POST /v1/chat"
features = ["api_access"]
spend = "chat"

[[routes]]
match = "GET /v1/stream"
features = ["api_access"]
spend = "stream"

[[routes]]
match = "GET /v1/stream-die"
features = ["api_access"]
spend = "stream"

[[routes]]
match = "POST /v1/projects"
features = ["api_access"]
limit = "projects"

[[routes]]
match = "DELETE /v1/projects/{{id}}"
features = ["api_access"]
release = "projects"

[[routes]]
match = "POST /v1/exports"
limit = "exports"

[[routes]]
match = "GET /v1/limited"
rate_limit = "1/minute"

[[routes]]
match = "GET /v1/status"
public = true

[[routes]]
match = "* /v1/*"
features = ["api_access"]
"""


@dataclass
class Seen:
    headers: list[dict[str, str]]
    stream_cancelled: threading.Event


def upstream(seen: Seen) -> Starlette:
    async def echo(request: Request) -> Response:
        seen.headers.append(dict(request.headers))
        status = int(request.query_params.get("status", 200))
        return JSONResponse({"path": request.url.path, "billable": request.headers.get("x-billable-id"),
                             "plan": request.headers.get("x-plan")}, status_code=status)

    async def chat(request: Request) -> Response:
        await request.body()
        if request.query_params.get("slow"):
            await asyncio.sleep(2)  # slower than the gateway's upstream timeout: the thing under test
        return JSONResponse({"usage": {"total_tokens": int(request.query_params.get("tokens", 10))}},
                            status_code=int(request.query_params.get("status", 200)))

    async def stream(request: Request) -> Response:
        mode = request.query_params.get("mode", "full")

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b'data: {"delta": "a", "usage": {"total_tokens": 3}}\n\n'
                if mode == "leave":
                    for _ in range(100):
                        await asyncio.sleep(0.05)  # a stream still going when the client leaves
                        yield b'data: {"delta": "."}\n\n'
                await asyncio.sleep(1.0)  # the rest comes later: the first event must reach the client before
                yield b'data: {"usage": {"total_tokens": 12}}\n\n'
            except asyncio.CancelledError:
                seen.stream_cancelled.set()
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    async def delete(request: Request) -> Response:
        return Response(status_code=204)

    async def ws_echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.headers.get("x-billable-id", ""))
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    return Starlette(
        routes=[
            Route("/v1/chat", chat, methods=["POST"]),
            Route("/v1/stream", stream),
            Route("/v1/projects/{id}", delete, methods=["DELETE"]),
            Route("/v1/stream-die", _RawEndpoint(die_mid_stream)),
            WebSocketRoute("/v1/ws", ws_echo),
            Route("/v1/{rest:path}", echo, methods=["GET", "POST", "PUT", "DELETE"]),
        ]
    )


class _RawEndpoint:
    """A raw ASGI endpoint inside a Starlette route."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


async def die_mid_stream(scope: Any, receive: Any, send: Any) -> None:
    """An event stream that reports 4 units, then the upstream dies before finishing."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b'data: {"usage": {"total_tokens": 4}}\n\n', "more_body": True})
    await asyncio.sleep(0.05)  # then it dies a moment later, without the final message


@dataclass
class Env:
    url: str
    seen: Seen
    app: GatewayApp
    billables: list[str] = field(default_factory=list)

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN}"}

    def key(self, billable: str | None = None) -> tuple[str, str]:
        billable = billable or f"org-{uuid.uuid4().hex[:8]}"
        r = httpx.post(f"{self.url}/_gateway/admin/keys", json={"billable": billable, "name": "t"}, headers=self.admin())
        assert r.status_code == 201, r.text
        self.billables.append(billable)
        return billable, r.json()["key"]


@contextmanager
def running(tmp_path: Path, *, redis_url: str | None, unmatched: str = "", **overrides: Any) -> Iterator[Env]:
    plans = tmp_path / "plans.toml"
    plans.write_text(CATALOG.format(unmatched=unmatched))
    seen = Seen([], threading.Event())
    with serve_in_thread(upstream(seen)) as upstream_url:
        settings = Settings(
            plans=str(plans),
            upstream=upstream_url,
            redis_url=redis_url,
            database_url=f"sqlite:///{tmp_path}/gw.db",
            admin_token=ADMIN,
            **overrides,
        )
        app = GatewayApp(settings)
        env = Env(url="", seen=seen, app=app)
        with serve_in_thread(app) as url:
            env.url = url
            yield env
    if redis_url is not None:
        # The billables' keys (and the reconciler's lease) on a shared Redis go with the test.
        with redis.Redis.from_url(redis_url) as client:
            for billable in env.billables:
                client.delete(*Engine(app.gateway.store, app.gateway.catalog).keys(billable))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with running(tmp_path, redis_url=shared_redis_url()) as e:
        yield e


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def settled(env: Env, billable: str) -> dict[str, Any]:
    """The billable's status once no hold is left: the gateway settles after the client has its answer."""

    def status() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(f"{env.url}/_gateway/admin/billables/{billable}", headers=env.admin()).json()
        return body if body["credits"]["held"] == 0 else None

    return wait_until(status, f"the holds of {billable} to be settled")


def test_admitted_call_headers_and_identity(env: Env) -> None:
    """An admitted call reaches the upstream with X-Billable-Id and X-Plan (client values dropped) and the headers."""
    billable, key = env.key()
    r = httpx.get(f"{env.url}/v1/anything", headers={**auth(key), "X-Billable-Id": "evil", "X-Plan": "pro"})
    assert r.status_code == 200 and r.json() == {"path": "/v1/anything", "billable": billable, "plan": "free"}
    assert r.headers["ratelimit-policy"] == '"rate";q=50;w=1'
    assert r.headers["ratelimit"] == '"rate";r=49;t=1'
    assert r.headers["x-ratelimit-limit"] == "50" and r.headers["x-ratelimit-resource"] == "rate"
    assert int(r.headers["x-ratelimit-reset"]) >= int(time.time())
    limits = parse_limits(r)
    assert limits.policies["rate"].remaining == 49
    # X-Api-Key works as well as Bearer.
    assert httpx.get(f"{env.url}/v1/anything", headers={"X-Api-Key": key}).status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer nope", "Bearer gw_short_x", "Bearer gw_aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"])
def test_unauthorized(env: Env, header: str | None) -> None:
    """No key, a malformed key and an unknown key are each 401 problem+json."""
    headers = {"Authorization": header} if header else {}
    r = httpx.get(f"{env.url}/v1/anything", headers=headers)
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "urn:gateway:unauthorized"


def test_every_denial_row(env: Env) -> None:
    """403 feature, 403 cap, 402 credits, 429 rate and allowance: each with its type, sentence and headers."""
    _, key = env.key()
    feature = httpx.post(f"{env.url}/v1/images", headers=auth(key))
    assert feature.status_code == 403 and feature.json()["type"] == "urn:gateway:feature-not-in-plan"
    assert feature.json()["detail"].startswith("Your current plan (Free) doesn't allow you to use HD images.")
    assert feature.json()["upgrade_url"] == "https://example.com/pricing"

    assert [httpx.post(f"{env.url}/v1/projects", headers=auth(key)).status_code for _ in range(2)] == [200, 200]
    cap = httpx.post(f"{env.url}/v1/projects", headers=auth(key))
    assert cap.status_code == 403 and cap.json()["type"] == "urn:gateway:limit-reached" and "retry-after" not in cap.headers

    codes = [httpx.post(f"{env.url}/v1/cheap", headers=auth(key)).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 200, 402]
    short = httpx.post(f"{env.url}/v1/cheap", headers=auth(key))
    assert short.json()["detail"] == "You're out of credits: this request needs 5 and you have 0."
    assert short.headers["x-credits-remaining"] == "0"

    assert httpx.get(f"{env.url}/v1/limited", headers=auth(key)).status_code == 200
    rate = httpx.get(f"{env.url}/v1/limited", headers=auth(key))
    assert rate.status_code == 429 and int(rate.headers["retry-after"]) >= 1
    assert rate.json()["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert rate.json()["violated_policies"] == ["rate:GET /v1/limited"]

    for _ in range(2):
        httpx.post(f"{env.url}/v1/exports", headers=auth(key))
    allowance = httpx.post(f"{env.url}/v1/exports", headers=auth(key))
    assert allowance.status_code == 429 and int(allowance.headers["retry-after"]) > 60
    _, start, end, _ = calendar_bounds("month", time.time(), ZoneInfo("UTC"))
    assert f'"exports";q=2;w={end - start}' in allowance.headers["ratelimit-policy"]  # this month's length


def test_unmatched_deny_is_404(tmp_path: Path) -> None:
    """With unmatched = "deny", a request no route matches is 404 urn:gateway:no-route."""
    with running(tmp_path, redis_url=shared_redis_url(), unmatched='unmatched = "deny"') as e:
        _, key = e.key()
        r = httpx.get(f"{e.url}/elsewhere", headers=auth(key))
    assert r.status_code == 404 and r.json()["type"] == "urn:gateway:no-route"


def test_public_route_and_options_need_no_key(env: Env) -> None:
    """A public route and a CORS preflight pass without identity; the upstream gets no billable."""
    r = httpx.get(f"{env.url}/v1/status", headers={"X-Billable-Id": "forged"})
    assert r.status_code == 200 and r.json()["billable"] is None
    assert httpx.options(f"{env.url}/v1/anything").status_code in (200, 405)


def test_admin_keys_lifecycle_and_revocation_within_a_second(env: Env) -> None:
    """Keys are created (shown once), listed without secrets, and a revoked key is refused within a second."""
    billable, key = env.key()
    listed = httpx.get(f"{env.url}/_gateway/admin/billables/{billable}/keys", headers=env.admin()).json()
    assert len(listed) == 1 and "key" not in listed[0] and listed[0]["revoked"] is False
    assert httpx.get(f"{env.url}/v1/anything", headers=auth(key)).status_code == 200
    key_id = listed[0]["id"]
    assert httpx.delete(f"{env.url}/_gateway/admin/keys/{key_id}", headers=env.admin()).status_code == 204
    # Refused within a second (DESIGN §3): the deadline is the contract here.
    wait_until(lambda: httpx.get(f"{env.url}/v1/anything", headers=auth(key)).status_code == 401,
               "the revoked key to be refused", timeout=1.1)
    assert httpx.delete(f"{env.url}/_gateway/admin/keys/nope", headers=env.admin()).status_code == 404


def test_admin_needs_the_token(env: Env) -> None:
    """Admin endpoints answer 401 without the token, with a wrong one, and to a customer's key."""
    _, key = env.key()
    for headers in ({}, {"Authorization": "Bearer wrong"}, auth(key)):
        r = httpx.get(f"{env.url}/_gateway/admin/billables/x", headers=headers)
        assert r.status_code == 401 and r.json()["type"] == "urn:gateway:unauthorized"


def test_admin_plan_credits_limits_recharge_overage_status(env: Env) -> None:
    """Every admin endpoint on one billable: plan, idempotent credits, cap count, auto-recharge, overage, status."""
    billable, key = env.key()
    base = f"{env.url}/_gateway/admin/billables/{billable}"
    assert httpx.put(f"{base}/plan", json={"plan": "pro"}, headers=env.admin()).json()["plan"] == "pro"
    assert httpx.post(f"{env.url}/v1/images", headers=auth(key)).status_code == 200
    assert httpx.put(f"{base}/plan", json={"plan": "gold"}, headers=env.admin()).status_code == 400
    assert httpx.delete(f"{base}/plan", headers=env.admin()).json()["plan_source"] == "default"
    outbox = sqlite3.connect(env.app.settings.database_url.removeprefix("sqlite:///"))
    changes = [json.loads(body)["data"] for (body,) in outbox.execute(
        "select body from events_outbox where type = 'plan_changed' and billable = ? order by created_at", (billable,))]
    assert changes == [{"from": "free", "to": "pro", "source": "assignment"}, {"from": "pro", "to": "free", "source": "default"}]

    grant = {"amount": 500, "reason": "goodwill", "idempotency_key": f"k-{uuid.uuid4()}"}
    first = httpx.post(f"{base}/credits", json=grant, headers=env.admin())
    again = httpx.post(f"{base}/credits", json=grant, headers=env.admin())
    assert first.status_code == again.status_code == 200 and not first.json()["duplicate"]
    assert first.json()["balance"] == again.json()["balance"] == 515 and again.json()["duplicate"]  # 20 - 5 spent on pro + 500
    bad = httpx.post(f"{base}/credits", content=b"{not json", headers=env.admin())
    assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"

    assert httpx.put(f"{base}/limits/projects", json={"usage": 12}, headers=env.admin()).json()["usage"] == 12
    assert httpx.put(f"{base}/limits/exports", json={"usage": 1}, headers=env.admin()).status_code == 400
    overage = httpx.get(f"{base}/overage", params={"plan": "free"}, headers=env.admin()).json()
    assert overage["items"][0]["sentence"] == "projects: 12 > 2 (reduce by 10)"

    recharge = {"enabled": True, "amount_cents": 2000, "threshold": 100}
    assert httpx.put(f"{base}/auto-recharge", json=recharge, headers=env.admin()).json() == recharge
    status = httpx.get(base, headers=env.admin()).json()
    assert status["credits"]["purchased"] == 500 and status["limits"]["projects"]["usage"] == 12
    usage = httpx.get(f"{env.url}/_gateway/usage", headers=auth(key)).json()
    # A full bucket's reset is "now", read a moment apart (it may cross a second): the rest is the same.
    for rate in (*usage["rate_limits"].values(), *status["rate_limits"].values()):
        rate.pop("reset")
    assert usage == status


def test_health_and_metrics(env: Env) -> None:
    """Health reports Redis and the database; metrics count decisions by outcome without billable labels."""
    _, key = env.key()
    httpx.get(f"{env.url}/v1/anything", headers=auth(key))
    httpx.post(f"{env.url}/v1/images", headers=auth(key))
    health = httpx.get(f"{env.url}/_gateway/health", headers=env.admin()).json()
    assert {k: health[k] for k in ("status", "redis", "database")} == {"status": "ok", "redis": "up", "database": "up"}
    assert set(health["record"]) == {"pending", "lag_seconds", "leader"}
    assert set(health["events"]) == {"waiting", "dead", "oldest_waiting_seconds"}
    metrics = httpx.get(f"{env.url}/_gateway/metrics", headers=env.admin()).text
    assert 'gateway_decisions_total{outcome="admitted",policy=""}' in metrics
    assert 'gateway_decisions_total{outcome="denied",policy="hd"}' in metrics
    assert "gateway_decision_seconds_bucket" in metrics and "org-" not in metrics


def test_metered_answers_settle(env: Env) -> None:
    """A metered answer settles to its units; a failed one gives the reserve back; a timeout too."""
    billable, key = env.key()
    base = f"{env.url}/_gateway/admin/billables/{billable}"
    httpx.post(f"{base}/credits", json={"amount": 100, "idempotency_key": f"k-{uuid.uuid4()}"}, headers=env.admin())
    r = httpx.post(f"{env.url}/v1/chat?tokens=7", headers=auth(key))
    assert r.status_code == 200 and r.headers["x-credits-remaining"] == "70"  # 120 - reserve 50
    assert httpx.get(base, headers=env.admin()).json()["credits"]["balance"] == 113
    httpx.post(f"{env.url}/v1/chat?status=500&tokens=0", headers=auth(key))
    assert httpx.get(base, headers=env.admin()).json()["credits"]["balance"] == 113


def test_sse_streams_event_by_event_and_settles(env: Env) -> None:
    """An event stream reaches the client while the upstream still writes; the last usage event is charged."""
    billable, key = env.key()
    with httpx.stream("GET", f"{env.url}/v1/stream", headers=auth(key), timeout=10) as r:
        began = time.monotonic()
        lines = r.iter_lines()
        first = next(lines)
        assert time.monotonic() - began < 0.7 and "delta" in first
        rest = list(lines)
    assert any("12" in line for line in rest)
    status = settled(env, billable)
    assert status["credits"]["balance"] == 20 - 12


def test_client_leaving_mid_stream_is_charged_what_was_seen(env: Env) -> None:
    """A client that leaves mid-stream cancels the upstream call and pays the units seen so far."""
    billable, key = env.key()
    with httpx.stream("GET", f"{env.url}/v1/stream?mode=leave", headers=auth(key), timeout=10) as r:
        next(r.iter_lines())
    assert env.seen.stream_cancelled.wait(5)
    status = settled(env, billable)
    assert status["credits"]["balance"] == 20 - 3 and status["credits"]["held"] == 0


def test_upstream_timeout_is_504_and_gives_back(tmp_path: Path) -> None:
    """An upstream slower than the timeout is 504, and the reserve goes back."""
    with running(tmp_path, redis_url=shared_redis_url(), upstream_timeout=0.5) as e:
        billable, key = e.key()
        base = f"{e.url}/_gateway/admin/billables/{billable}"
        httpx.post(f"{base}/credits", json={"amount": 100, "idempotency_key": f"k-{uuid.uuid4()}"}, headers=e.admin())
        r = httpx.post(f"{e.url}/v1/chat?slow=1", headers=auth(key), timeout=5)
        assert r.status_code == 504 and r.json()["type"] == "urn:gateway:upstream-timeout"
        status = httpx.get(base, headers=e.admin()).json()
    assert status["credits"]["balance"] == 120 and status["credits"]["held"] == 0


def test_oversized_body_is_413(tmp_path: Path) -> None:
    """A body over --max-body is 413 before the upstream sees it."""
    with running(tmp_path, redis_url=shared_redis_url(), max_body=1000) as e:
        _, key = e.key()
        r = httpx.post(f"{e.url}/v1/anything", headers=auth(key), content=b"x" * 5000)
    assert r.status_code == 413


def test_trusted_header_mode(tmp_path: Path) -> None:
    """With --billable-header, the named header names the billable; without it the request is 401."""
    with running(tmp_path, redis_url=shared_redis_url(), billable_header="X-Org") as e:
        e.billables.append("acme-trusted")
        ok = httpx.get(f"{e.url}/v1/anything", headers={"X-Org": "acme-trusted"})
        missing = httpx.get(f"{e.url}/v1/anything")
    assert ok.status_code == 200 and ok.json()["billable"] == "acme-trusted"
    assert missing.status_code == 401


def test_private_redis_stopped_and_restarted(tmp_path: Path, private_redis: RedisServer) -> None:
    """Redis down: plain routes answer open and flagged, spend routes 503; when it returns, decisions resume."""
    with running(tmp_path, redis_url=private_redis.url) as e:
        _, key = e.key()
        assert httpx.get(f"{e.url}/v1/anything", headers=auth(key)).status_code == 200
        private_redis.stop()
        try:
            down = [httpx.get(f"{e.url}/v1/anything", headers=auth(key)) for _ in range(5)]
            assert all(r.status_code == 200 and r.headers["x-gateway-degraded"] == "redis" for r in down)
            assert httpx.post(f"{e.url}/v1/cheap", headers=auth(key)).status_code == 503
            health = httpx.get(f"{e.url}/_gateway/health", headers=e.admin())
            assert health.status_code == 503 and health.json()["redis"] == "down"
        finally:
            private_redis.start()

        def resumed() -> httpx.Response | None:
            r = httpx.get(f"{e.url}/v1/anything", headers=auth(key))
            return None if "x-gateway-degraded" in r.headers else r

        r = wait_until(resumed, "decisions to resume on the restarted Redis")
        assert "x-gateway-degraded" not in r.headers and r.headers["ratelimit-policy"]
        metrics = httpx.get(f"{e.url}/_gateway/metrics", headers=e.admin()).text
        degraded = next(line for line in metrics.splitlines() if line.startswith("gateway_degraded_answers_total"))
        assert float(degraded.split()[1]) >= 5


def test_embedded_defaults(tmp_path: Path) -> None:
    """With no Redis URL the gateway decides on the in-process emulation with the same scripts."""
    with running(tmp_path, redis_url=None) as e:
        _, key = e.key()
        codes = [httpx.post(f"{e.url}/v1/projects", headers=auth(key)).status_code for _ in range(3)]
    assert codes == [200, 200, 403]
    json.dumps(codes)


def test_upstream_dying_mid_stream_is_charged_what_was_seen(env: Env) -> None:
    """A stream the upstream cuts short is charged the units it reported before dying, not the whole reserve."""
    billable, key = env.key()
    with pytest.raises(httpx.HTTPError), httpx.stream("GET", f"{env.url}/v1/stream-die", headers=auth(key), timeout=5) as r:
        for _ in r.iter_lines():
            pass
    status = settled(env, billable)
    assert status["credits"]["balance"] == 20 - 4 and status["credits"]["held"] == 0


def test_websocket_admitted_then_proxied_and_refused_without_key(env: Env) -> None:
    """A WebSocket upgrade passes the same checks, is proxied both ways, and is refused without a key."""
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    billable, key = env.key()
    ws_url = env.url.replace("http://", "ws://") + "/v1/ws"
    with ws_client.connect(ws_url, additional_headers=auth(key)) as ws:
        assert ws.recv(timeout=5) == billable
        ws.send("ping")
        assert ws.recv(timeout=5) == "ping"
    with pytest.raises(InvalidStatus) as refused, ws_client.connect(ws_url) as ws:
        ws.recv(timeout=5)
    assert "401" in str(refused.value) and refused.value.response.status_code == 401
