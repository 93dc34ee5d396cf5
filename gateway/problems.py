"""problem+json answers of the gateway's own endpoints (the admin API, billing, the client's usage), and
the one reader of their JSON bodies."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway import bounds
from gateway.errors import BadRequest, TooLarge


def problem(status: int, type_: str, title: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"type": type_, "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


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
