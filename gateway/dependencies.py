"""FastAPI dependencies: guard one endpoint by a feature, or make it spend an operation.

    engine = Engine(open_redis(url), load_catalog("plans.toml"))
    gate = Guard(engine, billable=lambda request: request.headers.get("x-org"))
    app = FastAPI(exception_handlers=gate.exception_handlers)

    @app.post("/v1/upscale", dependencies=[Depends(gate.require_feature("flux_hd_access"))])
    async def upscale(): ...

    @app.post("/v1/images")
    async def images(decision: Decision = Depends(gate.spend("generate_image"))): ...

Without the middleware in front, each dependency is one decision (one script call) under the endpoint's
own route (`POST /v1/images` in the usage history), and the answer carries the decision's headers
(RateLimit, X-RateLimit-*, X-Credits-Remaining) as the middleware's do, when the endpoint returns data
(FastAPI drops a dependency's headers from a Response the endpoint builds itself: add `decision.headers()`
to it). Behind the middleware, `require_feature` reads the decision the middleware already made, and the
middleware's headers are the ones sent.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.catalog import Catalog, Route, RouteConfig
from gateway.decision import APP_NAMED_NONE, Decision, Violation
from gateway.engine import Engine
from gateway.errors import BadRequest, RedisUnavailable, StateUnavailable
from gateway.ids import billable as billable_id
from gateway.problems import problem_response

_ANY = re.compile(".*")
BillableOf = Callable[[Request], "str | None | Awaitable[str | None]"]


class Denied(HTTPException):
    """A denial carrying its problem body and headers; `Guard.exception_handlers` renders it as problem+json."""

    def __init__(self, status: int, problem: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(status_code=status, detail=problem["detail"], headers={k.decode(): v.decode() for k, v in headers})
        self.problem = problem


async def _render(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Denied)
    return problem_response(exc.status_code, exc.problem, exc.headers)


class Guard:
    def __init__(self, engine: Engine, *, billable: BillableOf | None = None) -> None:
        self.engine = engine
        self.billable = billable
        self.exception_handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {Denied: _render}
        self._routes: dict[tuple[str, ...], Route] = {}

    @property
    def catalog(self) -> Catalog:
        """The catalog running now (a published one replaces it: never kept from the start)."""
        return self.engine.catalog

    async def _billable(self, request: Request) -> str:
        decided: Decision | None = request.scope.get("state", {}).get("gateway")
        if decided is not None and decided.billable:
            return decided.billable
        found = self.billable(request) if self.billable is not None else None
        if inspect.isawaitable(found):
            found = await found
        if not found:
            self._deny(Decision(False, None, None, violations=[Violation("", "unauthorized")]))
        try:
            return billable_id(found, "the billable callable's answer")
        except BadRequest as exc:
            problem = {"type": "urn:gateway:bad-request", "title": "Bad request", "status": 400, "detail": str(exc)}
            raise Denied(400, problem, []) from None

    def _deny(self, decision: Decision) -> None:
        raise Denied(decision.status, decision.problem(self.catalog, unauthorized=APP_NAMED_NONE), decision.headers())

    def _route(self, request: Request, features: tuple[str, ...], spend: str | None) -> Route:
        """The endpoint's route (`POST /v1/images`) with the dependency's needs, compiled once for each."""
        endpoint = request.scope.get("route")
        path = getattr(endpoint, "path", None) or "/"  # the template ("/v1/items/{id}"): one entry per endpoint
        key = (request.method, path, *features, "|", spend or "")
        route = self._routes.get(key)
        if route is None:
            # Not validated as a catalog match (a framework's path may say "{id:int}"): it is never matched,
            # only named in the usage history.
            config = RouteConfig.model_construct(match=f"{request.method} {path}", features=features, spend=spend, cost=1)
            # Negative indexes keep these apart from the catalog's routes in the engine's compile cache.
            route = Route(index=-2 - len(self._routes), config=config, method="*", pattern=_ANY, rate=None)
            self._routes[key] = route
        return route

    async def _decide(self, request: Request, response: Response, features: tuple[str, ...], spend: str | None) -> Decision:
        billable = await self._billable(request)
        try:
            decision = await self.engine.decide(billable, self._route(request, features, spend))
        except (RedisUnavailable, StateUnavailable):
            self._deny(Decision(False, billable, None, violations=[Violation("", "unavailable")]))
            raise AssertionError("unreachable") from None
        if not decision.admitted:
            self._deny(decision)
        if request.scope.get("state", {}).get("gateway") is None:  # behind the middleware, its headers are sent
            for name, value in decision.headers():
                response.headers.append(name.decode(), value.decode())
        return decision

    def require_feature(self, *features: str) -> Callable[[Request, Response], Awaitable[Decision | None]]:
        unknown = [f for f in features if f not in self.catalog.feature_names]
        if unknown:
            raise ValueError(f"unknown feature(s) {', '.join(unknown)}: plans.toml names {', '.join(sorted(self.catalog.feature_names))}")

        async def dependency(request: Request, response: Response) -> Decision | None:
            decided: Decision | None = request.scope.get("state", {}).get("gateway")
            if decided is not None and decided.plan is not None:
                plan = self.engine.terms_of(decided.billable or "", decided.plan)
                missing = [f for f in features if not plan.allows_feature(f)]
                if missing:
                    self._deny(Decision(False, decided.billable, decided.plan, violations=[Violation(f, "feature") for f in missing]))
                return decided
            return await self._decide(request, response, tuple(features), None)

        return dependency

    def status(self) -> Callable[[Request], Awaitable[dict[str, Any]]]:
        """A dependency answering the caller's status (as /_gateway/usage: with severities, sentences and
        the overall), for an endpoint that shows it: `status: dict = Depends(gate.status())`."""

        async def dependency(request: Request) -> dict[str, Any]:
            billable = await self._billable(request)
            try:
                return await self.engine.status(billable)
            except (RedisUnavailable, StateUnavailable):
                self._deny(Decision(False, billable, None, violations=[Violation("", "unavailable")]))
                raise AssertionError("unreachable") from None

        return dependency

    def spend(self, operation: str) -> Callable[[Request, Response], Awaitable[Decision]]:
        if operation not in self.catalog.operations:
            raise ValueError(f"unknown operation {operation!r}: plans.toml defines {', '.join(self.catalog.operations) or 'none'}")
        if self.catalog.operations[operation].metered:
            raise ValueError(f"{operation!r} is priced from the answer: route it through the middleware, which settles it")

        async def dependency(request: Request, response: Response) -> Decision:
            return await self._decide(request, response, (), operation)

        return dependency
