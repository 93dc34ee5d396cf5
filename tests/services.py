"""Private Redis and Postgres services for tests, on free loopback ports, torn down after.

The shared Redis on 127.0.0.1:6379 is never stopped, flushed or reconfigured: tests that need to do
any of that start their own server here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
import redis.asyncio

from gateway.catalog import Catalog
from gateway.engine import Engine
from gateway.store.redis import RedisStore, open_redis

SHARED_URL = "redis://127.0.0.1:6379/0"


def shared_redis_url() -> str:
    return os.environ.get("GATEWAY_TEST_REDIS_URL", SHARED_URL)


@dataclass(frozen=True)
class RedisSpace:
    """Where one test keeps its Redis state: a server (None: this process's emulation) and a key prefix of its own."""

    url: str | None
    prefix: str

    def store(self) -> RedisStore:
        """A new store on this Redis. Its connection belongs to the event loop that first uses it: code on
        another loop (a TestClient's, the test's own asyncio.run) opens its own. The timeout is a loaded
        machine's, not production's half second."""
        return open_redis(self.url, socket_timeout=5)

    def engine(self, catalog: Catalog, **kw: Any) -> Engine:
        return Engine(self.store(), catalog, prefix=self.prefix, **kw)


def raw_redis(url: str | None) -> Any:
    """An async redis-py client of the Redis behind `url` (None: this process's emulation), to look at or
    change what the gateway stores from outside it. Tests only: the gateway itself has no raw client."""
    if url is None:
        import fakeredis

        from gateway.store.embedded import server

        return fakeredis.FakeAsyncRedis(server=server(), decode_responses=True)
    if url.startswith("redis+cluster://"):
        nodes = [redis.asyncio.cluster.ClusterNode(h, int(p)) for h, _, p in
                 (part.rpartition(":") for part in url[len("redis+cluster://"):].split(","))]
        return redis.asyncio.RedisCluster(startup_nodes=nodes, decode_responses=True, socket_timeout=5)
    return redis.asyncio.Redis.from_url(url, decode_responses=True, socket_timeout=5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None and Path("/usr/bin/redis-server").exists():
        path = "/usr/bin/redis-server"
    if path is None:
        raise RuntimeError(
            "redis-server is not installed; the tests start private servers with it. "
            ".ci/run installs it (apt-get install redis-server)."
        )
    return path


def _wait(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}: {last}")


class RedisServer:
    """One redis-server subprocess without persistence; stop() and start() keep the port (data is lost)."""

    def __init__(self, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.extra = list(extra)
        self.dir = Path(tempfile.mkdtemp(prefix=f"gw-redis-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)

    def start(self) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            return self
        argv = [_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no", *self.extra]
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait(self._ready, f"redis-server on port {self.port}")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{(self.dir / 'redis.log').read_text(errors='replace')}") from None
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        with self.client() as c:
            return bool(c.ping())

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """Masters, and `replicas` replicas of each, slots assigned by hand (faster than redis-cli --cluster create).

    A master that dies degrades only its own slots (`cluster-require-full-coverage no`: Redis itself would
    otherwise refuse every slot until the failover), and its replica takes over after `node_timeout_ms`
    plus the election (`cluster-replica-validity-factor 0`: a replica always may)."""

    def __init__(self, masters: int = 3, *, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        total = masters * (1 + replicas)
        # Explicit bus ports: the default (port + 10000) may be taken or above 65535.
        self.bus_ports = [free_port() for _ in range(total)]
        self.servers = [
            RedisServer("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-port", str(bus), "--cluster-node-timeout", str(node_timeout_ms),
                        "--cluster-require-full-coverage", "no", "--cluster-replica-validity-factor", "0",
                        "--cluster-allow-replica-migration", "no", "--repl-diskless-sync-delay", "0")
            for bus in self.bus_ports
        ]
        self.masters = self.servers[:masters]
        self.replicas = self.servers[masters:]
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def start(self) -> Self:
        began = time.monotonic()
        for server in self.servers:
            server.start()
        clients = [s.client() for s in self.servers]
        n = len(self.masters)
        for i, c in enumerate(clients[:n]):
            c.cluster("ADDSLOTSRANGE", i * 16384 // n, (i + 1) * 16384 // n - 1)
        # Every pair meets directly: no waiting for gossip to introduce them.
        for i, c in enumerate(clients):
            for j, (s, bus) in enumerate(zip(self.servers, self.bus_ports, strict=True)):
                if i != j:
                    c.cluster("MEET", "127.0.0.1", s.port, bus)
        for c in clients:
            _wait(partial(_knows, c, len(clients)), "the cluster's nodes to meet")
        for i, c in enumerate(clients[n:]):
            master_id = clients[i % n].execute_command("CLUSTER", "MYID")
            # Until the handshake with the master is over, the replica knows it under another id.
            _wait(partial(c.execute_command, "CLUSTER", "REPLICATE", master_id), "a replica to follow its master")
        for c in clients:
            with c:
                _wait(partial(_formed, c), "the cluster to form", timeout=30)
        self.startup_seconds = time.monotonic() - began
        return self

    def owner(self, slot: int) -> RedisServer:
        """The server that is master of `slot` now, as a live node sees it."""
        for server in self.servers:
            if server.proc is None:
                continue
            try:
                with server.client() as c:
                    for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                        if start <= slot <= end:
                            return next(s for s in self.servers if s.port == int(master[1]))
            except redis.RedisError:
                continue
        raise RuntimeError(f"no live node names a master of slot {slot}")

    def stop(self) -> None:
        for s in self.servers:
            s.__exit__(None, None, None)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _knows(c: redis.Redis, n: int) -> bool:
    return bool(c.cluster("INFO")["cluster_known_nodes"] == str(n))


def _formed(c: redis.Redis) -> bool:
    """The cluster is ok as this node sees it, and a replica's link to its master is up."""
    if c.cluster("INFO")["cluster_state"] != "ok":
        return False
    info = c.info("replication")
    return info["role"] == "master" or info.get("master_link_status") == "up"


def delete_prefix(url: str, prefix: str) -> int:
    """Delete the keys that contain `prefix` (a unique per-run string) on a shared Redis; nothing else."""
    if len(prefix) < 8:
        raise ValueError(f"refusing to delete by a short prefix {prefix!r}")
    deleted = 0
    with redis.Redis.from_url(url, socket_timeout=2) as c:
        batch = []
        for key in c.scan_iter(match=f"*{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += c.delete(*batch)
                batch.clear()
        if batch:
            deleted += c.delete(*batch)
    return deleted


# ---- Postgres: a private server, for tests that stop it ---------------------------------------------------


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (a postmaster's backends and workers), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])  # the newest installed version
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} (PostgreSQL server binaries) is not installed; the tests start private servers with it. "
            ".ci/run installs it (apt-get install postgresql)."
        )
    return path


class PostgresServer:
    """One private postgres (initdb'd into a temporary directory) on a free loopback port.

    stop() and start() keep the port and the data: an outage, not a loss. Durability settings are off
    (fsync, synchronous_commit): the tests kill the server, never the machine. As root, the server runs
    as the `postgres` user, which owns the data directory (postgres refuses to run as root)."""

    def __init__(self, *extra: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.extra = list(extra)  # more postgres flags; a later -c wins (durability back on for a benchmark)
        self.dir = Path(tempfile.mkdtemp(prefix=f"gw-pg-{self.port}-"))
        self.data = self.dir / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: str | None = "postgres" if os.geteuid() == 0 else None
        self._initialized = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _init(self) -> None:
        if self.user:
            shutil.chown(self.dir, self.user, self.user)
        with open(self.dir / "initdb.log", "wb") as log:
            subprocess.run(
                [_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                 "--no-sync", "--no-instructions"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True,
                user=self.user, group=self.user,
            )
        self._initialized = True

    def start(self) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not self._initialized:
            try:
                self._init()
            except subprocess.CalledProcessError:
                raise RuntimeError("initdb failed:\n" + (self.dir / "initdb.log").read_text(errors="replace")) from None
        argv = [_pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=200", *self.extra]
        with open(self.dir / "postgres.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, user=self.user, group=self.user,
            )
        try:
            _wait(self._ready, f"postgres on port {self.port}", timeout=30)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{(self.dir / 'postgres.log').read_text(errors='replace')[-4000:]}") from None
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.proc.returncode}")
        done = subprocess.run(
            [_pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )
        return done.returncode == 0

    def pause(self) -> None:
        """SIGSTOP the server and every backend: it accepts connections (the kernel does) and answers nothing."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.poll() is None, "postgres is not running"
        for pid in [self.proc.pid, *children_of(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self) -> None:
        """A fast shutdown (SIGINT: connections are cut, the data stays)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()  # a paused server would not hear the SIGINT
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
