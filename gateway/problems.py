"""Every problem+json answer the gateway gives (RFC 9457), built here: the middleware's and the proxy's own
answers as ASGI messages, the gateway's endpoints (the admin API, billing, the client's usage) as Starlette
responses; and the one reader of those endpoints' JSON bodies."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NotRequired

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from typing_extensions import TypedDict

from gateway import bounds
from gateway.errors import BadRequest, TooLarge

PROBLEM_JSON = "application/problem+json"
BAD_REQUEST = "urn:gateway:bad-request"
PAYLOAD_TOO_LARGE = "urn:gateway:payload-too-large"

_LAST_WORD = re.compile(r"[^:#/]+$")


class ProblemError(TypedDict):
    message: str
    type: str
    code: int


class Problem(TypedDict):
    """Every problem+json body's members (the OpenAPI description's `Problem`; gateway/openapi.py)."""

    type: str
    title: str
    status: int
    detail: str
    plan: NotRequired[str | None]  # a denial of a billable's request: its plan
    violated_policies: NotRequired[list[str]]
    upgrade_url: NotRequired[str]
    problems: NotRequired[list[dict[str, str]]]  # a catalog that does not load: each problem and its place
    error: ProblemError


def problem_body(status: int, type_: str, title: str, detail: str, **members: Any) -> dict[str, Any]:
    """A problem+json body (RFC 9457), with the `error` member that SDKs made for LLM APIs show (DESIGN §3)."""
    found = _LAST_WORD.search(type_)
    error = {"message": detail, "type": found[0] if found else type_, "code": status}
    return {"type": type_, "title": title, "status": status, "detail": detail, **members, "error": error}


def bad_request_body(detail: str) -> dict[str, Any]:
    return problem_body(400, BAD_REQUEST, "Bad request", detail)


def too_large_body(detail: str) -> dict[str, Any]:
    return problem_body(413, PAYLOAD_TOO_LARGE, "Payload Too Large", detail)


def _payload(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _closing(status: int) -> list[tuple[bytes, bytes]]:
    # A 413's unread rest of the body would otherwise be parsed off the connection as the next request.
    return [(b"connection", b"close")] if status == 413 else []


def problem_messages(
    status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = (), *, websocket: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ASGI start and body messages of a problem+json answer (`websocket`: refusing a handshake)."""
    payload = _payload(body)
    own = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", b"%d" % len(payload)), *_closing(status)]
    prefix = "websocket.http.response" if websocket else "http.response"
    start = {"type": f"{prefix}.start", "status": status, "headers": [*own, *headers]}
    return start, {"type": f"{prefix}.body", "body": payload, "more_body": False}


class ProblemResponse(JSONResponse):
    """A problem+json answer of the gateway's own endpoints: the same bytes the middleware would send."""

    media_type = PROBLEM_JSON

    def render(self, content: Any) -> bytes:
        return _payload(content)


def problem_response(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> JSONResponse:
    response = ProblemResponse(body, status_code=status, headers=headers)
    for name, value in _closing(status):
        response.headers[name.decode()] = value.decode()
    return response


def problem(status: int, type_: str, title: str, detail: str) -> JSONResponse:
    # The gateway's own endpoints take bearer tokens (the admin token, a client's key): a 401 says so.
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return problem_response(status, problem_body(status, type_, title, detail), headers)


def http_problem(exc: HTTPException, method: str, path: str) -> JSONResponse:
    """Starlette's routing answers (an unknown path, a method an endpoint lacks) as problem+json."""
    if exc.status_code == 404:
        return problem(404, "urn:gateway:not-found", "Not found", f"No gateway endpoint at {path}: the README lists them.")
    if exc.status_code == 405:
        # Starlette builds Allow from a set: sorted, the same answer every time.
        allowed = ", ".join(sorted(m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()))
        response = problem(405, "urn:gateway:method-not-allowed", "Method not allowed", f"{path} takes {allowed}, not {method}.")
        response.headers["allow"] = allowed
        return response
    return problem(exc.status_code, "urn:gateway:error", "Error", str(exc.detail))


def bad_request(detail: str) -> JSONResponse:
    return problem_response(400, bad_request_body(detail))


def refused(exc: BadRequest) -> JSONResponse:
    """The answer to a BadRequest (400) or TooLarge (413)."""
    if isinstance(exc, TooLarge):
        return problem_response(413, too_large_body(str(exc)))
    return bad_request(str(exc))


async def read_body(request: Request, limit: int = bounds.MAX_BODY) -> bytes:
    """The whole body, read chunk by chunk; TooLarge as soon as it is over `limit` (or says it will be)."""
    declared = request.headers.get("content-length", "")
    too_large = TooLarge(f"The body is over the {limit}-byte limit, so it was not read.")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def json_body(request: Request) -> dict[str, Any] | JSONResponse:
    """The request's JSON object ({} when empty), or the 400 or 413 to answer instead."""
    try:
        raw = await read_body(request)
        if not raw.strip():
            return {}
        body = bounds.loads(raw, once_each=True)
    except BadRequest as exc:
        return refused(exc)
    if not isinstance(body, dict):
        return bad_request("The body must be a JSON object.")
    place = bounds.unrecordable(body) if b"\\u" in raw else None  # only an escape spells NUL or a lone surrogate
    if place is not None:
        return bad_request(f"{place}: NUL (\\u0000) and unpaired surrogates (\\ud800-\\udfff) cannot be kept: send text without them.")
    return body
