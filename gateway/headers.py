"""Which of a client's request headers reach the app or the upstream (DESIGN §3, "What the upstream receives").

- A header the gateway adds (`X-Billable-Id`, `X-Plan`) is dropped from the client in every spelling:
  any case, and `_` for `-` (WSGI and CGI servers read `X_Plan` as `X-Plan`). A client's `Connection`
  may not name them either: a proxy removes the headers `Connection` names, the gateway's included.
- A header the gateway adds to its answers (`RateLimit`, `X-Credits-Remaining`, `X-Gateway-Degraded`, ...) is
  dropped from the client in every spelling too: an upstream that reads one reads the gateway's word, or none.
- Method overrides are dropped: the method that was matched is the method forwarded.
- A header whose value holds a gateway key (`gw_<id>_<secret>`) never leaves the gateway, whatever its
  name and however the key is spelled in it (`Bearer`, `Token`, a tab, bare, beside other text, or in a
  `Basic` credential); any other `Authorization` (the upstream's own) passes unchanged.
"""

from __future__ import annotations

import binascii
import re

from gateway.identity import KEY_PATTERN, PREFIX

__all__ = ["ANSWERED", "IDENTITY", "carries_key", "forwardable", "spelled"]

Headers = list[tuple[bytes, bytes]]

IDENTITY = (b"x-billable-id", b"x-plan")
# What Decision.headers (and the check endpoint) put on an answer.
ANSWERED = (b"ratelimit", b"ratelimit-policy", b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset",
            b"x-ratelimit-resource", b"retry-after", b"x-credits-remaining", b"x-gateway-degraded", b"x-gateway-shadow")  # fmt: skip
_METHOD_OVERRIDES = (b"x-http-method-override", b"x-http-method", b"x-method-override")
_DROPPED = frozenset(IDENTITY + ANSWERED + _METHOD_OVERRIDES)
_KEY = PREFIX.encode()
_KEY_IN = re.compile(KEY_PATTERN.encode())
_BASIC = b"basic "
_FOLD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_", b"abcdefghijklmnopqrstuvwxyz-")


def spelled(name: bytes) -> bytes:
    """A header name as an upstream may read it: lower case, `_` as `-` (one C call: every header pays it)."""
    return name.translate(_FOLD)


def carries_key(value: bytes) -> bool:
    """Whether a header value holds a gateway key, in any spelling (a `Basic` credential decoded)."""
    if _KEY in value:  # one C search: most values have no "gw_" at all
        return _KEY_IN.search(value) is not None
    if value[:1] in b"Bb" and value[:6].lower() == _BASIC:
        try:
            return _KEY_IN.search(binascii.a2b_base64(value[6:].strip())) is not None
        except binascii.Error:
            return False
    return False


def forwardable(headers: Headers) -> Headers:
    """The client's headers without the gateway's names, method overrides and any header with a gateway key."""
    out: Headers = []
    for name, value in headers:
        if (_KEY in value or value[:1] in b"Bb") and carries_key(value):  # the call only where a key could be
            continue
        key = name.translate(_FOLD)  # spelled(name), inlined: every header of every request
        if key in _DROPPED:
            continue
        if key == b"connection" and (b"x" in value or b"X" in value):  # "keep-alive", "close", "Upgrade" name no identity
            tokens = [t for t in (t.strip() for t in value.split(b",")) if t and spelled(t) not in IDENTITY]
            if not tokens:
                continue
            value = b", ".join(tokens)
        out.append((name, value))
    return out
