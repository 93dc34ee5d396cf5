"""One narrow adapter over redis.asyncio: Lua scripts by SHA, a circuit breaker, and the three client kinds.

    open_redis(None)                        the in-process emulation (fakeredis with Lua), one per process
    open_redis("redis://..." | "rediss://...")   one server, through a blocking connection pool
    open_redis("redis+cluster://H:P,H:P")   Redis Cluster, from those startup nodes
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import ConfigError, RedisUnavailable
from gateway.store.resp import ConnectionLost, PipelinedConnection, ReplyError

ACCEPTED = "redis://HOST:PORT[/DB], rediss://HOST:PORT[/DB] or redis+cluster://HOST:PORT[,HOST:PORT...]"
EMBEDDED = "embedded"

# Errors that say Redis did not answer (or cannot serve the slot), as opposed to a script's own error.
_DOWN = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    RedisClusterException,
    ReadOnlyError,
    OSError,
    asyncio.TimeoutError,
)

try:
    from redis.maint_notifications import MaintNotificationsConfig

    # redis-py 8 speaks RESP3 and turns maintenance notifications on by default; with them on, the pool
    # skips its check for a connection the server closed (a restart then fails one call), and a
    # notification may relax socket timeouts to 10 s. Off: neither applies to a self-hosted Redis.
    _NO_MAINT: dict[str, Any] = {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}
except ImportError:  # redis-py before 7
    _NO_MAINT = {}

_fake_server: Any = None


@dataclass(frozen=True)
class Script:
    name: str
    text: str
    sha: str


@cache
def script(name: str) -> Script:
    """The text of lua/<name>.lua, read once; its SHA1 is what EVALSHA sends."""
    try:
        text = (resources.files("gateway.lua") / f"{name}.lua").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        # Running from a checkout that is not installed: lua/ sits at the repository root.
        text = (Path(__file__).resolve().parents[2] / "lua" / f"{name}.lua").read_text(encoding="utf-8")
    return Script(name, text, hashlib.sha1(text.encode()).hexdigest())


class Breaker:
    """Opens after `threshold` failures in a row; then one probe per cool-down, which doubles up to a cap."""

    def __init__(
        self,
        threshold: int = 3,
        cooldown: float = 1.0,
        max_cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0
        self.probing = False
        self.last_error = ""

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "half-open" if self.probing or self.clock() >= self.open_until else "open"

    def allow(self) -> bool:
        if self.failures < self.threshold:
            return True
        if self.probing or self.clock() < self.open_until:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self.cooldown = self.base_cooldown
        self.probing = False

    def failure(self, reason: str) -> None:
        self.last_error = reason
        self.failures += 1
        if self.probing:
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
        if self.failures >= self.threshold:
            self.open_until = self.clock() + self.cooldown
        self.probing = False

    def abandon(self) -> None:
        """A call ended without a verdict on Redis (cancelled): let the next one probe."""
        self.probing = False


class RedisStore:
    def __init__(
        self,
        client: Any,
        url: str,
        *,
        is_cluster: bool,
        embedded: bool,
        breaker: Breaker,
        pipelined: PipelinedConnection | None = None,
    ) -> None:
        self.client = client
        self.url = url
        self.is_cluster = is_cluster
        self.embedded = embedded
        self.breaker = breaker
        # Scripts on a single server go through one pipelined connection (resp.py); the rest through redis-py.
        self.pipelined = pipelined

    def _unavailable(self, reason: str) -> RedisUnavailable:
        return RedisUnavailable(
            f"Redis at {self.url} did not answer: {reason.rstrip('.')}. "
            "Check that it is running; routes follow on_redis_down meanwhile."
        )

    def _admit(self) -> None:
        """Raise at once while the circuit is open: a dead Redis costs microseconds per request."""
        if not self.breaker.allow():
            wait = max(self.breaker.open_until - self.breaker.clock(), 0.0)
            raise self._unavailable(
                f"circuit open after {self.breaker.failures} failures ({self.breaker.last_error}), "
                f"next try in {wait:.1f}s"
            )

    async def run(self, name: str, keys: list[str], args: Sequence[str | int | float | bytes]) -> Any:
        """EVALSHA lua/<name>.lua; NOSCRIPT loads and retries once, a timeout is never retried."""
        s = script(name)
        self._admit()
        if self.pipelined is not None:
            return await self._run_pipelined(s, keys, args)
        try:
            try:
                reply = await self.client.execute_command("EVALSHA", s.sha, len(keys), *keys, *args)
            except NoScriptError:
                # NOSCRIPT means the script did not run, so running it again cannot count twice.
                await self._load(s, keys)
                reply = await self.client.execute_command("EVALSHA", s.sha, len(keys), *keys, *args)
        except _DOWN as exc:
            reason = str(exc) or type(exc).__name__
            self.breaker.failure(reason)
            raise self._unavailable(reason) from exc
        except RedisError:
            self.breaker.success()  # Redis answered; the script's own error is the caller's
            raise
        except BaseException:
            self.breaker.abandon()
            raise
        self.breaker.success()
        return reply

    async def _run_pipelined(self, s: Script, keys: list[str], args: Sequence[str | int | float | bytes]) -> Any:
        assert self.pipelined is not None
        try:
            try:
                reply = await self.pipelined.call("EVALSHA", s.sha, len(keys), *keys, *args)
            except ReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                # NOSCRIPT means the script did not run, so running it again cannot count twice.
                await self.pipelined.call("SCRIPT", "LOAD", s.text)
                reply = await self.pipelined.call("EVALSHA", s.sha, len(keys), *keys, *args)
        except ConnectionLost as exc:
            self.breaker.failure(str(exc))
            raise self._unavailable(str(exc)) from exc
        except ReplyError as exc:
            self.breaker.success()
            raise RedisError(str(exc)) from exc
        except BaseException:
            self.breaker.abandon()
            raise
        self.breaker.success()
        return reply

    async def run_many(self, name: str, calls: Sequence[tuple[list[str], Sequence[str | int | float]]]) -> list[Any]:
        """`run` for many keys at once (the reconciler's reads): one write on the pipelined connection.

        Meant for scripts that only read: a lost connection fails them all, and none is retried."""
        if self.pipelined is None or not calls:
            return list(await asyncio.gather(*(self.run(name, keys, args) for keys, args in calls)))
        s = script(name)
        self._admit()
        commands = [("EVALSHA", s.sha, len(keys), *keys, *args) for keys, args in calls]
        try:
            replies = await self.pipelined.call_many(commands)
            if any(isinstance(r, ReplyError) and str(r).startswith("NOSCRIPT") for r in replies):
                await self.pipelined.call("SCRIPT", "LOAD", s.text)
                replies = await self.pipelined.call_many(commands)
        except ConnectionLost as exc:  # could not connect: nothing was sent
            replies = [exc]
        for reply in replies:
            if isinstance(reply, ConnectionLost):
                self.breaker.failure(str(reply))
                raise self._unavailable(str(reply)) from reply
            if isinstance(reply, ReplyError):
                self.breaker.success()
                raise RedisError(str(reply)) from reply
            if isinstance(reply, BaseException):
                self.breaker.abandon()
                raise reply
        self.breaker.success()
        return replies

    async def _load(self, s: Script, keys: list[str]) -> None:
        if self.is_cluster and keys:
            node = self.client.get_node_from_key(keys[0])
            await self.client.execute_command("SCRIPT LOAD", s.text, target_nodes=node)
        else:
            await self.client.execute_command("SCRIPT LOAD", s.text)

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (*_DOWN, RedisError):
            return False

    async def scan(self, match: str, count: int = 1000) -> AsyncIterator[str]:
        """Every key matching `match`; on a cluster, from every primary."""
        try:
            async for key in self.client.scan_iter(match=match, count=count):
                yield key if isinstance(key, str) else key.decode()
        except _DOWN as exc:
            raise self._unavailable(str(exc) or type(exc).__name__) from exc

    async def fields(self, keys: list[str], field: str) -> list[str | None]:
        """HGET `field` of each hash, pipelined (on a cluster, to every key's node); None where absent."""
        if not keys:
            return []
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hget(key, field)
                return list(await pipe.execute())
        except _DOWN as exc:
            raise self._unavailable(str(exc) or type(exc).__name__) from exc

    async def lease(self, key: str, holder: str, ttl_ms: int) -> bool:
        """Take or renew the lease on `key` for `ttl_ms`; True while `holder` has it. 0 ms gives it back."""
        return bool(await self.run("lease", [key], [holder, ttl_ms]))

    async def eviction_policy(self) -> str | None:
        if self.embedded:
            return "noeviction"
        try:
            reply = await self.client.config_get("maxmemory-policy")
        except (*_DOWN, RedisError):
            return None  # CONFIG is often disabled on managed Redis
        if isinstance(reply, dict) and reply and all(isinstance(v, dict) for v in reply.values()):
            reply = next(iter(reply.values()))  # a cluster answers per node
        value = reply.get("maxmemory-policy") if isinstance(reply, dict) else None
        return str(value) if value is not None else None

    async def epochs(self) -> dict[str, str]:
        """The epoch (lua/epoch.lua) of every master that answers, by master; one that does not is left
        out: it is down, not lost (DESIGN §5). A billable's own master answers `run("epoch", [its key], [])`."""
        if not self.is_cluster:
            try:
                return {self.url: str(await self.run("epoch", [], []))}
            except (RedisUnavailable, RedisError):
                return {}
        s = script("epoch")
        found: dict[str, str] = {}
        try:
            await self.client.initialize()  # a no-op once the client knows the cluster
        except (*_DOWN, RedisError):
            return found
        for node in self.client.get_primaries():
            try:
                try:
                    reply = await self.client.execute_command("EVALSHA", s.sha, 0, target_nodes=node)
                except NoScriptError:
                    await self.client.execute_command("SCRIPT LOAD", s.text, target_nodes=node)
                    reply = await self.client.execute_command("EVALSHA", s.sha, 0, target_nodes=node)
            except (*_DOWN, RedisError):
                continue
            found[node.name] = str(reply)
        return found

    async def close(self) -> None:
        if self.pipelined is not None:
            self.pipelined.close()
        await self.client.aclose()


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def _cluster_nodes(url: str) -> tuple[list[ClusterNode], str | None, str | None]:
    """Startup nodes, username and password of redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]."""
    rest = url[len("redis+cluster://") :].rstrip("/")
    user = password = ""
    if "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
    nodes = []
    for part in rest.split(","):
        host, _, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ConfigError(f"Redis URL {_redact(url)!r}: {part!r} is not HOST:PORT. Accepted: {ACCEPTED}.")
        nodes.append(ClusterNode(host, int(port)))
    return nodes, unquote(user) or None, unquote(password) or None


def open_redis(
    url: str | None,
    *,
    socket_timeout: float = 0.5,
    failure_threshold: int = 3,
    cooldown: float = 1.0,
    max_cooldown: float = 5.0,
) -> RedisStore:
    """A store for `url`; None is the in-process emulation. Never retries a command on its own."""
    global _fake_server
    breaker = Breaker(failure_threshold, cooldown, max_cooldown)
    # A mutating script retried after a timeout may run twice: every redis-py retry layer is off.
    no_retry = Retry(NoBackoff(), 0)
    if url is None:
        import fakeredis

        if _fake_server is None:
            _fake_server = fakeredis.FakeServer()
        client: Any = fakeredis.FakeAsyncRedis(server=_fake_server, decode_responses=True)
        return RedisStore(client, EMBEDDED, is_cluster=False, embedded=True, breaker=breaker)
    if url.startswith(("redis://", "rediss://")):
        try:
            pool = BlockingConnectionPool.from_url(
                url,
                max_connections=64,
                timeout=socket_timeout,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                retry=no_retry,
                decode_responses=True,
                **_NO_MAINT,
            )
        except ValueError as exc:
            raise ConfigError(f"Redis URL {_redact(url)!r} is invalid: {exc}. Accepted: {ACCEPTED}.") from exc
        client = Redis.from_pool(pool)
        kwargs = pool.connection_kwargs
        pipelined = PipelinedConnection(
            kwargs.get("host", "127.0.0.1"),
            int(kwargs.get("port", 6379)),
            db=int(kwargs.get("db", 0) or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            tls=url.startswith("rediss://"),
            timeout=socket_timeout,
        )
        return RedisStore(client, _redact(url), is_cluster=False, embedded=False, breaker=breaker, pipelined=pipelined)
    if url.startswith("redis+cluster://"):
        nodes, username, password = _cluster_nodes(url)
        client = RedisCluster(
            startup_nodes=nodes,
            username=username,
            password=password,
            retry=no_retry,
            max_connections=64,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            decode_responses=True,
            **_NO_MAINT,
        )
        if hasattr(client, "cluster_error_retry_attempts"):  # redis-py 5.x reads this instead of `retry`
            client.cluster_error_retry_attempts = 0
        return RedisStore(client, _redact(url), is_cluster=True, embedded=False, breaker=breaker)
    raise ConfigError(f"Redis URL {_redact(url)!r} is not supported. Accepted: {ACCEPTED}.")
