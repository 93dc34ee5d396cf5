"""`gateway serve` and `gateway demo` as a server with a life cycle (DESIGN §3).

    serve(settings)                      bind, start, serve until SIGTERM or SIGINT, drain within the grace
    serve(settings) with workers > 1     the parent binds one socket; N forked workers each run a whole
                                         gateway on it (its own reconciler: the Redis lease elects one leader)

The order is the contract. The port is bound before any other start-up work, so a port that is taken ends
the command at once; a start-up that fails ends it with one line and a non-zero status, never a hang.
SIGTERM and SIGINT stop accepting, let the requests in flight finish (their holds settle as usual), flush
the record and close, within GATEWAY_SHUTDOWN_GRACE; a second SIGINT cuts the wait short.

Serving itself (uvicorn, and the deadlines for slow clients it lacks) is gateway/serving.py, imported only
once the port is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError, GatewayError
from gateway.settings import LISTEN_BACKLOG, Settings

if TYPE_CHECKING:
    from gateway.serving import HTTPServer

log = logging.getLogger("gateway")

STARTUP_FAILED = 2  # the exit status of a start-up that failed (a setting, the record, the catalog)
_SHUTDOWN_RESERVE_S = 3.0  # at most, of the grace: for flushing the record and closing once requests are done

Started = Callable[[Any], Awaitable[None]]  # called with the GatewayApp once it serves (the demo's welcome)


# ---- the socket -------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or ConfigError naming why not (the first thing a server does)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"cannot listen on {host}:{port}: the port is taken (another gateway?): stop it or choose another --port"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}: check --host and --port") from None


# ---- one process ----------------------------------------------------------------------------------------


def serve(
    settings: Settings,
    *,
    listening: socket.socket | None = None,
    alongside: Callable[[], contextlib.AbstractAsyncContextManager[object]] | None = None,
    started: Started | None = None,
    make_app: Callable[[Settings], Any] | None = None,
) -> int:
    """`gateway serve` (and the demo, which brings its API `alongside` and says hello when `started`): bind,
    start, serve until told to stop. Returns the exit status; raises ConfigError before binding."""
    if settings.workers > 1 and settings.redis_url is None:
        raise ConfigError(
            f"--workers {settings.workers} needs a Redis all the workers share (--redis-url or GATEWAY_REDIS_URL): "
            "the embedded emulation lives inside one process"
        )
    sock = listening or bind(settings.host, settings.port)
    from gateway.app import GatewayApp

    try:
        # No I/O yet (the store connects on first use): a forked worker inherits it unused.
        app = (make_app or GatewayApp)(settings)
    except GatewayError:  # a catalog or a setting: the command's own one line (a catalog's problems each on theirs)
        sock.close()
        raise
    except Exception as exc:  # noqa: BLE001 - anything else still ends in one line
        sock.close()
        print(f"gateway: cannot start: {_line(exc)}", file=sys.stderr)
        return STARTUP_FAILED
    if settings.workers > 1:
        if settings.database_url.startswith("sqlite"):
            try:  # once, here: workers that migrate one file at once lock each other out ("database is locked")
                asyncio.run(_upgrade_record(settings))
            except GatewayError as exc:
                sock.close()
                print(f"gateway: cannot start: {_line(exc)}", file=sys.stderr)
                return STARTUP_FAILED
        return _supervise(sock, app, settings)
    return _run_loop(sock, app, settings, alongside, started, ready=None)


def _run_loop(
    sock: socket.socket, app: Any, settings: Settings, alongside: Any, started: Started | None, ready: int | None
) -> int:
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            status, clean = runner.run(_run(sock, app, settings, alongside, started, ready))
    except GatewayError as exc:
        print(f"gateway: {exc}", file=sys.stderr, flush=True)
        return STARTUP_FAILED
    if not clean:
        # Something outlived the grace (a database connection's thread would keep the interpreter alive).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


async def _run(
    sock: socket.socket, app: Any, settings: Settings, alongside: Any, started: Started | None, ready: int | None
) -> tuple[int, bool]:
    """One gateway on `sock`; answers (exit status, whether everything closed in time)."""
    loop = asyncio.get_running_loop()
    from gateway.serving import serving

    stop = asyncio.Event()
    signals: list[int] = []
    server: HTTPServer | None = None
    starting: asyncio.Task[None] | None = None
    status = 0

    def on_signal(sig: int) -> None:
        signals.append(sig)
        stop.set()
        if starting is not None and not starting.done():
            starting.cancel()  # told to stop while starting: stop starting
        elif server is not None and sig == signal.SIGINT and len(signals) > 1:
            server.force_exit = True  # a second Ctrl+C: stop waiting for the requests in flight

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    reloads: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        if starting is not None and starting.done() and hasattr(app, "reload"):
            task = asyncio.ensure_future(_reload(app))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    grace = settings.shutdown_grace
    reserve = min(_SHUTDOWN_RESERVE_S, grace / 4)  # for the last flush and closing
    drain = grace - reserve - 1.5  # for the requests in flight (the rest: uvicorn's ticks, cancelled requests)
    try:
        async with alongside() if alongside is not None else contextlib.nullcontext():
            starting = asyncio.create_task(app.startup(), name="gateway-startup")
            try:
                await starting
            except asyncio.CancelledError:
                log.warning("stopped while starting")
                return 1, await _close(app, reserve)
            except Exception as exc:  # noqa: BLE001 - every start-up failure is one line, never a traceback
                print(f"gateway: cannot start: {_line(exc)}", file=sys.stderr, flush=True)
                await _close(app, reserve)
                return STARTUP_FAILED, True
            try:
                async with serving(app, sock, settings, drain=drain) as server:
                    if ready is not None:
                        os.write(ready, f"{os.getpid()}\n".encode())
                    elif started is None:
                        _say_serving(sock, settings)
                    if started is not None:
                        await started(app)
                    told = asyncio.ensure_future(stop.wait())
                    await asyncio.wait([told, server.task], return_when=asyncio.FIRST_COMPLETED)
                    told.cancel()
                    if server.task.done():
                        ended = server.task
                        log.error("the HTTP server stopped on its own: %s",
                                  "cancelled" if ended.cancelled() else ended.exception() or "no error")
                        status = 1
                    else:
                        log.info("stopping: no new connections; the requests in flight have %gs to finish", drain)
            finally:
                clean = await _close(app, reserve)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return (status if clean else 1), clean


async def _reload(app: Any) -> None:
    """SIGHUP: publish --plans again; a file that does not load changes nothing and says why."""
    try:
        await app.reload()
    except GatewayError as exc:
        log.error("SIGHUP: the catalog was not published: %s", exc)
    except Exception:  # a reload never ends the server
        log.exception("SIGHUP: the catalog was not published")


async def _close(app: Any, budget: float) -> bool:
    """The app's shutdown (the last flush, connections closed) within `budget` seconds; False if cut short."""
    try:
        async with asyncio.timeout(budget):
            await app.shutdown()
        return True
    except TimeoutError:
        log.error("the shutdown did not finish within %gs (GATEWAY_SHUTDOWN_GRACE): exiting anyway; "
                  "what was not flushed reaches the record by the next leader's sweep", budget)
        return False


def _line(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _say_serving(sock: socket.socket, settings: Settings, workers: int = 1) -> None:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    each = f", {workers} workers" if workers > 1 else ""
    print(f"gateway: serving http://{shown}:{port} in front of {settings.upstream}{each} (Ctrl+C to stop)", flush=True)


# ---- workers ----------------------------------------------------------------------------------------------


async def _upgrade_record(settings: Settings) -> None:
    from gateway.store.db import Database

    db = await Database.connect(settings.database_url, auto_upgrade=True, timeout=settings.db_timeout)
    await db.close()


def _supervise(sock: socket.socket, app: Any, settings: Settings) -> int:
    """Fork `settings.workers` workers on the one socket and keep them. A worker of the first start that
    fails to start ends the server (the others would fail the same way: it printed why); a worker that dies
    later is replaced (one that cannot start again is retried every few seconds). SIGTERM and SIGINT go
    to every worker, each draining within its grace; one still running a second past it is killed."""
    ready_r, ready_w = os.pipe()
    os.set_blocking(ready_r, False)
    children: dict[int, int] = {}  # pid → slot
    first: set[int] = set()
    ready: set[int] = set()
    respawn: dict[int, float] = {}  # slot → when
    signals: list[int] = []

    parent = os.getpid()

    def spawn(slot: int) -> int:
        pid = os.fork()
        if pid == 0:  # the worker: a whole gateway on the inherited socket
            status = STARTUP_FAILED
            try:
                os.close(ready_r)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                _end_with(parent)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until its loop takes it: a reload, not an exit
                status = _run_loop(sock, app, settings, None, None, ready=ready_w)
            finally:
                os._exit(status)
        children[pid] = slot
        return pid

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _frame: signals.append(s))
    # SIGHUP to the parent: one worker publishes --plans again, and every worker follows it through Redis.
    hangups: list[int] = []
    signal.signal(signal.SIGHUP, lambda s, _frame: hangups.append(s))
    first = {spawn(slot) for slot in range(settings.workers)}
    status = 0
    stopping_at: float | None = None
    told = False
    pending = b""
    while children or (respawn and stopping_at is None):
        with contextlib.suppress(BlockingIOError):
            pending += os.read(ready_r, 4096)
        *lines, pending = pending.split(b"\n")
        ready.update(int(line) for line in lines if line)
        if not told and first <= ready:
            told = True
            _say_serving(sock, settings, settings.workers)
        if hangups and stopping_at is None:
            hangups.clear()
            live = sorted(pid for pid in children if pid in ready)
            if live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(live[0], signal.SIGHUP)
        if signals and stopping_at is None:
            stopping_at = time.monotonic()
            sock.close()  # the workers close theirs: with this one open too, the kernel would still queue connections
            _signal_all(children, signal.SIGTERM)
        now = time.monotonic()
        for slot, due in list(respawn.items()):
            if stopping_at is None and now >= due:
                del respawn[slot]
                spawn(slot)
        pid, wait_status = os.waitpid(-1, os.WNOHANG) if children else (0, 0)
        if pid:
            slot = children.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if stopping_at is not None:
                continue
            if pid in first and pid not in ready:
                status = code if code > 0 else STARTUP_FAILED
                stopping_at = time.monotonic()
                _signal_all(children, signal.SIGTERM)
            elif pid in ready:
                log.error("worker %d (pid %d) exited with status %d; starting another", slot, pid, code)
                respawn[slot] = now + 0.5
            else:
                log.error("worker %d could not start again (status %d); retrying in 5s", slot, code)
                respawn[slot] = now + 5.0
            continue
        if stopping_at is not None and now > stopping_at + settings.shutdown_grace + 1.0:
            _signal_all(children, signal.SIGKILL)
        time.sleep(0.05)
    sock.close()
    return status


def _end_with(parent: int) -> None:
    """A worker is sent SIGTERM (it drains, as on a stop) when its parent dies, even by SIGKILL: no one would
    supervise it, and a restarted server could not take its port. Linux's PR_SET_PDEATHSIG; elsewhere the
    worker outlives a killed parent."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _signal_all(children: dict[int, int], sig: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


__all__ = ["bind", "serve"]
