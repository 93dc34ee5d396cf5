"""problem+json answers of the gateway's own endpoints (the admin API, billing, the client's usage)."""

from __future__ import annotations

from starlette.responses import JSONResponse


def problem(status: int, type_: str, title: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"type": type_, "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


def bad_request(detail: str) -> JSONResponse:
    return problem(400, "urn:gateway:bad-request", "Bad request", detail)
