"""Redis decides, the record remembers (DESIGN §5): flushes to the database and restores from it.

    connected = connect(store, catalog, db, interval=1.0)   engine, grants, reconciler: restores from the record
    reconciler = connected.reconciler
    reconciler.start()              every interval: flush what this process touched; the leader sweeps
    await reconciler.stop()         flushes once more and gives the lead back
    await reconciler.run_once()     `gateway reconcile --once`: sweep every Redis node, flush what the record lacks

A flush writes absolute values, so a lost or repeated one does no harm: the billable's snapshot (its whole
state and its members' (gateway.members), with the change counter `chg` and the Redis time it was read
at), its usage totals and each member's, and its pending events (into the outbox, before they leave
Redis). A snapshot only replaces an older one, and usage rows
are written in the same transaction, only when the snapshot was: two processes flushing the same billable
cannot put an older state over a newer one.

Any number of processes flush what they touched. One leads (a Redis lease that expires when its holder
dies) and sweeps: every state hash on every node whose `chg` differs from the record's is flushed, so what
a crashed process had not reported still reaches the record, and grants a crashed process recorded but
never applied are applied. While the database is down, dirty billables are kept (one entry each, however
often they change) and flushed when it returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from gateway.background import Background
from gateway.billing.outbox import take_billed
from gateway.catalog import Catalog
from gateway.census import Census
from gateway.coalesce import Coalescer
from gateway.engine import Engine
from gateway.errors import DatabaseUnavailable, RedisReplyError, RedisUnavailable, StateUnavailable
from gateway.events import Outbox
from gateway.grants import Grants, grants_after, numbered_grants
from gateway.members import Members
from gateway.settings import Settings
from gateway.state import PREFIX, EventBatch, Restored, Snapshot, grant_sequence, restorable
from gateway.store.db import (
    Database,
    billable_overrides,
    plan_assignments,
    snapshots,
    usage_daily,
    usage_totals,
)
from gateway.store.redis import RedisStore
from gateway.usage import COLUMNS, DAILY, day_of, rows_from_state

log = logging.getLogger("gateway.reconcile")

_REDIS_ERRORS = (RedisUnavailable, RedisReplyError)
STOP_FLUSH_S = 15.0  # the last flush when a process stops (each of its record operations has its own deadline)
RESTORE_TIMEOUT_S = 2.0
RESTORE_BATCH = 500  # billables read from the record in one go when many restore at once
STRANDED_GRANT_S = 5.0  # a live grant is applied within milliseconds of its commit
EVENTS_PER_FLUSH = 1000
PRUNE_EVERY_S = 3600.0  # the leader forgets old events from the outbox this often
EVENTS_RETENTION = timedelta(days=Settings.events_retention_days)  # the outbox keeps an event this long


class Reconciler:
    def __init__(
        self,
        engine: Engine,
        db: Database,
        outbox: Outbox | None = None,
        *,
        grants: Grants | None = None,
        interval: float = 1.0,
        sweep_interval: float | None = None,
        lease_seconds: float | None = None,
        batch: int = 500,
        parallel: int | None = None,
        events_retention: timedelta = EVENTS_RETENTION,
        holder: str | None = None,
        census: Census | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.db = db
        self.census = census  # started and stopped with the reconciler
        self.outbox = outbox or Outbox(db)
        self.grants = grants
        self.interval = interval
        # A sweep reads every state hash (about 3 s of one core per 100,000 billables), so not too often: a
        # process that takes the lead sweeps at once, which covers a dead leader's billables.
        self.sweep_interval = sweep_interval if sweep_interval is not None else max(30 * interval, 10.0)
        # Long enough to survive a slow tick, short enough that a dead leader's sweep resumes soon.
        self.lease_ms = int(1000 * (lease_seconds if lease_seconds is not None else max(3 * interval, 2.0)))
        self.lease_key = f"{engine.prefix}:reconcile:leader"
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.batch = batch
        # SQLite takes one writer at a time: more would only wait on its lock.
        self.parallel = parallel or (1 if db.is_sqlite else 4)
        self.clock = clock
        self.events_retention = events_retention
        # Billables to flush, each with when it was first seen dirty: one entry however often it changes.
        self.dirty: dict[str, float] = {}
        # The change counter this process last saw the record hold, per billable: unchanged is skipped.
        self.recorded: dict[str, int] = {}
        self.database_ok = True
        self.redis_ok = True
        self.error = ""
        self.leader = False
        self.flushed = 0  # billables written since start
        # Told which snapshots a flush just committed (the benchmark measures lag with it); must not block.
        self.on_flushed: Callable[[list[tuple[str, Snapshot]]], None] | None = None
        self._next_sweep = 0.0
        self._next_prune = 0.0
        self._running = Background("gateway-reconcile")
        self._sweeping = Background("gateway-sweep")
        self._statements: tuple[Any, Any, Any] | None = None

    # ---- running ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._running.start(self._run)
        if self.census is not None:
            self.census.start()

    async def stop(self) -> None:
        """Stop the loop, flush what is dirty once more, and give the lead back."""
        await self._running.stop()
        await self._sweeping.stop()
        if self.census is not None:
            await self.census.stop()
        try:
            async with asyncio.timeout(STOP_FLUSH_S):
                await self.flush_dirty()
        except Exception as exc:  # noqa: BLE001 - shutting down: say what stays unflushed, never hang
            log.warning("stopping with %d billables not flushed (the leader's sweep will): %s", len(self.dirty), exc)
        if self.leader:
            try:
                await self.engine.store.lease(self.lease_key, self.holder, 0)
            except _REDIS_ERRORS:
                pass  # it expires on its own
            self.leader = False

    async def _run(self) -> None:
        while True:
            started = self.clock()
            await self.tick()
            await asyncio.sleep(max(0.0, self.interval - (self.clock() - started)))

    async def tick(self) -> None:
        """One interval's work: flush what was touched; hold or take the lead; sweep when it is due."""
        try:
            await self.flush_dirty()
        except Exception as exc:  # the billables stay dirty; the loop goes on
            if not isinstance(exc, (DatabaseUnavailable, *_REDIS_ERRORS)):  # an outage is said once, when it begins
                log.exception("a flush failed; its billables stay dirty")
        try:
            self.leader = await self.engine.store.lease(self.lease_key, self.holder, self.lease_ms)
        except _REDIS_ERRORS:
            self.leader = False
        sweeping = self._sweeping.running
        if self.leader and not sweeping and self.clock() >= self._next_sweep:
            self._next_sweep = self.clock() + self.sweep_interval
            # A task of its own: over many billables a sweep takes seconds, and what this process touches
            # meanwhile must still reach the record within the interval.
            self._sweeping.start(self._sweep_logged)
        if self.leader and self.clock() >= self._next_prune:
            self._next_prune = self.clock() + PRUNE_EVERY_S
            try:
                pruned = await self.outbox.prune(self.events_retention)
            except DatabaseUnavailable as exc:
                log.warning("could not prune the event outbox (next try in an hour): %s", exc)
            else:
                if pruned:
                    log.info("pruned %d events older than %s from the outbox", pruned, self.events_retention)

    async def _sweep_logged(self) -> None:
        try:
            swept = await self.sweep()
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again
            log.warning("the sweep stopped: %s", exc)
        else:
            if swept:
                log.info("the sweep flushed %d billables no process had reported", swept)

    async def run_once(self) -> int:
        """One full pass: sweep every node and flush what the record lacks, then what this process touched."""
        return await self.sweep() + await self.flush_dirty()

    # ---- what needs flushing --------------------------------------------------------------------------

    def take(self) -> None:
        """Move the billables the engine touched into the dirty set."""
        touched = self.engine.take_touched()
        now = self.clock()
        for billable in touched:
            self.dirty.setdefault(billable, now)

    @property
    def lag(self) -> float:
        """Seconds the oldest unflushed change has waited (as seen from when this process took it)."""
        return self.clock() - min(self.dirty.values()) if self.dirty else 0.0

    def health(self) -> dict[str, Any]:
        return {
            "database": "up" if self.database_ok else "down",
            # Billables, each once: one already dirty may have been touched again since the last tick.
            "pending": len(self.dirty) + self.engine.touched_besides(self.dirty),
            "lag_seconds": round(self.lag, 3),
            "leader": self.leader,
            "last_error": self.error or None,
        }

    async def flush_dirty(self) -> int:
        self.take()
        if not self.dirty:
            return 0
        return await self.flush(list(self.dirty))

    async def sweep(self) -> int:
        """Flush every billable whose state in Redis differs from the record's (its `chg` does), apply grants a
        crashed process recorded but never applied, and drop holds whose settle never came (past GATEWAY_HOLD_TTL)."""
        if self.grants is not None:
            await self.apply_stranded_grants()
        flushed = 0
        found: list[str] = []
        async for billable in self.engine.billables():
            found.append(billable)
            if len(found) >= 1000:
                flushed += await self._sweep_some(found)
                found = []
        if found:
            flushed += await self._sweep_some(found)
        return flushed

    async def apply_stranded_grants(self, older_than: float = STRANDED_GRANT_S) -> int:
        """Apply the grants recorded more than `older_than` seconds ago and still not in Redis: the process
        that recorded them died before applying (money first: recorded means it will be applied)."""
        assert self.grants is not None
        since = datetime.now(UTC) - timedelta(seconds=older_than)
        try:
            billables = await self.grants.stranded(since)
            for billable in billables:
                await self.grants.apply(billable)
        except DatabaseUnavailable as exc:
            self._database_down(exc)
            raise
        if billables:
            log.info("applied the stranded grants of %d billables", len(billables))
        return len(billables)

    async def _sweep_some(self, billables: list[str]) -> int:
        billables = list(dict.fromkeys(billables))  # SCAN may return a key twice
        await self.engine.expire_holds(billables)  # before the counters: an expiry is a change to flush
        counters = await self.engine.change_counters(billables)
        recorded = await self._recorded(billables)
        stale = [b for b, chg in zip(billables, counters, strict=True) if chg is not None and recorded.get(b) != chg]
        return await self.flush(stale, force=True) if stale else 0

    async def _recorded(self, billables: list[str]) -> dict[str, int]:
        try:
            async with self.db.engine.connect() as conn:
                found = await conn.execute(
                    sa.select(snapshots.c.billable, snapshots.c.chg).where(snapshots.c.billable.in_(billables))
                )
                return {row.billable: int(row.chg) for row in found}
        except DatabaseUnavailable as exc:
            self._database_down(exc)
            raise

    # ---- flushing -----------------------------------------------------------------------------------

    async def flush(self, billables: Sequence[str], *, force: bool = False) -> int:
        """Write these billables to the record, in batches, a few at once. Returns how many were written.

        A batch that fails stays dirty (to be flushed when the database or Redis is back) and the error
        is raised after the others stop; `force` writes even where this process saw the record current."""
        queue = deque(list(billables[i : i + self.batch]) for i in range(0, len(billables), self.batch))
        failed: list[Exception] = []
        written = 0

        async def worker() -> None:
            nonlocal written
            while queue and not failed:
                batch = queue.popleft()
                try:
                    done = await self._flush_batch(batch, force)
                except Exception as exc:  # noqa: BLE001 - kept dirty and reported below
                    failed.append(exc)
                    self._keep(batch)
                else:
                    written += done  # after the await: `written += await ...` would lose other workers' counts

        await asyncio.gather(*(worker() for _ in range(min(self.parallel, len(queue)) or 1)))
        for batch in queue:
            self._keep(batch)
        if failed:
            raise failed[0]
        return written

    def _keep(self, billables: Iterable[str]) -> None:
        now = self.clock()
        for billable in billables:
            self.dirty.setdefault(billable, now)

    async def _flush_batch(self, billables: list[str], force: bool) -> int:
        try:
            snaps = await self.engine.snapshots(billables)
            writes: list[tuple[str, Snapshot]] = []
            for billable, snap in zip(billables, snaps, strict=True):
                if not snap.has_state:
                    continue  # gone from Redis, or not restored yet: nothing here may replace the record's
                chg = snap.change_counter
                if not force and snap.pending_events == 0 and self.recorded.get(billable) == chg:
                    continue
                writes.append((billable, snap))
            with_events = [b for b, snap in writes if snap.pending_events]
            batches: list[EventBatch] = list(
                await asyncio.gather(*(self.engine.read_events(b, EVENTS_PER_FLUSH) for b in with_events))
            )
        except _REDIS_ERRORS as exc:
            self._redis_down(exc)
            raise
        try:
            # Events enter the outbox before the snapshot that counts them: a crash between the two
            # leaves `chg` unrecorded, so the billable is flushed again (the outbox ignores repeats).
            await self.outbox.add([e for batch in batches for e in batch.events])
            await self._write(writes)
        except DatabaseUnavailable as exc:
            self._database_down(exc)
            raise
        self.database_ok = True
        if len(self.recorded) > 1_000_000:
            self.recorded.clear()  # only an optimization: forgetting costs one redundant write each
        for billable, snap in writes:
            self.recorded[billable] = snap.change_counter
        for billable in billables:
            self.dirty.pop(billable, None)
        try:
            await asyncio.gather(
                *(self.engine.ack_events(b, len(batch.events), through=batch.mark) for b, batch in zip(with_events, batches))
            )
            for billable, snap in writes:  # past months' usage is in the record now
                await self.engine.forget_usage(billable, self.engine.past_usage(snap.state))
                for member, saved in snap.members.items():
                    await self.engine.forget_usage(billable, self.engine.past_usage(saved), member)
        except _REDIS_ERRORS as exc:
            self._redis_down(exc)  # the events stay pending (they are in the outbox already), past usage stays
        for billable, batch in zip(with_events, batches, strict=True):
            if len(batch.events) >= EVENTS_PER_FLUSH:
                self._keep([billable])  # more are waiting
        self.redis_ok = True
        self.flushed += len(writes)
        if self.on_flushed is not None and writes:
            self.on_flushed(writes)
        return len(writes)

    async def _write(self, writes: list[tuple[str, Snapshot]]) -> None:
        """Upsert the snapshots (only over older ones), then the usage totals of those written."""
        if not writes:
            return
        per_dollar = self.engine.catalog.settings.credits_per_dollar
        rows: list[dict[str, Any]] = sorted(
            (
                {
                    "billable": billable,
                    "state": json.dumps(snap.state, separators=(",", ":")),
                    "chg": snap.change_counter,
                    "updated_at": datetime.fromtimestamp(snap.now_ms / 1000, UTC),
                    "members": json.dumps(snap.members, separators=(",", ":")) if snap.members else None,
                }
                for billable, snap in writes
            ),
            key=lambda r: str(r["billable"]),  # one lock order in every process: no deadlocks between flushes
        )
        # The usage history of each billable written, and of each of its members (a team's, a key's own).
        states = {billable: [(billable, snap.state), *await self._members_now(billable, snap)] for billable, snap in writes}
        zone = self.engine.catalog.settings.zone
        days = {owner: day_of(zone, snap.now_ms / 1000) for billable, snap in writes for owner, _ in states[billable]}
        snapshot_upsert, usage_upsert, daily_upsert = self._upserts()
        async with self.db.engine.begin() as conn:
            # One statement each, compiled once and cached; the driver sends the rows in multi-row pages.
            written = set((await conn.execute(snapshot_upsert, rows)).scalars())
            usage = [
                {"billable": billable, "period": r.period, "route": r.route, "operation": r.operation,
                 "requests": r.requests, "units": r.units, "credits": r.credits, "amount_cents": r.amount_cents,
                 "shadow_denials": r.shadow_denials}
                for root in sorted(written)
                for billable, saved in states[root]
                for r in rows_from_state(saved, per_dollar)
            ]
            if usage:
                daily = await self._increases(conn, usage, days)
                await conn.execute(usage_upsert, usage)
                if daily:
                    await conn.execute(daily_upsert, daily)
            await take_billed(conn, self.db, dict(writes), written)

    async def _members_now(self, root: str, snap: Snapshot) -> list[tuple[str, dict[str, str]]]:
        """The member states of `snap` whose member is `root`'s now: a team that moved to another org left
        its old hash behind, and only the new one's counts are its usage history (else both would be
        written, each over the other)."""
        chain_of = self.engine.chain_of
        if chain_of is None:
            return sorted(snap.members.items())
        return [(m, saved) for m, saved in sorted(snap.members.items()) if (chain := await chain_of(m)) is not None and chain.root == root]

    async def _increases(self, conn: Any, usage: list[dict[str, Any]], days: dict[str, str]) -> list[dict[str, Any]]:
        """What each total grew by since the record's value (read under a row lock, in the upsert's
        transaction), on the flush's day: a repeated flush of the same absolute totals adds nothing."""
        t = usage_totals
        key = (t.c.billable, t.c.period, t.c.route, t.c.operation)
        old = {
            tuple(r[:4]): r[4:]
            for r in await conn.execute(
                sa.select(*key, *(t.c[c] for c in DAILY))
                .where(t.c.billable.in_({u["billable"] for u in usage}), t.c.period.in_({u["period"] for u in usage}))
                .order_by(*key)
                .with_for_update()
            )
        }
        daily = []
        for u in usage:
            before = old.get((u["billable"], u["period"], u["route"], u["operation"]), (0,) * len(DAILY))
            grown = {c: max(0, int(u[c]) - int(b)) for c, b in zip(DAILY, before, strict=True)}
            if any(grown.values()):
                daily.append({"billable": u["billable"], "day": days[u["billable"]], "route": u["route"],
                              "operation": u["operation"], **grown})
        return daily

    def _upserts(self) -> tuple[Any, Any, Any]:
        if self._statements is None:
            insert = self.db.insert(snapshots)
            snapshot_upsert = insert.on_conflict_do_update(
                index_elements=[snapshots.c.billable],
                set_={c: insert.excluded[c] for c in ("state", "chg", "updated_at", "members")},
                # A snapshot read earlier (by a slower process) never replaces a later one.
                where=sa.and_(snapshots.c.chg != insert.excluded.chg, snapshots.c.updated_at <= insert.excluded.updated_at),
            ).returning(snapshots.c.billable)
            insert = self.db.insert(usage_totals)
            usage_upsert = insert.on_conflict_do_update(
                index_elements=[usage_totals.c.billable, usage_totals.c.period, usage_totals.c.route, usage_totals.c.operation],
                set_={c: insert.excluded[c] for c in COLUMNS},
            )
            insert = self.db.insert(usage_daily)
            daily_upsert = insert.on_conflict_do_update(
                index_elements=[usage_daily.c.billable, usage_daily.c.day, usage_daily.c.route, usage_daily.c.operation],
                set_={c: usage_daily.c[c] + insert.excluded[c] for c in DAILY},
            )
            self._statements = (snapshot_upsert, usage_upsert, daily_upsert)
        return self._statements

    def _database_down(self, exc: BaseException) -> None:
        if self.database_ok:
            log.warning("the database did not take a flush; keeping billables dirty until it does: %s", exc)
        self.database_ok = False
        self.error = f"database: {exc.__class__.__name__}: {exc}"[:500]

    def _redis_down(self, exc: BaseException) -> None:
        if self.redis_ok:
            log.warning("Redis did not answer a flush; keeping billables dirty: %s", exc)
        self.redis_ok = False
        self.error = f"redis: {exc}"[:500]


def census_margin(db: Database) -> float:
    """Longer than a flush may take from its Redis read to its commit: two record operations, and slack."""
    return 2 * db.timeout + 5.0


@dataclass(frozen=True, slots=True)
class Connected:
    """An engine and what connects it to the record, built together (`connect`)."""

    engine: Engine
    grants: Grants
    reconciler: Reconciler
    rehydrator: Rehydrator


def connect(
    store: RedisStore,
    catalog: Catalog,
    db: Database,
    *,
    prefix: str = PREFIX,
    hold_ttl: int = 3600,
    interval: float = 1.0,
    events_retention: timedelta = EVENTS_RETENTION,
) -> Connected:
    """An engine connected to the record: Redis's lost states are restored from it, changes flushed to it.

    Every engine that writes to Redis next to a record needs both: one that applied a grant to a state
    Redis lost, without restoring it first, would hide the record's balance behind a fresh one. A team or a
    key with terms is decided with its org (gateway.members)."""
    census = Census(store, db, prefix=prefix, margin=census_margin(db))
    rehydrator = Rehydrator(db, census=census)
    engine = Engine(
        store, catalog, prefix=prefix, hold_ttl=hold_ttl, restore=rehydrator.restore, grants_after=rehydrator.grants_after,
        chain_of=Members(db).chain,
    )
    grants = Grants(db, engine)
    reconciler = Reconciler(engine, db, grants=grants, interval=interval, events_retention=events_retention, census=census)
    return Connected(engine, grants, reconciler, rehydrator)


class Rehydrator:
    """The engine's restore hooks: a billable's state Redis lost comes back from the record.

    `restore` reads the last snapshot, the manual plan assignment (part of the record since it was made),
    and the grants numbered after the snapshot's, in one go; the engine puts the snapshot back and applies
    those grants in one script (money first: one applied after the last flush is not lost, even when the
    process dies right after). `grants_after` gives the engine the grants to replay from what Redis holds
    when a restore found it behind.

    A billable the record has nothing of starts new. When the record does not answer, the billable starts
    new only if the census (`gateway.census`, which states the rule) shows the record has nothing of it
    and Redis has lost nothing since the census read; otherwise the error is raised and the route's
    on_redis_down applies. Without a census, always the latter."""

    def __init__(self, db: Database, *, timeout: float = RESTORE_TIMEOUT_S, census: Census | None = None) -> None:
        self.db = db
        self.timeout = timeout
        self.census = census
        # One read of the record at a time; the restores asked for while it runs (a Redis restart under load)
        # share the next one. A read per request instead queued hundreds on the reader: 150 ms each.
        self._reads: Coalescer[str, Restored] = Coalescer(self._read, size=RESTORE_BATCH)

    async def restore(self, billable: str) -> Restored | None:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._reads.get(billable)
        except (DatabaseUnavailable, TimeoutError):
            if self.census is None or not await self.census.is_new(billable):
                raise
        return None  # the record holds nothing of it: nothing to replay

    async def _read(self, billables: list[str]) -> dict[str, Restored]:
        """The snapshots, manual plans and grants of these billables, in one query (one round trip: under
        load each costs a turn of the event loop)."""
        numbered = numbered_grants(billables).subquery()
        none = sa.cast(sa.null(), numbered.c.seq.type)
        query = sa.union_all(
            sa.select(sa.literal("s"), snapshots.c.billable, snapshots.c.state, none, none)
            .where(snapshots.c.billable.in_(billables)),
            sa.select(sa.literal("m"), snapshots.c.billable, snapshots.c.members, none, none)
            .where(snapshots.c.billable.in_(billables), snapshots.c.members.is_not(None)),
            sa.select(sa.literal("p"), plan_assignments.c.billable, plan_assignments.c.plan, none, none)
            .where(plan_assignments.c.billable.in_(billables)),
            sa.select(sa.literal("o"), billable_overrides.c.billable, billable_overrides.c.overrides, none, none)
            .where(billable_overrides.c.billable.in_(billables), billable_overrides.c.overrides.is_not(None)),
            sa.select(sa.literal("x"), billable_overrides.c.billable, billable_overrides.c.suspension, none, none)
            .where(billable_overrides.c.billable.in_(billables), billable_overrides.c.suspension.is_not(None)),
            sa.select(sa.literal("g"), numbered.c.billable, sa.cast(sa.null(), sa.Text), numbered.c.seq, numbered.c.amount),
        )  # fmt: skip
        states: dict[str, dict[str, str]] = {}
        members: dict[str, dict[str, dict[str, str]]] = {}
        plans: dict[str, str] = {}
        overrides: dict[str, str] = {}
        suspended: set[str] = set()
        all_grants: list[tuple[str, int, int]] = []
        async with asyncio.timeout(self.timeout), self.db.reader.connect() as conn:
            for kind, billable, text, seq, amount in await conn.execute(query):
                if kind == "s":
                    states[billable] = json.loads(text)
                elif kind == "m":
                    members[billable] = json.loads(text)
                elif kind == "p":
                    plans[billable] = text
                elif kind == "o":
                    overrides[billable] = text
                elif kind == "x":
                    suspended.add(billable)
                else:
                    all_grants.append((billable, int(seq), int(amount)))
        grants: dict[str, list[tuple[int, int]]] = {}
        for b, seq, amount in sorted(all_grants):
            if seq > grant_sequence(states.get(b) or {}):
                grants.setdefault(b, []).append((seq, amount))
        found: dict[str, Restored] = {}  # the record knows nothing of the others: they start new
        for billable in billables:
            state, plan, after = states.get(billable), plans.get(billable), grants.get(billable, [])
            terms, held = overrides.get(billable), billable in suspended
            if state is None and plan is None and not after and terms is None and not held:
                continue
            # A plan version no process can have cached: every process resolves the plan again. That is a
            # change, so the restored state is flushed like any other.
            saved = restorable(state, plan, int(time.time() * 1000), overrides=terms, suspended=held)
            found[billable] = Restored(saved, tuple(after), members.get(billable, {}))
        return found

    async def grants_after(self, billable: str, after: int) -> list[tuple[int, int]]:
        """The grants the record numbers above `after` (what Redis holds: a restore found it behind them)."""
        try:
            async with self.db.engine.connect() as conn:
                return await grants_after(conn, billable, after)
        except DatabaseUnavailable as exc:
            log.error("billable %r was restored but its grants could not be replayed yet: %s", billable, exc)
            raise StateUnavailable(f"the grants of {billable!r} could not be replayed: {exc}") from exc
