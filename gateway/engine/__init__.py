"""The engine: request + plan + route → one script call → Decision.

Every per-billable key, field and script protocol is gateway.state's; here the facade that decides,
settles and changes a billable, over plans.py (resolution and its cache), spec.py (plan + route → spec),
transfer.py (state for the record) and status.py (the status body)."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from gateway import state
from gateway.catalog import CREDITS, Catalog, Plan, RateLimit, Route
from gateway.decision import Decision, PolicyState, Violation
from gateway.engine.members import MemberSpecs, member_denials
from gateway.engine.plans import ACTIVE_STATUSES, Plans, PlanSource, ResolvedPlan
from gateway.engine.spec import Compiled, Specs, period_code
from gateway.engine.status import status_body
from gateway.engine.transfer import Touched, Transfer
from gateway.errors import StateUnavailable
from gateway.idempotency import LIFETIME, Decided, Once
from gateway.members import Chain, Level
from gateway.overrides import Overrides
from gateway.periods import Bounds, Period, calendar_bounds
from gateway.state import EventBatch, Snapshot, Subscription
from gateway.store.redis import RedisStore

__all__ = ["ACTIVE_STATUSES", "SUSPENDED", "UNMATCHED", "Engine", "GrantResult", "Offline", "PlanSource", "ResolvedPlan", "period_code"]

UNMATCHED = "(unmatched)"
SUSPENDED = "suspended"  # the violated policy of a suspended billable's every request

# What the record gives back of a billable Redis lost (None: it has nothing, the billable starts new).
Restorer = Callable[[str], Awaitable[state.Restored | None]]
# The record's grants numbered after a sequence, as (sequence, amount) in order.
GrantsAfter = Callable[[str, int], Awaitable[Sequence[tuple[int, int]]]]
# A billable's org and the member levels up to it (gateway.members.Members.chain; None: it is an org).
ChainOf = Callable[[str], Awaitable[Chain | None]]


@dataclass(frozen=True, slots=True)
class GrantResult:
    status: Literal["applied", "duplicate", "gap"]
    last_sequence: int
    purchased_balance: int


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
        prefix: str = state.PREFIX,
        restore: Restorer | None = None,
        grants_after: GrantsAfter | None = None,
        hold_ttl: int = 3600,
        clock: Callable[[], float] = time.time,
        chain_of: ChainOf | None = None,
    ) -> None:
        # The local clock only picks candidate calendar windows and expires cached plans; Redis TIME decides.
        self.clock = clock
        self.store = store
        self.catalog = catalog
        self.prefix = prefix
        self.restore = restore
        # Read when a restore finds Redis behind the first grant after the snapshot: every grant after what
        # Redis holds is replayed from the record.
        self.grants_after = grants_after
        self.hold_ttl = hold_ttl
        # A member (a team, a key with terms) is decided with its org, in the org's script call.
        self.chain_of = chain_of
        self.member_specs = MemberSpecs()
        # Billables whose Redis state this process changed since the reconciler last took them.
        self._touched = Touched()
        self.plans = Plans(catalog, clock)
        self.specs = Specs(catalog)
        self.transfer = Transfer(store, prefix, self._touched, clock)
        self._bounds: tuple[float, str] = (0.0, "")
        self._windows: dict[str, Bounds] = {}  # the calendar bounds of `_bounds`, by period code
        self._month = ""  # the usage history's period label, YYYY-MM in the catalog's timezone
        self._month_start = 0.0
        self._restoring: dict[str, asyncio.Future[None]] = {}

    def use_catalog(self, catalog: Catalog) -> None:
        """Decide with `catalog` from the next decision on (one in flight finishes with what it compiled):
        what was compiled or resolved from the old one is dropped, the calendar too (its timezone may differ)."""
        self.catalog = catalog
        self.plans = Plans(catalog, self.clock)
        self.specs = Specs(catalog)
        self._bounds = (0.0, "")

    # ---- keys -------------------------------------------------------------------------------------

    def keys(self, billable: str) -> state.Keys:
        return state.keys(self.prefix, billable)

    # ---- deciding ---------------------------------------------------------------------------------

    async def decide(
        self,
        billable: str,
        route: Route | None,
        *,
        credit_cost: int | None = None,
        dry: bool = False,
        hold: bool = False,
        once: Once | None = None,
    ) -> Decision:
        """Decide one request. `route` None is an unmatched request forwarded with the plan's rate limit.

        `credit_cost` prices an operation from the request (units read from the request body or headers).
        `dry` answers the decision the request would get and writes nothing: no events, hold or counters.
        `hold` stores what an admission holds under `decision.hold.id` (as for a metered spend), so that any
        process can settle it once (gateway/check.py: `close`). With `once`, the script makes the request's
        idempotency record in the same call, or raises Decided when it was there.

        A member (gateway.members) is decided as its org, with each member level's own terms in the same
        call: the decision's billable is the org, its `members` the levels."""
        chain = await self.chain_of(billable) if self.chain_of is not None else None
        members, levels = self.member_specs.of(chain) if chain is not None else ("", ())
        if chain is not None:
            billable = chain.root
        keys = self.keys(billable)
        key_list = keys.all()
        member_denied: list[Violation] = []
        if chain is not None:
            member_denied = member_denials(chain.levels, route.config.features if route is not None else (), self.clock())
        if levels:
            key_list = [*key_list, *(state.member_key(self.prefix, billable, level.id) for level in levels)]
        if once is not None:
            key_list = [*key_list, once.record]
        resolved = self.plans.cached(billable)
        for _ in range(4):
            plan_name = resolved.name if resolved else self.catalog.settings.default_plan
            compiled = self._compiled(plan_name, route, resolved)
            # A suspended billable still makes the one call, writing nothing: a lift (a new plan version) is
            # seen by the script on the very next request of every process.
            suspended = resolved is not None and resolved.suspended
            hold_id = uuid.uuid4().hex[:16] if (compiled.metered or hold) and not dry and not suspended else ""
            args = state.DecideArgs(
                spec=compiled.spec,
                plan_version=resolved.version if resolved else -1,
                calendar=self._calendar(),
                forced_deny=(bool(compiled.denied or member_denied) and not compiled.shadow) or suspended,  # shadow never relaxes a suspension
                shadowed=bool(compiled.denied or member_denied) and compiled.shadow and not suspended,
                hold_id=hold_id,
                credit_cost=credit_cost,
                restores=self.restore is not None,
                hold_ttl=self.hold_ttl,
                plan=plan_name,
                usage_key=state.usage_key(self._month, route.match if route else UNMATCHED, route.config.spend or "" if route else ""),
                dry=dry,
                members=members,
                fingerprint=once.fingerprint if once else "",
            )
            reply = state.DecideReply.parse(await self.store.run("decide", key_list, args.argv()), hold_id)
            if isinstance(reply, state.Seen):
                raise Decided(reply.record)
            if isinstance(reply, state.Stale):
                resolved = self._resolve(billable, reply)
                continue
            if isinstance(reply, state.Missing):
                await self.rehydrate(billable)
                continue
            if not dry:
                self._touched.add(billable)
            if suspended:
                return self._suspended(billable, plan_name, route, reply)
            decision = self._decision(billable, plan_name, route, compiled, reply, member_denied)
            if levels:
                decision.members = tuple(level.id for level in levels)
            return decision
        raise RuntimeError(f"plan of {billable!r} kept changing during one decision")

    def _compiled(self, plan_name: str, route: Route | None, resolved: ResolvedPlan | None) -> Compiled:
        if resolved is None or resolved.terms is None:
            return self.specs.route(plan_name, route)
        return self.specs.route(plan_name, route, resolved.terms, resolved.digest)

    def _resolve(self, billable: str, reply: state.Stale) -> ResolvedPlan:
        return self.plans.resolve(billable, reply.plan_version, reply.assignment, reply.subscription, reply.overrides, reply.suspended)

    def _suspended(self, billable: str, plan: str, route: Route | None, reply: state.DecideReply) -> Decision:
        """403 suspended whatever else applies (DESIGN §3): the headers show what is left, nothing was taken."""
        return Decision(
            admitted=False,
            billable=billable,
            plan=plan,
            route=route,
            violations=[Violation(SUSPENDED, "suspended")],
            policies=reply.policies,
            now=reply.now_ms / 1000,
        )

    def _decision(
        self, billable: str, plan: str, route: Route | None, compiled: Compiled, reply: state.DecideReply, member_denied: list[Violation]
    ) -> Decision:
        violations = [*compiled.denied, *member_denied, *reply.violations]
        shadowed: list[Violation] = []
        if compiled.shadow:
            # Admitted and charged as if within: the violations are what it would have been denied for.
            violations, shadowed = [], violations
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
        admitted = reply.admitted and not violations
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
            shadowed=shadowed,
        )

    def _calendar(self) -> str:
        """Candidate calendar windows for the script, recomputed when the day rolls over."""
        now = self.clock()
        valid_until, text = self._bounds
        if now < valid_until:
            return text
        zone = self.catalog.settings.zone
        bounds = {code: calendar_bounds(kind, now, zone) for code, kind in (("m", "month"), ("w", "week"), ("d", "day"))}
        text = ";".join(f"{code}:{','.join(map(str, b))}" for code, b in bounds.items())  # lib/args.lua's bounds_arg
        self._bounds = (min(b[2] for b in bounds.values()), text)
        self._windows = bounds
        start = datetime.fromtimestamp(bounds["m"][1], zone)
        self._month = f"{start.year:04d}-{start.month:02d}"
        self._month_start = float(bounds["m"][1])
        return text

    # ---- usage counters of past months ----------------------------------------------------------------

    def past_usage(self, saved: dict[str, str]) -> dict[str, str]:
        """The usage history counters of months over long enough that no hold can change them.

        Once the record has them, Redis need not keep them: a billable's hash would otherwise grow by a
        few fields a month for as long as it lives."""
        self._calendar()
        if self.clock() < self._month_start + 2 * self.hold_ttl:
            return {}
        return state.past_counters(saved, self._month)

    async def forget_usage(self, billable: str, counters: dict[str, str], member: str | None = None) -> int:
        """Drop these counters (as `past_usage` found them, and now in the record; of `member`'s state hash
        when given) unless they changed since."""
        return await self.transfer.forget(billable, counters, member)

    def offline(self, billable: str, route: Route | None) -> Offline:
        """The plan, features and rate limits of a request as far as they are known without Redis."""
        resolved = self.plans.cached(billable)
        plan = resolved.name if resolved else self.catalog.settings.default_plan
        compiled = self._compiled(plan, route, resolved)
        if resolved is not None and resolved.suspended:
            return Offline(plan, (Violation(SUSPENDED, "suspended"),), compiled.rates)
        if compiled.shadow:
            return Offline(plan, (), ())  # nothing is enforced in shadow, not even in this process
        return Offline(plan, compiled.denied, compiled.rates)

    # ---- after the upstream answered ----------------------------------------------------------------

    async def settle(
        self, decision: Decision, *, give_back_limits: bool, credits_owed: int | None, units: float | None = None
    ) -> int | None:
        """Keep or give back what the decision held; settle a reserve to what is owed. Returns the balance.

        `units` are what a metered answer reported, counted in the usage history."""
        return (await self.settle_hold(decision, give_back_limits=give_back_limits, credits_owed=credits_owed, units=units)).balance

    async def settle_hold(
        self, decision: Decision, *, give_back_limits: bool, credits_owed: int | None, units: float | None = None
    ) -> state.SettleReply:
        """`settle`, answering whether it settled: status "settled" when a stored hold was settled before
        (nothing changed), "missing" when its state was lost with it (kept as charged)."""
        if decision.hold is None or decision.billable is None:
            return state.SettleReply("ok", None)
        self._touched.add(decision.billable)
        args = state.SettleArgs(
            hold=decision.hold,
            give_back_limits=give_back_limits,
            credits_owed=credits_owed,
            plan=decision.plan or "",
            units=None if units is None else math.ceil(units),
            restores=self.restore is not None,
        )
        keys = [*self.keys(decision.billable).all(), *self._member_keys(decision.billable, decision.hold.member_ids)]
        return state.SettleReply.parse(await self.store.run("settle", keys, args.argv()))

    def _member_keys(self, billable: str, members: Iterable[str]) -> list[str]:
        return [state.member_key(self.prefix, billable, member) for member in members]

    async def held(self, billable: str, hold_id: str) -> tuple[str, state.StoredHold] | None:
        """A stored hold (`decide(..., hold=True)`) still open, neither settled nor past its lifetime (then it
        is kept as charged), with the billable's plan now."""
        snap = await self.snapshot(billable)
        raw = snap.holds.get(hold_id)
        found = None if raw is None else state.Hold.stored(raw, hold_id, snap.now_ms)
        if found is None:
            return None
        return self.plans.resolve(billable, snap.plan_version, snap.assignment, snap.subscription).name, found

    async def once_read(self, request: Once) -> str | None:
        """The idempotency record of `request` (gateway/idempotency.py), None when there is none."""
        found: str | None = await self.store.run("once", [request.record], ["read"])
        return found

    async def once_answer(self, request: Once, record: str) -> None:
        """Replace the record decide.lua made with `record` (the same, with its answer), keeping its expiry."""
        await self.store.run("once", [request.record], ["answer", record])

    async def once_put(self, request: Once, record: str) -> bool:
        """Make the record `request` with its answer, for its lifetime; False when one was there."""
        return bool(await self.store.run("once", [request.record], ["put", record, LIFETIME]))

    async def close(
        self, billable: str, hold_id: str, settled_as: str, *, give_back_limits: bool, credits_owed: int | None,
        units: float | None, release: str | None, members: tuple[str, ...] = (),
    ) -> state.CloseReply:
        """Settle a stored hold (`decide(..., hold=True)`) as taken for `settled_as` ("<route>|<operation>")
        at the org `billable` and its `members` levels (`levels_of`), give back the cap `release` names, and
        answer the balance: one call (two when this process has not seen the billable's plan yet)."""
        resolved = self.plans.cached(billable)
        self._touched.add(billable)
        for _ in range(4):
            plan_name = resolved.name if resolved else self.catalog.settings.default_plan
            terms = (resolved.terms if resolved else None) or self.catalog.plans[plan_name]
            cap = terms.limits.get(release) if release else None
            args = state.CloseArgs(
                hold_id=hold_id,
                settled_as=settled_as,
                give_back_limits=give_back_limits,
                credits_owed=credits_owed,
                units=None if units is None else math.ceil(units),
                plan=plan_name,
                plan_version=resolved.version if resolved else -1,
                release=None if release is None else state.ReleaseArgs(release, 1, None if cap is None else cap.to, plan_name, False),
                status_spec=self.specs.status(plan_name, resolved.terms, resolved.digest) if resolved else self.specs.status(plan_name),
                calendar=self._calendar(),
                restores=self.restore is not None,
                members=members,
            )
            keys = [*self.keys(billable).all(), *self._member_keys(billable, members)]
            reply = state.CloseReply.parse(await self.store.run("settle", keys, args.argv()))
            if not isinstance(reply, state.Stale):
                return reply
            resolved = self._resolve(billable, reply)
        raise RuntimeError(f"plan of {billable!r} kept changing during one settle")

    async def release(self, billable: str, plan_name: str, limit: str, units: int = 1, members: Sequence[str] = ()) -> None:
        """Give back `units` of a persistent cap (a delete the upstream confirmed), never below 0, at the
        billable and each of `members` (a decision's) that counts it as a cap."""
        cap = self.terms_of(billable, plan_name).limits.get(limit)
        self._touched.add(billable)
        args = state.ReleaseArgs(limit, units, None if cap is None else cap.to, plan_name, self.restore is not None)
        for _ in range(2):
            keys = [*self.keys(billable).all(), *self._member_keys(billable, members)]
            reply = state.SettleReply.parse(await self.store.run("settle", keys, args.argv()))
            if reply.status != "missing":
                return
            await self.rehydrate(billable)

    # ---- plans --------------------------------------------------------------------------------------

    def terms_of(self, billable: str, plan_name: str) -> Plan:
        """The billable's effective plan as this process last resolved it (its overrides in place), when that
        was `plan_name`; else the catalog's `plan_name`. No I/O: for what follows a decision."""
        resolved = self.plans.cached(billable)
        if resolved is not None and resolved.terms is not None and resolved.name == plan_name:
            return resolved.terms
        return self.catalog.plans[plan_name]

    async def plan_of(self, billable: str) -> ResolvedPlan:
        """The billable's plan now (read from Redis, then cached like a decision would)."""
        snap = await self.snapshot(billable)
        return self.plans.resolve(billable, snap.plan_version, snap.assignment, snap.subscription, snap.overrides, snap.suspended)

    async def _update(self, billable: str, change: state.Update) -> None:
        self._touched.add(billable)
        await self.store.run("update", self.keys(billable).only_state(), change.argv())
        self.plans.forget(billable)

    async def set_assignment(self, billable: str, plan: str | None) -> None:
        if plan is not None and plan not in self.catalog.plans:
            raise ValueError(f'unknown plan "{plan}": plans.toml has {", ".join(self.catalog.plans)}')
        await self._update(billable, state.Update.assign(plan))

    async def set_subscription(self, billable: str, subscription: Subscription | None) -> None:
        await self._update(billable, state.Update.subscription(subscription))

    async def set_billing_period(self, billable: str, period: tuple[float, float] | None) -> None:
        await self._update(billable, state.Update.billing_period(period))

    async def set_count(self, billable: str, limit: str, usage: int) -> None:
        kind = self.catalog.limit_kinds.get(limit)
        if kind is None or kind.per is not None:
            raise ValueError(f'"{limit}" is not a persistent cap in plans.toml')
        if usage < 0:
            raise ValueError("usage cannot be negative")
        await self._update(billable, state.Update.count(limit, usage))

    async def set_overrides(self, billable: str, overrides: Overrides | None) -> None:
        """The billable's own terms (validated by gateway.overrides), None removes them: every process
        decides with them from its next request (the plan version moves)."""
        await self._update(billable, state.Update.overrides(overrides.to_json() if overrides else None))

    async def set_suspended(self, billable: str, suspended: bool) -> None:
        await self._update(billable, state.Update.suspend(suspended))

    async def reset_limit(self, billable: str, limit: str) -> None:
        """A per-period allowance starts its current window again: use 0, warnings and grace re-armed."""
        kind = self.catalog.limit_kinds.get(limit)
        if kind is None or kind.per is None:
            raise ValueError(f'"{limit}" is not a per-period allowance in plans.toml')
        await self._update(billable, state.Update.reset(limit))

    async def set_auto_recharge(
        self, billable: str, *, enabled: bool, threshold: int | None, amount_cents: int | None = None
    ) -> None:
        """Auto-recharge settings; the threshold is also where credits_low fires."""
        await self._update(billable, state.Update.recharge(enabled, threshold, amount_cents))

    async def end_recharge(self, billable: str) -> None:
        await self._update(billable, state.Update.recharge_done())

    async def apply_grant(self, billable: str, sequence: int, amount: int) -> GrantResult:
        """Apply grant number `sequence` once, strictly in order (money first: the record has it already)."""
        self._touched.add(billable)
        for _ in range(2):
            args = state.GrantArgs(sequence, amount, self.restore is not None)
            reply = state.GrantReply.parse(await self.store.run("grant", self.keys(billable).only_state(), args.argv()))
            if reply.status != "missing":
                return GrantResult(reply.status, reply.last_sequence, reply.purchased_balance)
            await self.rehydrate(billable)
        raise RuntimeError(f"state of {billable!r} vanished twice while applying a grant")

    # ---- state for the record -----------------------------------------------------------------------

    async def snapshot(self, billable: str) -> Snapshot:
        return (await self.snapshots([billable]))[0]

    async def snapshots(self, billables: Sequence[str]) -> list[Snapshot]:
        """Each billable's whole state, read at once (on a single server, in one write)."""
        return await self.transfer.snapshots(billables)

    async def restore_state(self, billable: str, restored: state.Restored) -> state.RestoreReply:
        """Put back state saved from a snapshot and apply the grants after it, in one script: whatever Redis
        holds already is live and wins, and each grant is applied once, in order."""
        keys = [*self.keys(billable).only_state(), *self._member_keys(billable, restored.members)]
        reply = state.RestoreReply.parse(await self.store.run("restore", keys, restored.argv()))
        self.plans.forget(billable)
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
        if reply.gap and self.grants_after is not None:
            # Another process restored an older snapshot first: replay from what Redis holds.
            await self.replay(billable, reply.last_sequence, self.grants_after)

    async def replay(self, billable: str, after: int, grants_after: GrantsAfter) -> None:
        """Apply every grant the record numbers above `after`, in order: Redis was restored from a snapshot
        holding grants up to it.

        Called from within a restore, which an apply of this billable may be waiting on: it takes no lock
        (Redis applies numbers in order and once, so a concurrent apply cannot double one)."""
        while True:
            for seq, amount in await grants_after(billable, after):
                result = await self.apply_grant(billable, seq, amount)
                if result.status == "gap":
                    # Another process restored an older snapshot first: start from what Redis holds.
                    after = result.last_sequence
                    break
            else:
                return

    async def pending_events(self, billable: str, limit: int = 1000) -> list[dict[str, Any]]:
        return await self.transfer.pending_events(billable, limit)

    async def read_events(self, billable: str, limit: int = 1000) -> EventBatch:
        return await self.transfer.read_events(billable, limit)

    async def ack_events(self, billable: str, count: int, *, through: tuple[int, int] | None = None) -> None:
        await self.transfer.ack_events(billable, count, through=through)

    def billables(self) -> AsyncIterator[str]:
        return self.transfer.billables()

    async def change_counters(self, billables: list[str]) -> list[int | None]:
        return await self.transfer.change_counters(billables)

    async def expire_holds(self, billables: list[str]) -> list[str]:
        return await self.transfer.expire_holds(billables)

    def take_touched(self) -> set[str]:
        """The billables changed since the last take (the reconciler's to flush)."""
        return self._touched.take()

    def touched_besides(self, billables: Iterable[str]) -> int:
        """How many billables changed since the last take are not among `billables` (nothing is taken)."""
        return len(self._touched.difference(billables))

    async def root_of(self, billable: str) -> str:
        """The billable whose state a decision for `billable` is kept in: its org when it is a member."""
        return (await self.levels_of(billable))[0]

    async def levels_of(self, billable: str) -> tuple[str, tuple[str, ...]]:
        """Where a decision for `billable` is kept: its org, and the member levels it counts at (those with
        terms of their own, nearest first: the order a hold gives back in)."""
        chain = await self.chain_of(billable) if self.chain_of is not None else None
        if chain is None:
            return billable, ()
        return chain.root, tuple(level.id for level in self.member_specs.of(chain)[1])

    async def usage(self, billable: str) -> dict[str, Any]:
        """What a customer's own view shows: the status of its org, and for a member (a team, a key with
        terms) `members`: each level's own numbers, nearest first."""
        chain = await self.chain_of(billable) if self.chain_of is not None else None
        if chain is None:
            return await self.status(billable)
        body = await self.status(chain.root)
        body["members"] = [await self._member_status(chain.root, level) for level in chain.levels]
        return body

    async def _member_status(self, root: str, level: Level) -> dict[str, Any]:
        terms = level.terms
        out: dict[str, Any] = {"member": level.id, "level": level.word, "suspended": level.suspended,
                               "terms": terms.shown() if terms is not None else None}  # fmt: skip
        if terms is None:
            return out
        saved = await self.store.hash(state.member_key(self.prefix, root, level.id))
        now = self.clock()

        def counted(limit: str | None, period: Period | None) -> int:
            """A count of the member's hash (a limit's, None: the credits'), 0 when counted in an earlier window."""
            used, window = state.counted_fields(limit)
            value, at = saved.get(used), saved.get(window)
            current = period is None or (at is not None and int(at) == self._window_start(period, now))
            return int(value or 0) if current else 0

        self._calendar()
        month: dict[str, int] = {"requests": 0, "units": 0, "credits": 0}
        for c in state.usage_counters(saved):
            if c.period == self._month and c.column in month:
                month[c.column] += c.value
        out["this_month"] = month

        if terms.credits is not None:
            spent = counted(None, terms.credit_period)
            out["credits"] = {"allowance": terms.credits, "spent": spent, "balance": max(0, terms.credits - spent), "per": terms.credits_per}
        limits = {}
        for name, limit in terms.limits.items():
            used = counted(name, limit.period)
            limits[name] = {"usage": used, "limit": limit.to, "remaining": max(0, limit.to - used), "per": limit.per}
        if limits:
            out["limits"] = limits
        return out

    def _window_start(self, period: Period, now: float) -> int:
        """The start (ms) of the window of `period` holding `now`, as lib/rules.lua's window_of picks it (a
        member's billing cycle is the calendar month)."""
        code = period_code(period)
        if code.startswith("s"):
            size = int(code[1:]) * 1000
            return int(now * 1000) // size * size
        self._calendar()
        bounds = self._windows["m" if code == "bc" else code]
        return int((bounds[0] if now < bounds[1] else bounds[1] if now < bounds[2] else bounds[2]) * 1000)

    async def status(self, billable: str) -> dict[str, Any]:
        """The status body of DESIGN §3, evaluated by status.lua with decide.lua's rules (of the restored
        state, when Redis lost it: else it would show a fresh quota the next request will not give)."""
        keys = self.keys(billable).all()
        resolved = self.plans.cached(billable)
        for _ in range(4):
            plan_name = resolved.name if resolved else self.catalog.settings.default_plan
            spec = self.specs.status(plan_name, resolved.terms, resolved.digest) if resolved else self.specs.status(plan_name)
            args = state.StatusArgs(spec, resolved.version if resolved else -1, self._calendar(), self.restore is not None)
            reply = state.StatusReply.parse(await self.store.run("status", keys, args.argv()))
            if isinstance(reply, state.Stale):
                resolved = self._resolve(billable, reply)
            elif isinstance(reply, state.Missing):
                await self.rehydrate(billable)
            else:
                assert resolved is not None  # without a plan version the script answers stale
                return status_body(self.catalog, billable, resolved, reply)
        raise RuntimeError(f"plan of {billable!r} kept changing during one status read")
