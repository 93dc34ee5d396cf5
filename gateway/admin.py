"""The gateway's own endpoints under /_gateway: the admin API, the client's usage, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from gateway import audit, openapi
from gateway.admin_bodies import MAX_NAME, MAX_REASON
from gateway.admin_members import MemberAdmin
from gateway.bounds import MAX_INT, integer
from gateway.catalog import Catalog, Plan
from gateway.check import Checker
from gateway.check_http import CheckEndpoints
from gateway.engine import Engine
from gateway.envelope import caused_event
from gateway.errors import (
    BadRequest,
    CatalogError,
    Conflict,
    DatabaseUnavailable,
    GatewayError,
    InvalidOverrides,
    KeyRevoked,
    PlansInUse,
    RedisUnavailable,
    StateUnavailable,
)
from gateway.events import Outbox
from gateway.grants import GrantConflict, Grants
from gateway.identity import KeyStore
from gateway.ids import billable as billable_id
from gateway.members import root_of
from gateway.metrics import CONTENT_TYPE_LATEST, Metrics
from gateway.overrides import Overrides, record_overrides, record_suspension
from gateway.overrides import kept as overrides_kept
from gateway.overrides import validate as validate_overrides
from gateway.problems import (
    BAD_REQUEST,
    bad_request,
    http_problem,
    json_body,
    problem,
    problem_body,
    problem_response,
    read_body,
    refused,
)
from gateway.publishing import Catalogs
from gateway.reconcile import Reconciler
from gateway.seats import NoSeat, seat_taker
from gateway.store.db import Database
from gateway.terms import validate as validate_terms
from gateway.usage import PERIOD, current_period, usage_report

log = logging.getLogger("gateway.admin")

Identify = Callable[[Request], Awaitable[str | None]]



def overage(status: dict[str, Any], target: str, plan: Plan) -> dict[str, Any]:
    """What the billable must remove before moving to `target` (`plan`: its terms, with the billable's
    overrides in place, since they stay across a plan change): each item over its limit, with a sentence."""
    items = []
    for name, limit in status["limits"].items():
        if plan.is_unlimited(name):
            continue
        cap = plan.limits.get(name)
        allowed = cap.to if cap is not None else 0
        if limit["usage"] > allowed:
            excess = limit["usage"] - allowed
            items.append(
                {
                    "limit": name,
                    "usage": limit["usage"],
                    "allowed": allowed,
                    "excess": excess,
                    "sentence": f"{name}: {limit['usage']} > {allowed} (reduce by {excess})",
                }
            )
    return {"billable": status["billable"], "plan": status["plan"], "target": target, "ok": not items, "items": items}


def plan_changed(billable: str, before: str, after: str, source: str) -> dict[str, Any]:
    """The plan_changed event of DESIGN §3 (sent through the outbox like every other event)."""
    # Each assignment is its own cause: two changes to the same plan are two events.
    return caused_event(billable, "plan_changed", f"admin:{uuid.uuid4().hex}", after, {"from": before, "to": after, "source": source})



class ArchivedPlan(GatewayError):
    """A plan that is archived, newly assigned: billables on it keep it, none is put on it (answered 409)."""


async def assign_plan(
    engine: Engine, grants: Grants | None, db: Database | None, billable: str, plan: str | None, *, token: str
) -> dict[str, Any]:
    """Put `billable` on `plan` (None: back to Stripe's or the default plan), as the admin API and the CLI
    do: in the record first, then in Redis (every gateway decides with it from its next request), the
    plan_changed event, the audit entry under `token`. Answers the billable's status."""
    catalog = engine.catalog
    if plan is not None and plan not in catalog.plans:
        raise BadRequest(f'Unknown plan {plan!r}: plans.toml has {", ".join(catalog.plans)}.')
    resolved = await engine.plan_of(billable)
    before = resolved.name
    if plan is not None and catalog.plans[plan].archived and plan != before:
        offered = ", ".join(catalog.plans_by_price())
        raise ArchivedPlan(f'Plan "{plan}" is archived: billables already on it keep it, but none is newly assigned to it (assign one of {offered}).')
    if grants is not None:
        await grants.record_assignment(billable, plan)
    await engine.set_assignment(billable, plan)
    status = await engine.status(billable)
    if status["plan"] != before and db is not None:
        await Outbox(db).add([plan_changed(billable, before, status["plan"], status["plan_source"])])
    if db is not None:
        await audit.record(
            db, token=token, action="plan.assign" if plan is not None else "plan.remove", billable=billable,
            before={"plan": before, "source": resolved.source}, after={"plan": status["plan"], "source": status["plan_source"]},
        )  # fmt: skip
    return status


class Endpoints:
    def __init__(
        self,
        *,
        engine: Engine,
        keys: KeyStore | None,
        db: Database | None,
        grants: Grants | None,
        metrics: Metrics,
        reconciler: Reconciler | None = None,
        identify: Identify,
        admin_token: str | None,
        admin_tokens: Mapping[str, str] | None = None,
        metrics_token: str | None = None,
        catalogs: Catalogs | None = None,
        extra_routes: list[Route] | None = None,
        extra_admin_routes: list[Route] | None = None,
    ) -> None:
        self.engine = engine
        self.keys = keys
        self.db = db
        self.grants = grants
        self.reconciler = reconciler
        self.metrics = metrics
        self.identify = identify
        # name → token: GATEWAY_ADMIN_TOKEN is "admin"; the audit log names whichever made a change.
        self.tokens = {**({audit.ADMIN: admin_token} if admin_token else {}), **(admin_tokens or {})}
        self.metrics_token = metrics_token
        self.catalogs = catalogs
        if not self.tokens:
            log.warning("GATEWAY_ADMIN_TOKEN is not set: the admin API is off")
        self.members = MemberAdmin(db, keys, lambda: self.engine.catalog, engine.clock, self._audit)
        admin = [
            Route("/_gateway/admin/keys", self.create_key, methods=["POST"]),
            Route("/_gateway/admin/keys/{key_id}", self.revoke_key, methods=["DELETE"]),
            Route("/_gateway/admin/keys/{key_id}/terms", self.members.key_terms, methods=["PUT", "DELETE"]),
            Route("/_gateway/admin/billables/{billable}/parent", self.members.parent, methods=["PUT", "DELETE"]),
            Route("/_gateway/admin/billables/{billable}/terms", self.members.team_terms, methods=["PUT", "DELETE"]),
            Route("/_gateway/admin/billables/{billable}", self.billable_status, methods=["GET"]),
            Route("/_gateway/admin/billables/{billable}/keys", self.list_keys, methods=["GET"]),
            Route("/_gateway/admin/billables/{billable}/plan", self.members.org_only(self.assign_plan), methods=["PUT", "DELETE"]),
            Route("/_gateway/admin/billables/{billable}/credits", self.members.org_only(self.grant_credits), methods=["POST"]),
            Route("/_gateway/admin/billables/{billable}/limits/{limit}", self.members.org_only(self.set_limit), methods=["PUT"]),
            Route("/_gateway/admin/billables/{billable}/limits/{limit}/reset", self.members.org_only(self.reset_limit), methods=["POST"]),
            Route("/_gateway/admin/billables/{billable}/overrides", self.members.org_only(self.overrides), methods=["GET", "PUT", "DELETE"]),
            Route("/_gateway/admin/billables/{billable}/suspension", self.suspension, methods=["PUT", "DELETE"]),
            Route("/_gateway/admin/billables/{billable}/auto-recharge", self.members.org_only(self.auto_recharge), methods=["PUT"]),
            Route("/_gateway/admin/billables/{billable}/overage", self.overage, methods=["GET"]),
            Route("/_gateway/admin/billables/{billable}/usage", self.usage_history, methods=["GET"]),
            Route("/_gateway/admin/billables/{billable}/invoice-preview", self.invoice_preview, methods=["GET"]),
            Route("/_gateway/admin/catalog", self.catalog_endpoint, methods=["GET", "POST"]),
            Route("/_gateway/admin/audit", self.audit_log, methods=["GET"]),
            Route("/_gateway/openapi.json", self.openapi, methods=["GET"]),
            *(extra_admin_routes or []),
        ]
        self.admin_paths = frozenset(r.path for r in admin)
        self.router = Router(
            routes=[
                *[Route(r.path, self._admin(r.endpoint), methods=list(r.methods or [])) for r in admin],
                Route("/_gateway/usage", self.usage, methods=["GET"]),
                *CheckEndpoints(Checker(engine), admin=self.token_name, identify=identify).routes(),
                Route("/_gateway/health", self.health, methods=["GET"]),
                Route("/_gateway/metrics", self.prometheus, methods=["GET"]),
                *(extra_routes or []),
            ]
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        try:
            # With "app" in the scope the router raises for an unknown path or method (else it answers plain
            # text): every answer under /_gateway is problem+json.
            await self.router(scope if "app" in scope else {**scope, "app": self}, receive, send)
        except HTTPException as exc:
            await http_problem(exc, scope["method"], scope["path"])(scope, receive, send)
        except BadRequest as exc:  # an id, a number or a body outside its rule, from any endpoint
            await refused(exc)(scope, receive, send)
        except Conflict as exc:  # well formed, but clashing with the state it would change
            await problem(409, "urn:gateway:conflict", "Conflict", str(exc))(scope, receive, send)
        except KeyRevoked as exc:  # the client's own endpoints, with a key revoked since
            await problem(401, "urn:gateway:unauthorized", "Unauthorized", str(exc))(scope, receive, send)

    @property
    def catalog(self) -> Catalog:
        """The catalog running now (a published one replaces it: never kept from the start)."""
        return self.engine.catalog

    # ---- guards -------------------------------------------------------------------------------------

    def _admin(self, endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            if not self.tokens:
                return problem(401, "urn:gateway:unauthorized", "Unauthorized", "The admin API is off: set GATEWAY_ADMIN_TOKEN to turn it on.")
            name = self.token_name(request)
            if name is None:
                return problem(401, "urn:gateway:unauthorized", "Unauthorized", "The admin API needs Authorization: Bearer <GATEWAY_ADMIN_TOKEN>.")
            request.state.token = name  # who makes the change, for the audit log
            if "billable" in request.path_params:
                billable_id(request.path_params["billable"], "the billable in the path")
            try:
                return await endpoint(request)
            except (RedisUnavailable, StateUnavailable) as exc:
                return problem(503, "urn:gateway:unavailable", "Service unavailable", f"{exc} Retry when Redis is back.")
            except DatabaseUnavailable as exc:
                return problem(503, "urn:gateway:unavailable", "Service unavailable", str(exc))

        return guarded

    def token_name(self, request: Request) -> str | None:
        """The name of the admin token the request carries (every one compared, in constant time), else None."""
        found = None
        for name, token in self.tokens.items():
            if _bearer(request, token):
                found = name
        return found

    async def _audit(self, request: Request, action: str, billable: str | None, before: Any, after: Any) -> None:
        if self.db is not None:
            await audit.record(self.db, token=request.state.token, action=action, billable=billable, before=before, after=after)

    # ---- keys ---------------------------------------------------------------------------------------

    async def create_key(self, request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        billable, name = billable_id(body.get("billable"), "billable"), body.get("name", "")
        if not isinstance(name, str) or len(name) > MAX_NAME:
            return bad_request(f'name is a string of at most {MAX_NAME} characters (send {{"billable": "org_1", "name": "ci"}}).')
        if self.keys is None:
            return bad_request("This gateway names billables by a trusted header: it has no API keys.")
        # A key's own terms (its budget beside its owner's) are checked before the key exists.
        terms = validate_terms(body["terms"], self.catalog, self.engine.clock()) if body.get("terms") is not None else None
        seat = None
        if self.db is not None:
            root = await root_of(self.db, billable)
            seat = seat_taker(self.db, self.catalog, (await self.engine.plan_of(root)).name, root)
        try:
            created = await self.keys.create(billable, name, seat=seat)
        except NoSeat as exc:
            return problem(403, "urn:gateway:no-seat", "No seat", str(exc))
        await self._audit(request, "key.create", billable, None, {"id": created.id, "name": created.name})
        if terms is not None:
            answer = await self.members.put_key_terms(request, created.id, billable, terms, status=201)
            if answer.status_code != 201:
                return answer
        return JSONResponse(
            {"id": created.id, "key": created.key, "billable": created.billable, "name": created.name,
             "created_at": _iso(created.created_at), **({"terms": terms.shown()} if terms is not None else {})},
            status_code=201,
        )

    async def list_keys(self, request: Request) -> Response:
        if self.keys is None:
            return JSONResponse([])
        found = await self.keys.list(request.path_params["billable"])
        return JSONResponse(
            [
                {"id": k.id, "name": k.name, "created_at": _iso(k.created_at), "last_used_at": _iso(k.last_used_at),
                 "revoked": k.revoked}
                for k in found
            ]
        )

    async def revoke_key(self, request: Request) -> Response:
        key_id = request.path_params["key_id"]
        owner = await self.keys.owner(key_id) if self.keys is not None else None
        try:
            found = self.keys is not None and await self.keys.revoke(key_id)
        except RedisUnavailable as exc:
            if owner is not None and not owner[1]:
                await self._audit(request, "key.revoke", owner[0], {"id": key_id, "revoked": False}, {"id": key_id, "revoked": True})
            detail = f"{exc} The key is revoked in the record; other gateway processes may accept it for a few minutes: revoke it again."
            return problem(503, "urn:gateway:unavailable", "Service unavailable", detail)
        if not found:
            return problem(404, "urn:gateway:not-found", "Not found", "No such API key.")
        if owner is not None and not owner[1]:  # revoking again changes nothing
            await self._audit(request, "key.revoke", owner[0], {"id": key_id, "revoked": False}, {"id": key_id, "revoked": True})
        return Response(status_code=204)

    # ---- billables ----------------------------------------------------------------------------------

    async def billable_status(self, request: Request) -> Response:
        return JSONResponse(await self.engine.status(request.path_params["billable"]))

    async def invoice_preview(self, request: Request) -> Response:
        """The period's lines so far (plan price, overage per meter, pay-as-you-go) with their amounts (gateway/invoice.py)."""
        status = await self.engine.status(request.path_params["billable"])
        return JSONResponse({"billable": status["billable"], "plan": status["plan"], **status["invoice"]})

    async def assign_plan(self, request: Request) -> Response:
        billable = request.path_params["billable"]
        catalog = self.catalog
        plan: str | None = None
        if request.method == "PUT":
            body = await json_body(request)
            if isinstance(body, JSONResponse):
                return body
            plan = body.get("plan")
            if not isinstance(plan, str) or plan not in catalog.plans:
                return bad_request(f'Unknown plan {plan!r}: plans.toml has {", ".join(catalog.plans)}.')
        try:
            return JSONResponse(await assign_plan(self.engine, self.grants, self.db, billable, plan, token=request.state.token))
        except ArchivedPlan as exc:
            return problem(409, "urn:gateway:conflict", "Conflict", str(exc))

    async def grant_credits(self, request: Request) -> Response:
        """200 with the balance once applied; 202 when recorded but not yet in Redis; 503 when not recorded."""
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        billable = request.path_params["billable"]
        amount = integer(body, "amount")
        key, reason = body.get("idempotency_key"), body.get("reason", "")
        if amount == 0:
            return bad_request("amount must not be 0: a whole number of credits to grant (negative takes back).")
        if not isinstance(key, str) or not key or len(key) > MAX_NAME or not key.isprintable():
            return bad_request(
                f"idempotency_key is required: a string of 1 to {MAX_NAME} printable characters naming this grant, so a "
                'retry cannot grant twice (send {"amount": 500, "reason": "...", "idempotency_key": "..."}).'
            )
        if not isinstance(reason, str):
            return bad_request("reason must be a string.")
        if self.grants is None:
            return problem(503, "urn:gateway:unavailable", "Service unavailable", "No database: grants need the record.")
        balance_before: int | None = None
        if await self.grants.find(key) is None:  # a retry of a grant already made is never refused for its size
            balance_before = await self._balance_stays_exact(billable, amount)
        try:
            result = await self.grants.grant(billable, amount, reason=reason, idempotency_key=key)
        except GrantConflict as exc:
            return problem(409, "urn:gateway:conflict", "Conflict", str(exc))
        status: dict[str, Any] | None = None
        if result.applied:
            with contextlib.suppress(RedisUnavailable, StateUnavailable):
                status = await self.engine.status(billable)
        if not result.duplicate:
            after = {"amount": amount, "reason": reason, "idempotency_key": key, "sequence": result.sequence,
                     "balance": status["credits"]["balance"] if status is not None else None}  # fmt: skip
            await self._audit(request, "credits.grant", billable, {"balance": balance_before}, after)
        if status is None:
            detail = "The grant is recorded; Redis did not take it yet, so it is applied when Redis is back. A retry with the same idempotency_key is safe."
            return JSONResponse(
                {"status": "recorded", "idempotency_key": key, "sequence": result.sequence, "detail": detail}, status_code=202
            )
        return JSONResponse(
            {"balance": status["credits"]["balance"], "credits": status["credits"], "sequence": result.sequence,
             "duplicate": result.duplicate},
        )

    async def _balance_stays_exact(self, billable: str, amount: int) -> int | None:
        """Conflict (409) when the grant would take the live balance past ±MAX_INT (skipped while Redis is down:
        the record still bounds what is granted). Answers the balance (None while Redis is down)."""
        try:
            balance: int | None = (await self.engine.status(billable))["credits"]["balance"]
        except (RedisUnavailable, StateUnavailable):
            return None
        if balance is not None and abs(balance + amount) > MAX_INT:
            raise Conflict(f"amount: this grant would take the balance of {billable} from {balance} to {balance + amount}, past ±{MAX_INT}.")
        return balance

    async def set_limit(self, request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        usage = integer(body, "usage", low=0)
        billable, limit = request.path_params["billable"], request.path_params["limit"]
        before = (await self.engine.status(billable))["limits"].get(limit, {}).get("usage")
        try:
            await self.engine.set_count(billable, limit, usage)
        except ValueError as exc:
            return bad_request(f"{exc}.")
        status = await self.engine.status(billable)
        await self._audit(request, "limit.set", billable, {"limit": limit, "usage": before}, {"limit": limit, "usage": usage})
        return JSONResponse(status["limits"].get(limit, {"usage": usage}))

    async def reset_limit(self, request: Request) -> Response:
        """A per-period allowance's use in the current window back to 0, its warnings and grace re-armed."""
        billable, limit = request.path_params["billable"], request.path_params["limit"]
        kind = self.catalog.limit_kinds.get(limit)
        if kind is None:
            known = ", ".join(sorted(self.catalog.limit_kinds)) or "none"
            return problem(404, "urn:gateway:not-found", "Not found", f'No limit "{limit}" in plans.toml (its limits: {known}).')
        if kind.per is None:
            return bad_request(f'"{limit}" is a persistent cap, not a per-period allowance: set its count with PUT .../limits/{limit} {{"usage": N}}.')
        before = (await self.engine.status(billable))["limits"].get(limit)  # restores a lost state first
        await self.engine.reset_limit(billable, limit)
        after = (await self.engine.status(billable))["limits"].get(limit)
        await self._audit(request, "limit.reset", billable, {"limit": limit, "usage": before["usage"] if before else None},
                          {"limit": limit, "usage": after["usage"] if after else 0})  # fmt: skip
        return JSONResponse(after if after is not None else {"usage": 0, "per": kind.per})

    async def overrides(self, request: Request) -> Response:
        """GET: the status with the stored overrides; PUT: new ones (validated by the catalog's own rules);
        DELETE: back to the plan's terms. Each answers the status: the effective terms."""
        billable = request.path_params["billable"]
        if request.method == "GET":
            return JSONResponse(await self.engine.status(billable))
        before = await self.engine.plan_of(billable)
        terms: Overrides | None = None
        if request.method == "PUT":
            body = await json_body(request)
            if isinstance(body, JSONResponse):
                return body
            try:
                terms = validate_overrides(body, self.catalog, before.name, self.engine.clock())
            except InvalidOverrides as exc:
                problems = [{"place": p.place, "message": p.message} for p in exc.problems]
                return problem_response(400, problem_body(400, BAD_REQUEST, "Bad request", str(exc), problems=problems))
        if self.db is not None:
            await record_overrides(self.db, billable, terms)
        await self.engine.set_overrides(billable, terms)
        status = await self.engine.status(billable)
        shown = before.overrides.shown() if before.overrides is not None else None
        await self._audit(request, "overrides.set" if terms is not None else "overrides.remove", billable, shown, status["overrides"])
        return JSONResponse(status)

    async def suspension(self, request: Request) -> Response:
        """PUT {"reason"}: every request of the billable is 403 suspended from the next one; DELETE lifts it."""
        billable = request.path_params["billable"]
        reason: str | None = None
        if request.method == "PUT":
            body = await json_body(request)
            if isinstance(body, JSONResponse):
                return body
            reason = body.get("reason", "")
            if not isinstance(reason, str) or len(reason) > MAX_REASON:
                return bad_request(f'reason is a string of at most {MAX_REASON} characters (send {{"reason": "..."}}).')
        kept = await overrides_kept(self.db, billable) if self.db is not None else None
        was = (await self.engine.plan_of(billable)).suspended
        if self.db is not None:
            await record_suspension(self.db, billable, reason)
        await self.engine.set_suspended(billable, reason is not None)
        before = {"suspended": was, "reason": kept.suspension if kept is not None else None}
        after = {"suspended": reason is not None, "reason": reason}
        await self._audit(request, "suspension.set" if reason is not None else "suspension.lift", billable, before, after)
        return JSONResponse({"billable": billable, **after})

    async def auto_recharge(self, request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            return bad_request('Send {"enabled": true, "amount_cents": 2000, "threshold": 1000}: enabled is true or false.')
        amount = None if body.get("amount_cents") is None else integer(body, "amount_cents", low=1)
        threshold = None if body.get("threshold") is None else integer(body, "threshold", low=0)
        if enabled and amount is None:
            return bad_request("amount_cents is needed to enable auto-recharge.")
        billable = request.path_params["billable"]
        # Before: the settings as the audit log last recorded them (Redis keeps them under the engine's own names).
        before = await audit.last_after(self.db, "auto_recharge.set", billable) if self.db is not None else None
        await self.engine.set_auto_recharge(billable, enabled=enabled, threshold=threshold, amount_cents=amount)
        settings = {"enabled": enabled, "amount_cents": amount, "threshold": threshold}
        await self._audit(request, "auto_recharge.set", billable, before, settings)
        return JSONResponse(settings)

    async def overage(self, request: Request) -> Response:
        target = request.query_params.get("plan")
        if target not in self.catalog.plans:
            return bad_request(f'Name the target plan: ?plan=one of {", ".join(self.catalog.plans)}.')
        billable = request.path_params["billable"]
        status = await self.engine.status(billable)
        resolved = await self.engine.plan_of(billable)
        plan = self.catalog.plans[target]
        if resolved.overrides is not None and resolved.terms is not None:
            plan = resolved.overrides.apply(plan, self.catalog)
        return JSONResponse(overage(status, target, plan))

    async def usage_history(self, request: Request) -> Response:
        """Requests, units, credits, amount_cents and shadow_denials per route and operation in a month, from the record."""
        billable = request.path_params["billable"]
        current = current_period(self.catalog.settings.zone, self.engine.clock())
        period = request.query_params.get("period") or current
        if not PERIOD.match(period):
            return bad_request(f"period is a month, YYYY-MM (like {current}), not {period!r}.")
        if self.db is None:
            return problem(503, "urn:gateway:unavailable", "Service unavailable", "No database: usage comes from the record.")
        if period == current and self.reconciler is not None:
            await self.reconciler.flush([billable], force=True)  # the answer includes the last second's use
        return JSONResponse(await usage_report(self.db, billable, period))

    # ---- catalogs and the audit log -------------------------------------------------------------------

    async def catalog_endpoint(self, request: Request) -> Response:
        """GET: what this process runs. POST (the body a plans.toml): publish it to every process."""
        if self.catalogs is None:
            return problem(503, "urn:gateway:unavailable", "Service unavailable", "No record: catalogs are published in it.")
        if request.method == "GET":
            if self.catalogs.running is None:
                return problem(503, "urn:gateway:unavailable", "Service unavailable", "No catalog published yet.")
            return JSONResponse(self.catalogs.running.describe())
        raw = await read_body(request)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return bad_request(f"The catalog is not UTF-8 text (byte {exc.start} is not): send the plans.toml as UTF-8.")
        try:
            published, changed = await self.catalogs.publish(text, token=request.state.token)
        except PlansInUse as exc:
            detail = "Billables are on plans this catalog lacks; nothing changed: " + "; ".join(str(p) for p in exc.problems)
            body = problem_body(409, "urn:gateway:conflict", "Conflict", detail,
                                problems=[{"place": p.place, "message": p.message} for p in exc.problems])  # fmt: skip
            return JSONResponse(body, status_code=409, media_type="application/problem+json")
        except CatalogError as exc:
            problems = [{"place": p.place, "message": p.message} for p in exc.problems]
            count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
            detail = f"The catalog does not load ({count}); nothing changed: " + "; ".join(str(p) for p in exc.problems)
            body = problem_body(400, "urn:gateway:bad-request", "Bad request", detail, problems=problems)
            return JSONResponse(body, status_code=400, media_type="application/problem+json")
        except RedisUnavailable as exc:
            running = self.catalogs.running
            version = running.version if running is not None else "?"
            detail = (f"{exc} Version {version} is in the record and runs on this process; the others run it when "
                      "they next start: publish it again when Redis is back.")  # fmt: skip
            return problem(503, "urn:gateway:unavailable", "Service unavailable", detail)
        return JSONResponse({**published.describe(), "changed": changed}, status_code=201 if changed else 200)

    async def audit_log(self, request: Request) -> Response:
        if self.db is None:
            return problem(503, "urn:gateway:unavailable", "Service unavailable", "No record: the audit log is in it.")
        billable = request.query_params.get("billable") or None
        if billable is not None:
            billable_id(billable, "billable")
        since: datetime | None = None
        if request.query_params.get("since"):
            try:
                since = datetime.fromisoformat(request.query_params["since"])
            except ValueError:
                return bad_request(f"since is an ISO 8601 time (like 2026-11-01T00:00:00Z), not {request.query_params['since']!r}.")
            since = since.replace(tzinfo=UTC) if since.tzinfo is None else since
        return JSONResponse({"entries": await audit.entries(self.db, billable=billable, since=since)})

    # ---- the client's own, and the operator's probes -------------------------------------------------

    async def usage(self, request: Request) -> Response:
        billable = await self.identify(request)
        if billable is None:
            return problem(401, "urn:gateway:unauthorized", "Unauthorized",
                           "A valid API key is required: send Authorization: Bearer <key> or X-Api-Key: <key>.")
        try:
            return JSONResponse(await self.engine.usage(billable))
        except GatewayError as exc:
            return problem(503, "urn:gateway:unavailable", "Service unavailable", str(exc))

    async def health(self, request: Request) -> Response:
        """Liveness for anyone (`{"status"}`); with the admin token, Redis, database, record and outbox state."""
        masters = await self.engine.store.masters_up()
        redis_up = bool(masters) and all(masters.values())
        some_up = any(masters.values())  # a cluster with a master down still decides on the others' slots
        db_up = await self.db.ping() if self.db is not None else None
        record = self.reconciler.health() if self.reconciler is not None else None
        if db_up and record is not None and record["database"] == "down":
            db_up = False  # it answers a ping but has not taken a flush yet
        body: dict[str, Any] = {"status": "ok" if redis_up and db_up is not False else "degraded"}
        code = 200 if some_up else 503
        if self.token_name(request) is None:
            return JSONResponse(body, status_code=code)
        body["redis"] = "up" if redis_up else "degraded" if some_up else "down"
        if self.engine.store.is_cluster:
            body["redis_masters"] = {address: "up" if up else "down" for address, up in sorted(masters.items())}
        body["database"] = "none" if db_up is None else ("up" if db_up else "down")
        if record is not None:
            # Catch-up: billables waiting for the record, and how long the oldest has waited.
            body["record"] = {k: record[k] for k in ("pending", "lag_seconds", "leader")}
        if db_up and self.db is not None:
            try:
                async with asyncio.timeout(2.0):
                    body["events"] = await Outbox(self.db).backlog()
            except Exception as exc:  # noqa: BLE001 - health answers whatever the outbox does
                log.warning("health: could not count the event outbox: %s", exc)
        return JSONResponse(body, status_code=code)

    async def openapi(self, request: Request) -> Response:
        """This router's OpenAPI 3.1 description (gateway/openapi.py)."""
        return JSONResponse(openapi.document(self.router.routes, self.admin_paths, self.catalog))

    async def prometheus(self, request: Request) -> Response:
        tokens = [t for t in (self.metrics_token, *self.tokens.values()) if t]
        if not any(_bearer(request, t) for t in tokens):
            detail = (
                "Metrics need Authorization: Bearer <GATEWAY_METRICS_TOKEN or GATEWAY_ADMIN_TOKEN>."
                if tokens
                else "Metrics are off: set GATEWAY_METRICS_TOKEN (or GATEWAY_ADMIN_TOKEN) and send it as Authorization: Bearer <token>."
            )
            return problem(401, "urn:gateway:unauthorized", "Unauthorized", detail)
        return Response(await self.metrics.scrape(), media_type=CONTENT_TYPE_LATEST)


def _bearer(request: Request, token: str) -> bool:
    """Whether the request carries `Authorization: Bearer <token>` (compared in constant time)."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if hasattr(value, "isoformat"):
        text: str = value.isoformat()
        return text.replace("+00:00", "Z")
    return str(value)
