"""A billable's state for the record: snapshots, pending events and their acks, the scans of the sweep."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from gateway import state
from gateway.state import EventBatch, Snapshot
from gateway.store.redis import RedisStore


class Touched:
    """Billables whose Redis state this process changed since the reconciler last took them."""

    def __init__(self) -> None:
        self._billables: set[str] = set()

    def add(self, billable: str) -> None:
        self._billables.add(billable)

    def update(self, billables: Iterable[str]) -> None:
        self._billables.update(billables)

    def take(self) -> set[str]:
        taken, self._billables = self._billables, set()
        return taken

    def __contains__(self, billable: object) -> bool:
        return billable in self._billables

    def __len__(self) -> int:
        return len(self._billables)

    def difference(self, other: Iterable[str]) -> set[str]:
        return self._billables.difference(other)


class Transfer:
    def __init__(self, store: RedisStore, prefix: str, touched: Touched, clock: Callable[[], float]) -> None:
        self.store = store
        self.prefix = prefix
        self._touched = touched
        self.clock = clock

    def keys(self, billable: str) -> state.Keys:
        return state.keys(self.prefix, billable)

    async def snapshots(self, billables: Sequence[str]) -> list[Snapshot]:
        """Each billable's whole state, read at once (on a single server, in one write)."""
        replies = await self.store.run_many("snapshot", [(self.keys(b).all(), ()) for b in billables])
        return [Snapshot.parse(reply) for reply in replies]

    async def forget(self, billable: str, counters: dict[str, str], member: str | None = None) -> int:
        """Drop these fields (of `member`'s state hash, when given) unless they changed since they were read."""
        if not counters:
            return 0
        keys = self.keys(billable).only_state() + ([state.member_key(self.prefix, billable, member)] if member is not None else [])
        forgotten = int(await self.store.run("forget", keys, state.forget_argv(counters)))
        if forgotten:
            self._touched.add(billable)
        return forgotten

    async def read_events(self, billable: str, limit: int = 1000) -> EventBatch:
        return EventBatch.parse(billable, await self.store.read_list(self.keys(billable).events, limit))

    async def pending_events(self, billable: str, limit: int = 1000) -> list[dict[str, Any]]:
        return (await self.read_events(billable, limit)).events

    async def ack_events(self, billable: str, count: int, *, through: tuple[int, int] | None = None) -> None:
        """Drop the `count` oldest pending events once the record holds them.

        With `through` (an EventBatch's mark) only those at or before it go: another process may have
        taken the same batch and acked it already, and the events after it are not in the record yet."""
        if count <= 0:
            return
        if through is None:
            await self.store.trim_list(self.keys(billable).events, count)
        else:
            await self.store.run("ack", self.keys(billable).only_events(), state.AckArgs(count, *through).argv())

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
            self._touched.update(due)
        return due
