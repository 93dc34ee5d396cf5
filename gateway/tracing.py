"""OpenTelemetry: a span per request with its decision, a child span per Redis call, `traceparent` carried through.

On when `GATEWAY_OTEL_ENDPOINT` (or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`) names an OTLP/HTTP collector
and the `otel` extra is installed; `GatewayApp` then serves `traced(middleware, provider(settings))`. An app
that builds its own `GatewayMiddleware` wraps it the same way with a tracer provider of its own.

Off, nothing imports opentelemetry (only the functions below do, when called) and a request pays one check,
`GatewayMiddleware.traced is None`: the Redis store and the proxy are not wrapped at all.

- The request's span (SERVER, `GET /v1/hello`) continues the client's W3C `traceparent` (a new trace without
  one), carries the HTTP semantic conventions (`http.request.method`, `url.path`, `http.route`,
  `http.response.status_code`, ...) and the decision (`gateway.billable`, `gateway.plan`, `gateway.route`,
  `gateway.admitted`, `gateway.violated_policies`, `gateway.credits`, `gateway.degraded`, `gateway.shadow`).
  Forward-auth's (`/_gateway/auth`) carries the decision of the request the edge asks about.
- Its `traceparent` replaces the client's on the request the gateway passes on, so the upstream (behind the
  proxy) or the wrapped app continues the trace under the gateway's span.
- Each Redis call made inside it is a CLIENT child: `EVALSHA decide`, with `db.system.name` (and the older
  `db.system`) `redis`, `db.operation.name` `EVALSHA` and `db.stored_procedure.name` the script's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from gateway import __version__, forward_auth
from gateway.errors import ConfigError
from gateway.store.redis import Transport, script_name
from gateway.store.resp import Arg, Command

if TYPE_CHECKING:  # opentelemetry is imported only when tracing is on
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from gateway.decision import Decision
    from gateway.middleware import GatewayMiddleware
    from gateway.settings import Settings
    from gateway.store.node import Node

__all__ = ["provider", "shut_down", "traced"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EXPORT_TIMEOUT_S = 5.0  # one export of a batch to the collector
SHUTDOWN_S = EXPORT_TIMEOUT_S + 1.0
log = logging.getLogger(__name__)
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
# http.request.method is one of these; another is "_OTHER", the method itself in http.request.method_original.
_KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"})
_AUTH_ROUTE = forward_auth.PATH.decode()


def provider(settings: Settings) -> TracerProvider | None:
    """The tracer provider that batches spans to `settings.otel_endpoint` over OTLP/HTTP (its `/v1/traces`), or
    None when tracing is off. ConfigError when it is asked for and the `otel` extra is not installed."""
    if not settings.otel_endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(
            f"GATEWAY_OTEL_ENDPOINT (or OTEL_EXPORTER_OTLP_ENDPOINT) is set but OpenTelemetry is not installed "
            f"({exc.name} is missing): pip install 'gateway[otel]', or unset it"
        ) from exc
    resource = Resource.create({"service.version": __version__})  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES apply
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "gateway"}))
    made = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=settings.otel_endpoint.rstrip("/") + "/v1/traces", timeout=EXPORT_TIMEOUT_S)
    made.add_span_processor(BatchSpanProcessor(exporter, export_timeout_millis=int(EXPORT_TIMEOUT_S * 1000)))
    return made


async def shut_down(tracer_provider: Any, deadline: float = SHUTDOWN_S) -> None:
    """Export the spans still batched, in a daemon thread (the SDK's export blocks) and within `deadline`: a
    collector that is gone costs a stopping gateway at most that, never its event loop nor its exit."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            tracer_provider.shutdown()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(finish)

    threading.Thread(target=run, name="gateway-tracing-shutdown", daemon=True).start()
    try:
        await asyncio.wait_for(done, deadline)
    except TimeoutError:
        log.warning("tracing: the collector did not take the last spans within %g s; they are dropped", deadline)


def traced(middleware: GatewayMiddleware, tracer_provider: Any) -> ASGIApp:
    """`middleware` with a span per request from `tracer_provider` (an OpenTelemetry TracerProvider): its
    decisions recorded on the request's span, its engine's Redis calls as child spans, `traceparent` passed on."""
    from opentelemetry import trace

    tracer = tracer_provider.get_tracer("gateway", __version__)
    middleware.traced = _recording(trace.get_current_span)
    middleware.engine.store.wrap_transport(lambda inner: _TracedTransport(inner, tracer))
    return _Requests(middleware, tracer)


def _recording(current: Callable[[], Span]) -> Callable[[Decision], None]:
    def record(decision: Decision) -> None:
        span = current()
        if not span.is_recording():
            return
        route = decision.route
        attributes: dict[str, Any] = {
            "gateway.admitted": decision.admitted,
            "gateway.violated_policies": decision.violated_policies,
            "gateway.degraded": decision.degraded,
        }
        if decision.billable is not None:
            attributes["gateway.billable"] = decision.billable
        if decision.plan is not None:
            attributes["gateway.plan"] = decision.plan
        if decision.credits is not None:
            attributes["gateway.credits"] = decision.credits
        if decision.shadow is not None:
            attributes["gateway.shadow"] = decision.shadow  # X-Gateway-Shadow: the status and policies it would deny for
        if route is not None:
            attributes["gateway.route"] = route.match
            method, _, template = route.match.partition(" ")
            attributes["http.route"] = template
            span.update_name(f"{method} {template}")
        span.set_attributes(attributes)

    return record


class _Requests:
    """The request's SERVER span around the middleware, and the gateway's `traceparent` on what it passes on."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        from opentelemetry.trace import SpanKind, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.app = app
        self._tracer = tracer
        self._propagator = TraceContextTextMapPropagator()
        self._server = SpanKind.SERVER
        self._error = StatusCode.ERROR

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan; a WebSocket's connection is not one request
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers if name in _TRACE_HEADERS}
        parent = self._propagator.extract(carrier) if carrier else None
        method: str = scope["method"]
        with self._tracer.start_as_current_span(method, context=parent, kind=self._server, attributes=_request(scope)) as span:
            ours: dict[str, str] = {}
            self._propagator.inject(ours)
            passed = [(name, value) for name, value in headers if name not in _TRACE_HEADERS]
            passed += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in ours.items()]

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status: int = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:  # a 4xx is the client's, not the server's error (HTTP conventions)
                        span.set_status(self._error)
                        span.set_attribute("error.type", str(status))
                await send(message)

            await self.app({**scope, "headers": passed}, receive, sending)
            if forward_auth.asks(scope.get("raw_path") or scope["path"].encode()):
                # The route decided is the edge's request's (gateway.route); this request's own is forward-auth.
                span.set_attribute("http.route", _AUTH_ROUTE)
                span.update_name(f"{method} {_AUTH_ROUTE}")


def _request(scope: Scope) -> dict[str, Any]:
    """The HTTP server span's attributes known before the answer (semantic conventions, stable HTTP)."""
    method: str = scope["method"]
    attributes: dict[str, Any] = {"url.path": scope["path"], "url.scheme": scope.get("scheme", "http")}
    if method in _KNOWN_METHODS:
        attributes["http.request.method"] = method
    else:
        attributes["http.request.method"], attributes["http.request.method_original"] = "_OTHER", method
    if version := scope.get("http_version"):
        attributes["network.protocol.version"] = version
    if server := scope.get("server"):
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    if client := scope.get("client"):
        attributes["client.address"] = client[0]
    for name, value in scope["headers"]:
        if name == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
            break
    return attributes


class _TracedTransport:
    """A store's transport whose calls made inside a traced request are its CLIENT child spans."""

    def __init__(self, inner: Transport, tracer: Tracer) -> None:
        from opentelemetry import trace

        self._inner = inner
        self._tracer = tracer
        self._current = trace.get_current_span
        self._client = trace.SpanKind.CLIENT
        self.label = inner.label
        self.is_cluster = inner.is_cluster

    async def call(self, key: str, command: Command) -> Any:
        if not self._current().is_recording():  # the reconciler's and other background calls: no trace of their own
            return await self._inner.call(key, command)
        name, attributes = _described(command)
        with self._tracer.start_as_current_span(name, kind=self._client, attributes=attributes):
            return await self._inner.call(key, command)

    async def call_many(self, commands: Sequence[tuple[str, Command]]) -> list[Any]:
        if not commands or not self._current().is_recording():
            return await self._inner.call_many(commands)
        name, attributes = _described(commands[0][1])
        attributes["db.operation.batch.size"] = len(commands)
        with self._tracer.start_as_current_span(name, kind=self._client, attributes=attributes):
            return await self._inner.call_many(commands)

    async def primaries(self) -> list[Node]:
        return await self._inner.primaries()

    def nodes(self) -> list[Node]:
        return self._inner.nodes()

    async def close(self) -> None:
        await self._inner.close()


def _described(command: Command) -> tuple[str, dict[str, Any]]:
    """A Redis call's span name and attributes (database client conventions): `EVALSHA decide`."""
    operation = _text(command[0]).upper()
    attributes: dict[str, Any] = {"db.system.name": "redis", "db.system": "redis", "db.operation.name": operation}
    if operation == "EVALSHA" and len(command) > 1 and (name := script_name(_text(command[1]))) is not None:
        attributes["db.stored_procedure.name"] = name
        return f"{operation} {name}", attributes
    return operation, attributes


def _text(arg: Arg) -> str:
    return arg.decode("latin-1") if isinstance(arg, bytes) else str(arg)
