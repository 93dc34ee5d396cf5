"""A pipelined Redis connection for the hot path: the scripts of concurrent requests share one write.

redis-py checks a connection out of a pool, packs and writes each command on its own and arms a
timeout per call; at gateway load that costs more than the decision. Here every call made in one
event-loop tick is packed into one buffer and written once, replies are parsed by hiredis and matched
to their callers in order, and a single watchdog enforces the timeout: the connection is dead when a
command has waited `timeout` seconds and Redis has sent nothing meanwhile. A connection that fails
fails every call still in flight and is dropped: none of them is ever retried (a script may have run),
which is the rule for mutating scripts. There is no pool to run dry: every caller queues on the one
connection, and a long queue that Redis keeps answering is busy, never mistaken for down.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as ssl_module
import time
from collections.abc import Sequence
from typing import Any, cast

import hiredis

from gateway.store.failures import ConnectionLost, ReplyError, SetupRefused

Arg = bytes | str | int | float
Command = tuple[Arg, ...]


def _pack(args: Command) -> bytes:
    # hiredis's stub declares a one-element tuple; pack_command takes any number of arguments.
    packed: bytes = hiredis.pack_command(cast(Any, args))
    return packed


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedConnection) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        if self.owner._protocol is self:
            self.owner._received(data)

    def eof_received(self) -> None:
        # The server closed: fail what is in flight now, before a caller can see the transport closing and
        # connect again (the successor's replies must never reach the calls made on this connection).
        if self.owner._protocol is self:
            self.owner._lost(ConnectionLost("connection closed (by the server)"))

    def connection_lost(self, exc: Exception | None) -> None:
        # A connection dropped earlier (timed out, replaced) must not take its successor down with it.
        if self.owner._protocol is self:
            self.owner._lost(ConnectionLost(f"connection closed ({exc or 'by the server'})"))


class PipelinedConnection:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        timeout: float = 0.5,
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.tls = tls
        self.timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._reader: Any = None
        self._pending: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._buffer: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._answered = 0.0  # when Redis last sent a reply (monotonic)
        self._connecting: asyncio.Future[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def call(self, command: Command) -> Any:
        if self._transport is None or self._transport.is_closing():
            await self._connect()
        (future,) = self._submit((command,))
        return await future

    async def call_many(self, commands: Sequence[Command]) -> list[Any]:
        """Several commands in one write; each reply in order, a ReplyError or ConnectionLost in its place.

        No task or coroutine per command: the reconciler reads hundreds of states at once this way."""
        if self._transport is None or self._transport.is_closing():
            await self._connect()
        return list(await asyncio.gather(*self._submit(commands), return_exceptions=True))

    def _submit(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        """Queue the commands for this tick's write (the connection is up); one future per reply."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures: list[asyncio.Future[Any]] = []
        for command in commands:
            future: asyncio.Future[Any] = loop.create_future()
            futures.append(future)
            self._pending.append((now, future))
            self._buffer.append(_pack(command))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout, self._check)
        return futures

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and self._transport.is_closing():
            self._lost(ConnectionLost("connection closed before the commands were written"))
        elif self._buffer and self._transport is not None:
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._transport.write(data)

    def _received(self, data: bytes) -> None:
        self._answered = time.monotonic()
        self._reader.feed(data)
        while True:
            reply = self._reader.gets()
            if reply is False:
                return
            if not self._pending:
                self._lost(ConnectionLost("Redis sent a reply nobody asked for"))
                return
            _, future = self._pending.popleft()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ReplyError(str(reply)))
            else:
                future.set_result(reply)

    def _check(self) -> None:
        self._watchdog = None
        if not self._pending:
            return
        # Waiting behind other replies that keep coming is being busy: only silence counts.
        started = max(self._pending[0][0], self._answered)
        waited = time.monotonic() - started
        if waited >= self.timeout:
            self._lost(ConnectionLost(f"no answer within {self.timeout:g}s"))
            return
        self._watchdog = asyncio.get_running_loop().call_later(self.timeout - waited, self._check)

    def _lost(self, exc: Exception) -> None:
        transport, self._transport = self._transport, None
        self._protocol = None
        self._buffer.clear()
        pending, self._pending = self._pending, collections.deque()
        for _, future in pending:
            if not future.done():
                future.set_exception(exc)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if transport is not None and not transport.is_closing():
            transport.abort()

    async def _connect(self) -> None:
        """Connect once for every caller waiting: a refused or timed-out attempt fails them all at once."""
        attempt = self._connecting
        if attempt is None:
            attempt = self._connecting = asyncio.ensure_future(self._open())
            attempt.add_done_callback(self._attempted)
        await asyncio.shield(attempt)

    def _attempted(self, attempt: asyncio.Future[None]) -> None:
        if self._connecting is attempt:
            self._connecting = None
        if not attempt.cancelled():
            attempt.exception()  # every waiter was given it

    async def _open(self) -> None:
        # Calls still in flight belong to the connection being replaced (closing, not yet reported lost):
        # they fail here, else the new connection's replies would be matched to them.
        if self._transport is not None or self._pending:
            self._lost(ConnectionLost("connection closed (by the server)"))
        loop = asyncio.get_running_loop()
        context = ssl_module.create_default_context() if self.tls else None
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        protocol = self._protocol = _Protocol(self)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: protocol, self.host, self.port, ssl=context),
                self.timeout,
            )
        except (TimeoutError, OSError) as exc:
            raise ConnectionLost(f"cannot connect to {self.address}: {exc or 'timed out'}") from exc
        setup: list[Command] = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        # Nobody else writes until the setup is answered: a command must never run in the wrong database.
        for command in setup:
            future: asyncio.Future[Any] = loop.create_future()
            self._pending.append((time.monotonic(), future))
            transport.write(_pack(command))
            try:
                await asyncio.wait_for(future, self.timeout)
            except (ReplyError, ConnectionLost, TimeoutError) as exc:
                self._protocol = None
                transport.abort()
                self._pending.clear()
                what = "AUTH" if command[0] == "AUTH" else f"SELECT {self.db}"
                raise (SetupRefused if isinstance(exc, ReplyError) else ConnectionLost)(
                    f"{self.address} refused {what}: {exc or 'no answer'}"
                ) from exc
        self._transport = transport

    def close(self) -> None:
        self._lost(ConnectionLost("closed"))
