"""A loopback TCP forwarder that tests point at one server or another: a failover as its clients see it.

    switch = Switch(redis.port).start()     clients connect to switch.port
    switch.hold()                           bytes stop flowing (a client's calls go unanswered)
    switch.point(other.port)                open connections are cut; new ones reach `other`
    switch.release()                        bytes flow again
    switch.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Self


class Switch:
    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._open: set[asyncio.StreamWriter] = set()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None

    def start(self) -> Self:
        self._thread.start()
        self._call(self._listen())
        return self

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        finally:
            for w in (writer, up_writer):
                w.close()
                self._open.discard(w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                if writer.is_closing():
                    return
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def hold(self) -> None:
        async def clear() -> None:
            assert self._flowing is not None
            self._flowing.clear()

        self._call(clear())

    def release(self) -> None:
        async def set_() -> None:
            assert self._flowing is not None
            self._flowing.set()

        self._call(set_())

    def point(self, target: int) -> None:
        async def cut() -> None:
            self.target = target
            for w in list(self._open):
                w.transport.abort()

        self._call(cut())

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._open):
                w.transport.abort()

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
