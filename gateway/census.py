"""Which billables the record holds: how one Redis lacks is told new from lost while the record is down.

Redis has an epoch per master (lua/epoch.lua: its run id and replication id, DESIGN §5), and it changes
whenever that master may have lost data: a restart, a replica promoted. A billable Redis lacks is
restored from the record when the record answers (`gateway.reconcile.Rehydrator`). When it does not,
the rule is:

    new  iff  the epoch of the billable's slot's master, read now, began at least `margin` before the census
              last read the record, and the billable is not in that census;
    otherwise it cannot be told from one Redis lost, and the route's on_redis_down applies.

The census is the set of billables the record holds anything of (a snapshot, a manual plan, a credit
grant), read at start and again whenever a master has an epoch it does not cover yet. Why the rule is
sound: the epoch seen now was in force when the census read the record (a master's epoch never comes
back once gone), and the billable is missing under it, so it had no state in this epoch (`noeviction`
is required: an evicted billable would pass for new). Whatever the record holds of it therefore comes
from a flush that read an earlier epoch, before this one began, and committed within a flush's deadline
of that read: before the census read, which is what the margin ensures. (A plan assigned or a grant
recorded since goes to Redis too, and is restored or replayed once the record is back.)

When an epoch began is known at the latest: when this process first saw it, or earlier by as long as the
master says it has lasted (its uptime, while no promotion replaced its replication id: lib/epoch.lua). So
a process started beside a Redis long up reads the census at once and decides a signup during a record
outage from its first request; beside a Redis just (re)started it waits out the margin.

DESIGN states it as "new only if this process saw the same epoch when it last read the record"; that
alone would take a billable the record holds but no request has restored since the epoch began for new,
and hand it a fresh quota. The census is what tells those apart.

    census = Census(store, db, prefix="gw", margin=20.0)
    census.start()                      every second: learn the masters' epochs, read the record when due
    await census.is_new(billable)       the rule above, for a billable Redis lacks while the record is down
    await census.stop()
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import math
import time
from array import array
from collections.abc import Callable

import sqlalchemy as sa

from gateway import state
from gateway.background import Background
from gateway.grants import granted_billables
from gateway.overrides import overridden_billables
from gateway.store.db import Database, plan_assignments, snapshots
from gateway.store.redis import RedisStore

log = logging.getLogger("gateway.census")

INTERVAL_S = 1.0
READ_TIMEOUT_S = 60.0  # reading every billable id of a large record takes a while; nothing waits on it
PARTITION = 10_000


def _hash(billable: str) -> int:
    """64 bits of the id: a collision only makes a new billable follow on_redis_down during an outage."""
    return int.from_bytes(hashlib.blake2b(billable.encode(), digest_size=8).digest(), "big", signed=True)


class Census:
    def __init__(
        self,
        store: RedisStore,
        db: Database,
        *,
        prefix: str,
        margin: float,
        interval: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.db = db
        self.prefix = prefix
        self.margin = margin  # longer than a flush may take from its Redis read to its commit
        self.interval = interval
        self.clock = clock
        self.read_at = -math.inf  # when the last census read began
        self._hashes = array("q")  # sorted
        self._first_seen: dict[str, float] = {}  # epoch → when it began at the latest (this process saw it, or Redis's uptime)
        self._watching = Background("gateway-census")
        self._failing = False

    def start(self) -> None:
        self._watching.start(self._run)

    async def stop(self) -> None:
        await self._watching.stop()

    async def _run(self) -> None:
        while True:
            try:
                await self.watch()
            except Exception as exc:  # noqa: BLE001 - the next round tries again; until then on_redis_down
                if not self._failing:
                    log.warning("cannot read which billables the record holds (%s: %s); while the record is "
                                "down, billables Redis lacks follow on_redis_down", type(exc).__name__, exc)
                self._failing = True
            else:
                if self._failing:
                    log.info("read which billables the record holds again")
                self._failing = False
            await asyncio.sleep(self.interval)

    async def watch(self) -> None:
        """Learn every master's epoch; read the record when one has been seen long enough and is not covered."""
        now = self.clock()
        due = False
        for epoch, age in (await self.store.epochs()).values():
            # An epoch Redis says began `age` seconds ago was in force then: a Redis long up is covered by
            # the first read, and a new process decides a new billable from its start.
            first = self._first_seen.setdefault(epoch, now - age)
            due = due or self.read_at < first + self.margin <= now
        if due:
            await self.read()

    async def read(self) -> None:
        """Read the ids of every billable the record holds anything of (their hashes: 8 bytes each)."""
        started = self.clock()  # the epochs seen so far were in force before the query sees the record
        query = sa.union(
            sa.select(snapshots.c.billable), sa.select(plan_assignments.c.billable), granted_billables(), overridden_billables()
        )
        hashes: list[int] = []
        async with asyncio.timeout(READ_TIMEOUT_S), self.db.reader.connect() as conn:
            result = await conn.stream_scalars(query)
            async for part in result.partitions(PARTITION):
                hashes.extend(_hash(b) for b in part)
                await asyncio.sleep(0)  # a large record: let requests through between partitions
        hashes.sort()
        self._hashes, self.read_at = array("q", hashes), started
        log.info("the record holds %d billables: while it is down, a billable Redis lacks is new only if it "
                 "is not one of them", len(hashes))

    async def is_new(self, billable: str) -> bool:
        """The rule of this module's docstring, for a billable Redis lacks while the record is down."""
        epoch = str(await self.store.run("epoch", state.keys(self.prefix, billable).only_state(), []))
        first = self._first_seen.setdefault(epoch, self.clock())
        if first + self.margin > self.read_at:
            return False  # Redis may have lost data since the census read the record
        h = _hash(billable)
        i = bisect.bisect_left(self._hashes, h)
        return i == len(self._hashes) or self._hashes[i] != h
