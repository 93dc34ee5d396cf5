"""OpenTelemetry (gateway/tracing.py): a span per request with its decision, the Redis call as its child, the
client's traceparent continued and the gateway's forwarded; nothing of it (not even the import) when off.

`gateway serve`'s app under uvicorn on a private redis-server and SQLite, the SDK's InMemorySpanExporter, a real
upstream on a free port that answers with the headers it got; in middleware mode the same upstream is the app."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import _upgrade
from http_servers import serve_in_thread
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from services import RedisServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from waiting import wait_until

from gateway.app import GatewayApp
from gateway.errors import ConfigError
from gateway.settings import Settings

CATALOG = """
[catalog]
default_plan = "free"

[features]
hd = "HD images"

[operations.image]
cost = 5

[plans.free]
price = 0
credits = 100
limits.exports = { to = 1, per = "month" }

[plans.pro]
price = 29
allows = ["hd"]

[[routes]]
match = "POST /v1/images"
features = ["hd"]

[[routes]]
match = "POST /v1/render"
spend = "image"

[[routes]]
match = "POST /v1/exports"
limit = "exports"
enforce = "shadow"
"""
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


def echo_app() -> Starlette:
    """The upstream (or the wrapped app): answers with the headers it was sent."""

    async def echo(request: Request) -> Response:
        await request.body()
        return JSONResponse({"headers": dict(request.headers)})

    return Starlette(routes=[Route("/{rest:path}", echo, methods=["GET", "POST"])])


@contextmanager
def gateway(tmp_path: Path, redis: RedisServer, *, proxy: bool, tracer_provider: Any = None, **settings: Any) -> Iterator[str]:
    """The gateway's URL: proxying to a real upstream, or with the upstream app inside it (middleware mode)."""
    plans = tmp_path / "plans.toml"
    plans.write_text(CATALOG)
    db_url = f"sqlite:///{tmp_path}/gw.db"
    asyncio.run(_upgrade(db_url))
    with serve_in_thread(echo_app()) as upstream:
        configured = Settings(plans=str(plans), redis_url=redis.url, database_url=db_url, billable_header="X-Org",
                              upstream=upstream if proxy else None, **settings)  # fmt: skip
        app = GatewayApp(configured, None if proxy else echo_app(), tracer_provider=tracer_provider)
        with serve_in_thread(app) as url:
            yield url


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    made = TracerProvider()
    made.add_span_processor(SimpleSpanProcessor(exporter))
    return made


def server_span(exporter: InMemorySpanExporter, path: str) -> ReadableSpan:
    """The request's span (it ends once the answer is sent: waited for)."""

    def found() -> ReadableSpan | None:
        spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER and (s.attributes or {}).get("url.path") == path]
        return spans[-1] if spans else None

    span = wait_until(found, f"the span of {path}")
    return span


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.parent is not None and s.parent.span_id == parent.context.span_id]


@pytest.mark.parametrize("proxy", [True, False], ids=["proxy", "middleware"])
def test_a_span_per_request_carries_its_decision_and_the_redis_call(
    tmp_path: Path, private_redis: RedisServer, exporter: InMemorySpanExporter, provider: TracerProvider, proxy: bool
) -> None:
    """An admitted spend, a 403 for a feature and a shadowed admission: each a SERVER span with the HTTP
    conventions and the decision's attributes; a known billable's one Redis call, `EVALSHA decide`, a CLIENT
    child of it."""
    org = f"org_{uuid.uuid4().hex[:8]}"
    with gateway(tmp_path, private_redis, proxy=proxy, tracer_provider=provider) as url, httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(2):  # a new billable's first decisions restore it and learn its plan (more calls)
            client.post("/v1/render", headers={"X-Org": org})
        admitted = client.post("/v1/render", headers={"X-Org": org})
        denied = client.post("/v1/images", headers={"X-Org": org})
        client.post("/v1/exports", headers={"X-Org": org})
        shadowed = client.post("/v1/exports", headers={"X-Org": org})
    assert admitted.status_code == 200 and denied.status_code == 403 and shadowed.status_code == 200

    span = server_span(exporter, "/v1/render")
    attributes = dict(span.attributes or {})
    assert span.name == "POST /v1/render"
    assert {k: attributes[k] for k in ("http.request.method", "http.route", "http.response.status_code", "url.scheme")} == {
        "http.request.method": "POST", "http.route": "/v1/render", "http.response.status_code": 200, "url.scheme": "http"}  # fmt: skip
    assert attributes["gateway.billable"] == org and attributes["gateway.plan"] == "free"
    assert attributes["gateway.route"] == "POST /v1/render" and attributes["gateway.admitted"] is True
    assert attributes["gateway.violated_policies"] == () and attributes["gateway.degraded"] is False
    assert attributes["gateway.credits"] == 85 and "gateway.shadow" not in attributes
    redis_calls = [s for s in children(exporter, span) if s.kind is SpanKind.CLIENT]
    decide = [s for s in redis_calls if (s.attributes or {}).get("db.stored_procedure.name") == "decide"]
    assert len(decide) == 1, [s.name for s in redis_calls]
    assert decide[0].name == "EVALSHA decide" and decide[0].context.trace_id == span.context.trace_id
    assert {k: (decide[0].attributes or {})[k] for k in ("db.system", "db.system.name", "db.operation.name")} == {
        "db.system": "redis", "db.system.name": "redis", "db.operation.name": "EVALSHA"}  # fmt: skip

    refused = dict(server_span(exporter, "/v1/images").attributes or {})
    assert refused["http.response.status_code"] == 403 and refused["gateway.admitted"] is False
    assert refused["gateway.violated_policies"] == ("hd",) and refused["gateway.route"] == "POST /v1/images"
    shadow = dict(server_span(exporter, "/v1/exports").attributes or {})
    assert shadow["gateway.admitted"] is True and shadow["gateway.shadow"] == "429 exports"


@pytest.mark.parametrize("proxy", [True, False], ids=["proxy", "middleware"])
def test_the_clients_traceparent_is_continued_and_the_gateways_forwarded(
    tmp_path: Path, private_redis: RedisServer, exporter: InMemorySpanExporter, provider: TracerProvider, proxy: bool
) -> None:
    """The span continues the client's trace under the client's span; the upstream gets the same trace with the
    gateway's span as its parent (the client's own traceparent does not pass)."""
    with gateway(tmp_path, private_redis, proxy=proxy, tracer_provider=provider) as url:
        answer = httpx.post(f"{url}/v1/render", headers={"X-Org": f"org_{uuid.uuid4().hex[:8]}", "traceparent": TRACEPARENT,
                                                         "tracestate": "vendor=1"}, timeout=30)  # fmt: skip
    assert answer.status_code == 200
    span = server_span(exporter, "/v1/render")
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == CLIENT_SPAN and span.parent.is_remote
    seen = answer.json()["headers"]
    assert seen["traceparent"] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"
    assert seen["tracestate"] == "vendor=1"


def test_forward_auth_is_the_span_of_the_request_it_decides(
    tmp_path: Path, private_redis: RedisServer, exporter: InMemorySpanExporter, provider: TracerProvider
) -> None:
    """`/_gateway/auth`: its own route and name, the decision of the request the edge names."""
    org = f"org_{uuid.uuid4().hex[:8]}"
    with gateway(tmp_path, private_redis, proxy=True, tracer_provider=provider) as url:
        asked = httpx.get(f"{url}/_gateway/auth", headers={"X-Org": org, "X-Original-Method": "POST", "X-Original-URI": "/v1/images"},
                          timeout=30)  # fmt: skip
    assert asked.status_code == 403
    span = server_span(exporter, "/_gateway/auth")
    attributes = dict(span.attributes or {})
    assert span.name == "GET /_gateway/auth" and attributes["http.route"] == "/_gateway/auth"
    assert attributes["gateway.route"] == "POST /v1/images" and attributes["gateway.admitted"] is False
    assert attributes["gateway.billable"] == org and attributes["gateway.violated_policies"] == ("hd",)


def test_spans_reach_an_otlp_collector_named_by_the_setting(tmp_path: Path, private_redis: RedisServer) -> None:
    """With GATEWAY_OTEL_ENDPOINT set (no provider given), the gateway's own exporter posts OTLP/HTTP protobuf to
    its /v1/traces; the batch is sent when the gateway stops."""
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: Request) -> Response:
        received.append(ExportTraceServiceRequest.FromString(await request.body()))
        return Response(b"", media_type="application/x-protobuf")

    with serve_in_thread(Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])])) as collector:
        settings = Settings.load({}, {"GATEWAY_OTEL_ENDPOINT": collector})
        with gateway(tmp_path, private_redis, proxy=True, otel_endpoint=settings.otel_endpoint) as url:
            assert httpx.post(f"{url}/v1/render", headers={"X-Org": "org_otlp"}, timeout=30).status_code == 200
        names = {span.name for r in received for rs in r.resource_spans for ss in rs.scope_spans for span in ss.spans}
        services = {a.value.string_value for r in received for rs in r.resource_spans for a in rs.resource.attributes if a.key == "service.name"}
    assert {"POST /v1/render", "EVALSHA decide"} <= names
    assert services == {"gateway"}


def test_a_collector_that_never_answers_holds_the_stop_no_longer_than_its_deadline(tmp_path: Path) -> None:
    """The last batch goes out at stop in a thread with a deadline: a collector that takes the connection and
    never answers costs the stopping gateway at most tracing's deadline, and its event loop nothing."""
    import socket

    from gateway import tracing

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()  # accepts into the backlog, never reads nor answers
        endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}"
        made = tracing.provider(Settings.load({}, {"GATEWAY_OTEL_ENDPOINT": endpoint}))
        assert made is not None
        with made.get_tracer("test").start_as_current_span("a request"):
            pass

        async def stop() -> tuple[bool, int]:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.05)
                    ticks += 1

            ticking = asyncio.create_task(tick())
            await tracing.shut_down(made, deadline=0.5)
            ticking.cancel()
            exporting = any(t.name == "gateway-tracing-shutdown" and t.is_alive() for t in threading.enumerate())
            return exporting, ticks

        exporting, ticks = asyncio.run(stop())
    assert exporting  # it returned at its own deadline while the export still waits on the collector
    assert ticks > 0  # and the loop ran meanwhile


def test_the_endpoint_setting() -> None:
    """GATEWAY_OTEL_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT, else off; a URL that is not one is one line."""
    assert Settings.load({}, {}).otel_endpoint is None
    assert Settings.load({}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318"}).otel_endpoint == "http://otel:4318"
    both = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", "GATEWAY_OTEL_ENDPOINT": "https://mine:4318"}
    assert Settings.load({}, both).otel_endpoint == "https://mine:4318"
    assert Settings.load({"otel_endpoint": "http://flag:4318"}, both).otel_endpoint == "http://flag:4318"
    with pytest.raises(ConfigError, match=r"^GATEWAY_OTEL_ENDPOINT: the OpenTelemetry collector is its OTLP/HTTP address"):
        Settings.load({}, {"GATEWAY_OTEL_ENDPOINT": "otel:4318"})


OFF = """
import sys
import redis  # redis-py 8 itself imports OpenTelemetry's metrics API when it is installed: the baseline
before = {name for name in sys.modules if name.split(".")[0] == "opentelemetry"}
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from gateway.app import GatewayApp
from gateway.settings import Settings

async def echo(request):
    return JSONResponse({"traceparent": request.headers.get("traceparent")})

inner = Starlette(routes=[Route("/{rest:path}", echo, methods=["POST"])])
app = GatewayApp(Settings.load({"plans": sys.argv[1], "database_url": sys.argv[2], "billable_header": "X-Org"}), inner)
with TestClient(app) as client:
    seen = client.post("/v1/render", headers={"X-Org": "org_1", "traceparent": sys.argv[3]})
    assert seen.status_code == 200, seen.text
    assert app.middleware is not None and app.middleware.traced is None and app._serve is app.middleware
    print(seen.json()["traceparent"])
print(sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry" and name not in before))
"""


def test_off_by_default_nothing_is_traced_or_imported(tmp_path: Path) -> None:
    """Without an endpoint: a request is decided and answered, the client's traceparent passes as it came (no span
    of the gateway's own), and the gateway imports no opentelemetry module (beyond what redis-py 8 imports by
    itself when the package is installed: its metrics API, never a tracer, the SDK's trace or a propagator)."""
    plans = tmp_path / "plans.toml"
    plans.write_text(CATALOG)
    environ = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_OTEL_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")}
    run = subprocess.run([sys.executable, "-c", OFF, str(plans), f"sqlite:///{tmp_path}/gw.db", TRACEPARENT],
                         capture_output=True, text=True, timeout=120, env=environ, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-2:] == [TRACEPARENT, "[]"]
