"""The pure ASGI middleware: decide before the app runs, add the headers once, settle only where needed.

    app = GatewayMiddleware(app, engine=engine, keys=key_store)            # API keys
    app = GatewayMiddleware(app, engine=engine, billable=lambda scope: ...)  # the app names the billable
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from gateway.bounds import MAX_INT, loads
from gateway.catalog import Catalog, Operation, Route
from gateway.decision import API_KEY_REQUIRED, APP_NAMED_NONE, Decision, Violation, header_required
from gateway.engine import Engine
from gateway.errors import BadRequest, DatabaseUnavailable, RedisUnavailable, StateUnavailable
from gateway.headers import forwardable
from gateway.identity import key_from_headers
from gateway.ids import billable as billable_id
from gateway.local import LocalLimits
from gateway.meter import ResponseMeter, header_units, json_path
from gateway.metrics import Metrics
from gateway.paths import BadPath, canonical, encoded
from gateway.problems import problem_body

log = logging.getLogger("gateway.middleware")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
BillableFn = Callable[[Scope], "str | None | Awaitable[str | None]"]

_BAD_REQUEST = "urn:gateway:bad-request"


class KeyLookup(Protocol):
    async def authenticate(self, presented: str) -> str | None: ...


def problem_response(
    status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> tuple[Message, Message]:
    payload = json.dumps(body, separators=(",", ":")).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(payload)).encode()),
            *headers,
        ],
    }
    return start, {"type": "http.response.body", "body": payload, "more_body": False}


def bad_request(detail: str) -> dict[str, Any]:
    return problem_body(400, _BAD_REQUEST, "Bad request", detail)


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: Engine,
        keys: KeyLookup | None = None,
        billable: BillableFn | None = None,
        billable_header: str | None = None,
        endpoints: ASGIApp | None = None,
        metrics: Metrics | None = None,
        max_body: int = 10 * 1024 * 1024,
        on_decision: Callable[[Decision], None] | None = None,
        freeze_gc: bool = True,
        processes: int = 1,
    ) -> None:
        if keys is None and billable is None and billable_header is None:
            raise ValueError("name how billables are found: keys=KeyStore, billable=callable or billable_header=NAME")
        self.app = app
        self.engine = engine
        self.keys = keys
        self.billable = billable
        self.billable_header = billable_header.lower().encode() if billable_header else None
        self.endpoints = endpoints
        self.metrics = metrics or Metrics()
        self.max_body = max_body
        # Told of every decision that emitted events or started an auto-recharge; must not block.
        self.on_decision = on_decision
        # After the app's startup, what it loaded lives as long as the process: gc.freeze() keeps it out of
        # the collector's scans, which otherwise stall requests (p99 52 ms → 10 ms in bench/).
        self.freeze_gc = freeze_gc
        # on_redis_down = "local": this process's share of the rate limits (`processes` share them).
        self.local = LocalLimits(processes)
        self._warned_at = 0.0
        # A 401 names what identifies a billable here; API keys are asked for with a Bearer challenge.
        self._challenge: list[tuple[bytes, bytes]]
        if billable is not None:
            self._unauthorized, self._challenge = APP_NAMED_NONE, []
        elif billable_header is not None:
            self._unauthorized, self._challenge = header_required(billable_header), []
        else:
            self._unauthorized, self._challenge = API_KEY_REQUIRED, [(b"www-authenticate", b"Bearer")]

    @property
    def catalog(self) -> Catalog:
        """The catalog running now (a published one replaces it in the engine)."""
        return self.engine.catalog

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            if kind == "lifespan" and self.freeze_gc:

                async def send_and_freeze(message: Message) -> None:
                    if message["type"] == "lifespan.startup.complete":
                        gc.collect()
                        gc.freeze()
                    await send(message)

                await self.app(scope, receive, send_and_freeze)
                return
            await self.app(scope, receive, send)
            return
        # Everything below (the /_gateway endpoints, public routes, matching, the app) sees one canonical path.
        raw_path: bytes | None = scope.get("raw_path")
        if raw_path is None:  # optional in ASGI: the decoded path, encoded again
            raw_path = encoded(scope["path"])
            scope = {**scope, "raw_path": raw_path}
        try:
            found = canonical(raw_path)
        except BadPath as exc:
            await self._bad_path(scope, send, exc.detail)
            return
        if found is not None:
            scope = {**scope, "raw_path": found[0], "path": found[1]}
        path: str = scope["path"]
        if path.startswith("/_gateway") and self.endpoints is not None and (len(path) == 9 or path[9] == "/"):
            await self.endpoints(scope, receive, send)
            return
        method = scope["method"] if kind == "http" else "GET"
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        clean = forwardable(headers)
        catalog = self.engine.catalog  # one catalog for the whole request, even when a new one is published meanwhile
        route = catalog.route_for(method, path)
        if method == "OPTIONS" or (route is not None and route.config.public):
            # CORS preflight and public routes go through without identity.
            await self.app({**scope, "headers": clean}, receive, send)
            return

        started = time.perf_counter()
        try:
            billable = await self.identify(scope)
        except BadRequest as exc:
            self.metrics.decided("bad_request", ())
            await self._bad_request(scope, send, str(exc))
            return
        except DatabaseUnavailable as exc:
            log.warning("cannot check an API key: %s", exc)
            self.metrics.decided("unavailable", ())
            await self._deny(scope, send, Decision(False, None, None, violations=[Violation("", "unavailable")]))
            return
        if billable is None:
            self.metrics.decided("unauthorized", ())
            await self._deny(scope, send, Decision(False, None, None, violations=[Violation("", "unauthorized")]))
            return
        if route is None and catalog.settings.unmatched == "deny":
            self.metrics.decided("no_route", ())
            await self._deny(scope, send, Decision(False, billable, None, violations=[Violation("", "no_route")]))
            return

        operation = catalog.operations[route.config.spend] if route and route.config.spend else None
        credit_cost: int | None = None
        if operation is not None and operation.units_source is not None and not operation.metered:
            priced = await self._price_from_request(scope, receive, send, operation, headers)
            if priced is None:
                return
            credit_cost, receive = priced

        try:
            decision = await self.engine.decide(billable, route, credit_cost=credit_cost)
        except (RedisUnavailable, StateUnavailable) as exc:
            await self._redis_down(scope, receive, send, route, billable, clean, exc)
            return
        finally:
            self.metrics.latency(time.perf_counter() - started)
        if decision.admitted:
            self.metrics.decided("admitted")
        else:
            self.metrics.decided("denied", decision.violated_policies)
        if decision.events or decision.recharge:
            self.metrics.events(decision.events)
            if self.on_decision is not None:
                try:
                    self.on_decision(decision)
                except Exception:  # an observer never breaks a request
                    log.exception("on_decision failed")
        if not decision.admitted:
            await self._deny(scope, send, decision)
            return

        upstream_headers = clean + [(b"x-billable-id", billable.encode()), (b"x-plan", (decision.plan or "").encode())]
        scope = {**scope, "headers": upstream_headers, "state": {**scope.get("state", {}), "gateway": decision}}
        if kind == "websocket":
            await self.app(scope, receive, send)
            return
        await self._forward(scope, receive, send, decision, route, operation)

    # ---- identity -----------------------------------------------------------------------------------

    async def identify(self, scope: Scope) -> str | None:
        """The billable of a request: the app's callable, the trusted header, or the API key.

        BadRequest when the callable or the header names one outside the billable id rule."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if self.billable is not None:
            found = self.billable(scope)
            if inspect.isawaitable(found):
                found = await found
            return billable_id(found, "the billable callable's answer") if found else None
        if self.billable_header is not None:
            for name, value in headers:
                if name == self.billable_header and value:
                    return billable_id(value.decode("latin-1"), f"the {self.billable_header.decode()} header")
            return None
        presented = key_from_headers(headers)
        if presented is None or self.keys is None:
            return None
        return await self.keys.authenticate(presented)

    # ---- answers the gateway gives itself -----------------------------------------------------------

    async def _deny(self, scope: Scope, send: Send, decision: Decision) -> None:
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": decision.problem_type or ""})
            return
        headers = decision.headers()
        if decision.status == 401:
            headers += self._challenge
        start, body = problem_response(decision.status, decision.problem(self.catalog, unauthorized=self._unauthorized), headers)
        if scope["type"] == "websocket":
            # Refuse the handshake with the denial response (the server supports it).
            start, body = {**start, "type": "websocket.http.response.start"}, {**body, "type": "websocket.http.response.body"}
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
            await self.app(scope, receive, send)
            return

        async def send_flagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        await self.app(scope, receive, send_flagged)

    async def _bad_path(self, scope: Scope, send: Send, detail: str) -> None:
        """A path that cannot be made canonical: 400 before identity, nothing charged."""
        self.metrics.decided("bad_request", ())
        await self._bad_request(scope, send, detail)

    async def _bad_request(self, scope: Scope, send: Send, detail: str) -> None:
        start, body = problem_response(400, bad_request(detail))
        if scope["type"] == "http":
            await send(start)
            await send(body)
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({**start, "type": "websocket.http.response.start"})
            await send({**body, "type": "websocket.http.response.body"})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": _BAD_REQUEST})

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
                start, body = problem_response(413, problem_body(413, "urn:gateway:payload-too-large", "Payload Too Large", detail))
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
        self, scope: Scope, receive: Receive, send: Send, decision: Decision, route: Route | None, operation: Operation | None
    ) -> None:
        extra = decision.headers()
        meter_source = operation.units_source if operation is not None and operation.metered else None
        state: dict[str, Any] = {"status": None, "complete": False, "meter": None, "release": True}

        async def send_wrapped(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                # Headers go onto the start message exactly once; the body streams untouched.
                state["status"] = message["status"]
                response_headers = message.get("headers", [])
                if meter_source is not None:
                    content_type = ""
                    for k, v in response_headers:
                        if k.lower() == b"content-type":
                            content_type = v.decode("latin-1")
                        elif k.lower() == b"x-gateway-release" and v.strip() == b"0":
                            state["release"] = False
                    state["meter"] = ResponseMeter(meter_source, content_type, list(response_headers))
                elif route is not None and route.config.release is not None:
                    state["release"] = not any(
                        k.lower() == b"x-gateway-release" and v.strip() == b"0" for k, v in response_headers
                    )
                message = {**message, "headers": [*response_headers, *extra]}
            elif kind == "http.response.body":
                meter = state["meter"]
                if meter is not None:
                    meter.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    state["complete"] = True
            elif kind == "http.response.pathsend":
                state["complete"] = True
            await send(message)

        needs_settle = decision.hold is not None and (meter_source is not None or decision.hold.needs_settle)
        release = route.config.release if route is not None else None
        if not needs_settle and release is None:
            await self.app(scope, receive, send_wrapped)
            return
        try:
            await self.app(scope, receive, send_wrapped)
        except BaseException:
            state["failed"] = True
            raise
        finally:
            await self._settle(decision, state, operation, release)

    async def _settle(self, decision: Decision, state: dict[str, Any], operation: Operation | None, release: str | None) -> None:
        status: int | None = state["status"]
        meter: ResponseMeter | None = state["meter"]
        ok = status is not None and 200 <= status < 300
        try:
            if release is not None and ok and state["complete"] and state["release"] and decision.plan:
                await self.engine.release(decision.billable or "", decision.plan, release)
            if decision.hold is None:
                return
            metered = operation is not None and operation.metered
            if status is not None and not state["complete"]:
                # The stream died or the client left mid-answer: what was seen is charged, else everything held.
                units = meter.seen if meter is not None else None
                if metered and units is not None and operation is not None:
                    await self.engine.settle(decision, give_back_limits=False, credits_owed=operation.price(units), units=units)
                elif metered:
                    await self.engine.settle(decision, give_back_limits=False, credits_owed=None)
                return
            units = meter.finish() if meter is not None else None
            if ok:
                if metered and operation is not None:
                    owed = operation.price(units) if units is not None else None
                    await self.engine.settle(decision, give_back_limits=False, credits_owed=owed, units=units)
                return
            if status is None:
                if state.get("failed"):
                    # The app failed before answering: nothing was delivered.
                    await self.engine.settle(decision, give_back_limits=True, credits_owed=0)
                # Otherwise the client left before the answer: charged as held.
                return
            # A non-2xx answer gives everything back, unless it reports units (then those are charged).
            owed = operation.price(units) if metered and units is not None and operation is not None else 0
            await self.engine.settle(decision, give_back_limits=True, credits_owed=owed, units=units if metered else None)
        except (RedisUnavailable, StateUnavailable) as exc:
            # The hold stays as charged: never a free answer because Redis blinked.
            self.metrics.redis_error()
            log.warning("could not settle a hold for %r: %s", decision.billable, exc)
