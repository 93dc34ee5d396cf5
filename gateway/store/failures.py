"""A connection's failures, in a module of their own that stays pure Python: GATEWAY_COMPILE=1 compiles
store/resp.py and store/node.py with mypyc, which cannot compile a class derived from a builtin exception
other than Exception, and crashes reading an attribute of a compiled subclass of a pure-Python one."""

from __future__ import annotations

from gateway.errors import RedisReplyError


class ReplyError(RedisReplyError):
    """An error reply from Redis (the command or script failed; Redis itself answered)."""

    @property
    def code(self) -> str:
        """The error's first word: NOSCRIPT, MOVED, ASK, LOADING, ERR ..."""
        return str(self).split(" ", 1)[0]


class ConnectionLost(ConnectionError):
    """Redis did not answer in time, or the connection broke: the outcome of calls in flight is unknown."""


class SetupRefused(ConnectionLost):
    """Redis refused the connection's AUTH or SELECT: the URL's user, password or database is wrong."""
