"""`gateway serve` in a subprocess of its own, over real HTTP: what a test needs to start it, signal it, read
its log and its exit. Its upstream is a small app in a thread that counts the requests it is answering."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
from http_servers import serve_in_thread
from services import free_port
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ADMIN = "served-admin-for-tests"
CATALOG = """
[catalog]
default_plan = "free"
on_redis_down = "closed"

[operations.chat]
per_unit = 1
units = "response.json:usage.total_tokens"
reserve = 20

[plans.free]
price = 0
limits.projects = { to = 100 }

[[routes]]
match = "POST /chat"
spend = "chat"

[[routes]]
match = "GET /stream"
spend = "chat"

[[routes]]
match = "POST /projects"
limit = "projects"

[[routes]]
match = "* /*"
"""


@dataclass
class Upstream:
    """What the upstream is doing: requests arrived and not yet answered, and how many it answered."""

    url: str = ""
    in_flight: int = 0
    answered: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def upstream() -> Iterator[Upstream]:
    """POST /chat?sleep=S answers after S seconds with 5 tokens of usage; GET /stream sends an event every 0.2 s
    (`events` of them, then the usage); everything else answers at once."""
    seen = Upstream()

    async def answer(request: Request) -> Response:
        with seen.lock:
            seen.in_flight += 1
        try:
            await request.body()
            await asyncio.sleep(float(request.query_params.get("sleep", "0")))
            return JSONResponse({"ok": True, "usage": {"total_tokens": 5}})
        except ClientDisconnect:
            return Response(status_code=499)  # the gateway gave up on a slow client: nobody reads this
        finally:
            with seen.lock:
                seen.in_flight -= 1
                seen.answered += 1

    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            with seen.lock:
                seen.in_flight += 1
            try:
                for _ in range(int(request.query_params.get("events", "100"))):
                    yield b'data: {"delta": "x"}\n\n'
                    await asyncio.sleep(0.2)
                yield b'data: {"usage": {"total_tokens": 5}}\n\n'
            finally:
                with seen.lock:
                    seen.in_flight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/stream", stream), Route("/{rest:path}", answer, methods=["GET", "POST", "DELETE"])])
    with serve_in_thread(app) as url:
        seen.url = url
        yield seen


@dataclass
class Served:
    """`gateway serve` with `env` (over the defaults below) and `args`; `start()` waits for its health."""

    tmp: Path
    upstream: str
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    catalog: str = CATALOG
    name: str = "gw"
    command: str = "serve"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    since: float = 0.0  # when it was launched, or last signalled

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.tmp / f"{self.name}.log"

    def launch(self) -> Served:
        plans = self.tmp / f"{self.name}.toml"
        plans.write_text(self.catalog)
        env = {
            **os.environ,
            "GATEWAY_PLANS": str(plans),
            "GATEWAY_UPSTREAM": self.upstream,
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_DATABASE_URL": f"sqlite:///{self.tmp}/{self.name}.db",
            "GATEWAY_ADMIN_TOKEN": ADMIN,
            "GATEWAY_BILLABLE_HEADER": "X-Org",
            "GATEWAY_RECONCILE_INTERVAL": "0.5",
            **self.env,
        }
        self.since = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", self.command, *self.args], env=env, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, cwd=self.tmp,
            )
        return self

    def start(self, timeout: float = 60) -> Served:
        self.launch()
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/_gateway/health", timeout=2).status_code in (200, 503):
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log()}")
            time.sleep(0.1)

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN}"}

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.since = time.monotonic()
        os.kill(self.proc.pid, sig)

    def exit_status(self, timeout: float) -> tuple[int, float]:
        """The status it exits with and the seconds since the last signal (or the launch)."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - self.since

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
