"""problem+json answers of the gateway's own endpoints (the admin API, billing, the client's usage)."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse


def problem(status: int, type_: str, title: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"type": type_, "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


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
