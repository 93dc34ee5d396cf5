"""Which of a client's request headers reach the app or the upstream (DESIGN §3, "What the upstream receives").

- A header the gateway adds (`X-Billable-Id`, `X-Plan`) is dropped from the client in every spelling:
  any case, and `_` for `-` (WSGI and CGI servers read `X_Plan` as `X-Plan`). A client's `Connection`
  may not name them either: a proxy removes the headers `Connection` names, the gateway's included.
- Method overrides are dropped: the method that was matched is the method forwarded.
- The gateway's own key (`gw_...` in `Authorization: Bearer` or `X-Api-Key`) never leaves the gateway;
  any other `Authorization` (the upstream's own) passes unchanged.
"""

from __future__ import annotations

from gateway.identity import PREFIX

__all__ = ["IDENTITY", "forwardable", "spelled"]

Headers = list[tuple[bytes, bytes]]

IDENTITY = (b"x-billable-id", b"x-plan")
_METHOD_OVERRIDES = (b"x-http-method-override", b"x-http-method", b"x-method-override")
_DROPPED = frozenset(IDENTITY + _METHOD_OVERRIDES)
_KEY = PREFIX.encode()


def spelled(name: bytes) -> bytes:
    """A header name as an upstream may read it: lower case, `_` as `-`."""
    if name.islower() and b"_" not in name:  # what ASGI servers hand over: no copy
        return name
    return name.lower().replace(b"_", b"-")


def forwardable(headers: Headers) -> Headers:
    """The client's headers without the gateway's names, method overrides and the gateway's key."""
    out: Headers = []
    for name, value in headers:
        key = spelled(name)
        if key in _DROPPED:
            continue
        if key == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip().startswith(_KEY):
                continue
        elif key == b"x-api-key":
            if value.strip().startswith(_KEY):
                continue
        elif key == b"connection":
            tokens = [token for t in value.split(b",") if (token := t.strip()) and spelled(token) not in IDENTITY]
            if not tokens:
                continue
            value = b", ".join(tokens)
        out.append((name, value))
    return out
