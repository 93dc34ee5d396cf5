"""Redis Cluster as a first-class store: one pipelined connection and one breaker per master.

A key's slot (CRC16 of its hash tag) names its master in a map read with CLUSTER SLOTS. Every request
for a master's slots shares that master's one connection (nothing to run dry), and that master's
breaker: a dead master refuses only its own slots. The map follows the cluster:

- MOVED (a slot changed hands) or ASK (a slot is being migrated) means the command did not run, so it
  is sent again where the reply says (after ASKING, for ASK); a MOVED also updates the map and asks for
  a refresh. TRYAGAIN (a billable's keys are split between the two nodes of a migration) did not run
  either: it is sent again after a short wait, for up to TRYAGAIN_FOR seconds. A lost connection or a
  timeout is never sent again (a script may have run).
- Whenever a node fails, refuses (its breaker is open) or cannot serve, a background task reads the map
  again, and keeps reading it, and probing the failing masters, every REFRESH_INTERVAL until every
  master answers: after a failover the promoted replica is found within that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from binascii import crc_hqx
from collections.abc import Callable, Sequence
from typing import Any

from gateway.errors import RedisUnavailable
from gateway.store.breaker import Breaker
from gateway.store.failures import ReplyError
from gateway.store.node import Connection, Node
from gateway.store.resp import Command

SLOTS = 16384
REDIRECTS = 5  # a slot that moves more often than this within one call is not settling: unavailable
TRYAGAIN_FOR = 1.0  # seconds a call waits for a slot's migration to let it through
_REDIRECTED = frozenset({"MOVED", "ASK", "TRYAGAIN"})
REFRESH_INTERVAL = 0.2  # seconds between map reads while some master fails


def key_slot(key: str) -> int:
    """The cluster slot of `key`: CRC16 (XMODEM) of its hash tag, or of the whole key without one."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key.encode(), 0) & (SLOTS - 1)


def _redirect(exc: ReplyError, node: Node) -> tuple[str, int] | None:
    """Where a MOVED or ASK reply sends the command (`MOVED 3999 127.0.0.1:6381`), else None."""
    if exc.code not in ("MOVED", "ASK"):
        return None
    parts = str(exc).split(" ")
    if len(parts) < 3:
        return None
    host, _, port = parts[2].rpartition(":")
    if not port.isdigit():
        return None
    # An empty host means "the host you asked" (a node that does not know its own address).
    return host or node.address.rpartition(":")[0], int(port)


class Cluster:
    is_cluster = True

    def __init__(
        self,
        startup: Sequence[tuple[str, int]],
        *,
        label: str,
        connect: Callable[[str, int], Connection],
        breaker: Callable[[], Breaker],
    ) -> None:
        self.label = label
        self._startup = list(startup)
        self._connect = connect
        self._breaker = breaker
        self._nodes: dict[str, Node] = {}
        self._slots: list[Node | None] | None = None
        self._owners: list[Node] = []  # the masters of the map, in slot order
        self._importing: set[Node] = set()  # masters that answered ASK since the map was read
        self._first: asyncio.Future[list[Node | None]] | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def node(self, host: str, port: int) -> Node:
        address = f"{host}:{port}"
        found = self._nodes.get(address)
        if found is None:
            found = self._nodes[address] = Node(
                self._connect(host, port), self._breaker(), label=f"{address} (of {self.label})", on_trouble=self.trouble
            )
        return found

    # ---- calls --------------------------------------------------------------------------------------

    async def call(self, key: str, command: Command) -> Any:
        slots = self._slots
        if slots is None:
            slots = await self._first_map()
        slot = key_slot(key)
        node = slots[slot]
        if node is None:
            raise self._unserved(slot)
        asking = False
        redirects = 0
        wait, waited = 0.01, 0.0
        while True:
            try:
                if not asking:
                    return await node.call(command)
                reply = (await node.call_many([("ASKING",), command]))[1]
                if isinstance(reply, BaseException):
                    raise reply
                return reply
            except ReplyError as exc:
                if exc.code == "TRYAGAIN" and waited < TRYAGAIN_FOR:
                    await asyncio.sleep(wait)
                    waited, wait = waited + wait, min(wait * 2, 0.1)
                    continue
                target = _redirect(exc, node)
                if target is None:
                    raise
                redirects += 1
                if redirects > REDIRECTS:
                    raise RedisUnavailable(
                        f"Redis Cluster {self.label} redirected slot {slot} {REDIRECTS} times in one call: it is resharding"
                    ) from exc
                node = self.node(*target)
                asking = exc.code == "ASK"
                if asking:
                    self._importing.add(node)
                else:
                    if self._slots is not None:
                        self._slots[slot] = node
                    self.trouble()  # a MOVED slot rarely moves alone: read the whole map again

    async def call_many(self, commands: Sequence[tuple[str, Command]]) -> list[Any]:
        """Each command to its key's master, one write per master; each reply or error in its place."""
        if not commands:
            return []
        slots = self._slots
        if slots is None:
            slots = await self._first_map()
        out: list[Any] = [None] * len(commands)
        groups: dict[Node, list[int]] = {}
        for i, (key, _) in enumerate(commands):
            slot = key_slot(key)
            node = slots[slot]
            if node is None:
                out[i] = self._unserved(slot)
            else:
                groups.setdefault(node, []).append(i)

        async def send(node: Node, indexes: list[int]) -> None:
            for i, reply in zip(indexes, await node.call_many([commands[i][1] for i in indexes]), strict=True):
                out[i] = reply

        await asyncio.gather(*(send(node, indexes) for node, indexes in groups.items()))
        moved = [i for i, r in enumerate(out) if isinstance(r, ReplyError) and r.code in _REDIRECTED]
        if moved:
            again = await asyncio.gather(*(self.call(*commands[i]) for i in moved), return_exceptions=True)
            for i, reply in zip(moved, again, strict=True):
                out[i] = reply
        return out

    async def primaries(self) -> list[Node]:
        """The masters of the map (read it first if need be), and those importing a slot right now."""
        if self._slots is None:
            await self._first_map()
        return list(dict.fromkeys([*self._owners, *self._importing]))

    def nodes(self) -> list[Node]:
        return list(self._owners)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):  # RuntimeError: its loop is gone
                await task
        for node in self._nodes.values():
            node.close()

    def _unserved(self, slot: int) -> RedisUnavailable:
        self.trouble()
        return RedisUnavailable(
            f"Redis Cluster {self.label} has no master for slot {slot}; routes follow on_redis_down meanwhile."
        )

    # ---- the map --------------------------------------------------------------------------------------

    async def _first_map(self) -> list[Node | None]:
        """The map, read once for every caller waiting (the first calls, or every call until it is read)."""
        first = self._first
        if first is None:
            first = self._first = asyncio.ensure_future(self._refresh())
            first.add_done_callback(self._read_first)
        return await asyncio.shield(first)

    def _read_first(self, first: asyncio.Future[list[Node | None]]) -> None:
        self._first = None
        if not first.cancelled():
            first.exception()  # every waiter was given it

    async def _refresh(self) -> list[Node | None]:
        """Read CLUSTER SLOTS from the first node that answers: healthy masters first, then the startup nodes."""
        startup = [self.node(host, port) for host, port in self._startup]
        known = list(dict.fromkeys([*self._owners, *self._nodes.values(), *startup]))
        reasons: list[str] = []
        for node in sorted(known, key=lambda n: n.breaker.failures > 0):
            try:
                reply = await node.call(("CLUSTER", "SLOTS"))
            except (RedisUnavailable, ReplyError) as exc:
                reasons.append(f"{node.address}: {exc.__cause__ or exc}")
                continue
            return self._install(reply, node)
        raise RedisUnavailable(
            f"Redis Cluster {self.label} cannot be connected: no node answered CLUSTER SLOTS "
            f"({'; '.join(reasons)}). Check that it is running; routes follow on_redis_down meanwhile."
        )

    def _install(self, reply: list[Any], asked: Node) -> list[Node | None]:
        slots: list[Node | None] = [None] * SLOTS
        owners: list[Node] = []
        for entry in sorted(reply, key=lambda e: int(e[0])):
            start, end, (host, port, *_) = int(entry[0]), int(entry[1]), entry[2]
            if host in ("", "?"):  # the node does not know its own address: the one we asked does
                host = asked.address.rpartition(":")[0]
            node = self.node(str(host), int(port))
            slots[start : end + 1] = [node] * (end - start + 1)
            if node not in owners:
                owners.append(node)
        self._slots, self._owners = slots, owners
        self._importing.clear()
        return slots

    def trouble(self) -> None:
        """Read the map again soon, and keep reading it while a master fails (a node's `on_trouble`)."""
        loop = asyncio.get_running_loop()
        task, wake = self._task, self._wake
        if task is None or wake is None or task.done() or task.get_loop() is not loop:
            wake = self._wake = asyncio.Event()
            self._task = loop.create_task(self._maintain(wake), name="gateway-redis-cluster-map")
        wake.set()

    async def _maintain(self, wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            began = time.monotonic()
            with contextlib.suppress(RedisUnavailable):
                await self._refresh()
            failing = [node for node in self._owners if node.breaker.failures]
            if failing:
                # A master that answers a PING again is used again now, not after its breaker's cool-down.
                await asyncio.gather(*(node.probe() for node in failing))
                if any(node.breaker.failures for node in self._owners):
                    wake.set()
            await asyncio.sleep(max(0.0, REFRESH_INTERVAL - (time.monotonic() - began)))
