"""The in-process Redis emulation (fakeredis with Lua): the default when no Redis URL is given.

Every store of one process shares one emulated server, as every process shares one real Redis. Replies
come back as RESP would give them (no redis-py parsing), so the store reads them exactly as it reads a
real server's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from gateway.store.failures import ReplyError
from gateway.store.resp import Command

_server: Any = None


def server() -> Any:
    """This process's emulated server (a fakeredis.FakeServer), made on first use."""
    global _server
    if _server is None:
        import fakeredis

        _server = fakeredis.FakeServer()
    return _server


class EmbeddedConnection:
    address = "embedded"

    def __init__(self) -> None:
        import fakeredis

        self._client: Any = fakeredis.FakeAsyncRedis(server=server(), decode_responses=True, protocol=2)
        self._client.response_callbacks.clear()  # raw replies, as a RESP reader gives them

    async def call(self, command: Command) -> Any:
        try:
            return await self._client.execute_command(*command)
        except NoScriptError as exc:  # redis-py strips the code this one error is known by
            raise ReplyError(f"NOSCRIPT {exc}") from exc
        except ResponseError as exc:
            raise ReplyError(str(exc)) from exc

    async def call_many(self, commands: Sequence[Command]) -> list[Any]:
        out: list[Any] = []
        for command in commands:
            try:
                out.append(await self.call(command))
            except ReplyError as exc:
                out.append(exc)
        return out

    def close(self) -> None:
        """Nothing to close: the emulated server lives as long as the process."""
