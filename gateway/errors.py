"""Errors a user of the gateway can cause or meet.

    GatewayError
    ├── CatalogError        plans.toml is wrong: every problem, each with its dotted place
    ├── RedisUnavailable    Redis cannot be reached (or the circuit breaker is open)
    │   └── RedisRefused    Redis answered but refused the connection's set-up (AUTH, SELECT): a setting to fix
    ├── RedisReplyError     Redis answered with an error (a script failed, a command was refused)
    ├── StateUnavailable    a billable's lost state cannot be restored (the record is unreachable)
    ├── DatabaseUnavailable the record cannot be read or written (grants refused, unknown keys refused)
    ├── ConfigError         a setting (flag or environment variable) is wrong
    └── BadRequest          a client or operator sent a value outside its rule (400; the message names the field)
        └── TooLarge        a body over its size limit (413)
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a catalog: where (dotted path) and what to do about it."""

    place: str
    message: str

    def __str__(self) -> str:
        return f"{self.place}: {self.message}" if self.place else self.message


class CatalogError(GatewayError):
    """A plans.toml that cannot be used; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem], source: str = "plans.toml") -> None:
        self.problems = problems
        self.source = source
        if len(problems) == 1 and not problems[0].place:  # the file itself (not found, not TOML): one line
            message = problems[0].message
            super().__init__(f"gateway: {message}" if message.startswith(source) else f"gateway: {source}: {message}")
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


class PlansInUse(CatalogError):
    """A catalog to publish lacks plans that billables are on (each a problem at `plans.<name>`): archive them."""


class RedisUnavailable(GatewayError):
    """Redis did not answer; the route's on_redis_down decides what the client gets."""


class RedisRefused(RedisUnavailable):
    """Redis refused AUTH or SELECT: the URL's user, password or database number is wrong."""


class RedisReplyError(GatewayError):
    """Redis answered, with an error: a script failed or the server refused the command (not an outage)."""


class StateUnavailable(GatewayError):
    """A billable's state is missing from Redis and the record cannot restore it."""


class ConfigError(GatewayError):
    """A setting given by flag or environment is invalid."""


class DatabaseUnavailable(GatewayError):
    """The record (Postgres, or the embedded SQLite file) did not answer: `url` (shown without its password)
    and `reason` (the deadline, the driver's words) say which and why. Raised by `store.db.answering` only."""

    def __init__(self, message: str, *, url: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.reason = reason

    def also(self, more: str) -> DatabaseUnavailable:
        """The same outage, its message followed by `more` (what it left undone, what to check)."""
        return DatabaseUnavailable(f"{self}{more}", url=self.url, reason=self.reason)


class KeyRevoked(GatewayError):
    """An API key whose secret matches, revoked: answered 401 saying so and when (a guess never learns it)."""


class BadRequest(GatewayError):
    """A value sent by a client or an operator breaks its rule (an id, a number, a body): answered 400.

    The message is the problem's `detail`: it names the field and what is allowed."""

    status = 400


class Conflict(GatewayError):
    """A request that is well formed but clashes with the state it would change (terms for a billable with
    no parent, a plan archived): answered 409."""

    status = 409


class InvalidOverrides(BadRequest):
    """A billable's overrides that break the catalog's rules; `problems` lists each with its place."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"The overrides do not apply ({count}); nothing changed: " + "; ".join(map(str, problems)))


class TooLarge(BadRequest):
    """A body over its size limit: answered 413 without reading the rest."""

    status = 413
