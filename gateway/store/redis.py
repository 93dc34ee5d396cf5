"""The store: Lua scripts by SHA over one transport seam, for one server, a cluster or the emulation.

    open_redis(None)                        the in-process emulation (fakeredis with Lua), one per process
    open_redis("redis://..." | "rediss://...")   one server, through one pipelined connection
    open_redis("redis+cluster://H:P,H:P")   Redis Cluster, a pipelined connection per master

A transport (`node.One`, `cluster.Cluster`) routes each command by its key to a node; every node has
its breaker (node.py), so the store has one path for everything: `_call`, and `run` over it with the
one NOSCRIPT → SCRIPT LOAD → retry-once. Callers get RedisUnavailable (down, refused, cannot serve)
or RedisReplyError (a script's own error); no caller holds a client.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from importlib import resources
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from redis import connection as _redis_connection

from gateway.errors import ConfigError, RedisUnavailable
from gateway.store.breaker import Breaker
from gateway.store.cluster import Cluster
from gateway.store.embedded import EmbeddedConnection
from gateway.store.failures import ReplyError
from gateway.store.node import Node, One
from gateway.store.resp import Arg, Command, PipelinedConnection

__all__ = ["Breaker", "RedisStore", "Script", "Transport", "open_redis", "script", "script_name"]

ACCEPTED = "redis://HOST:PORT[/DB], rediss://HOST:PORT[/DB] or redis+cluster://HOST:PORT[,HOST:PORT...]"
EMBEDDED = "embedded"
_parse_url: Callable[[str], dict[str, Any]] = _redis_connection.parse_url


@dataclass(frozen=True)
class Script:
    name: str
    text: str
    sha: str


@cache
def script(name: str) -> Script:
    """The text of lua/<name>.lua, read once, each `--#include NAME` line replaced by lua/lib/NAME.lua (the
    rules scripts share); its SHA1 is what EVALSHA sends."""
    lines = [_source(f"lib/{line[11:].strip()}") if line.startswith("--#include ") else line
             for line in _source(name).splitlines(keepends=True)]  # fmt: skip
    text = "".join(lines)
    found = Script(name, text, hashlib.sha1(text.encode()).hexdigest())
    _NAMES[found.sha] = name
    return found


_NAMES: dict[str, str] = {}  # SHA1 -> script name, of every script read so far (each is read before it is sent)


def script_name(sha: str) -> str | None:
    """The name of the script an EVALSHA sends by `sha` (for traces), None for one this process never read."""
    return _NAMES.get(sha)


def _source(name: str) -> str:
    try:
        return (resources.files("gateway.lua") / f"{name}.lua").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        # Running from a checkout that is not installed: lua/ sits at the repository root.
        return (Path(__file__).resolve().parents[2] / "lua" / f"{name}.lua").read_text(encoding="utf-8")


class Transport(Protocol):
    """Routes a command by its key: one node, or a cluster's master of the key's slot."""

    label: str
    is_cluster: bool

    async def call(self, key: str, command: Command) -> Any: ...

    async def call_many(self, commands: Sequence[tuple[str, Command]]) -> list[Any]: ...

    async def primaries(self) -> list[Node]: ...

    def nodes(self) -> list[Node]: ...

    async def close(self) -> None: ...


def _noscript(reply: Any) -> bool:
    return isinstance(reply, ReplyError) and reply.code == "NOSCRIPT"


def _raise_first(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies


class RedisStore:
    def __init__(self, transport: Transport, *, embedded: bool = False) -> None:
        self._transport = transport
        self.url = transport.label
        self.is_cluster = transport.is_cluster
        self.embedded = embedded

    def wrap_transport(self, wrap: Callable[[Transport], Transport]) -> None:
        """Put `wrap(transport)` between the store and its nodes (gateway/tracing.py: a span per call), so that a
        store without one pays nothing for it."""
        self._transport = wrap(self._transport)

    # ---- scripts ------------------------------------------------------------------------------------

    async def run(self, name: str, keys: list[str], args: Sequence[Arg]) -> Any:
        """EVALSHA lua/<name>.lua on its keys' node; NOSCRIPT loads and retries once, a timeout never."""
        s = script(name)
        key = keys[0] if keys else ""
        command = ("EVALSHA", s.sha, len(keys), *keys, *args)
        try:
            return await self._transport.call(key, command)
        except ReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        # NOSCRIPT means the script did not run, so running it again cannot count twice.
        await self._load(s)
        return await self._transport.call(key, command)

    async def run_many(self, name: str, calls: Sequence[tuple[list[str], Sequence[Arg]]]) -> list[Any]:
        """`run` for many keys at once (the reconciler's reads): one write per node.

        Meant for scripts that only read: a lost connection fails them all, and none is retried."""
        if not calls:
            return []
        s = script(name)
        commands = [(keys[0] if keys else "", ("EVALSHA", s.sha, len(keys), *keys, *args)) for keys, args in calls]
        replies = await self._transport.call_many(commands)
        missing = [i for i, reply in enumerate(replies) if _noscript(reply)]
        if missing:
            await self._load(s)
            for i, reply in zip(missing, await self._transport.call_many([commands[i] for i in missing]), strict=True):
                replies[i] = reply
        return _raise_first(replies)

    async def _load(self, s: Script) -> None:
        """SCRIPT LOAD on every master (a cluster's that lacks it is the one that said NOSCRIPT, or soon will be)."""
        nodes = await self._transport.primaries()
        await asyncio.gather(*(node.call(("SCRIPT", "LOAD", s.text)) for node in nodes), return_exceptions=True)

    # ---- what callers need besides scripts ------------------------------------------------------------

    async def lease(self, key: str, holder: str, ttl_ms: int) -> bool:
        """Take or renew the lease on `key` for `ttl_ms`; True while `holder` has it. 0 ms gives it back."""
        return bool(await self.run("lease", [key], [holder, ttl_ms]))

    async def read_list(self, key: str, count: int) -> list[str]:
        """The first `count` items of a list (oldest first, for lists appended at the tail)."""
        return list(await self._transport.call(key, ("LRANGE", key, 0, count - 1)))

    async def trim_list(self, key: str, count: int) -> None:
        """Drop the first `count` items of a list."""
        await self._transport.call(key, ("LTRIM", key, count, -1))

    async def fields(self, keys: list[str], field: str) -> list[str | None]:
        """HGET `field` of each hash, pipelined (on a cluster, to every key's master); None where absent."""
        return _raise_first(await self._transport.call_many([(key, ("HGET", key, field)) for key in keys]))

    async def hash(self, key: str) -> dict[str, str]:
        """Every field of a hash (a member's state, which no script reads whole for a status)."""
        flat = list(await self._transport.call(key, ("HGETALL", key)))
        return dict(zip(flat[::2], flat[1::2], strict=True))

    async def scan(self, match: str, count: int = 1000) -> AsyncIterator[str]:
        """Every key matching `match`; on a cluster, from every master."""
        for node in await self._transport.primaries():
            cursor = "0"
            while True:
                cursor, keys = await node.call(("SCAN", cursor, "MATCH", match, "COUNT", count))
                for key in keys:
                    yield key
                if cursor == "0":
                    break

    async def on_primaries(self, command: Command) -> dict[str, Any]:
        """`command` on every master (the one server, the emulation), by address: its reply, or the
        RedisUnavailable or RedisReplyError it got. Per-node facts (INFO's run_id, CONFIG) are read here."""
        nodes = await self._transport.primaries()
        replies = await asyncio.gather(*(node.call(command) for node in nodes), return_exceptions=True)
        return {node.address: reply for node, reply in zip(nodes, replies, strict=True)}

    async def ping(self) -> bool:
        """Every master answers."""
        masters = await self.masters_up()
        return bool(masters) and all(masters.values())

    async def masters_up(self) -> dict[str, bool]:
        """Whether each master answers, by address ({} when none can be named): on a cluster with one master
        down, the others still decide for their slots."""
        try:
            replies = await self.on_primaries(("PING",))
        except RedisUnavailable:
            return {}
        return {address: reply == "PONG" for address, reply in replies.items()}

    async def eviction_policy(self) -> str | None:
        """maxmemory-policy (the first that is not noeviction, on a cluster); None where CONFIG is refused."""
        if self.embedded:
            return "noeviction"
        try:
            replies = await self.on_primaries(("CONFIG", "GET", "maxmemory-policy"))
        except RedisUnavailable:
            return None
        policies = [str(r[1]) for r in replies.values() if isinstance(r, list) and len(r) == 2]
        if not policies:
            return None  # CONFIG is often disabled on managed Redis
        return next((p for p in policies if p != "noeviction"), policies[0])

    def breakers(self) -> dict[str, Breaker]:
        """The breaker of each master (of the one server, of the emulation), by address."""
        return {node.address: node.breaker for node in self._transport.nodes()}

    async def epochs(self) -> dict[str, tuple[str, int]]:
        """The epoch (lua/lib/epoch.lua) of every master that answers, and the seconds it has lasted at least,
        by address; one that does not is left out: it is down, not lost (DESIGN §5). A billable's own master
        answers `run("epoch", [its key], [])`."""
        s = script("epoch")
        command = ("EVALSHA", s.sha, 0, "age")
        try:
            replies = await self.on_primaries(command)
            if any(_noscript(reply) for reply in replies.values()):
                await self._load(s)
                replies = await self.on_primaries(command)
        except RedisUnavailable:
            return {}
        return {address: (str(reply[0]), int(reply[1])) for address, reply in replies.items() if not isinstance(reply, BaseException)}

    async def close(self) -> None:
        await self._transport.close()


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def _cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
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
        nodes.append((host, int(port)))
    return nodes, unquote(user) or None, unquote(password) or None


def open_redis(
    url: str | None,
    *,
    socket_timeout: float = 0.5,
    failure_threshold: int = 3,
    cooldown: float = 1.0,
    max_cooldown: float = 5.0,
) -> RedisStore:
    """A store for `url`; None is the in-process emulation. Never retries a command that may have run."""
    breaker = partial(Breaker, failure_threshold, cooldown, max_cooldown)
    if url is None:
        return RedisStore(One(Node(EmbeddedConnection(), breaker(), label=EMBEDDED)), embedded=True)
    if url.startswith(("redis://", "rediss://")):
        try:
            parts = _parse_url(url)
            db = int(parts.get("db", 0) or 0)
        except ValueError as exc:
            raise ConfigError(f"Redis URL {_redact(url)!r} is invalid: {exc}. Accepted: {ACCEPTED}.") from exc
        conn = PipelinedConnection(
            parts.get("host", "127.0.0.1"),
            int(parts.get("port", 6379)),
            db=db,
            username=parts.get("username"),
            password=parts.get("password"),
            tls=url.startswith("rediss://"),
            timeout=socket_timeout,
        )
        return RedisStore(One(Node(conn, breaker(), label=_redact(url))))
    if url.startswith("redis+cluster://"):
        startup, username, password = _cluster_nodes(url)

        def connect(host: str, port: int) -> PipelinedConnection:
            return PipelinedConnection(host, port, username=username, password=password, timeout=socket_timeout)

        return RedisStore(Cluster(startup, label=_redact(url), connect=connect, breaker=breaker))
    raise ConfigError(f"Redis URL {_redact(url)!r} is not supported. Accepted: {ACCEPTED}.")
