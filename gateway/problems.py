"""problem+json answers of the gateway's own endpoints (the admin API, billing, the client's usage), and
the one reader of their JSON bodies."""

from __future__ import annotations

import re
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

_LAST_WORD = re.compile(r"[^:#/]+$")


def problem_body(status: int, type_: str, title: str, detail: str, **members: Any) -> dict[str, Any]:
    """A problem+json body (RFC 9457), with the `error` member that SDKs made for LLM APIs show (DESIGN §3)."""
    found = _LAST_WORD.search(type_)
    error = {"message": detail, "type": found[0] if found else type_, "code": status}
    return {"type": type_, "title": title, "status": status, "detail": detail, **members, "error": error}


from gateway import bounds
from gateway.errors import BadRequest, TooLarge


def problem(status: int, type_: str, title: str, detail: str) -> JSONResponse:
    # The gateway's own endpoints take bearer tokens (the admin token, a client's key): a 401 says so.
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        problem_body(status, type_, title, detail),
        status_code=status,
        headers=headers,
        media_type="application/problem+json",
    )


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
    return problem(400, "urn:gateway:bad-request", "Bad request", detail)


def refused(exc: BadRequest) -> JSONResponse:
    """The answer to a BadRequest (400) or TooLarge (413)."""
    if isinstance(exc, TooLarge):
        return problem(413, "urn:gateway:payload-too-large", "Payload Too Large", str(exc))
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
        body = bounds.loads(raw)
    except BadRequest as exc:
        return refused(exc)
    if not isinstance(body, dict):
        return bad_request("The body must be a JSON object.")
    return body
