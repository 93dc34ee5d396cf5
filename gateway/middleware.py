"""The pure ASGI middleware: decide before the app runs, add the headers once, settle only where needed.

    app = GatewayMiddleware(app, engine=engine, keys=key_store)            # API keys
    app = GatewayMiddleware(app, engine=engine, billable=lambda scope: ...)  # the app names the billable
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway import forward_auth
from gateway.bounds import MAX_INT, loads
from gateway.catalog import Catalog, Operation, Route
from gateway.decision import Decision, Violation
from gateway.engine import Engine
from gateway.errors import BadRequest, DatabaseUnavailable, KeyRevoked, RedisUnavailable, StateUnavailable
from gateway.headers import forwardable
from gateway.identify import BillableFn, Identifier, KeyLookup
from gateway.local import LocalLimits
from gateway.meter import ResponseMeter, UnitsSource, header_units, json_path
from gateway.metrics import Metrics
from gateway.paths import BadPath, canonical, encoded
from gateway.problems import BAD_REQUEST, bad_request_body, problem_messages, too_large_body
from gateway.settings import DEFAULT_MAX_BODY
from gateway.settlement import Outcome, outcome, releases, settlement

log = logging.getLogger("gateway.middleware")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: Engine,
        keys: KeyLookup | None = None,
        billable: BillableFn | None = None,
        billable_header: str | None = None,
        identifier: Identifier | None = None,
        endpoints: ASGIApp | None = None,
        metrics: Metrics | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        on_decision: Callable[[Decision], None] | None = None,
        freeze_gc: bool = True,
        processes: int = 1,
    ) -> None:
        self.app = app
        # `identifier` is the one the gateway's endpoints share; else it is made of keys, billable or billable_header.
        self.identifier = identifier or Identifier(keys=keys, billable=billable, billable_header=billable_header)
        self.engine = engine
        self.endpoints = endpoints
        self.metrics = metrics or Metrics()
        self.max_body = max_body
        # Told of every decision that emitted events or started an auto-recharge; must not block.
        self.on_decision = on_decision
        self.freeze_gc = freeze_gc  # see freeze_heap
        # on_redis_down = "local": this process's share of the rate limits (`processes` share them).
        self.local = LocalLimits(processes)
        self._warned_at = 0.0
        # Told of every decision, for the request's span (gateway/tracing.py sets it); None: tracing is off.
        self.traced: Callable[[Decision], None] | None = None

    @property
    def catalog(self) -> Catalog:
        """The catalog running now (a published one replaces it in the engine)."""
        return self.engine.catalog

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            if kind == "lifespan" and self.freeze_gc:
                await self.app(scope, receive, _freezing_after_startup(send))
                return
            await self.app(scope, receive, send)
            return
        # Everything below (the /_gateway endpoints, public routes, matching, the app) sees one canonical path.
        raw_path: bytes | None = scope.get("raw_path")
        if raw_path is None:  # optional in ASGI: the decoded path, encoded again
            raw_path = encoded(scope["path"])
            scope = {**scope, "raw_path": raw_path}
        app = self.app
        try:
            if self.endpoints is not None and kind == "http" and forward_auth.asks(raw_path):
                # The edge asks about a request it forwards itself: decided as one passing through.
                send, app = forward_auth.answering(scope, send), forward_auth.admit
                scope = forward_auth.asked(scope, raw_path)
            elif (found := canonical(raw_path)) is not None:
                scope = {**scope, "raw_path": found[0], "path": found[1]}
        except (BadPath, BadRequest) as exc:
            await self._bad_path(scope, send, str(exc))
            return
        path: str = scope["path"]
        if app is self.app and path.startswith("/_gateway") and self.endpoints is not None and (len(path) == 9 or path[9] == "/"):
            await self.endpoints(scope, receive, send)
            return
        method = scope["method"] if kind == "http" else "GET"
        clean = forwardable(scope["headers"])
        catalog = self.engine.catalog  # one catalog for the whole request, even when a new one is published meanwhile
        route = catalog.route_for(method, path)
        twin = catalog.case_twin(method, path, route)
        if twin is not None:
            await self._bad_path(scope, send, _case_detail(path, twin))
            return
        if method == "OPTIONS" or (route is not None and route.config.public):
            # CORS preflight and public routes go through without identity.
            await app({**scope, "headers": clean}, receive, send)
            return
        await self._gate(scope, receive, send, catalog, route, clean, app)

    async def _gate(
        self, scope: Scope, receive: Receive, send: Send, catalog: Catalog, route: Route | None, clean: list[tuple[bytes, bytes]],
        app: ASGIApp,
    ) -> None:
        """Identify, price and decide a request that needs a billable; then deny it or pass it on."""
        started = time.perf_counter()
        billable = await self._billable_or_answer(scope, send, catalog, route)
        if billable is None:
            return
        operation = catalog.operations[route.config.spend] if route and route.config.spend else None
        credit_cost: int | None = None
        if operation is not None and operation.units_source is not None and not operation.metered:
            priced = await self._price_from_request(scope, receive, send, operation, scope["headers"])
            if priced is None:
                return
            credit_cost, receive = priced

        try:
            decision = await self.engine.decide(billable, route, credit_cost=credit_cost)
        except (RedisUnavailable, StateUnavailable) as exc:
            await self._redis_down(scope, receive, send, route, billable, clean, exc, app)
            return
        finally:
            self.metrics.latency(time.perf_counter() - started)
        self._observe(decision)
        if not decision.admitted:
            await self._deny(scope, send, decision)
            return
        if self.traced is not None:
            self.traced(decision)

        upstream_headers = clean + [(b"x-billable-id", (decision.billable or billable).encode()), (b"x-plan", (decision.plan or "").encode())]
        scope = {**scope, "headers": upstream_headers, "state": {**scope.get("state", {}), "gateway": decision}}
        if scope["type"] == "websocket":
            await app(scope, receive, send)
            return
        await self._forward(scope, receive, send, decision, route, operation, app)

    async def _billable_or_answer(self, scope: Scope, send: Send, catalog: Catalog, route: Route | None) -> str | None:
        """The request's billable, or None after answering it (400, 401, 503, or a route this gateway denies)."""
        try:
            billable = await self.identify(scope)
        except BadRequest as exc:
            self.metrics.decided("bad_request", ())
            await self._bad_request(scope, send, str(exc))
            return None
        except KeyRevoked as exc:
            self.metrics.decided("unauthorized", ())
            await self._deny(scope, send, Decision(False, None, None, violations=[Violation("", "unauthorized")]), str(exc))
            return None
        except DatabaseUnavailable as exc:
            log.warning("cannot check an API key: %s", exc)
            self.metrics.decided("unavailable", ())
            await self._deny(scope, send, Decision(False, None, None, violations=[Violation("", "unavailable")]))
            return None
        if billable is None:
            self.metrics.decided("unauthorized", ())
            await self._deny(scope, send, Decision(False, None, None, violations=[Violation("", "unauthorized")]))
            return None
        if route is None and catalog.settings.unmatched == "deny":
            self.metrics.decided("no_route", ())
            await self._deny(scope, send, Decision(False, billable, None, violations=[Violation("", "no_route")]))
            return None
        return billable

    def _observe(self, decision: Decision) -> None:
        """Count the decision; tell `on_decision` of one that emitted events or started an auto-recharge."""
        if decision.admitted:
            self.metrics.decided("admitted")
            if decision.shadowed:
                self.metrics.shadowed(decision.shadowed_policies)
        else:
            self.metrics.decided("denied", decision.violated_policies)
        if decision.events or decision.recharge:
            self.metrics.events(decision.events)
            if self.on_decision is not None:
                try:
                    self.on_decision(decision)
                except Exception:  # an observer never breaks a request
                    log.exception("on_decision failed")

    async def identify(self, scope: Scope) -> str | None:
        """The billable of a request (see `Identifier`)."""
        return await self.identifier(scope)

    # ---- answers the gateway gives itself -----------------------------------------------------------

    async def _deny(self, scope: Scope, send: Send, decision: Decision, unauthorized: str | None = None) -> None:
        if self.traced is not None:
            self.traced(decision)
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": decision.problem_type or ""})
            return
        headers = decision.headers()
        if decision.status == 401:
            headers += self.identifier.challenge
        problem = decision.problem(self.catalog, unauthorized=unauthorized or self.identifier.unauthorized)
        # A websocket here is refused with the denial response (the server supports it).
        start, body = problem_messages(decision.status, problem, headers, websocket=scope["type"] == "websocket")
        await send(start)
        await send(body)

    async def _redis_down(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route | None,
        billable: str,
        clean: list[tuple[bytes, bytes]],
        exc: Exception,
        app: ASGIApp,
    ) -> None:
        self.metrics.redis_error()
        policy = route.config.on_redis_down if route else None
        if policy is None:
            spends = route is not None and route.config.spend is not None
            policy = "closed" if spends else self.catalog.settings.on_redis_down
        if policy == "local" and route is not None and (route.config.limit or route.config.spend or route.config.release):
            policy = "closed"  # caps, allowances and credits live in Redis only: no share of them to keep here
        if policy == "closed":
            self.metrics.decided("unavailable", ())
            await self._deny(scope, send, Decision(False, billable, None, violations=[Violation("", "unavailable")]))
            return
        decision: Decision | None = None
        if policy == "local":
            known = self.engine.offline(billable, route)
            decision = self.local.decide(billable, known.plan, route, known.denied, known.rates)
            if not decision.admitted:
                self.metrics.decided("denied", decision.violated_policies)
                await self._deny(scope, send, decision)
                return
        self.metrics.degraded()
        if self.traced is not None:
            self.traced(decision or Decision(True, billable, None, route, degraded=True))
        now = time.monotonic()
        if now - self._warned_at > 10:  # one line per outage, not one per request
            self._warned_at = now
            how = "with this process's share of the rate limits" if decision else "open"
            log.warning("deciding %s without Redis: %s", how, exc)
        added = decision.headers() if decision is not None else [(b"x-gateway-degraded", b"redis")]
        upstream = clean + [(b"x-billable-id", billable.encode())]
        if decision is not None:
            upstream.append((b"x-plan", (decision.plan or "").encode()))
            scope = {**scope, "state": {**scope.get("state", {}), "gateway": decision}}
        scope = {**scope, "headers": upstream}
        if scope["type"] == "websocket":
            await app(scope, receive, send)
            return

        async def send_flagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        await app(scope, receive, send_flagged)

    async def _bad_path(self, scope: Scope, send: Send, detail: str) -> None:
        """A path that cannot be made canonical: 400 before identity, nothing charged."""
        self.metrics.decided("bad_request", ())
        await self._bad_request(scope, send, detail)

    async def _bad_request(self, scope: Scope, send: Send, detail: str) -> None:
        if scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
            start, body = problem_messages(400, bad_request_body(detail), websocket=scope["type"] == "websocket")
            await send(start)
            await send(body)
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": BAD_REQUEST})

    async def _price_from_request(
        self, scope: Scope, receive: Receive, send: Send, operation: Operation, headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, Receive] | None:
        """Units read from the request itself: the body is read once (bounded) and replayed to the app."""
        source = operation.units_source
        assert source is not None
        if source.where == "request.header":
            units = header_units(headers, source.path)
            if units is None:
                await self._bad_request(scope, send, f"This operation is priced from the request: send a {source.path} header with a number.")
                return None
            cost = await self._cost(scope, send, operation, units)
            return None if cost is None else (cost, receive)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                detail = f"The request body is over the {self.max_body}-byte limit, so it was not read."
                start, body = problem_messages(413, too_large_body(detail))
                await send(start)
                await send(body)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        wanted = f"This operation is priced from the request: send a JSON body with a number at {source.path}."
        try:
            doc = loads(raw) if raw else None
        except BadRequest as exc:  # not JSON, or nested too deep to read
            await self._bad_request(scope, send, f"{exc} {wanted}")
            return None
        units = json_path(doc, source.path) if doc is not None else None
        if units is None:
            await self._bad_request(scope, send, wanted)
            return None
        cost = await self._cost(scope, send, operation, units)
        if cost is None:
            return None
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        return cost, replay

    async def _cost(self, scope: Scope, send: Send, operation: Operation, units: float) -> int | None:
        """The credits `units` cost, or None after answering 400 when no balance could ever cover them."""
        cost = operation.price(units) if units <= MAX_INT else MAX_INT + 1  # 1e308 units would overflow the price
        if cost <= MAX_INT:
            return cost
        source = operation.units_source
        await self._bad_request(scope, send, f"{source}: {units:g} units would cost more than {MAX_INT} credits.")
        return None

    # ---- forwarding and settling --------------------------------------------------------------------

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, decision: Decision, route: Route | None, operation: Operation | None,
        app: ASGIApp,
    ) -> None:
        meter_source = operation.units_source if operation is not None and operation.metered else None
        release = route.config.release if route is not None else None
        fate = Fate(send, decision.headers(), meter_source, watch_release=release is not None)
        needs_settle = decision.hold is not None and (meter_source is not None or decision.hold.needs_settle)
        if not needs_settle and release is None:
            await app(scope, receive, fate.send)
            return
        # Not try/finally: compiled (mypyc), an await in a finally after an exception leaves that exception
        # current, and the next request through the same task raises it again.
        failure: BaseException | None = None
        try:
            await app(scope, receive, fate.send)
        except BaseException as exc:  # noqa: BLE001 - raised again below, once settled
            failure, fate.failed = exc, True
        await self._settle(decision, fate, operation, release)
        if failure is not None:
            raise failure

    async def _settle(self, decision: Decision, fate: Fate, operation: Operation | None, release: str | None) -> None:
        result = outcome(fate.status, fate.complete, fate.failed)
        try:
            if release is not None and decision.plan and releases(result, fate.status, fate.release_confirmed):
                await self.engine.release(decision.billable or "", decision.plan, release, members=decision.members)
            if decision.hold is None:
                return
            metered = operation if operation is not None and operation.metered else None
            todo = settlement(result, fate.status, fate.units(result), metered)
            if todo is not None:
                await self.engine.settle(
                    decision, give_back_limits=todo.give_back_limits, credits_owed=todo.credits_owed, units=todo.units
                )
        except (RedisUnavailable, StateUnavailable) as exc:
            # The hold stays as charged: never a free answer because Redis blinked.
            self.metrics.redis_error()
            log.warning("could not settle a hold for %r: %s", decision.billable, exc)


def _case_detail(path: str, twin: Route) -> str:
    """The refusal of a path that is `twin` in another case, naming the segment."""
    for given, spelled in zip(path.split("/"), twin.match.split()[-1].split("/"), strict=False):
        if given != spelled and given.lower() == spelled.lower():
            return (f'The path segment "{given[:100]}" is "{spelled}" in the route {twin.match}: send the path as the '
                    "catalog spells it.")  # fmt: skip
    return f"The path start {path[:100]!r} is the route {twin.match} in another case: send it as the catalog spells it."


def _freezing_after_startup(send: Send) -> Send:
    async def send_and_freeze(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            freeze_heap()
        await send(message)

    return send_and_freeze


def freeze_heap() -> None:
    """After the app's startup, what it loaded lives as long as the process: gc.freeze() keeps it out of the
    collector's scans, which otherwise stall requests (p99 52 ms → 10 ms in bench/)."""
    gc.collect()
    gc.freeze()


class Fate:
    """One request's answer as it goes out: its status, whether all of it went, the units it reports.

    Wraps `send` per request (never state on the middleware): adds the gateway's headers to the start
    message exactly once and lets the body stream through untouched."""

    def __init__(
        self, send: Send, extra: list[tuple[bytes, bytes]], meter_source: UnitsSource | None, *, watch_release: bool
    ) -> None:
        self._send = send
        self._extra = extra
        self._meter_source = meter_source
        self._watch_release = watch_release
        self.status: int | None = None
        self.complete = False
        self.failed = False
        self.release_confirmed = True
        self.meter: ResponseMeter | None = None

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            response_headers = message.get("headers", [])
            if self._meter_source is not None:
                content_type = ""
                for k, v in response_headers:
                    if k.lower() == b"content-type":
                        content_type = v.decode("latin-1")
                    elif k.lower() == b"x-gateway-release" and v.strip() == b"0":
                        self.release_confirmed = False
                self.meter = ResponseMeter(self._meter_source, content_type, list(response_headers))
            elif self._watch_release:
                self.release_confirmed = not any(
                    k.lower() == b"x-gateway-release" and v.strip() == b"0" for k, v in response_headers
                )
            message = {**message, "headers": [*response_headers, *self._extra]}
        elif kind == "http.response.body":
            if self.meter is not None:
                self.meter.feed(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
        elif kind == "http.response.pathsend":
            self.complete = True
        await self._send(message)

    def units(self, result: Outcome) -> float | None:
        """The units the answer reported: all of it when it completed, what was seen when it was cut short."""
        if self.meter is None:
            return None
        return self.meter.finish() if result is Outcome.COMPLETE else self.meter.seen
