"""The engine: request + plan + route → one script call → Decision.

It owns every per-billable Redis key and every script (DESIGN §7). One billable's state lives under
one hash tag, `<prefix>:{<billable>}`:

    <prefix>:{b}        hash: plan version `pv`, assignment `asg`, subscription `sub`, billing period
                        `bp_s`/`bp_e` (ms), rate cells `r:<policy>` (GCRA TAT, ms), limit usage `u:<limit>`,
                        window `w:<limit>`, grace start `g:<limit>`, block sent `b:<limit>`, warned `t:<limit>`,
                        credits (`c:w` period start, `c:s` spent of the allowance, `c:p` purchased, `c:d` debt,
                        `c:seq` last grant applied, `c:thr` low threshold), auto-recharge (`ar:*`),
                        event sequence `eseq`, change counter `chg`, `hyd` (state present)
    <prefix>:{b}:ev     list: pending events, oldest first, until the record takes them
    <prefix>:{b}:holds  hash: metered holds awaiting their settle
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote, unquote

from gateway.catalog import CREDITS, Catalog, Limit, Plan, RateLimit, Route
from gateway.decision import Decision, PolicyState, Violation
from gateway.envelope import script_event
from gateway.errors import StateUnavailable
from gateway.periods import Period, calendar_bounds, window_at
from gateway.store.redis import RedisStore
from gateway.usage import counter_period

log = logging.getLogger("gateway.engine")

PlanSource = Literal["assignment", "subscription", "default"]
ACTIVE_STATUSES = frozenset({"active", "trialing"})
_AFTER = {"block_usage": "b", "just_warn": "w", "grace_then_block": "g"}
UNMATCHED = "(unmatched)"

Restorer = Callable[[str], Awaitable[dict[str, str] | None]]


def period_code(period: Period) -> str:
    """How a window is named to the scripts: m, w, d, bc, or s<seconds>."""
    if period.kind == "duration":
        return f"s{period.seconds}"
    return {"month": "m", "week": "w", "day": "d", "billing_cycle": "bc"}[period.kind]


@dataclass(frozen=True, slots=True)
class Subscription:
    """What billing says a billable subscribes to (set through the engine, read by plan resolution)."""

    plan: str
    status: str
    past_due_since: float | None = None  # Unix seconds of the Stripe event that reported past_due

    def to_json(self) -> str:
        return json.dumps({"plan": self.plan, "status": self.status, "past_due_since": self.past_due_since})

    @classmethod
    def from_json(cls, text: str) -> Subscription:
        raw = json.loads(text)
        return cls(raw["plan"], raw["status"], raw.get("past_due_since"))


@dataclass(frozen=True, slots=True)
class ResolvedPlan:
    name: str
    source: PlanSource
    version: int
    expires_at: float = float("inf")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One billable's whole live state, read atomically with Redis TIME (ms)."""

    now_ms: int
    state: dict[str, str]
    holds: dict[str, str]
    pending_events: int


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Pending events read for the record, oldest first, and the mark (seq, time) of the last one."""

    events: list[dict[str, Any]]
    mark: tuple[int, int] | None


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
        on_restored: Callable[[str, dict[str, str]], Awaitable[None]] | None = None,
        hold_ttl: int = 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The local clock only picks candidate calendar windows and expires cached plans; Redis TIME decides.
        self.clock = clock
        self.store = store
        self.catalog = catalog
        self.prefix = prefix
        self.restore = restore
        # Called after a restore lands, with the state restored: the record replays what came after it.
        self.on_restored = on_restored
        self.hold_ttl = hold_ttl
        # Billables whose Redis state this process changed since the reconciler last took the set.
        self.touched: set[str] = set()
        self._plans: dict[str, ResolvedPlan] = {}
        self._compiled: dict[tuple[str, int], _Compiled] = {}
        self._bounds: tuple[float, str] = (0.0, "")
        self._month = ""  # the usage history's period label, YYYY-MM in the catalog's timezone
        self._month_start = 0.0
        self._restoring: dict[str, asyncio.Future[None]] = {}

    # ---- keys -------------------------------------------------------------------------------------

    def keys(self, billable: str) -> list[str]:
        base = f"{self.prefix}:{{{_tag(billable)}}}"
        return [base, base + ":ev", base + ":holds"]

    # ---- deciding ---------------------------------------------------------------------------------

    async def decide(self, billable: str, route: Route | None, *, credit_cost: int | None = None) -> Decision:
        """Decide one request. `route` None is an unmatched request forwarded with the plan's rate limit.

        `credit_cost` prices an operation from the request (units read from the request body or headers)."""
        keys = self.keys(billable)
        resolved = self._plans.get(billable)
        if resolved is not None and resolved.expires_at <= self.clock():
            resolved = None
        for _ in range(4):
            plan_name = resolved.name if resolved else self.catalog.settings.default_plan
            compiled = self._compile(plan_name, route)
            hold_id = uuid.uuid4().hex[:16] if compiled.metered else ""
            raw = await self.store.run(
                "decide",
                keys,
                [
                    compiled.spec,
                    resolved.version if resolved else -1,
                    self._calendar(),
                    "1" if compiled.denied else "0",
                    hold_id,
                    "" if credit_cost is None else credit_cost,
                    "1" if self.restore else "0",
                    self.hold_ttl,
                    plan_name,
                    f"{self._month}|{route.match if route else UNMATCHED}|{route.config.spend or '' if route else ''}",
                ],
            )
            if raw[0] == "stale":
                resolved = self._resolve(billable, int(raw[1]), raw[2], raw[3])
                continue
            if raw[0] == "missing":
                await self.rehydrate(billable)
                continue
            self.touched.add(billable)
            return self._decision(billable, plan_name, route, compiled, raw, hold_id)
        raise RuntimeError(f"plan of {billable!r} kept changing during one decision")

    def _decision(
        self, billable: str, plan: str, route: Route | None, compiled: _Compiled, reply: list[Any], hold_id: str
    ) -> Decision:
        """The script's reply (see decide.lua's last lines; None stands for none) as a Decision."""
        ok, now, policies_reply, violations_reply, events, credit, hold_reply = reply
        violations = list(compiled.denied)
        violations += [Violation(*v) for v in violations_reply]
        policies = [PolicyState(p[0], p[1], p[2], p[3], p[4], None if p[1] == "cap" else p[5]) for p in policies_reply]
        balance: int | None = None
        recharge = False
        if credit:
            allowance, shown, balance, recharge, purchased = credit[0], credit[1], credit[2], bool(credit[3]), credit[4]
            if not shown:
                balance = None
            if route is not None and route.config.spend is not None and allowance >= 0:
                # q: the nominal allowance plus the purchased credits on hand, so r (the balance) is never above it.
                policies.append(PolicyState(CREDITS, "credits", allowance + max(0, purchased), None, balance, None))
        admitted = bool(ok) and not compiled.denied
        hold: dict[str, Any] | None = None
        if admitted and hold_reply:
            cp, cb, window, allowance_held, usage_key, limits = hold_reply
            hold = {"cp": cp, "cb": cb, "w": window, "a": allowance_held, "q": usage_key, "l": limits}
            if hold_id:
                hold["id"] = hold_id
        return Decision(
            admitted=admitted,
            billable=billable,
            plan=plan,
            route=route,
            violations=violations,
            policies=policies,
            events=[script_event(billable, json.loads(e)) for e in events] if events else [],
            credits=balance,
            hold=hold,
            now=now / 1000,
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

    def past_usage(self, state: dict[str, str]) -> dict[str, str]:
        """The usage counters (`qr:`/`qu:`/`qc:`) of months over long enough that no hold can change them.

        Once the record has them, Redis need not keep them: a billable's hash would otherwise grow by a
        few fields a month for as long as it lives."""
        self._calendar()
        if self.clock() < self._month_start + 2 * self.hold_ttl:
            return {}
        month = self._month
        return {f: v for f, v in state.items() if (period := counter_period(f)) is not None and period < month}

    async def forget_usage(self, billable: str, counters: dict[str, str]) -> int:
        """Drop these counters (as `past_usage` found them, and now in the record) unless they changed since."""
        if not counters:
            return 0
        forgotten = int(await self.store.run("forget", self.keys(billable)[:1], [x for kv in counters.items() for x in kv]))
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
        """Everything the script needs for this plan and route, as one JSON string built once."""
        denied: list[Violation] = []
        spec: dict[str, Any] = {"arm": self.catalog.settings.auto_recharge_max_per_month}
        rates = [r for r in (plan.rate, route.rate if route else None) if r is not None]
        spec["r"] = [[r.name, r.per_seconds * 1000 / r.limit, r.burst, r.window] for r in rates]
        spec["l"] = []
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
                    spec["l"].append(_limit_spec(config.limit, limit or self.catalog.limit_kinds[config.limit], config.cost, unlimited))
            if config.spend is not None:
                operation = self.catalog.operations[config.spend]
                metered = operation.metered
                cost = operation.hold if operation.per_unit is not None else (operation.cost or 0)
        allowance = -1 if plan.is_unlimited(CREDITS) else (plan.credits or 0)
        spec["cr"] = {
            "a": allowance,
            "p": period_code(plan.credit_period),
            "ro": 1 if plan.rollover else 0,
            "c": cost,
            "show": 1 if route is not None and route.config.spend is not None else 0,
        }
        fields = [f"r:{r[0]}" for r in spec["r"]]
        for limit in spec["l"]:
            fields += [f"{kind}:{limit['n']}" for kind in ("u", "g", "t", "b", "w")]
        fields += ["c:w", "c:s", "c:p", "c:d", "c:thr", "ar:on", "ar:lease", "ar:n", "ar:m"]
        spec["f"] = fields  # what the script reads, fetched in one HMGET
        return _Compiled(json.dumps(spec, separators=(",", ":")), tuple(denied), metered, tuple(rates))

    # ---- after the upstream answered ----------------------------------------------------------------

    async def settle(
        self, decision: Decision, *, give_back_limits: bool, credits_owed: int | None, units: float | None = None
    ) -> int | None:
        """Keep or give back what the decision held; settle a reserve to what is owed. Returns the balance.

        `units` are what a metered answer reported, counted in the usage history."""
        if decision.hold is None or decision.billable is None:
            return None
        self.touched.add(decision.billable)
        raw = await self.store.run(
            "settle",
            self.keys(decision.billable),
            [
                "settle",
                json.dumps(decision.hold),
                "back" if give_back_limits else "keep",
                "" if credits_owed is None else credits_owed,
                decision.plan or "",
                "" if units is None else math.ceil(units),
                "1" if self.restore else "0",
            ],
        )
        out = json.loads(raw)
        return _int(out.get("bal"))

    async def release(self, billable: str, plan_name: str, limit: str, units: int = 1) -> None:
        """Give back `units` of a persistent cap (a delete the upstream confirmed), never below 0."""
        plan = self.catalog.plans[plan_name]
        cap = plan.limits.get(limit)
        self.touched.add(billable)
        args: list[str | int | float | bytes] = ["release", limit, units, "" if cap is None else cap.to, plan_name]
        for _ in range(2):
            out = json.loads(await self.store.run("settle", self.keys(billable), [*args, "1" if self.restore else "0"]))
            if out.get("st") != "missing":
                return
            await self.rehydrate(billable)

    # ---- plans --------------------------------------------------------------------------------------

    def _resolve(self, billable: str, version: int, assignment: str | None, subscription: str | None) -> ResolvedPlan:
        """Manual assignment → active subscription (past_due within the grace) → default plan."""
        plans = self.catalog.plans
        resolved = ResolvedPlan(self.catalog.settings.default_plan, "default", version)
        if assignment and assignment in plans:
            resolved = ResolvedPlan(assignment, "assignment", version)
        elif subscription:
            sub = Subscription.from_json(subscription)
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
        return self._resolve(billable, int(snap.state.get("pv", 0)), snap.state.get("asg"), snap.state.get("sub"))

    async def _update(self, billable: str, *args: str | int) -> None:
        self.touched.add(billable)
        await self.store.run("update", self.keys(billable)[:1], list(args))
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
            await self._update(billable, "period", int(period[0] * 1000), int(period[1] * 1000))

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
            status, last, balance = await self.store.run("grant", self.keys(billable)[:1], [sequence, amount, "1" if self.restore else "0"])
            if status != "missing":
                return GrantResult(status, int(last), int(balance))
            await self.rehydrate(billable)
        raise RuntimeError(f"state of {billable!r} vanished twice while applying a grant")

    # ---- state for the record -----------------------------------------------------------------------

    async def snapshot(self, billable: str) -> Snapshot:
        return (await self.snapshots([billable]))[0]

    async def snapshots(self, billables: Sequence[str]) -> list[Snapshot]:
        """Each billable's whole state, read at once (on a single server, in one write)."""
        replies = await self.store.run_many("snapshot", [(self.keys(b), ()) for b in billables])
        return [Snapshot(int(now), _pairs(state), _pairs(holds), int(pending)) for now, state, holds, pending in replies]

    async def restore_state(self, billable: str, state: dict[str, str]) -> bool:
        """Put back state saved from a snapshot; whatever Redis holds already is live and wins."""
        args: list[str] = [x for kv in state.items() for x in kv]
        restored = bool(await self.store.run("restore", self.keys(billable)[:1], args))
        self._plans.pop(billable, None)
        return restored

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
            state = await self.restore(billable)
        except Exception as exc:
            raise StateUnavailable(f"the state of {billable!r} is not in Redis and the record cannot restore it: {exc}") from exc
        await self.restore_state(billable, state or {})
        if self.on_restored is not None:
            await self.on_restored(billable, state or {})

    async def pending_events(self, billable: str, limit: int = 1000) -> list[dict[str, Any]]:
        return (await self.read_events(billable, limit)).events

    async def read_events(self, billable: str, limit: int = 1000) -> EventBatch:
        raw = [json.loads(item) for item in await self.store.read_list(self.keys(billable)[1], limit)]
        mark = (int(raw[-1]["seq"]), int(raw[-1]["at"])) if raw else None
        return EventBatch([script_event(billable, e) for e in raw], mark)

    async def ack_events(self, billable: str, count: int, *, through: tuple[int, int] | None = None) -> None:
        """Drop the `count` oldest pending events once the record holds them.

        With `through` (an EventBatch's mark) only those at or before it go: another process may have
        taken the same batch and acked it already, and the events after it are not in the record yet."""
        if count <= 0:
            return
        if through is None:
            await self.store.trim_list(self.keys(billable)[1], count)
        else:
            await self.store.run("ack", self.keys(billable)[1:2], [count, through[0], through[1]])

    async def billables(self) -> AsyncIterator[str]:
        """Every billable whose state Redis holds (on a cluster, from every primary), for the record's sweep."""
        head = len(self.prefix) + 2
        async for key in self.store.scan(f"{self.prefix}:{{*}}"):
            yield unquote(key[head:-1])

    async def change_counters(self, billables: list[str]) -> list[int | None]:
        """Each billable's change counter `chg` (None: no state in Redis), in one pipelined round trip."""
        values = await self.store.fields([self.keys(b)[0] for b in billables], "chg")
        return [None if v is None else int(v) for v in values]

    async def expire_holds(self, billables: list[str]) -> list[str]:
        """Drop the holds past their lifetime (kept as charged: their settle never came) of the billables whose
        oldest hold is due; answers those billables. Two pipelined round trips, the second only when one is due."""
        due_at = await self.store.fields([self.keys(b)[0] for b in billables], "hx")
        now_ms = self.clock() * 1000
        due = [b for b, at in zip(billables, due_at, strict=True) if at is not None and float(at) <= now_ms]
        if due:
            await self.store.run_many("expire", [(self.keys(b)[::2], ()) for b in due])
            self.touched.update(due)
        return due

    async def status(self, billable: str) -> dict[str, Any]:
        """The status body of DESIGN §3, from one snapshot (of the restored state, when Redis lost it)."""
        snap = await self.snapshot(billable)
        if self.restore is not None and "hyd" not in snap.state:
            await self.rehydrate(billable)  # else the answer would show a fresh quota the next request will not give
            snap = await self.snapshot(billable)
        resolved = self._resolve(billable, int(snap.state.get("pv", 0)), snap.state.get("asg"), snap.state.get("sub"))
        return status_body(self.catalog, billable, resolved, snap, self._calendar())


def _limit_spec(name: str, limit: Limit, cost: int, unlimited: bool) -> dict[str, Any]:
    period = limit.period
    spec: dict[str, Any] = {
        "n": name,
        "to": -1 if unlimited else limit.to,
        "c": cost,
        "p": period_code(period) if period else "",
        "a": _AFTER[limit.after_limit],
        "g": limit.grace_seconds * 1000,
        "gm": -1 if limit.grace_max is None else limit.grace_max,
        "wa": list(limit.warn_at),
    }
    if period is not None:
        spec["w"] = period.nominal_seconds
    return spec


def window_of(code: str, state: dict[str, str], now_ms: int, calendar: str) -> tuple[int, int]:
    """The window (ms) containing now for a period code: the same choice decide.lua makes."""
    if code == "bc":
        start, end = _int(state.get("bp_s")), _int(state.get("bp_e"))
        if start is not None and end is not None and end > start and now_ms >= start:
            if now_ms < end:
                return start, end
            length = end - start
            k = (now_ms - end) // length
            return end + k * length, end + (k + 1) * length
        code = "m"
    if code.startswith("s"):
        size = int(code[1:]) * 1000
        start = now_ms - now_ms % size
        return start, start + size
    bounds = json.loads(calendar)[code]
    start_s, end_s = window_at((bounds[0], bounds[1], bounds[2], bounds[3]), now_ms / 1000)
    return start_s * 1000, end_s * 1000


def status_body(catalog: Catalog, billable: str, resolved: ResolvedPlan, snap: Snapshot, calendar: str) -> dict[str, Any]:
    plan = catalog.plans[resolved.name]
    state, now = snap.state, snap.now_ms
    limits: dict[str, Any] = {}
    names = list(plan.limits) + [n for n in plan.unlimited if n != CREDITS and n not in plan.limits]
    for name in names:
        unlimited = plan.is_unlimited(name)
        limit = plan.limits.get(name) or catalog.limit_kinds[name]
        usage = _int(state.get(f"u:{name}")) or 0
        window: tuple[int, int] | None = None
        grace_at = _int(state.get(f"g:{name}"))
        blocked_once = state.get(f"b:{name}") == "1"
        if limit.period is not None:
            window = window_of(period_code(limit.period), state, now, calendar)
            if _int(state.get(f"w:{name}")) != window[0]:
                usage, grace_at, blocked_once = 0, None, False
        to = None if unlimited else limit.to
        grace_ends = grace_at + limit.grace_seconds * 1000 if grace_at is not None else None
        over = to is not None and usage >= to
        grace_active = bool(grace_ends is not None and now < grace_ends and to is not None and usage > to)
        if limit.after_limit == "just_warn" or to is None:
            blocked = False
        elif limit.after_limit == "grace_then_block":
            blocked = over and not grace_active and (grace_at is not None or blocked_once)
        else:
            blocked = over
        limits[name] = {
            "usage": usage,
            "limit": to,
            "remaining": None if to is None else max(0, to - usage),
            "percent_used": None if not to else round(100 * usage / to, 2),
            "grace_active": grace_active,
            "grace_ends_at": _iso(grace_ends / 1000) if grace_ends is not None else None,
            "blocked": blocked,
            "per": limit.per,
            "window_start": _iso(window[0] / 1000) if window else None,
            "window_end": _iso(window[1] / 1000) if window else None,
            "after_limit": limit.after_limit,
        }
    allowance = -1 if plan.is_unlimited(CREDITS) else (plan.credits or 0)
    spent = _int(state.get("c:s")) or 0
    purchased = _int(state.get("c:p")) or 0
    debt = _int(state.get("c:d")) or 0
    cwindow = window_of(period_code(plan.credit_period), state, now, calendar)
    if _int(state.get("c:w")) != cwindow[0]:
        if plan.rollover and allowance > 0 and state.get("c:w"):
            purchased += max(0, allowance - spent)
        spent = min(debt, allowance) if allowance > 0 else 0
        debt -= spent
    period_left = None if allowance < 0 else max(0, allowance - spent)
    held = 0
    for raw in snap.holds.values():
        hold = json.loads(raw)
        if hold.get("exp", 0) > now:
            held += int(hold.get("cp", 0)) + int(hold.get("cb", 0))
    rate_limits: dict[str, Any] = {}
    for rate in [plan.rate, *(r.rate for r in catalog.routes)]:
        if rate is None:
            continue
        interval = rate.per_seconds * 1000 / rate.limit
        tat = max(float(state.get(f"r:{rate.name}", now)), now)
        remaining = int((now - (tat - rate.burst * interval)) // interval)
        rate_limits[rate.name] = {
            "limit": rate.burst,
            "remaining": max(0, min(rate.burst, remaining)),
            "reset": _iso(tat / 1000),
        }
    return {
        "billable": billable,
        "plan": resolved.name,
        "plan_source": resolved.source,
        "features": sorted(plan.allows),
        "limits": limits,
        "credits": {
            "balance": None if period_left is None else period_left + purchased - debt,
            "period": period_left,
            "purchased": purchased,
            "held": held,
            "debt": debt,
        },
        "rate_limits": rate_limits,
    }


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _list(value: Any) -> list[Any]:
    # cjson encodes an empty Lua table as {}.
    return value if isinstance(value, list) else []


def _int(value: Any) -> int | None:
    if value is None or value == "" or value is False:
        return None
    return int(float(value))


@functools.lru_cache(maxsize=65536)
def _tag(billable: str) -> str:
    # Percent-encoding keeps `{`, `}` and `:` out of the tag, so no id can reach another's keys.
    return quote(billable, safe="")


def _pairs(flat: Any) -> dict[str, str]:
    items = _list(flat)
    return dict(zip(items[::2], items[1::2]))
