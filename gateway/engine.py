"""The engine: request + plan + route → one script call → Decision.

Every per-billable key, field and script protocol is gateway.state's; the engine compiles the spec,
resolves the plan, and calls the scripts with the types there (DESIGN §7)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gateway import state
from gateway.catalog import CREDITS, Catalog, Limit, Plan, RateLimit, Route
from gateway.decision import Decision, PolicyState, Violation
from gateway.errors import StateUnavailable
from gateway.periods import Period, calendar_bounds
from gateway.state import EventBatch, Snapshot, Subscription
from gateway.store.redis import RedisStore

log = logging.getLogger("gateway.engine")

PlanSource = Literal["assignment", "subscription", "default"]
ACTIVE_STATUSES = frozenset({"active", "trialing"})
UNMATCHED = "(unmatched)"

# What the record gives back of a billable Redis lost (None: it has nothing, the billable starts new).
Restorer = Callable[[str], Awaitable[state.Restored | None]]
# Replays the grants after a sequence, when a restore found Redis behind the grants the record gave it.
Replayer = Callable[[str, int], Awaitable[None]]


def period_code(period: Period) -> str:
    """How a window is named to the scripts: m, w, d, bc, or s<seconds>."""
    if period.kind == "duration":
        return f"s{period.seconds}"
    return {"month": "m", "week": "w", "day": "d", "billing_cycle": "bc"}[period.kind]


@dataclass(frozen=True, slots=True)
class ResolvedPlan:
    name: str
    source: PlanSource
    version: int
    expires_at: float = float("inf")


@dataclass(frozen=True, slots=True)
class GrantResult:
    status: Literal["applied", "duplicate", "gap"]
    last_sequence: int
    purchased_balance: int


@dataclass(frozen=True, slots=True)
class _Compiled:
    spec: str
    denied: tuple[Violation, ...]
    metered: bool
    rates: tuple[RateLimit, ...]


@dataclass(frozen=True, slots=True)
class Offline:
    """What this process knows of a request without Redis (on_redis_down = "local")."""

    plan: str  # as this process last resolved it; the default plan for a billable it never saw
    denied: tuple[Violation, ...]  # the route's features that plan lacks
    rates: tuple[RateLimit, ...]  # the plan's and the route's rate limits


class Engine:
    def __init__(
        self,
        store: RedisStore,
        catalog: Catalog,
        *,
        prefix: str = "gw",
        restore: Restorer | None = None,
        on_restored: Replayer | None = None,
        hold_ttl: int = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The local clock only picks candidate calendar windows and expires cached plans; Redis TIME decides.
        self.clock = clock
        self.store = store
        self.catalog = catalog
        self.prefix = prefix
        self.restore = restore
        # Called when a restore finds Redis behind the first grant after the snapshot: the record replays
        # every grant after what Redis holds.
        self.on_restored = on_restored
        self.hold_ttl = hold_ttl
        # Billables whose Redis state this process changed since the reconciler last took the set.
        self.touched: set[str] = set()
        self._plans: dict[str, ResolvedPlan] = {}
        self._compiled: dict[tuple[str, int], _Compiled] = {}
        self._status_specs: dict[str, str] = {}
        self._bounds: tuple[float, str] = (0.0, "")
        self._month = ""  # the usage history's period label, YYYY-MM in the catalog's timezone
        self._month_start = 0.0
        self._restoring: dict[str, asyncio.Future[None]] = {}

    # ---- keys -------------------------------------------------------------------------------------

    def keys(self, billable: str) -> state.Keys:
        return state.keys(self.prefix, billable)

    # ---- deciding ---------------------------------------------------------------------------------

    async def decide(
        self, billable: str, route: Route | None, *, credit_cost: int | None = None, dry: bool = False
    ) -> Decision:
        """Decide one request. `route` None is an unmatched request forwarded with the plan's rate limit.

        `credit_cost` prices an operation from the request (units read from the request body or headers).
        `dry` answers the decision the request would get and writes nothing: no events, hold or counters."""
        keys = self.keys(billable)
        resolved = self._cached_plan(billable)
        for _ in range(4):
            plan_name = resolved.name if resolved else self.catalog.settings.default_plan
            compiled = self._compile(plan_name, route)
            hold_id = uuid.uuid4().hex[:16] if compiled.metered and not dry else ""
            args = state.DecideArgs(
                spec=compiled.spec,
                plan_version=resolved.version if resolved else -1,
                calendar=self._calendar(),
                forced_deny=bool(compiled.denied),
                hold_id=hold_id,
                credit_cost=credit_cost,
                restores=self.restore is not None,
                hold_ttl=self.hold_ttl,
                plan=plan_name,
                usage_key=state.usage_key(self._month, route.match if route else UNMATCHED, route.config.spend or "" if route else ""),
                dry=dry,
            )
            reply = state.DecideReply.parse(await self.store.run("decide", keys.all(), args.argv()), hold_id)
            if isinstance(reply, state.Stale):
                resolved = self._resolve(billable, reply.plan_version, reply.assignment, reply.subscription)
                continue
            if isinstance(reply, state.Missing):
                await self.rehydrate(billable)
                continue
            if not dry:
                self.touched.add(billable)
            return self._decision(billable, plan_name, route, compiled, reply)
        raise RuntimeError(f"plan of {billable!r} kept changing during one decision")

    def _cached_plan(self, billable: str) -> ResolvedPlan | None:
        resolved = self._plans.get(billable)
        return None if resolved is None or resolved.expires_at <= self.clock() else resolved

    def _decision(self, billable: str, plan: str, route: Route | None, compiled: _Compiled, reply: state.DecideReply) -> Decision:
        violations = [*compiled.denied, *reply.violations]
        policies = reply.policies
        balance: int | None = None
        recharge = False
        credit = reply.credit
        if credit is not None:
            balance = credit.balance if credit.shown else None
            recharge = credit.recharge
            if route is not None and route.config.spend is not None and credit.allowance >= 0:
                # q: the nominal allowance plus the purchased credits on hand, so r (the balance) is never above it.
                policies.append(PolicyState(CREDITS, "credits", credit.allowance + max(0, credit.purchased), None, balance, None))
        admitted = reply.admitted and not compiled.denied
        return Decision(
            admitted=admitted,
            billable=billable,
            plan=plan,
            route=route,
            violations=violations,
            policies=policies,
            events=state.EventBatch.parse(billable, reply.events).events if reply.events else [],
            credits=balance,
            hold=reply.hold if admitted else None,
            now=reply.now_ms / 1000,
            recharge=recharge,
        )

    def _calendar(self) -> str:
        """Candidate calendar windows for the script, recomputed when the day rolls over."""
        now = self.clock()
        valid_until, text = self._bounds
        if now < valid_until:
            return text
        zone = self.catalog.settings.zone
        bounds = {code: calendar_bounds(kind, now, zone) for code, kind in (("m", "month"), ("w", "week"), ("d", "day"))}
        text = json.dumps(bounds, separators=(",", ":"))
        self._bounds = (min(b[2] for b in bounds.values()), text)
        start = datetime.fromtimestamp(bounds["m"][1], zone)
        self._month = f"{start.year:04d}-{start.month:02d}"
        self._month_start = bounds["m"][1]
        return text

    # ---- usage counters of past months ----------------------------------------------------------------

    def past_usage(self, saved: dict[str, str]) -> dict[str, str]:
        """The usage counters (`qr:`/`qu:`/`qc:`) of months over long enough that no hold can change them.

        Once the record has them, Redis need not keep them: a billable's hash would otherwise grow by a
        few fields a month for as long as it lives."""
        self._calendar()
        if self.clock() < self._month_start + 2 * self.hold_ttl:
            return {}
        return state.past_counters(saved, self._month)

    async def forget_usage(self, billable: str, counters: dict[str, str]) -> int:
        """Drop these counters (as `past_usage` found them, and now in the record) unless they changed since."""
        if not counters:
            return 0
        forgotten = int(await self.store.run("forget", self.keys(billable).only_state(), [x for kv in counters.items() for x in kv]))
        if forgotten:
            self.touched.add(billable)
        return forgotten

    def offline(self, billable: str, route: Route | None) -> Offline:
        """The plan, features and rate limits of a request as far as they are known without Redis."""
        resolved = self._plans.get(billable)
        if resolved is None or resolved.expires_at <= self.clock():
            plan = self.catalog.settings.default_plan
        else:
            plan = resolved.name
        compiled = self._compile(plan, route)
        return Offline(plan, compiled.denied, compiled.rates)

    def _compile(self, plan_name: str, route: Route | None) -> _Compiled:
        key = (plan_name, route.index if route else -1)
        found = self._compiled.get(key)
        if found is None:
            found = self._compiled[key] = self._build(self.catalog.plans[plan_name], route)
        return found

    def _build(self, plan: Plan, route: Route | None) -> _Compiled:
        """Everything the script needs for this plan and route, encoded once."""
        denied: list[Violation] = []
        rates = [r for r in (plan.rate, route.rate if route else None) if r is not None]
        limits: list[state.LimitSpec] = []
        metered = False
        cost = 0
        if route is not None:
            config = route.config
            denied += [Violation(f, "feature") for f in config.features if not plan.allows_feature(f)]
            if config.limit is not None:
                limit = plan.limits.get(config.limit)
                unlimited = plan.is_unlimited(config.limit)
                if limit is None and not unlimited:
                    denied.append(Violation(config.limit, "feature"))
                else:
                    limits.append(_limit_spec(config.limit, limit or self.catalog.limit_kinds[config.limit], config.cost, unlimited))
            if config.spend is not None:
                operation = self.catalog.operations[config.spend]
                metered = operation.metered
                cost = operation.hold if operation.per_unit is not None else (operation.cost or 0)
        spec = state.Spec(
            rates=tuple(state.RateSpec(r.name, r.per_seconds * 1000 / r.limit, r.burst, r.window) for r in rates),
            limits=tuple(limits),
            credits=state.CreditSpec(
                allowance=-1 if plan.is_unlimited(CREDITS) else (plan.credits or 0),
                period=period_code(plan.credit_period),
                rollover=plan.rollover,
                cost=cost,
                shown=route is not None and route.config.spend is not None,
            ),
            recharges_per_month=self.catalog.settings.auto_recharge_max_per_month,
        )
        return _Compiled(spec.encode(), tuple(denied), metered, tuple(rates))

    # ---- after the upstream answered ----------------------------------------------------------------

    async def settle(
        self, decision: Decision, *, give_back_limits: bool, credits_owed: int | None, units: float | None = None
    ) -> int | None:
        """Keep or give back what the decision held; settle a reserve to what is owed. Returns the balance.

        `units` are what a metered answer reported, counted in the usage history."""
        if decision.hold is None or decision.billable is None:
            return None
        self.touched.add(decision.billable)
        args = state.SettleArgs(
            hold=decision.hold,
            give_back_limits=give_back_limits,
            credits_owed=credits_owed,
            plan=decision.plan or "",
            units=None if units is None else math.ceil(units),
            restores=self.restore is not None,
        )
        return state.SettleReply.parse(await self.store.run("settle", self.keys(decision.billable).all(), args.argv())).balance

    async def release(self, billable: str, plan_name: str, limit: str, units: int = 1) -> None:
        """Give back `units` of a persistent cap (a delete the upstream confirmed), never below 0."""
        plan = self.catalog.plans[plan_name]
        cap = plan.limits.get(limit)
        self.touched.add(billable)
        args = state.ReleaseArgs(limit, units, None if cap is None else cap.to, plan_name, self.restore is not None)
        for _ in range(2):
            reply = state.SettleReply.parse(await self.store.run("settle", self.keys(billable).all(), args.argv()))
            if reply.status != "missing":
                return
            await self.rehydrate(billable)

    # ---- plans --------------------------------------------------------------------------------------

    def _resolve(self, billable: str, version: int, assignment: str | None, sub: Subscription | None) -> ResolvedPlan:
        """Manual assignment → active subscription (past_due within the grace) → default plan."""
        plans = self.catalog.plans
        resolved = ResolvedPlan(self.catalog.settings.default_plan, "default", version)
        if assignment and assignment in plans:
            resolved = ResolvedPlan(assignment, "assignment", version)
        elif sub is not None:
            if sub.plan in plans:
                if sub.status in ACTIVE_STATUSES:
                    resolved = ResolvedPlan(sub.plan, "subscription", version)
                elif sub.status == "past_due" and sub.past_due_since is not None:
                    ends = sub.past_due_since + self.catalog.settings.past_due_grace_seconds
                    if self.clock() < ends:
                        resolved = ResolvedPlan(sub.plan, "subscription", version, expires_at=ends)
            else:
                log.warning("billable %r subscribes to plan %r, which plans.toml lacks; using the default", billable, sub.plan)
        elif assignment:
            log.warning("billable %r is assigned plan %r, which plans.toml lacks; using the default", billable, assignment)
        self._plans[billable] = resolved
        return resolved

    async def plan_of(self, billable: str) -> ResolvedPlan:
        """The billable's plan now (read from Redis, then cached like a decision would)."""
        snap = await self.snapshot(billable)
        return self._resolve(billable, snap.plan_version, snap.assignment, snap.subscription)

    async def _update(self, billable: str, *args: str | int) -> None:
        self.touched.add(billable)
        await self.store.run("update", self.keys(billable).only_state(), list(args))
        self._plans.pop(billable, None)

    async def set_assignment(self, billable: str, plan: str | None) -> None:
        if plan is not None and plan not in self.catalog.plans:
            raise ValueError(f'unknown plan "{plan}": plans.toml has {", ".join(self.catalog.plans)}')
        await self._update(billable, "assign", plan or "")

    async def set_subscription(self, billable: str, subscription: Subscription | None) -> None:
        await self._update(billable, "subscription", subscription.to_json() if subscription else "")

    async def set_billing_period(self, billable: str, period: tuple[float, float] | None) -> None:
        if period is None:
            await self._update(billable, "period", "")
        else:
            await self._update(billable, "period", state.ms(period[0]), state.ms(period[1]))

    async def set_count(self, billable: str, limit: str, usage: int) -> None:
        kind = self.catalog.limit_kinds.get(limit)
        if kind is None or kind.per is not None:
            raise ValueError(f'"{limit}" is not a persistent cap in plans.toml')
        if usage < 0:
            raise ValueError("usage cannot be negative")
        await self._update(billable, "count", limit, usage)

    async def set_auto_recharge(
        self, billable: str, *, enabled: bool, threshold: int | None, amount_cents: int | None = None
    ) -> None:
        """Auto-recharge settings; the threshold is also where credits_low fires."""
        await self._update(
            billable,
            "recharge",
            "1" if enabled else "0",
            "" if threshold is None else threshold,
            "" if amount_cents is None else amount_cents,
        )

    async def end_recharge(self, billable: str) -> None:
        await self._update(billable, "recharge_done")

    async def apply_grant(self, billable: str, sequence: int, amount: int) -> GrantResult:
        """Apply grant number `sequence` once, strictly in order (money first: the record has it already)."""
        self.touched.add(billable)
        for _ in range(2):
            status, last, balance = await self.store.run("grant", self.keys(billable).only_state(), [sequence, amount, "1" if self.restore else "0"])
            if status != "missing":
                return GrantResult(status, int(last), int(balance))
            await self.rehydrate(billable)
        raise RuntimeError(f"state of {billable!r} vanished twice while applying a grant")

    # ---- state for the record -----------------------------------------------------------------------

    async def snapshot(self, billable: str) -> Snapshot:
        return (await self.snapshots([billable]))[0]

    async def snapshots(self, billables: Sequence[str]) -> list[Snapshot]:
        """Each billable's whole state, read at once (on a single server, in one write)."""
        replies = await self.store.run_many("snapshot", [(self.keys(b).all(), ()) for b in billables])
        return [Snapshot.parse(reply) for reply in replies]

    async def restore_state(self, billable: str, restored: state.Restored) -> state.RestoreReply:
        """Put back state saved from a snapshot and apply the grants after it, in one script: whatever Redis
        holds already is live and wins, and each grant is applied once, in order."""
        reply = state.RestoreReply.parse(await self.store.run("restore", self.keys(billable).only_state(), restored.argv()))
        self._plans.pop(billable, None)
        return reply

    async def rehydrate(self, billable: str) -> None:
        """Restore a billable whose state Redis lost, from the record (or as new when it has none; while the
        record is down, `restore` decides whether it is new or raises: see gateway.census).

        Concurrent first requests in this process share one restore; across processes the restore
        script is idempotent, so the first to land wins."""
        running = self._restoring.get(billable)
        if running is None:
            running = self._restoring[billable] = asyncio.ensure_future(self._rehydrate(billable))
            running.add_done_callback(lambda _: self._restoring.pop(billable, None))
        await asyncio.shield(running)

    async def _rehydrate(self, billable: str) -> None:
        assert self.restore is not None
        try:
            restored = await self.restore(billable)
        except Exception as exc:
            raise StateUnavailable(f"the state of {billable!r} is not in Redis and the record cannot restore it: {exc}") from exc
        reply = await self.restore_state(billable, restored or state.Restored())
        if reply.gap and self.on_restored is not None:
            # Another process restored an older snapshot first: replay from what Redis holds.
            await self.on_restored(billable, reply.last_sequence)

    async def pending_events(self, billable: str, limit: int = 1000) -> list[dict[str, Any]]:
        return (await self.read_events(billable, limit)).events

    async def read_events(self, billable: str, limit: int = 1000) -> EventBatch:
        return EventBatch.parse(billable, await self.store.read_list(self.keys(billable).events, limit))

    async def ack_events(self, billable: str, count: int, *, through: tuple[int, int] | None = None) -> None:
        """Drop the `count` oldest pending events once the record holds them.

        With `through` (an EventBatch's mark) only those at or before it go: another process may have
        taken the same batch and acked it already, and the events after it are not in the record yet."""
        if count <= 0:
            return
        if through is None:
            await self.store.trim_list(self.keys(billable).events, count)
        else:
            await self.store.run("ack", self.keys(billable).only_events(), [count, through[0], through[1]])

    async def billables(self) -> AsyncIterator[str]:
        """Every billable whose state Redis holds (on a cluster, from every primary), for the record's sweep."""
        async for key in self.store.scan(state.pattern(self.prefix)):
            yield state.billable_of(self.prefix, key)

    async def change_counters(self, billables: list[str]) -> list[int | None]:
        """Each billable's change counter (None: no state in Redis), in one pipelined round trip."""
        values = await self.store.fields([self.keys(b).state for b in billables], state.CHANGE_FIELD)
        return [None if v is None else int(v) for v in values]

    async def expire_holds(self, billables: list[str]) -> list[str]:
        """Drop the holds past their lifetime (kept as charged: their settle never came) of the billables whose
        oldest hold is due; answers those billables. Two pipelined round trips, the second only when one is due."""
        due_at = await self.store.fields([self.keys(b).state for b in billables], state.HOLD_EXPIRY_FIELD)
        now_ms = self.clock() * 1000
        due = [b for b, at in zip(billables, due_at, strict=True) if at is not None and float(at) <= now_ms]
        if due:
            await self.store.run_many("expire", [([self.keys(b).state, self.keys(b).holds], ()) for b in due])
            self.touched.update(due)
        return due

    async def status(self, billable: str) -> dict[str, Any]:
        """The status body of DESIGN §3, evaluated by status.lua with decide.lua's rules (of the restored
        state, when Redis lost it: else it would show a fresh quota the next request will not give)."""
        keys = self.keys(billable).all()
        resolved = self._cached_plan(billable)
        for _ in range(4):
            plan_name = resolved.name if resolved else self.catalog.settings.default_plan
            args = state.StatusArgs(self._status_spec(plan_name), resolved.version if resolved else -1, self._calendar(),
                                    self.restore is not None)  # fmt: skip
            reply = state.StatusReply.parse(await self.store.run("status", keys, args.argv()))
            if isinstance(reply, state.Stale):
                resolved = self._resolve(billable, reply.plan_version, reply.assignment, reply.subscription)
            elif isinstance(reply, state.Missing):
                await self.rehydrate(billable)
            else:
                assert resolved is not None  # without a plan version the script answers stale
                return status_body(self.catalog, billable, resolved, reply)
        raise RuntimeError(f"plan of {billable!r} kept changing during one status read")

    def _status_spec(self, plan_name: str) -> str:
        found = self._status_specs.get(plan_name)
        if found is None:
            found = self._status_specs[plan_name] = _status_spec(self.catalog, self.catalog.plans[plan_name]).encode()
        return found


def _limit_spec(name: str, limit: Limit, cost: int, unlimited: bool) -> state.LimitSpec:
    period = limit.period
    return state.LimitSpec(
        name=name,
        to=-1 if unlimited else limit.to,
        cost=cost,
        period=period_code(period) if period else "",
        after=limit.after_limit,
        grace_ms=limit.grace_seconds * 1000,
        grace_max=-1 if limit.grace_max is None else limit.grace_max,
        warn_at=tuple(limit.warn_at),
        window=period.nominal_seconds if period is not None else None,
    )


def _status_spec(catalog: Catalog, plan: Plan) -> state.StatusSpec:
    limits = []
    for name in [*plan.limits, *(n for n in plan.unlimited if n != CREDITS and n not in plan.limits)]:
        limit = plan.limits.get(name) or catalog.limit_kinds[name]
        limits.append(
            state.StatusLimit(
                name=name,
                to=-1 if plan.is_unlimited(name) else limit.to,
                period=period_code(limit.period) if limit.period is not None else "",
                after=limit.after_limit,
                grace_ms=limit.grace_seconds * 1000,
            )
        )
    rates = _rates(catalog, plan)
    return state.StatusSpec(
        limits=tuple(limits),
        rates=tuple((r.name, r.per_seconds * 1000 / r.limit, r.burst) for r in rates),
        credit_allowance=-1 if plan.is_unlimited(CREDITS) else (plan.credits or 0),
        credit_period=period_code(plan.credit_period),
        rollover=plan.rollover,
    )


def _rates(catalog: Catalog, plan: Plan) -> list[RateLimit]:
    """The rate limits a status shows: the plan's and every route's."""
    return [r for r in [plan.rate, *(route.rate for route in catalog.routes)] if r is not None]


def status_body(catalog: Catalog, billable: str, resolved: ResolvedPlan, reply: state.StatusReply) -> dict[str, Any]:
    """The body of what status.lua evaluated: only presentation here, every rule is the script's."""
    plan = catalog.plans[resolved.name]
    limits: dict[str, Any] = {}
    for found in reply.limits:
        limit = plan.limits.get(found.name) or catalog.limit_kinds[found.name]
        to = None if plan.is_unlimited(found.name) else limit.to
        usage, window = found.usage, found.window_ms
        limits[found.name] = {
            "usage": usage,
            "limit": to,
            "remaining": None if to is None else max(0, to - usage),
            "percent_used": None if not to else round(100 * usage / to, 2),
            "grace_active": found.grace_active,
            "grace_ends_at": state.iso(found.grace_ends_ms / 1000) if found.grace_ends_ms is not None else None,
            "blocked": found.blocked,
            "per": limit.per,
            "window_start": state.iso(window[0] / 1000) if window else None,
            "window_end": state.iso(window[1] / 1000) if window else None,
            "after_limit": limit.after_limit,
        }
    rates = {
        found.name: {"limit": rate.burst, "remaining": found.remaining, "reset": state.iso(found.reset_ms / 1000)}
        for rate, found in zip(_rates(catalog, plan), reply.rates, strict=True)
    }
    left = reply.period_left
    return {
        "billable": billable,
        "plan": resolved.name,
        "plan_source": resolved.source,
        "features": sorted(plan.allows),
        "limits": limits,
        "credits": {
            "balance": None if left is None else left + reply.purchased - reply.debt,
            "period": left,
            "purchased": reply.purchased,
            "held": reply.held,
            "debt": reply.debt,
        },
        "rate_limits": rates,
    }
