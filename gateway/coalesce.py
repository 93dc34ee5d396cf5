"""One lookup in flight at a time; the keys asked for meanwhile share the next (group commit for reads).

Under load every database round trip costs a turn of the event loop, so a query per key (a restore per
billable after a Redis restart, a lookup per API key after a start) queues hundreds of them. Here:

    batches = Coalescer(fetch, size=500)   fetch(keys) -> {key: value}, for at most `size` keys at a time
    value = await batches.get(key)         the fetch's value for key (None when it has none) or its error
    batches.add(key)                       the same without waiting for it (a write nobody waits on)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    def __init__(self, fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]], *, size: int = 500) -> None:
        self.fetch = fetch
        self.size = size
        # Until answered: who asks for a key whose fetch is on its way waits for that one.
        self._pending: dict[K, asyncio.Future[V | None]] = {}
        self._queued: dict[K, None] = {}  # keys for the next fetch, in the order asked
        self._running: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V | None:
        # Shielded: one caller giving up (its client left) must not cancel the others' answer.
        return await asyncio.shield(self._future(key))

    def add(self, key: K) -> None:
        self._future(key)

    def _future(self, key: K) -> asyncio.Future[V | None]:
        future = self._pending.get(key)
        if future is None:
            future = self._pending[key] = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieve)
            self._queued[key] = None
            if self._running is None:
                self._running = asyncio.ensure_future(self._run())
        return future

    async def _run(self) -> None:
        try:
            while self._queued:
                keys = list(self._queued)[: self.size]
                for key in keys:
                    del self._queued[key]
                found: Mapping[K, V] = {}
                failure: Exception | None = None
                try:
                    found = await self.fetch(keys)
                except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
                    failure = exc
                for key in keys:
                    future = self._pending.pop(key)
                    if future.done():
                        continue
                    if failure is not None:
                        future.set_exception(failure)
                    else:
                        future.set_result(found.get(key))
        finally:
            self._running = None

    async def drain(self) -> None:
        """Wait until every key asked for so far is answered."""
        while self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)


def _retrieve(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()  # retrieved, so a failure nobody awaited any more is not reported as lost
