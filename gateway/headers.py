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
_LOOKED_AT = _DROPPED | {b"authorization", b"x-api-key", b"connection"}
_KEY = PREFIX.encode()
_FOLD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_", b"abcdefghijklmnopqrstuvwxyz-")


def spelled(name: bytes) -> bytes:
    """A header name as an upstream may read it: lower case, `_` as `-` (one C call: every header pays it)."""
    return name.translate(_FOLD)


def forwardable(headers: Headers) -> Headers:
    """The client's headers without the gateway's names, method overrides and the gateway's key."""
    out: Headers = []
    for name, value in headers:
        key = name.translate(_FOLD)  # spelled(name), inlined: every header of every request
        if key in _LOOKED_AT:
            if key in _DROPPED:
                continue
            if key == b"connection":
                if b"x" in value or b"X" in value:  # "keep-alive", "close", "Upgrade" name no identity
                    tokens = [t for t in (t.strip() for t in value.split(b",")) if t and spelled(t) not in IDENTITY]
                    if not tokens:
                        continue
                    value = b", ".join(tokens)
            elif key == b"x-api-key":
                if value.strip().startswith(_KEY):
                    continue
            else:
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"bearer" and token.strip().startswith(_KEY):
                    continue
        out.append((name, value))
    return out
