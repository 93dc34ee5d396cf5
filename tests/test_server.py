"""A real server's life cycle and its limits (DESIGN §3), through `gateway serve` subprocesses over real HTTP:
a taken port, start-up lines, SIGTERM with requests in flight, workers on one port, slow clients, the
connection cap. Redis is a private redis-server wherever the test reads or breaks it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from http_servers import closed_port
from served import CATALOG, Served, upstream
from services import RedisServer, children_of
from waiting import wait_until

pytestmark = pytest.mark.slow


def redis_env(server: RedisServer) -> dict[str, str]:
    return {"GATEWAY_REDIS_URL": server.url}


def grant(gw: Served, billable: str, amount: int) -> None:
    r = httpx.post(f"{gw.url}/_gateway/admin/billables/{billable}/credits", headers=gw.admin(), timeout=10,
                   json={"amount": amount, "reason": "test", "idempotency_key": f"{billable}-{amount}"})
    assert r.status_code == 200, r.text


# ---- start-up -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_taken_port_ends_the_command_at_once_with_one_line(tmp_path: Path, command: str) -> None:
    """`gateway serve` (and `demo`) on a port another process holds: a non-zero exit with one line naming the
    port, before any other start-up work (it used to print the error and hang, deaf to SIGTERM)."""
    with socket.create_server(("127.0.0.1", 0)) as taken, upstream() as up:
        port = taken.getsockname()[1]
        gw = Served(tmp_path, up.url, port=port, command=command).launch()
        code, _ = gw.exit_status(timeout=20)  # about a second here, the interpreter's start included
        lines = gw.log().strip().splitlines()
    assert code != 0
    said = f"gateway: cannot listen on 127.0.0.1:{port}: the port is taken (another gateway?): stop it or choose another --port"
    assert lines == [said], lines


def test_an_unreachable_redis_starts_anyway_and_says_so(tmp_path: Path, private_redis: RedisServer) -> None:
    """A Redis that refuses connections, a host that does not resolve, rediss:// to a plain port: each starts
    (routes follow on_redis_down: health says Redis is down) with a start-up line naming the URL and what is
    wrong; an unreachable upstream is a line too, never a failure."""
    cases = {
        f"redis://127.0.0.1:{closed_port()}/0": "Connection refused",
        "redis://no-such-host.invalid:6379/0": "no-such-host.invalid",
        f"rediss://127.0.0.1:{private_redis.port}/0": "If that port speaks no TLS, the URL is redis://, not rediss://.",
    }
    with upstream() as up:
        for i, (url, reason) in enumerate(cases.items()):
            with Served(tmp_path, up.url, env={"GATEWAY_REDIS_URL": url}, name=f"r{i}") as gw:
                gw.start()
                assert httpx.get(f"{gw.url}/_gateway/health", timeout=10).status_code == 503
                line = next(line for line in gw.log().splitlines() if "Starting anyway" in line)
                assert url in line and "did not answer" in line and reason in line, line
                assert "the catalog's on_redis_down: closed" in line
        nothing = f"http://127.0.0.1:{closed_port()}"
        with Served(tmp_path, nothing, env=redis_env(private_redis), name="up") as gw:
            gw.start()
            assert httpx.get(f"{gw.url}/v1/x", headers={"X-Org": "a"}, timeout=10).status_code == 502
            assert f"the upstream {nothing} does not accept connections" in gw.log()


def test_a_redis_database_index_the_server_lacks_is_named_at_start(tmp_path: Path, private_redis: RedisServer) -> None:
    """DB index 99 on a server with 16: the start fails at once, with one line naming the index error and the fix."""
    with upstream() as up:
        gw = Served(tmp_path, up.url, env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{private_redis.port}/99"}).launch()
        code, _ = gw.exit_status(timeout=60)
    assert code != 0
    problems = [line for line in gw.log().splitlines() if line.startswith("gateway:")]
    assert len(problems) == 1 and "DB index is out of range" in problems[0] and "GATEWAY_REDIS_URL" in problems[0]
    assert "Traceback" not in gw.log()


def test_an_unreachable_database_fails_the_start_with_one_line(tmp_path: Path) -> None:
    """The record is needed to start (keys, grants, the schema's revision): a Postgres that refuses connections
    ends the start at once with one line naming it and what to check."""
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/gone"
    with upstream() as up:
        gw = Served(tmp_path, up.url, env={"GATEWAY_DATABASE_URL": url}).launch()
        code, _ = gw.exit_status(timeout=60)
    problems = [line for line in gw.log().splitlines() if line.startswith("gateway:")]
    assert code != 0 and len(problems) == 1, gw.log()
    assert url in problems[0] and "GATEWAY_DATABASE_URL" in problems[0] and "Traceback" not in gw.log()


# ---- shutdown ---------------------------------------------------------------------------------------------


def test_sigterm_finishes_the_requests_in_flight_settles_their_holds_and_exits_within_the_grace(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """SIGTERM while 50 metered requests wait on a slow upstream: no new connection is taken, all 50 are answered
    200, each hold settles to its 5 units (the holds hash is empty, 50 x 5 spent), the record has the last state,
    and the process exits 0 within GATEWAY_SHUTDOWN_GRACE."""
    grace = 10.0
    env = {**redis_env(private_redis), "GATEWAY_SHUTDOWN_GRACE": str(grace)}
    with upstream() as up, Served(tmp_path, up.url, env=env) as gw:
        gw.start()
        grant(gw, "term", 1000)

        async def main() -> list[int]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=60)) as client:
                calls = [asyncio.create_task(client.post(f"{gw.url}/chat?sleep=3", headers={"X-Org": "term"}))
                         for _ in range(50)]
                await asyncio.to_thread(wait_until, lambda: up.in_flight == 50, "50 requests at the upstream", 30)
                gw.signal(signal.SIGTERM)

                def refused() -> bool:
                    try:
                        httpx.get(f"{gw.url}/_gateway/health", timeout=1)
                    except httpx.ConnectError:
                        return True
                    except httpx.HTTPError:
                        pass
                    return False

                await asyncio.to_thread(wait_until, refused, "new connections to be refused", 5)
                return [r.status_code for r in await asyncio.gather(*calls)]

        statuses = asyncio.run(main())
        code, took = gw.exit_status(timeout=grace + 20)
    assert statuses == [200] * 50
    assert code == 0 and took < grace + 1.0, (code, took, gw.log()[-3000:])
    with private_redis.client() as c:
        assert c.hgetall("gw:{term}:holds") == {}
        state = c.hgetall("gw:{term}")
    assert int(state["c:p"]) == 1000 - 50 * 5
    import sqlite3

    with sqlite3.connect(tmp_path / "gw.db") as record:
        (recorded,) = record.execute("select state from snapshots where billable = 'term'").fetchone()
    assert json.loads(recorded) == state  # the last flush, after the last settle


# ---- workers ------------------------------------------------------------------------------------------------


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def holds_connections(pid: int, port: int) -> bool:
    """Whether process `pid` holds an established TCP connection on local port `port` (from /proc: its
    sockets' inodes against the kernel's table)."""
    mine = _socket_inodes(pid)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in mine:
            return True
    return False


def test_two_workers_share_one_port_and_decide_exactly(tmp_path: Path, private_redis: RedisServer) -> None:
    """`--workers 2`: two whole gateways on one port, both deciding, exactly: 600 concurrent requests against a cap
    of 300, over connections both workers hold, are 300 admitted and 300 refused; SIGTERM ends both and the
    parent with 0."""
    catalog = CATALOG.replace("limits.projects = { to = 100 }", "limits.projects = { to = 300 }")
    env = redis_env(private_redis)
    with upstream() as up, Served(tmp_path, up.url, env=env, args=["--workers", "2"], catalog=catalog) as gw:
        gw.start()
        assert gw.proc is not None
        wait_until(lambda: "2 workers" in gw.log(), "both workers to be ready", 60)
        workers = children_of(gw.proc.pid)
        assert len(workers) == 2

        async def main() -> Counter[int]:
            # The kernel gives each connection to whichever worker accepts first: open connections until both
            # workers hold some, then send every request over them.
            deadline = time.monotonic() + 60
            while True:
                client = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50, max_keepalive_connections=50))
                await asyncio.gather(*(client.get(f"{gw.url}/_gateway/health") for _ in range(50)))
                if all(holds_connections(pid, gw.port) for pid in workers):
                    break
                await client.aclose()
                assert time.monotonic() < deadline, "one worker never accepted a connection"
            try:
                answers = await asyncio.gather(
                    *(client.post(f"{gw.url}/projects", headers={"X-Org": "cap"}) for _ in range(600))
                )
            finally:
                await client.aclose()
            return Counter(r.status_code for r in answers)

        assert asyncio.run(main()) == Counter({200: 300, 403: 300})
        with private_redis.client() as c:
            assert c.hget("gw:{cap}", "u:projects") == "300"
        gw.signal(signal.SIGTERM)
        code, took = gw.exit_status(timeout=30)
    assert code == 0 and took < 11.0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_on_the_embedded_redis_are_refused_with_one_line(tmp_path: Path) -> None:
    """The embedded emulation lives inside one process: `--workers 2` without --redis-url is refused, one line."""
    with upstream() as up:
        gw = Served(tmp_path, up.url, args=["--workers", "2"]).launch()
        code, _ = gw.exit_status(timeout=30)
    assert code != 0
    said = ("gateway: --workers 2 needs a Redis all the workers share (--redis-url or GATEWAY_REDIS_URL): "
            "the embedded emulation lives inside one process")
    assert gw.log().strip().splitlines() == [said]


# ---- slow clients ---------------------------------------------------------------------------------------------


async def _slow(port: int, start: bytes, trickle: bytes | None) -> tuple[float, bytes]:
    """Open a connection, send `start`, then `trickle` every half second (None: nothing more) until the
    server closes it; answers how long it stayed open and what the server sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = time.monotonic()
    writer.write(start)
    got = b""

    async def read() -> None:
        nonlocal got
        while chunk := await reader.read(4096):
            got += chunk

    reading = asyncio.create_task(read())
    try:
        while not reading.done():
            await asyncio.wait([reading], timeout=0.5)
            if trickle is not None and not reading.done():
                writer.write(trickle)
    except (ConnectionError, OSError):
        pass
    await asyncio.wait([reading], timeout=30)
    writer.close()
    return time.monotonic() - opened, got


def test_slow_clients_are_cut_off_while_a_normal_client_is_served(tmp_path: Path) -> None:
    """300 connections trickling their headers and 50 whose body stalls, with 2 s deadlines: a normal client keeps
    getting 200s meanwhile; each slow header is closed with a 408 and each stalled body closed, within the
    deadline and a few seconds (they used to stay open for minutes)."""
    env = {"GATEWAY_HEADER_TIMEOUT": "2", "GATEWAY_BODY_TIMEOUT": "2"}
    with upstream() as up, Served(tmp_path, up.url, env=env) as gw:
        gw.start()

        async def main() -> tuple[list[tuple[float, bytes]], list[tuple[float, bytes]], Counter[int]]:
            headers = [_slow(gw.port, b"GET /v1/x HTTP/1.1\r\nHost: gw\r\n", b"X-Slow: 1\r\n") for _ in range(300)]
            body = b"POST /v1/upload HTTP/1.1\r\nHost: gw\r\nX-Org: slow\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10
            bodies = [_slow(gw.port, body, None) for _ in range(50)]
            slow = asyncio.gather(asyncio.gather(*headers), asyncio.gather(*bodies))
            normal: Counter[int] = Counter()
            async with httpx.AsyncClient(timeout=10) as client:
                while not slow.done():
                    normal[(await client.get(f"{gw.url}/v1/x", headers={"X-Org": "normal"})).status_code] += 1
                    await asyncio.sleep(0.05)
            slow_headers, slow_bodies = await slow
            return slow_headers, slow_bodies, normal

        slow_headers, slow_bodies, normal = asyncio.run(main())
    assert set(normal) == {200} and normal[200] >= 10, normal
    assert all(got.startswith(b"HTTP/1.1 408 ") for _, got in slow_headers)
    assert max(took for took, _ in slow_headers + slow_bodies) < 2 + 8, "a slow client stayed open"
    assert min(took for took, _ in slow_headers + slow_bodies) >= 1.5  # the deadline, not sooner


def test_connections_past_the_cap_get_503_until_there_is_room(tmp_path: Path) -> None:
    """GATEWAY_MAX_CONNECTIONS=20 with 25 connections open and idle: a request gets 503; once they close, 200."""
    with upstream() as up, Served(tmp_path, up.url, env={"GATEWAY_MAX_CONNECTIONS": "20"}) as gw:
        gw.start()
        idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(25)]
        try:
            r = httpx.get(f"{gw.url}/v1/x", headers={"X-Org": "a"}, timeout=10)
            assert r.status_code == 503
        finally:
            for s in idle:
                s.close()

        def served() -> bool:
            return httpx.get(f"{gw.url}/v1/x", headers={"X-Org": "a"}, timeout=10).status_code == 200

        wait_until(served, "a request to be served again", 10)


def test_workers_end_when_their_parent_is_killed(tmp_path: Path, private_redis: RedisServer) -> None:
    """`--workers 2`, the parent SIGKILLed (nothing supervises the workers any more): both workers exit on their
    own instead of serving on."""
    env = redis_env(private_redis)
    with upstream() as up, Served(tmp_path, up.url, env=env, args=["--workers", "2"]) as gw:
        gw.start()
        assert gw.proc is not None
        wait_until(lambda: "2 workers" in gw.log(), "both workers to be ready", 60)
        workers = children_of(gw.proc.pid)
        assert len(workers) == 2
        gw.signal(signal.SIGKILL)
        gw.exit_status(timeout=30)

        def running(pid: int) -> bool:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return False
            return stat.rsplit(")", 1)[1].split()[0] != "Z"  # an exited orphan waits for init as a zombie

        try:
            wait_until(lambda: not any(running(pid) for pid in workers), "the orphaned workers to exit", 30)
        finally:
            for pid in filter(running, workers):  # a failed run leaves nothing serving
                os.kill(pid, signal.SIGKILL)
