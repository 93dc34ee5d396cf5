"""`POST /_gateway/check` and `POST /_gateway/settle`: gateway/check.py over HTTP.

Either the admin token (the body names the billable) or the billable's own credentials (an API key, or
whatever identifies it in this gateway: the body's billable is then optional and must be its own).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Required

from pydantic import ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from typing_extensions import TypedDict

from gateway import ids
from gateway.bounds import MAX_INT
from gateway.check import HOLD_ID, Checker, HoldNotOpen, Outcome, hold_billable
from gateway.errors import BadRequest, DatabaseUnavailable, RedisUnavailable, StateUnavailable
from gateway.idempotency import KEY_PATTERN, MAX_KEY_LENGTH, KeyReused, StillAnswering, key_from
from gateway.ids import billable as billable_id
from gateway.problems import json_body, problem

Identify = Callable[[Request], Awaitable[str | None]]

Units = Annotated[float, Field(ge=0, le=MAX_INT)]
# The Idempotency-Key header may stand in for it (both: the same key); the document declares the member only,
# as OpenAPI cannot say "one of a header and a member".
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=MAX_KEY_LENGTH, pattern=KEY_PATTERN,
                                      description="Or the Idempotency-Key header (both: the same key)")]  # fmt: skip


class CheckQuestion(TypedDict, total=False):
    """The body of `POST /_gateway/check`: its fields are the ones accepted (and its OpenAPI schema)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]  # _only refuses any other field

    billable: Required[ids.BillableId]  # with the admin token; a key's holder may leave it out (the key's own)
    # null is as if left out, for each of the rest but consume
    route: str | None  # "POST /v1/images"
    feature: str | None
    limit: str | None
    by: Annotated[int, Field(ge=0, le=MAX_INT)] | None
    operation: str | None
    units: Units | None
    consume: bool
    idempotency_key: IdempotencyKey | None  # a consuming check retried with it answers the first answer


class SettleQuestion(TypedDict, total=False):
    """The body of `POST /_gateway/settle` (hold and outcome are required)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    hold: Required[Annotated[str, Field(pattern=f"^{HOLD_ID}\\.{ids.PATTERN}$")]]  # check.hold_billable's rule
    outcome: Required[Outcome]
    units: Units | None  # null: as if left out
    idempotency_key: IdempotencyKey | None  # a settle retried with it answers the first answer


_CHECK_FIELDS = tuple(name for name in CheckQuestion.__annotations__ if not name.startswith("__"))
_SETTLE_FIELDS = tuple(name for name in SettleQuestion.__annotations__ if not name.startswith("__"))


class CheckEndpoints:
    def __init__(self, checker: Checker, *, admin: Callable[[Request], str | None], identify: Identify) -> None:
        self.checker = checker
        self.admin = admin  # the name of the admin token a request carries (any named one), else None
        self.identify = identify

    def routes(self) -> list[Route]:
        return [
            Route("/_gateway/check", self._guard(self.check), methods=["POST"]),
            Route("/_gateway/settle", self._guard(self.settle), methods=["POST"]),
        ]

    def _guard(self, endpoint: Callable[[Request, dict[str, Any], str | None], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            try:
                own: str | None = None
                if self.admin(request) is None:
                    own = await self.identify(request)
                    if own is None:
                        return problem(401, "urn:gateway:unauthorized", "Unauthorized",
                                       "Send the billable's API key (Authorization: Bearer <key> or X-Api-Key: <key>) or the admin token.")  # fmt: skip
                body = await json_body(request)
                if isinstance(body, JSONResponse):
                    return body
                return await endpoint(request, body, own)
            except KeyReused as exc:
                return problem(422, "urn:gateway:idempotency-key-reused", "Idempotency key reused", str(exc))
            except StillAnswering as exc:
                return problem(409, "urn:gateway:idempotency-key-in-use", "Idempotency key in use", str(exc))
            except (RedisUnavailable, StateUnavailable, DatabaseUnavailable) as exc:
                return problem(503, "urn:gateway:unavailable", "Service unavailable", f"{exc} Retry shortly.")

        return guarded

    async def check(self, request: Request, body: dict[str, Any], own: str | None) -> Response:
        _only(body, _CHECK_FIELDS, "a check")
        named = body.get("billable")
        if own is None:
            if named is None:
                raise BadRequest('billable is required with the admin token (send {"billable": "org_1", "route": "POST /v1/images"}).')
            billable = billable_id(named, "billable")
        else:
            billable = own
            if named is not None and billable_id(named, "billable") != own:
                return _forbidden(f"These credentials are {own}'s: they cannot check {named}.")
        for name in ("route", "feature", "limit", "operation"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise BadRequest(f"{name} must be a string.")
        consume = body.get("consume", False)
        if not isinstance(consume, bool):
            raise BadRequest("consume must be true or false.")
        by = body.get("by")
        result = await self.checker.check(
            billable, route=body.get("route"), feature=body.get("feature"), limit=body.get("limit"), by=by,
            operation=body.get("operation"), units=_units(body), consume=consume, idempotency_key=_key(request, body),
        )  # fmt: skip
        response = JSONResponse(result.body())
        response.raw_headers.extend(result.headers)
        if result.replayed:
            response.raw_headers.append(_REPLAYED)
        return response

    async def settle(self, request: Request, body: dict[str, Any], own: str | None) -> Response:
        _only(body, _SETTLE_FIELDS, "a settle")
        hold = body.get("hold")
        if "hold" in body and hold is None:
            raise BadRequest("hold is null: there is nothing to settle, because the check was denied or dry (only an "
                             'allowed check with "consume": true answers a hold; its "problem" says why it was denied).')
        if not isinstance(hold, str):
            raise BadRequest('hold is required: the "hold" a consuming check answered.')
        if own is not None and hold_billable(hold) != own:
            return _forbidden(f"These credentials are {own}'s: the hold is another billable's.")
        outcome = body.get("outcome")
        if outcome not in ("success", "failure"):
            raise BadRequest('outcome must be "success" (the answer was a 2xx) or "failure" (it was not).')
        try:
            result = await self.checker.settle(hold, outcome=outcome, units=_units(body), idempotency_key=_key(request, body))
        except HoldNotOpen as exc:
            return problem(409, "urn:gateway:conflict", "Conflict", str(exc))
        response = JSONResponse(result.body())
        if result.replayed:
            response.raw_headers.append(_REPLAYED)
        if result.balance is not None:
            response.raw_headers.append((b"x-credits-remaining", b"%d" % result.balance))
        return response


_REPLAYED = (b"idempotent-replayed", b"true")  # as Stripe marks a retry's answer


def _key(request: Request, body: dict[str, Any]) -> str | None:
    return key_from(request.headers.get("idempotency-key"), body.get("idempotency_key"))


def _only(body: dict[str, Any], known: tuple[str, ...], what: str) -> None:
    for name in body:
        if name not in known:
            raise BadRequest(f"unknown field {name[:80]!r}: {what} takes {', '.join(known)}.")


def _units(body: dict[str, Any]) -> float | None:
    units = body.get("units")
    if units is None:
        return None
    if isinstance(units, bool) or not isinstance(units, int | float) or not 0 <= units <= MAX_INT:
        raise BadRequest(f"units must be a number from 0 to {MAX_INT}.")
    return units


def _forbidden(detail: str) -> JSONResponse:
    return problem(403, "urn:gateway:forbidden", "Forbidden", detail)
