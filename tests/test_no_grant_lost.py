"""A Redis loss loses no grant (DESIGN §5): what the record has and Redis lacks is replayed, once each, in order.

Grants are committed to the record (SQLite file, Postgres) before Redis sees them, numbered without gaps per
billable. When Redis loses a billable, its first request restores the last snapshot, which may be older than
the last grants: every grant numbered after the snapshot's is replayed. When Redis holds fewer grants than the
record says (a promoted replica that missed the last writes, a restore from an older snapshot by another
process), the next grant finds the gap and the record's missing grants are pushed first.

Redis is a private redis-server (these tests restart it) or a replica of one; every process is wired as
`gateway serve` wires it (`reconcile.connect`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from engine_support import BASE
from services import RedisServer, RedisSpace
from waiting import wait_until

from gateway.catalog import parse_catalog
from gateway.engine import Engine
from gateway.grants import Grants
from gateway.reconcile import Reconciler, Rehydrator, connect
from gateway.state import GrantReply, Restored
from gateway.store.db import Database, credit_grants
from gateway.store.resp import Arg

CATALOG = parse_catalog(BASE)
ORG = "org-grants"


@dataclass
class Process:
    """One gateway process's engine, grants, reconciler and restorer; `applied` is every grant it sent Redis and
    the answer."""

    engine: Engine
    grants: Grants
    reconciler: Reconciler
    rehydrator: Rehydrator
    applied: list[tuple[int, str]] = field(default_factory=list)

    async def grant(self, amount: int) -> int:
        record = await self.grants.grant(ORG, amount, reason="test", idempotency_key=f"k-{uuid.uuid4().hex}")
        return record.sequence

    async def purchased(self) -> int:
        credits = (await self.engine.status(ORG))["credits"]
        assert credits["debt"] == 0
        return int(credits["purchased"])

    async def sequence(self) -> int:
        return int((await self.engine.snapshot(ORG)).state.get("c:seq", 0))


@dataclass
class Record:
    db: Database
    prefix: str
    processes: list[Process] = field(default_factory=list)

    def process(self, redis_url: str) -> Process:
        """A new gateway process (empty caches, connections of its own) on `redis_url`."""
        c = connect(RedisSpace(redis_url, self.prefix).store(), CATALOG, self.db, prefix=self.prefix)
        engine = c.engine
        p = Process(engine, c.grants, c.reconciler, c.rehydrator)
        store = engine.store
        run = store.run

        # Each grant script's outcome, seen at the store: the engine may be compiled (mypyc), whose calls
        # to its own methods no patch of them reaches.
        async def recorded(name: str, keys: list[str], args: Sequence[Arg]) -> Any:
            reply = await run(name, keys, args)
            found = GrantReply.parse(reply) if name == "grant" else None
            if found is not None and found.status != "missing":  # missing: restored, then applied
                p.applied.append((int(args[0]), found.status))
            return reply

        store.run = recorded  # type: ignore[method-assign]
        self.processes.append(p)
        return p

    async def unapplied(self) -> list[int]:
        async with self.db.engine.connect() as conn:
            found = await conn.execute(sa.select(credit_grants.c.seq).where(credit_grants.c.applied_at.is_(None)))
            return sorted(found.scalars())


@asynccontextmanager
async def record(db_url: str) -> AsyncIterator[Record]:
    db = await Database.connect(db_url)
    await db.upgrade()
    rec = Record(db, f"gwt{uuid.uuid4().hex[:10]}")
    try:
        yield rec
    finally:
        for p in rec.processes:
            await p.engine.store.close()
        await db.close()


def lose(server: RedisServer, engine: Engine, how: str) -> None:
    """Redis loses the billable: restarted without persistence, or its keys deleted (as an eviction would)."""
    if how == "restart":
        server.stop()
        server.start()
    else:
        with server.client() as c:
            assert c.delete(*engine.keys(ORG)) >= 1


@pytest.mark.parametrize("loss", ["restart", "deleted"])
def test_grants_after_the_last_snapshot_are_replayed_once_each_in_order(
    empty_db_url: str, private_redis: RedisServer, loss: str
) -> None:
    """Grants recorded and applied after the last snapshot (a take-back among them) come back after the loss:
    the next decision restores the older snapshot and replays each later grant once, in sequence order, and
    neither a retry, a sweep nor a second loss counts any of them again."""

    async def main() -> None:
        async with record(empty_db_url) as rec:
            p = rec.process(private_redis.url)
            assert await p.grant(100) == 1
            assert (await p.engine.decide(ORG, CATALOG.route_for("POST", "/cheap-images"))).admitted  # 5 of the 10
            assert await p.reconciler.flush_dirty() == 1  # the snapshot: grant 1, allowance half spent
            later = [await p.grant(amount) for amount in (-30, 7, 200)]  # applied in Redis, not in the snapshot
            assert later == [2, 3, 4] and await p.purchased() == 277
            assert await rec.unapplied() == []

            lose(private_redis, p.engine, loss)
            q = rec.process(private_redis.url)  # the next request, on another process
            decision = await q.engine.decide(ORG, CATALOG.route_for("POST", "/cheap-images"))
            assert decision.admitted  # the 5 credits of allowance the snapshot kept
            assert q.applied == []  # grants 2, 3, 4 came back in the restore's own script, each once
            assert await q.purchased() == 277 and await q.sequence() == 4
            assert (await q.engine.status(ORG))["credits"]["period"] == 0

            await q.grants.apply(ORG)  # a retry: nothing is pending in the record
            assert await q.reconciler.apply_stranded_grants(older_than=0) == 0
            assert await p.purchased() == 277

            # The restored state reaches the record; lost again, it comes back from there with nothing to replay.
            assert await q.reconciler.flush_dirty() == 1
            lose(private_redis, q.engine, loss)
            r = rec.process(private_redis.url)
            assert await r.purchased() == 277 and await r.sequence() == 4
            assert r.applied == []

    asyncio.run(main())


def test_a_new_grant_finds_a_promoted_replica_behind_and_replays_what_it_missed(empty_db_url: str) -> None:
    """A replica promoted before it received the last two grants holds fewer than the record says: the next
    grant finds the gap, the record's missing grants are pushed first, in order, then the new one."""

    async def main(master: RedisServer, replica: RedisServer) -> None:
        async with record(empty_db_url) as rec:
            p = rec.process(master.url)
            assert await p.grant(50) == 1
            with replica.client() as c:
                wait_until(lambda: c.hget(p.engine.keys(ORG)[0], "c:seq") == "1", "the replica to have grant 1")
                c.execute_command("REPLICAOF", "NO", "ONE")  # promoted: it takes no more writes from the master
            assert [await p.grant(amount) for amount in (20, 5)] == [2, 3]  # only the old master has these

            q = rec.process(replica.url)  # the gateway now talks to the promoted replica
            assert await q.purchased() == 50 and await q.sequence() == 1  # Redis is behind the record
            assert await q.grant(1) == 4
            assert q.applied == [(4, "gap"), (2, "applied"), (3, "applied"), (4, "applied")]
            assert await q.purchased() == 76 and await q.sequence() == 4
            assert await rec.unapplied() == []
            await q.grants.apply(ORG)
            assert await q.purchased() == 76

    with RedisServer() as master, RedisServer("--replicaof", "127.0.0.1", str(master.port)) as replica:
        asyncio.run(main(master, replica))


def test_a_restore_that_finds_an_older_one_landed_first_replays_from_what_redis_holds(
    empty_db_url: str, private_redis: RedisServer
) -> None:
    """Two processes restore one billable: the one that read the record before a late flush landed puts the
    older snapshot back first without the grants after it (as a process of the release before restores made
    both one script did); the other, holding the newer snapshot's grants, finds Redis behind them and replays
    every grant after what Redis holds, in order, once."""

    async def main() -> None:
        async with record(empty_db_url) as rec:
            p = rec.process(private_redis.url)
            assert await p.grant(10) == 1
            await p.reconciler.flush_dirty()  # the record's snapshot has grant 1
            assert await p.grant(20) == 2
            in_flight = await p.engine.snapshot(ORG)  # p's next flush has read grant 2; its write is late
            assert await p.grant(40) == 3

            lose(private_redis, p.engine, "restart")
            r, q = rec.process(private_redis.url), rec.process(private_redis.url)
            older = await r.rehydrator.restore(ORG)  # r reads the record: grant 1's snapshot, grants 2 and 3 after it
            assert older is not None and older.grant_sequence == 1 and [g[0] for g in older.grants] == [2, 3]
            await p.reconciler._write([(ORG, in_flight)])  # p's late flush lands: grant 2's snapshot
            read = q.rehydrator._reads.fetch

            async def while_r_restores_first(billables: list[str]) -> Mapping[str, Restored]:
                found = await read(billables)
                newer = found[ORG]  # q reads grant 2's snapshot (grants after it: 3)
                assert newer.grant_sequence == 2
                await r.engine.restore_state(ORG, Restored(older.state))  # r's older snapshot lands first, alone
                return found

            q.rehydrator._reads.fetch = while_r_restores_first
            assert (await q.engine.decide(ORG, CATALOG.route_for("GET", "/anything"))).admitted
            assert q.applied == [(2, "applied"), (3, "applied")]  # its restore found the gap, the replay filled it
            assert await q.purchased() == 70 and await q.sequence() == 3
            assert r.applied == []

    asyncio.run(main())


def test_a_process_that_dies_between_restore_and_replay_loses_no_grant(
    empty_db_url: str, private_redis: RedisServer
) -> None:
    """A process restores the snapshot and dies before replaying the grants after it: the next decision, or
    at the latest the leader's sweep, still gives the billable every grant."""

    async def main() -> None:
        async with record(empty_db_url) as rec:
            p = rec.process(private_redis.url)
            assert await p.grant(10) == 1
            await p.reconciler.flush_dirty()
            assert await p.grant(20) == 2  # after the snapshot

            lose(private_redis, p.engine, "restart")
            r = rec.process(private_redis.url)
            state = await r.rehydrator.restore(ORG)
            assert state is not None
            await r.engine.restore_state(ORG, state)  # r dies here: the snapshot and grant 2 landed as one

            q = rec.process(private_redis.url)
            assert (await q.engine.decide(ORG, CATALOG.route_for("GET", "/anything"))).admitted
            await q.reconciler.sweep()
            assert await q.purchased() == 30

    asyncio.run(main())
