"""problem+json answers of the gateway's own endpoints (the admin API, billing, the client's usage)."""

from __future__ import annotations

import json
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


async def json_body(request: Request) -> dict[str, Any] | JSONResponse:
    """The request's JSON object ({} when empty), or the 400 to answer instead."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return bad_request("The body is not valid JSON.")
    if not isinstance(body, dict):
        return bad_request("The body must be a JSON object.")
    return body
