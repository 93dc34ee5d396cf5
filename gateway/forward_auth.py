"""`/_gateway/auth`: forward-auth, for an edge proxy that keeps its own routing (nginx `auth_request`,
Traefik `forwardAuth`, Caddy `forward_auth`, Envoy `ext_authz`).

The edge asks about a request before it forwards it; the middleware decides that request exactly as it
decides one passing through (identity, plan, route, the one Redis script), forwards nothing and answers
200 with `X-Billable-Id`, `X-Plan` and the quota headers for the edge to copy, or the denial itself: its
status, problem body and headers. nginx reads no body from an `auth_request`, so its denials carry the
problem in `X-Gateway-Problem` too.

The request asked about is named by exactly one of:
- `X-Forwarded-Method` + `X-Forwarded-Uri` (Traefik, Caddy),
- `X-Original-Method` + `X-Original-URI` (nginx, set by its configuration),
- the raw path after `/_gateway/auth`, with the asking request's own method (Envoy's `path_prefix`).
Edges pass the client's other headers along, so a client may add its own of the others: two that name
different requests are refused (400), never one chosen. The path follows the canonical-path rules
(gateway/paths.py): one that cannot be made canonical is a 400.

The answer is taken as the request's 2xx: a limit's hold is kept, a `release` is made, a metered
operation is charged its reserve (no answer passes here to read units from).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from gateway.errors import BadRequest
from gateway.headers import IDENTITY
from gateway.paths import canonical

__all__ = ["METHOD", "PATH", "SOURCES", "admit", "answering", "asked", "asks"]

Scope = dict[str, Any]
Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]

PATH = b"/_gateway/auth"
PROBLEM_HEADER = b"x-gateway-problem"
_NGINX = ("X-Original-Method", "X-Original-URI")
SOURCES = (("X-Forwarded-Method", "X-Forwarded-Uri"), _NGINX)  # the header pairs that name the request
METHOD = "[A-Z][A-Z_-]{0,31}"  # what nginx accepts as a method; routes name upper-case ones
_METHOD = re.compile(METHOD.encode())
_WHICH = (
    "X-Original-Method and X-Original-URI (nginx auth_request), X-Forwarded-Method and X-Forwarded-Uri "
    "(Traefik, Caddy), or the path after /_gateway/auth (Envoy ext_authz)"
)


def asks(raw_path: bytes) -> bool:
    """Whether a request's raw path (before it is made canonical: `/_gateway/auth/../x` is Envoy asking about
    `/../x`, never a path of the gateway's own) is forward-auth's."""
    return raw_path == PATH or raw_path.startswith(PATH + b"/")


def answering(scope: Scope, send: Send) -> Send:
    """The `send` forward-auth's answer goes out through: nginx's denials carry the problem in a header too."""
    nginx = _NGINX[1].lower().encode()
    return _problem_in_header(send) if any(name == nginx for name, _ in scope["headers"]) else send


def asked(scope: Scope, raw_path: bytes) -> Scope:
    """The request the edge asks about, as the scope the middleware decides (canonical path, its query).
    BadRequest (or paths.BadPath) says why it cannot be read."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    named: dict[str, tuple[bytes, bytes]] = {}  # where it was read -> (method, target)
    suffix = raw_path[len(PATH) :]
    if suffix:
        query = scope.get("query_string", b"")
        named["the path after /_gateway/auth"] = (scope["method"].encode(), suffix + b"?" + query if query else suffix)
    for method_header, uri_header in SOURCES:
        method, uri = _one(headers, method_header), _one(headers, uri_header)
        if method is None and uri is None:
            continue
        if method is None or uri is None:
            given, missing = (method_header, uri_header) if uri is None else (uri_header, method_header)
            raise BadRequest(f"{given} came without {missing}: the edge must send both.")
        named[f"{method_header} and {uri_header}"] = (method, uri)
    if not named:
        raise BadRequest(f"Name the request to decide: {_WHICH}.")
    if len(set(named.values())) > 1:
        raise BadRequest(f"{' and '.join(named)} name different requests: the edge must set one (a client may have sent the other).")  # fmt: skip
    method, target = next(iter(named.values()))
    if _METHOD.fullmatch(method) is None:
        raise BadRequest(f"The method to decide must be an upper-case HTTP method like GET or POST, not {method[:32].decode('latin-1')!r}.")
    path, _, query = target.partition(b"?")
    found = canonical(path)
    raw, decoded = found if found is not None else (path, unquote(path.decode("ascii")))
    return {**scope, "method": method.decode("ascii"), "path": decoded, "raw_path": raw, "query_string": query}


async def admit(scope: Scope, receive: Any, send: Send) -> None:
    """What the edge gets for an admitted request, in place of the upstream's answer: the identity the
    middleware would send upstream (it adds the quota headers itself)."""
    identity = [(name, value) for name, value in scope["headers"] if name in IDENTITY]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0"), *identity]})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _problem_in_header(send: Send) -> Send:
    """nginx keeps only an auth_request's headers: a denial's problem body goes in X-Gateway-Problem too."""
    start: Message | None = None

    async def sending(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] >= 300:
            start = message  # held until its body (the problem, one message) is known
            return
        if start is not None and message["type"] == "http.response.body":
            body: bytes = message.get("body", b"")
            await send({**start, "headers": [*start["headers"], (PROBLEM_HEADER, body)]})
            start = None
        await send(message)

    return sending


def _one(headers: list[tuple[bytes, bytes]], name: str) -> bytes | None:
    """The header's value (an empty one is none: edges never send those); BadRequest when it is sent twice
    (which one the edge set cannot be told)."""
    key = name.lower().encode()
    found = [value for k, value in headers if k == key and value.strip()]
    if len(found) > 1:
        raise BadRequest(f"{name} was sent {len(found)} times: the edge must set it once.")
    return found[0].strip() if found else None
