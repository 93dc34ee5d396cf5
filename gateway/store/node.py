"""One Redis server as the store sees it: a connection and the circuit breaker in front of it.

Every command to a server goes through `Node.call` or `Node.call_many`, so there is one breaker path:
a connection that breaks or times out counts a failure (and the command is never sent again: a script
may have run), an answer of any kind closes the breaker, and an open breaker refuses without I/O.
An answer that says the server cannot serve now (LOADING, READONLY, CLUSTERDOWN ...) means the command
did not run: it is RedisUnavailable like an outage, but the server answered, so the breaker stays closed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway.errors import RedisRefused, RedisUnavailable
from gateway.store.breaker import Breaker
from gateway.store.failures import ConnectionLost, ReplyError, SetupRefused
from gateway.store.resp import Command

# Replies saying the command was refused before it ran, because the server cannot serve it right now.
# (TRYAGAIN, a slot halfway through a migration, is the cluster transport's: it waits and sends again.)
NOT_SERVING = frozenset({"LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "BUSY"})


class Connection(Protocol):
    """What a node talks through: resp.PipelinedConnection, or the in-process emulation."""

    @property
    def address(self) -> str: ...

    async def call(self, command: Command) -> Any: ...

    async def call_many(self, commands: Sequence[Command]) -> list[Any]: ...

    def close(self) -> None: ...


class Node:
    def __init__(
        self,
        conn: Connection,
        breaker: Breaker,
        *,
        label: str,
        on_trouble: Callable[[], None] | None = None,
    ) -> None:
        self.conn = conn
        self.breaker = breaker
        self.label = label  # how messages name it: the URL, or host:port within a cluster
        # Told when this node failed or refused (the cluster refreshes its map); must not block.
        self.on_trouble = on_trouble

    @property
    def address(self) -> str:
        return self.conn.address

    def unavailable(self, reason: str, *, hint: str = "Check that it is running") -> RedisUnavailable:
        reason = reason if reason.endswith((".", "?", "!")) else reason + "."
        return RedisUnavailable(f"Redis at {self.label} did not answer: {reason} {hint}; routes follow on_redis_down meanwhile.")

    def _refused(self) -> RedisUnavailable:
        if self.on_trouble is not None:
            self.on_trouble()
        return self.unavailable(self.breaker.refusal())

    def _failed(self, exc: ConnectionLost) -> RedisUnavailable:
        self.breaker.failure(str(exc))
        if self.on_trouble is not None:
            self.on_trouble()
        if isinstance(exc, SetupRefused):
            refused = self.unavailable(str(exc), hint="Check the URL's user, password and database number")
            return RedisRefused(str(refused))
        return self.unavailable(str(exc))

    def _not_serving(self, exc: ReplyError) -> RedisUnavailable:
        if self.on_trouble is not None:
            self.on_trouble()
        return RedisUnavailable(f"Redis at {self.label} cannot serve the command now: {exc}")

    async def call(self, command: Command) -> Any:
        """One command; raises RedisUnavailable (down, refused, cannot serve) or ReplyError (its own error)."""
        breaker = self.breaker
        if not breaker.allow():
            raise self._refused()
        try:
            reply = await self.conn.call(command)
        except ConnectionLost as exc:
            raise self._failed(exc) from exc
        except ReplyError as exc:
            breaker.success()
            if exc.code in NOT_SERVING:
                raise self._not_serving(exc) from exc
            raise
        except BaseException:
            breaker.abandon()
            raise
        breaker.success()
        return reply

    async def call_many(self, commands: Sequence[Command]) -> list[Any]:
        """Commands in one write; each reply, ReplyError or RedisUnavailable in its place."""
        if not commands:
            return []
        breaker = self.breaker
        if not breaker.allow():
            return [self._refused()] * len(commands)
        try:
            replies = await self.conn.call_many(commands)
        except ConnectionLost as exc:  # could not connect: nothing was sent
            replies = [exc] * len(commands)
        except BaseException:
            breaker.abandon()
            raise
        lost = next((r for r in replies if isinstance(r, ConnectionLost)), None)
        down = self._failed(lost) if lost is not None else None
        if down is None:
            breaker.success()
        out: list[Any] = []
        for reply in replies:
            if isinstance(reply, ConnectionLost):
                reply = down
            elif isinstance(reply, ReplyError) and reply.code in NOT_SERVING:
                reply = self._not_serving(reply)
            out.append(reply)
        return out

    async def probe(self) -> bool:
        """PING past the breaker (a background check while it is open); an answer closes it."""
        try:
            reply = await self.conn.call(("PING",))
        except (ConnectionLost, ReplyError):
            return False
        if reply != "PONG":
            return False
        self.breaker.success()
        return True

    def close(self) -> None:
        self.conn.close()


class One:
    """The transport of a single server (or the in-process emulation): every key lives on its one node."""

    is_cluster = False

    def __init__(self, node: Node) -> None:
        self.node = node
        self.label = node.label

    async def call(self, key: str, command: Command) -> Any:
        try:
            return await self.node.call(command)
        except ReplyError as exc:
            if exc.code == "MOVED":
                raise RedisUnavailable(
                    f"Redis at {self.label} is a cluster node ({exc}): use redis+cluster://HOST:PORT[,HOST:PORT...]"
                ) from exc
            raise

    async def call_many(self, commands: Sequence[tuple[str, Command]]) -> list[Any]:
        return await self.node.call_many([command for _, command in commands])

    async def primaries(self) -> list[Node]:
        return [self.node]

    def nodes(self) -> list[Node]:
        return [self.node]

    async def close(self) -> None:
        self.node.close()
