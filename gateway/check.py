"""The decision as data, for apps in any language: may this billable do this now, and (consuming) a hold
that any gateway process on the same Redis settles later, exactly as the proxy settles a request.

    checker = Checker(engine)
    result = await checker.check("org_1", route="POST /v1/images")            # dry: writes nothing
    result = await checker.check("org_1", limit="projects", by=1, consume=True)
    await checker.settle(result.hold, outcome="success")                        # kept (or "failure": given back)

A question names a route (`"POST /v1/images"`, decided as the proxy decides that request), or one part
of the plan alone: a `feature`, a `limit` with `by` units, an `operation` with `units` (these ask about
the plan's terms, so the plan's rate limit is not applied to them).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, NotRequired, cast

from typing_extensions import TypedDict

from gateway import idempotency
from gateway.bounds import MAX_INT, whole
from gateway.catalog import Catalog, Operation, Route, RouteConfig, _nearest
from gateway.decision import Decision
from gateway.engine import UNMATCHED, Engine
from gateway.errors import BadRequest
from gateway.ids import billable as billable_id
from gateway.paths import BadPath, canonical, encoded
from gateway.problems import Problem
from gateway.settlement import Outcome as Fate
from gateway.settlement import Settle, releases, settlement

Outcome = Literal["success", "failure"]

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# A hold id: the holds hash's field, then (newer ones) a tag naming what it was taken for, ".", the billable.
_FIELD, _TAG = "[0-9a-f]{16}", "[0-9a-f]{12}"
HOLD_ID = f"{_FIELD}(?:{_TAG})?"  # what comes before the "."
_HOLD = re.compile(f"({_FIELD})({_TAG})?\\.(.+)", re.DOTALL)
_KINDS = ("route", "feature", "limit", "operation")


class CheckAnswer(TypedDict):
    """The body of `POST /_gateway/check` (its OpenAPI schema too)."""

    allowed: bool
    status: int
    violated_policies: list[str]
    problem: Problem | None
    remaining: dict[str, int | None]
    hold: NotRequired[str]


class SettleAnswer(TypedDict):
    """The body of `POST /_gateway/settle` (its OpenAPI schema too)."""

    hold: str
    outcome: Outcome
    billable: str
    settled: bool
    balance: int | None


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's answer: the body of `POST /_gateway/check`, and the headers the proxy would send."""

    allowed: bool
    status: int
    violated_policies: list[str]
    problem: dict[str, Any] | None
    remaining: dict[str, int | None]
    hold: str | None = None  # a consuming check's hold, for `settle`
    headers: list[tuple[bytes, bytes]] = field(default_factory=list, repr=False)
    replayed: bool = False  # the first answer of its Idempotency-Key, given again

    def kept(self) -> dict[str, Any]:
        """What an idempotency record keeps of it (its body and headers), to answer a retry."""
        return {"body": self.body(), "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers]}

    @classmethod
    def again(cls, kept: dict[str, Any]) -> CheckResult:
        body = kept["body"]
        return cls(body["allowed"], body["status"], body["violated_policies"], body["problem"], body["remaining"], body.get("hold"),
                   [(k.encode("latin-1"), v.encode("latin-1")) for k, v in kept["headers"]], replayed=True)  # fmt: skip

    def body(self) -> CheckAnswer:
        out: CheckAnswer = {
            "allowed": self.allowed,
            "status": self.status,
            "violated_policies": self.violated_policies,
            "problem": cast(Problem | None, self.problem),
            "remaining": self.remaining,
        }
        if self.hold is not None:
            out["hold"] = self.hold
        return out


@dataclass(frozen=True, slots=True)
class SettleResult:
    """What a settle did: `balance` is the credit balance after it (None when the billable has none)."""

    hold: str
    outcome: Outcome
    billable: str
    balance: int | None
    replayed: bool = False  # the first answer of its Idempotency-Key, given again

    def body(self) -> SettleAnswer:
        return {"hold": self.hold, "outcome": self.outcome, "billable": self.billable, "settled": True, "balance": self.balance}

    @classmethod
    def again(cls, body: dict[str, Any]) -> SettleResult:
        return cls(body["hold"], body["outcome"], body["billable"], body["balance"], replayed=True)


class HoldNotOpen(LookupError):
    """The hold was settled already, or outlived GATEWAY_HOLD_TTL (then it was kept as charged)."""


@dataclass(frozen=True, slots=True)
class _Taken:
    """What a hold was taken for, as settling needs it: "<route>|<operation>" (its usage key's end)."""

    settled_as: str
    route: Route | None
    operation: Operation | None


def _tag(settled_as: str) -> str:
    return hashlib.sha256(settled_as.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class _Question:
    route: Route | None
    public: bool = False
    credit_cost: int | None = None


def hold_billable(hold: str) -> str:
    """The billable a hold id belongs to; BadRequest when it is no hold id."""
    found = _HOLD.fullmatch(hold) if isinstance(hold, str) else None
    if found is None:
        raise BadRequest('hold must be the "hold" a consuming check answered (hex digits, ".", the billable).')
    return billable_id(found[3], "the billable in hold")


class Checker:
    """`check` and `settle` over an engine; keeps nothing between calls (every hold lives in Redis)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._routes: dict[tuple[str, str], Route] = {}  # a check's own routes: one per feature, limit, operation
        self._taken: tuple[Catalog | None, dict[str, _Taken]] = (None, {})  # by tag, for the running catalog

    @property
    def catalog(self) -> Catalog:
        return self.engine.catalog  # the one running now (a published catalog replaces it between requests)

    async def check(
        self,
        billable: str,
        *,
        route: str | None = None,
        feature: str | None = None,
        limit: str | None = None,
        by: int | None = None,
        operation: str | None = None,
        units: float | None = None,
        consume: bool = False,
        idempotency_key: str | None = None,
    ) -> CheckResult:
        """The decision the proxy would make; with `consume` also taken, as the proxy admits, under a hold.

        A consuming check with an `idempotency_key` used before (24 h) answers what that one answered and
        takes nothing (KeyReused when it asked something else, StillAnswering when it has not answered)."""
        billable = billable_id(billable, "billable")
        question = self._question(route=route, feature=feature, limit=limit, by=by, operation=operation, units=units)
        if question.public:
            return CheckResult(True, 200, [], None, {})
        request = None
        if consume and idempotency_key is not None:
            asked = {"route": route, "feature": feature, "limit": limit, "by": by, "operation": operation, "units": units}
            # Under the state the decision is kept in (a member's org's): one slot for the script on a cluster.
            root = await self.engine.root_of(billable)
            request = idempotency.once(self.engine.keys(root).state, "check", idempotency_key, asked)
        try:
            decision = await self.engine.decide(billable, question.route, credit_cost=question.credit_cost, hold=consume, dry=not consume,
                                                once=request)  # fmt: skip
        except idempotency.Decided as seen:
            assert request is not None
            kept = idempotency.answer_of(request, seen.record) or await idempotency.wait_for_answer(request, partial(self.engine.once_read, request))
            if kept is None:
                raise idempotency.still_answering(request) from None
            return CheckResult.again(kept)
        hold = decision.hold.id if consume and decision.admitted and decision.hold else None
        result = CheckResult(
            allowed=decision.admitted,
            status=decision.status,
            violated_policies=[n for n in decision.violated_policies if n],
            problem=None if decision.admitted else decision.problem(self.catalog),
            remaining={p.name: None if p.remaining is None else max(0, p.remaining) for p in decision.policies},
            hold=f"{hold}{_tag(_settled_as(question.route))}.{billable}" if hold else None,
            headers=decision.headers(),
        )
        if request is not None:
            await self.engine.once_answer(request, idempotency.record(request, result.kept(), hold or ""))
        return result

    async def settle(self, hold: str, *, outcome: Outcome, units: float | None = None, idempotency_key: str | None = None) -> SettleResult:
        """`settle_once` with an `idempotency_key`: a retry within 24 h answers the first settle's answer
        (KeyReused when it settled something else); without one, a second settle is HoldNotOpen."""
        if idempotency_key is None:
            return await self.settle_once(hold, outcome=outcome, units=units)
        billable = await self.engine.root_of(hold_billable(hold))  # the record in the state the hold is in
        request = idempotency.once(self.engine.keys(billable).state, "settle", idempotency_key,
                                   {"hold": hold, "outcome": outcome, "units": units})  # fmt: skip
        raw = await self.engine.once_read(request)
        kept = None if raw is None else idempotency.answer_of(request, raw)
        if kept is not None:
            return SettleResult.again(kept)
        try:
            result = await self.settle_once(hold, outcome=outcome, units=units)
        except HoldNotOpen:
            # Settled already: by this key's first request (racing this one, its answer soon there) or not.
            kept = await idempotency.wait_for_answer(request, partial(self.engine.once_read, request))
            if kept is None:
                raise
            return SettleResult.again(kept)
        await self.engine.once_put(request, idempotency.record(request, dict(result.body())))
        return result

    async def settle_once(self, hold: str, *, outcome: Outcome, units: float | None = None) -> SettleResult:
        """Settle a consuming check's hold as the proxy settles a complete answer: `success` a 2xx (a metered
        operation charged for `units`, at most its max_units, else its whole reserve), `failure` a non-2xx
        (limits and credits given back, unless `units` were reported: those are charged). HoldNotOpen when
        it was settled before or outlived its lifetime."""
        billable, members = await self.engine.levels_of(hold_billable(hold))
        if outcome not in ("success", "failure"):
            raise BadRequest('outcome must be "success" (the answer was a 2xx) or "failure" (it was not).')
        if units is not None and not (0 <= units <= MAX_INT):
            raise BadRequest(f"units must be a number from 0 to {MAX_INT}.")
        taken = self._taken_for(hold)
        if taken is None:  # an older hold id, or its route left the catalog: read what it was taken for
            return await self._settle_read(hold, billable, outcome, units)
        todo = _settle(outcome, units, taken.operation)
        release = taken.route.config.release if taken.route is not None else None
        reply = await self.engine.close(
            billable, hold[:16], taken.settled_as, give_back_limits=todo.give_back_limits, credits_owed=todo.credits_owed,
            units=todo.units, release=release if release is not None and releases(Fate.COMPLETE, _answered(outcome), True) else None,
            members=members,
        )  # fmt: skip
        if reply.status == "read":  # held at other member levels (the chain changed since): read, then settle
            return await self._settle_read(hold, billable, outcome, units)
        if reply.status == "mismatch":
            raise BadRequest(f"hold: {hold} was not answered by a check (its tag names another route): send the hold as the check answered it.")
        if reply.status == "missing":
            raise HoldNotOpen(f"Hold {hold} is not open: Redis lost it (it is kept as charged).")
        if reply.status != "ok":
            raise HoldNotOpen(f"Hold {hold} is not open: it was settled already, or outlived GATEWAY_HOLD_TTL (then it was kept as charged).")
        return SettleResult(hold, outcome, billable, reply.balance)

    async def _settle_read(self, hold: str, billable: str, outcome: Outcome, units: float | None) -> SettleResult:
        """`settle` of a hold whose tag this catalog cannot name: read it, settle it, release (three calls)."""
        held = await self.engine.held(billable, hold[:16])
        if held is None:
            raise HoldNotOpen(f"Hold {hold} is not open: it was settled already, or outlived GATEWAY_HOLD_TTL (then it was kept as charged).")
        plan, stored = held
        route = self._settled_route(stored.route)
        decision = Decision(True, billable, plan, route, hold=stored.hold)
        todo = _settle(outcome, units, self.catalog.operations.get(stored.operation or ""))
        reply = await self.engine.settle_hold(decision, give_back_limits=todo.give_back_limits, credits_owed=todo.credits_owed,
                                              units=todo.units)  # fmt: skip
        release = route.config.release if route is not None else None
        if reply.status == "ok" and release is not None and releases(Fate.COMPLETE, _answered(outcome), True):
            await self.engine.release(billable, plan, release, members=stored.hold.member_ids)
        if reply.status == "missing":
            raise HoldNotOpen(f"Hold {hold} is not open: Redis lost it (it is kept as charged).")
        if reply.status != "ok":  # another settle of the same hold came first
            raise HoldNotOpen(f"Hold {hold} is not open: it was settled already.")
        balance = reply.balance
        if balance is None:  # nothing to settle in credits: the settle script did not count the balance
            balance = (await self.engine.status(billable))["credits"]["balance"]
        return SettleResult(hold, outcome, billable, balance)

    # ---- the question -------------------------------------------------------------------------------

    def _question(
        self,
        *,
        route: str | None,
        feature: str | None,
        limit: str | None,
        by: int | None,
        operation: str | None,
        units: float | None,
    ) -> _Question:
        given = [k for k, v in (("route", route), ("feature", feature), ("limit", limit), ("operation", operation)) if v is not None]
        if len(given) != 1:
            named = f"not {' and '.join(given)}" if given else "none was given"
            raise BadRequest(f"Name one of route, feature, limit or operation ({named}).")
        if units is not None and (isinstance(units, bool) or not isinstance(units, int | float) or not 0 <= units <= MAX_INT):
            raise BadRequest(f"units must be a number from 0 to {MAX_INT}.")
        cost = 1 if by is None else whole(by, "by", low=0)  # checked whatever is asked, used by a limit's
        if route is not None:
            return self._route_question(route, units)
        if feature is not None:
            return _Question(self._own("feature", _known(feature, "feature", self.catalog.feature_names)))
        if limit is not None:
            name = _known(limit, "limit", self.catalog.limit_kinds)
            return _Question(self._own("limit", name, cost))
        assert operation is not None
        name = _known(operation, "operation", self.catalog.operations)
        spend = self.catalog.operations[name]
        if units is None and spend.units_source is not None and not spend.metered:
            raise BadRequest(f"units: the operation {name} is priced from the request ({spend.units}): send units.")
        return _Question(self._own("operation", name), credit_cost=_price(spend, units))

    def _route_question(self, text: str, units: float | None) -> _Question:
        method, _, path = text.strip().partition(" ")
        method, path = method.upper(), path.strip()
        if method not in METHODS or not path.startswith("/"):
            raise BadRequest(f'route must be "METHOD /path" like "POST /v1/images" (METHOD one of {", ".join(METHODS)}), not {text[:80]!r}.')
        try:
            found = canonical(encoded(path.partition("?")[0]))
        except BadPath as exc:
            raise BadRequest(f"route: {exc.detail}") from None
        if found is not None:
            path = found[1]
        matched = self.catalog.route_for(method, path)
        if matched is None and self.catalog.settings.unmatched == "deny":
            matches = [r.match for r in self.catalog.routes]
            near = _nearest(f"{method} {path}", matches)
            hint = f' Did you mean "{near}"?' if near else f" The routes are: {', '.join(matches)}."
            raise BadRequest(f'route: no route matches {method} {path} (unmatched = "deny" answers it 404).{hint}')
        if matched is not None and matched.config.public:
            return _Question(matched, public=True)
        spend = self.catalog.operations[matched.config.spend] if matched is not None and matched.config.spend else None
        cost: int | None = None
        if spend is not None and spend.units_source is not None and not spend.metered:
            if units is None:
                raise BadRequest(f"units: {matched.match if matched else text} is priced from the request ({spend.units}): send units.")
            cost = _price(spend, units)
        elif spend is not None and spend.metered and units is not None:
            cost = _price(spend, units)  # held for these units instead of the reserve
        return _Question(matched, credit_cost=cost)

    def _own(self, kind: str, name: str, cost: int = 1) -> Route:
        """A check's own route for one feature, limit or operation (negative index: see Engine._compile)."""
        if kind == "limit":
            config = RouteConfig.model_construct(match=f"CHECK limit:{name}", limit=name, cost=cost)
            return Route(index=-2, config=config, method="CHECK", pattern=_NEVER, rate=None)
        key = (kind, name)
        found = self._routes.get(key)
        if found is None:
            if kind == "feature":
                config = RouteConfig.model_construct(match=f"CHECK feature:{name}", features=(name,))
            else:
                config = RouteConfig.model_construct(match=f"CHECK operation:{name}", spend=name)
            found = self._routes[key] = Route(index=-2, config=config, method="CHECK", pattern=_NEVER, rate=None)
        return found

    def _taken_for(self, hold: str) -> _Taken | None:
        """What a hold id's tag names in the running catalog (None: no tag, or nothing of this catalog)."""
        found = _HOLD.fullmatch(hold)
        if found is None or found[2] is None:
            return None
        catalog, by_tag = self._taken
        if catalog is not self.catalog:
            catalog = self.catalog
            routes: list[Route | None] = [None, *catalog.routes]
            routes += [self._own("feature", name) for name in catalog.feature_names]
            routes += [self._own("limit", name) for name in catalog.limit_kinds]
            routes += [self._own("operation", name) for name in catalog.operations]
            by_tag = {}
            for route in routes:
                settled_as = _settled_as(route)
                spend = route.config.spend if route is not None else None
                by_tag[_tag(settled_as)] = _Taken(settled_as, route, catalog.operations.get(spend) if spend else None)
            self._taken = (catalog, by_tag)
        return by_tag.get(found[2])

    def _settled_route(self, match: str) -> Route | None:
        """The route a hold was decided for, as far as settling needs it (a release; the operation is the hold's)."""
        for route in self.catalog.routes:
            if route.match == match:
                return route
        return None


_NEVER = re.compile(r"(?!)")  # a check's own routes match no request


def _settled_as(route: Route | None) -> str:
    """What a hold's usage key ends with (gateway.state.usage_key): the route's match and its operation."""
    return f"{route.match}|{route.config.spend or ''}" if route is not None else f"{UNMATCHED}|"


def _answered(outcome: Outcome) -> int:
    return 200 if outcome == "success" else 500


def _settle(outcome: Outcome, units: float | None, operation: Operation | None) -> Settle:
    """A whole answer's settle through the proxy's own rules (gateway/settlement.py): a 2xx or not."""
    todo = settlement(Fate.COMPLETE, _answered(outcome), units, operation if operation is not None and operation.metered else None)
    return todo if todo is not None else Settle(give_back_limits=False, credits_owed=None)  # kept: only closes the hold


def _known(name: Any, kind: str, known: Mapping[str, Any] | frozenset[str]) -> str:
    if not isinstance(name, str) or name not in known:
        near = _nearest(name, known) if isinstance(name, str) else None
        hint = f' Did you mean "{near}"?' if near else f" plans.toml has {', '.join(sorted(known)) or 'none'}."
        raise BadRequest(f"{kind}: unknown {kind} {str(name)[:80]!r}.{hint}")
    return name


def _price(operation: Operation, units: float | None) -> int | None:
    """The credits `units` of an operation cost (a fixed-cost operation: `units` requests), None for its own."""
    if units is None:
        return None
    cost = operation.price(units) if operation.per_unit is not None else (operation.cost or 0) * math.ceil(units)
    if cost > MAX_INT:
        raise BadRequest(f"units: {units:g} units would cost more than {MAX_INT} credits.")
    return cost


__all__ = ["HOLD_ID", "CheckAnswer", "CheckResult", "Checker", "HoldNotOpen", "Outcome", "SettleAnswer", "SettleResult", "hold_billable"]
