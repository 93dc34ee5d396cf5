from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import hiredis
import pytest
import redis
from services import RedisCluster, RedisServer, free_port, raw_redis, shared_redis_url
from waiting import until

from gateway.errors import ConfigError, RedisReplyError, RedisUnavailable
from gateway.store.cluster import key_slot
from gateway.store.redis import Breaker, RedisStore, open_redis, script
from gateway.store.resp import PipelinedConnection

T = TypeVar("T")


def go(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def ping_once(store: RedisStore, key: str = "x:{a}:1", arg: str = "hello") -> list[str]:
    try:
        return list(await store.run("_ping", [key], [arg]))
    finally:
        await store.close()


def assert_pinged(reply: list[str], key: str = "x:{a}:1", arg: str = "hello") -> None:
    assert reply[:2] == [key, arg]
    assert reply[2].isdigit() and abs(int(reply[2]) - time.time()) < 60


def script_calls(server: RedisServer) -> tuple[int, int]:
    """(EVALSHA calls, SCRIPT LOAD calls) the server has counted since its stats were reset."""
    with server.client() as c:
        stats = c.info("commandstats")
    calls = {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "script|load")}
    return calls["evalsha"], calls["script|load"]


def test_embedded_emulation_runs_the_same_scripts() -> None:
    """With no URL, scripts run in the in-process emulation, whose data every store of the process shares."""

    async def main() -> None:
        a, b = open_redis(None), open_redis(None)
        assert a.embedded and not a.is_cluster
        assert_pinged(list(await a.run("_ping", ["x:{a}:1"], ["hello"])))
        raw = raw_redis(None)
        await raw.set("x:{a}:shared", "1")
        await raw.hset("x:{a}:h", "f", "v")
        assert await b.fields(["x:{a}:h", "x:{a}:none"], "f") == ["v", None]
        assert await a.ping() and await a.eviction_policy() == "noeviction"
        assert [k async for k in b.scan("x:{a}:shared")] == ["x:{a}:shared"]
        await raw.rpush("x:{a}:l", "1", "2", "3")
        assert await a.read_list("x:{a}:l", 2) == ["1", "2"]
        await a.trim_list("x:{a}:l", 2)
        assert await b.read_list("x:{a}:l", 10) == ["3"]
        with pytest.raises(RedisReplyError, match="not an integer"):  # a script's own error, not an outage
            await a.run("lease", ["x:{a}:lease"], ["me", "soon"])
        await raw.delete("x:{a}:shared", "x:{a}:h", "x:{a}:l")
        await raw.aclose()
        await a.close()
        await b.close()

    go(main())


def test_shared_redis(key_prefix: str) -> None:
    """Scripts run on the shared Redis, loaded by SHA once and then only EVALSHA'd."""
    url = shared_redis_url()
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"shared Redis at {url} unreachable: {exc}")
    key = f"{key_prefix}:{{a}}:1"
    assert_pinged(go(ping_once(open_redis(url), key, "7")), key, "7")


def test_private_server_evalsha_only(private_redis: RedisServer) -> None:
    """A script is loaded once (on NOSCRIPT) and every later call is a single EVALSHA."""

    async def main() -> None:
        store = open_redis(private_redis.url)
        for i in range(5):
            assert_pinged(list(await store.run("_ping", ["x:{a}:1"], [i])), arg=str(i))
        assert await store.eviction_policy() == "noeviction"
        assert await store.ping()
        await store.close()

    with private_redis.client() as c:
        c.script_flush()
        c.config_resetstat()
    go(main())
    # One NOSCRIPT answer, one SCRIPT LOAD, then five EVALSHAs that ran.
    assert script_calls(private_redis) == (6, 1)


def test_noscript_after_script_flush(private_redis: RedisServer) -> None:
    """SCRIPT FLUSH between calls is survived: NOSCRIPT, load, retry once."""

    async def main() -> None:
        store = open_redis(private_redis.url)
        assert_pinged(list(await store.run("_ping", ["x:{a}:1"], ["hello"])))
        with private_redis.client() as c:
            c.script_flush()
            assert c.script_exists(script("_ping").sha) == [False]
        assert_pinged(list(await store.run("_ping", ["x:{a}:1"], ["hello"])))
        with private_redis.client() as c:
            assert c.script_exists(script("_ping").sha) == [True]
        await store.close()

    go(main())


def test_run_many_is_one_write_and_survives_script_flush(private_redis: RedisServer) -> None:
    """Many calls of one script go out together (no task each): every reply in order; after SCRIPT FLUSH,
    one load and the batch again; a stopped server fails the batch as unavailable."""
    keys = [f"x:{{{i}}}:1" for i in range(300)]

    async def main() -> None:
        store = open_redis(private_redis.url)
        for _ in range(2):
            replies = await store.run_many("_ping", [([k], [f"arg{i}"]) for i, k in enumerate(keys)])
            for i, (k, reply) in enumerate(zip(keys, replies, strict=True)):
                assert_pinged(list(reply), k, f"arg{i}")
            with private_redis.client() as c:
                c.script_flush()
        assert await store.run_many("_ping", []) == []
        private_redis.stop()
        with pytest.raises(RedisUnavailable):
            await store.run_many("_ping", [([k], ["x"]) for k in keys[:3]])
        await store.close()
        port = free_port()
        never = open_redis(f"redis://127.0.0.1:{port}/0")  # nothing ever listened: cannot connect
        with pytest.raises(RedisUnavailable, match="did not answer"):
            await never.run_many("_ping", [([k], ["x"]) for k in keys[:3]])
        assert never.breakers()[f"127.0.0.1:{port}"].failures == 1  # one failed write, not one per call
        await never.close()

    try:
        go(main())
    finally:
        private_redis.start()


def test_noscript_after_restart(private_redis: RedisServer) -> None:
    """A restarted server (scripts and data lost) is used again without a failed call."""

    async def main() -> None:
        store = open_redis(private_redis.url)
        assert_pinged(list(await store.run("_ping", ["x:{a}:1"], ["hello"])))
        private_redis.stop()
        await asyncio.sleep(0.05)  # the loop sees the pooled socket close, as it would during a real restart
        private_redis.start()
        assert_pinged(list(await store.run("_ping", ["x:{a}:1"], ["hello"])))
        assert store.breakers()[f"127.0.0.1:{private_redis.port}"].state == "closed"
        await store.close()

    try:
        go(main())
    finally:
        private_redis.start()


def test_breaker_opens_answers_without_io_and_recovers(private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped server fails fast; after 3 failures no I/O at all; after a restart it recovers by itself."""

    async def main() -> None:
        store = open_redis(private_redis.url, cooldown=0.2)
        breaker = store.breakers()[f"127.0.0.1:{private_redis.port}"]
        assert_pinged(list(await store.run("_ping", ["x:{a}:1"], ["hello"])))
        private_redis.stop()
        for _ in range(3):
            with pytest.raises(RedisUnavailable, match=r"Redis at redis://127\.0\.0\.1:\d+/0 did not answer"):
                await store.run("_ping", ["x:{a}:1"], ["hello"])
        assert breaker.state == "open"

        calls = 0
        # Everything a single server is sent goes through its pipelined connection: count that.
        real = PipelinedConnection.call

        async def counting(self: PipelinedConnection, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return await real(self, *args, **kwargs)

        monkeypatch.setattr(PipelinedConnection, "call", counting)
        for _ in range(100):
            with pytest.raises(RedisUnavailable, match="circuit open after 3 failures"):
                await store.run("_ping", ["x:{a}:1"], ["hello"])
        assert calls == 0

        private_redis.start()
        await asyncio.sleep(0.25)  # past the 0.2 s cooldown (the thing under test): the breaker lets a probe through
        assert_pinged(list(await store.run("_ping", ["x:{a}:1"], ["hello"])))
        assert calls == 3  # the probe: EVALSHA (NOSCRIPT on the fresh server), SCRIPT LOAD, EVALSHA
        assert breaker.state == "closed"
        await store.close()

    try:
        go(main())
    finally:
        private_redis.start()


def test_breaker_half_open_lets_one_probe_and_doubles_cooldown() -> None:
    """Half-open admits a single probe; a failed probe doubles the cool-down up to its cap; success closes."""
    now = [0.0]
    b = Breaker(threshold=3, cooldown=1.0, max_cooldown=5.0, clock=lambda: now[0])
    for _ in range(3):
        assert b.allow()
        b.failure("refused")
    assert b.state == "open" and not b.allow()
    for expected in (2.0, 4.0, 5.0, 5.0):
        now[0] = b.open_until
        assert b.allow() and not b.allow()  # one probe, the rest still fail fast
        b.failure("refused")
        assert b.cooldown == expected and b.open_until == now[0] + expected
    now[0] = b.open_until
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.cooldown == 1.0 and b.allow()


def test_ping_never_raises() -> None:
    """ping() on a port nobody listens on is False, not an exception."""

    async def main() -> bool:
        store = open_redis(f"redis://127.0.0.1:{_closed_port()}/0", socket_timeout=0.2)
        try:
            return await store.ping()
        finally:
            await store.close()

    assert go(main()) is False


class SilentRedis:
    """Answers +OK to every command except EVALSHA, which it receives and never answers; as a cluster
    node (`cluster=True`) it answers CLUSTER SLOTS with itself as the master of every slot."""

    def __init__(self, *, cluster: bool = False) -> None:
        self.cluster = cluster
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.commands: list[bytes] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while data := conn.recv(65536):
                buf += data
                commands, buf = _parse(buf)
                for args in commands:
                    name = args[0].upper()
                    self.commands.append(name)
                    if name == b"CLUSTER" and self.cluster:
                        conn.sendall(b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:%d\r\n" % self.port)
                    elif name != b"EVALSHA":
                        conn.sendall(b"+OK\r\n")

    def close(self) -> None:
        self.stopped = True
        self.listener.close()


def _parse(buf: bytes) -> tuple[list[list[bytes]], bytes]:
    """Complete RESP arrays at the start of `buf`, and what is left over."""
    commands: list[list[bytes]] = []
    while buf.startswith(b"*") and (end := buf.find(b"\r\n")) > 0:
        pos, args = end + 2, []
        for _ in range(int(buf[1:end])):
            line = buf.find(b"\r\n", pos)
            if line < 0:
                return commands, buf
            start = line + 2
            stop = start + int(buf[pos + 1 : line])
            if len(buf) < stop + 2:
                return commands, buf
            args.append(buf[start:stop])
            pos = stop + 2
        commands.append(args)
        buf = buf[pos:]
    return commands, buf


@pytest.mark.parametrize("cluster", [False, True])
def test_timeout_is_not_retried(cluster: bool) -> None:
    """A script sent to a server (or a cluster's master) that never answers is sent once, and the caller
    gets RedisUnavailable."""
    silent = SilentRedis(cluster=cluster)
    url = f"redis+cluster://127.0.0.1:{silent.port}" if cluster else f"redis://127.0.0.1:{silent.port}/0"

    async def main() -> None:
        store = open_redis(url, socket_timeout=0.2)
        began = time.monotonic()
        with pytest.raises(RedisUnavailable, match="did not answer: no answer within 0.2s"):
            await store.run("_ping", ["x:{a}:1"], ["hello"])
        assert time.monotonic() - began < 1.0
        await store.close()

    try:
        go(main())
    finally:
        silent.close()
    assert silent.commands.count(b"EVALSHA") == 1


@pytest.mark.cluster
def test_cluster_runs_scripts_on_every_node(redis_cluster: RedisCluster) -> None:
    """Each cluster node answers NOSCRIPT once and gets the script loaded; SCAN sees every primary."""
    tags = ["a", "b", "c", "d", "e", "f"]

    async def main() -> None:
        store = open_redis(redis_cluster.url)
        assert store.is_cluster
        for _ in range(2):
            for t in tags:
                assert_pinged(list(await store.run("_ping", [f"x:{{{t}}}:1"], ["hi"])), f"x:{{{t}}}:1", "hi")
        owners = {key_slot(f"x:{{{t}}}:1") * 3 // 16384 for t in tags}  # the fixture splits the slots in thirds
        assert len(owners) == 3
        raw = raw_redis(redis_cluster.url)
        for t in tags:
            await raw.hset(f"scan:{{{t}}}", "f", t)
        assert sorted([k async for k in store.scan("scan:*")]) == sorted(f"scan:{{{t}}}" for t in tags)
        # One pipelined HGET per master, each reply in its key's place.
        assert await store.fields([f"scan:{{{t}}}" for t in [*tags, "none"]], "f") == [*tags, None]
        for t in tags:
            await raw.delete(f"scan:{{{t}}}")
        await raw.aclose()
        assert await store.eviction_policy() == "noeviction"
        assert await store.ping()
        await store.close()

    go(main())
    for server in redis_cluster.servers:
        with server.client() as c:
            assert c.script_exists(script("_ping").sha) == [True]
            c.script_flush()
    go(main())  # and again after SCRIPT FLUSH on every node


def test_unreachable_cluster_is_unavailable() -> None:
    """A cluster none of whose startup nodes answers is RedisUnavailable, like a single server."""
    store = open_redis(f"redis+cluster://127.0.0.1:{_closed_port()},127.0.0.1:{_closed_port()}")
    with pytest.raises(RedisUnavailable, match="cannot be connected: no node answered CLUSTER SLOTS"):
        go(store.run("_ping", ["x:{a}:1"], ["v"]))
    go(store.close())


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379", "127.0.0.1:6379", "", "redis+cluster://", "redis+cluster://host",
     "redis+cluster://h:1,h2:x", "unix:///tmp/redis.sock", "redis://127.0.0.1:notaport/0"],
)
def test_bad_urls_name_the_accepted_forms(url: str) -> None:
    """A Redis URL that cannot work is a ConfigError naming it and every accepted form."""
    with pytest.raises(ConfigError) as info:
        open_redis(url)
    assert "redis://" in str(info.value) and "redis+cluster://HOST:PORT" in str(info.value)


def test_a_refused_database_number_is_named_and_nothing_runs_elsewhere(private_redis: RedisServer) -> None:
    """DB 99 on a 16-database server: RedisUnavailable naming SELECT 99 and what to check; no command
    reached the server (none may run in database 0 while SELECT is refused)."""
    with private_redis.client() as c:
        c.config_resetstat()

    async def main() -> None:
        store = open_redis(f"redis://127.0.0.1:{private_redis.port}/99")
        with pytest.raises(RedisUnavailable, match=r"refused SELECT 99: ERR DB index is out of range\. Check the URL"):
            await store.run("_ping", ["x:{a}:1"], ["hello"])
        assert await store.ping() is False
        await store.close()

    go(main())
    assert script_calls(private_redis) == (0, 0)


def test_password_is_not_shown() -> None:
    """Messages name the URL without its password."""
    store = open_redis(f"redis://user:s3cret@127.0.0.1:{_closed_port()}/0", socket_timeout=0.2)
    with pytest.raises(RedisUnavailable) as info:
        go(store.run("_ping", ["k"], ["v"]))
    assert "s3cret" not in str(info.value) and "user:***@" in str(info.value)
    go(store.close())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def test_a_call_in_flight_when_the_server_closes_never_gets_the_next_connections_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server closes with a call in flight, and the event loop reports the loss late (uvloop closes the
    handle first): that call fails with ConnectionLost, and the call that connects again gets its own reply,
    never handed to the older one."""
    from gateway.store import resp

    late: list[tuple[Any, Exception | None]] = []
    monkeypatch.setattr(resp._Protocol, "connection_lost", lambda self, exc: late.append((self, exc)))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                if command[1] == b"hold":  # never answered: the server goes away with it in flight
                    writer.close()
                    return
                writer.write(b"$%d\r\n%s\r\n" % (len(command[1]), command[1]))

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        conn = PipelinedConnection("127.0.0.1", server.sockets[0].getsockname()[1], timeout=3)
        assert await conn.call(("ECHO", "first")) == "first"
        held = asyncio.ensure_future(conn.call(("ECHO", "hold")))
        await until(lambda: held.done() or (t := conn._transport) is None or t.is_closing(), "the server to close")
        assert await conn.call(("ECHO", "next")) == "next"
        with pytest.raises(resp.ConnectionLost):
            await held
        conn.close()
        server.close()

    go(main())
