"""The loop of a sender that drains an outbox in the record (the events' webhook, the meters' Stripe):
claim a bounded batch of due rows, send them a few at a time, record each outcome; back off while the
record does not answer, never give up; on stop, let the batch in flight finish (up to `stop_wait`).

Subclasses say how to claim, send and record a row; what is not sent stays in the record for later."""

from __future__ import annotations

import abc
import asyncio
import logging
from typing import Generic, TypeVar

Row = TypeVar("Row")
_MAX_IDLE_S = 30.0  # the longest wait between tries while the record does not answer


class OutboxSender(abc.ABC, Generic[Row]):
    name: str  # in the task's name and the log lines: "events", "meters"

    def __init__(self, *, batch: int, concurrency: int, poll: float) -> None:
        self.batch = batch
        self.concurrency = concurrency
        self.poll = poll  # seconds between claims when nothing is due
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._log = logging.getLogger(type(self).__module__)  # the sender's own module names its lines

    @property
    @abc.abstractmethod
    def stop_wait(self) -> float:
        """How long a stop lets the batch in flight finish before cancelling it (its claims come due again)."""

    @abc.abstractmethod
    async def _claim(self) -> list[Row]: ...

    @abc.abstractmethod
    async def _send(self, row: Row) -> str | None:
        """Send one row: None once it is delivered, else one line saying what went wrong."""

    @abc.abstractmethod
    async def _record(self, outcomes: list[tuple[Row, str | None]]) -> None: ...

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"gateway-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            try:
                await asyncio.wait_for(task, self.stop_wait)
            except TimeoutError:
                pass  # wait_for cancelled it: the claims it held come due again when their lease ends

    async def run_once(self) -> int:
        """Claim due rows, send them, record each outcome; answers how many were claimed."""
        claimed = await self._claim()
        if not claimed:
            return 0
        await self._record(await self._send_all(claimed))
        return len(claimed)

    async def _send_all(self, claimed: list[Row]) -> list[tuple[Row, str | None]]:
        """Each claimed row's outcome: by default `_send` each, `concurrency` at a time."""
        gate = asyncio.Semaphore(self.concurrency)

        async def send(row: Row) -> tuple[Row, str | None]:
            async with gate:
                return row, await self._send(row)

        return list(await asyncio.gather(*(send(r) for r in claimed)))

    async def _run(self) -> None:
        failing = 0
        while not self._stopping.is_set():
            try:
                handled = await self.run_once()
            except Exception as exc:  # noqa: BLE001 - the record is down, most likely: retry, never give up
                if failing == 0:
                    self._log.warning("%s: cannot reach the outbox, retrying until it answers: %s", self.name, exc)
                failing += 1
                handled = 0
            else:
                if failing:
                    self._log.info("%s: the outbox answers again", self.name)
                failing = 0
            if handled >= self.batch:
                continue  # more may be due right now
            wait = min(self.poll * 2 ** min(failing, 5), _MAX_IDLE_S) if failing else self.poll
            try:
                await asyncio.wait_for(self._stopping.wait(), wait)
            except TimeoutError:
                pass
