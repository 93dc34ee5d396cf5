"""`gateway demo`: the gateway on its embedded defaults in front of a small built-in API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.errors import ConfigError
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.app import GatewayApp

DEMO_BILLABLE = "demo_org"


async def _echo(request: Request) -> Response:
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "billable": request.headers.get("x-billable-id"),
            "plan": request.headers.get("x-plan"),
        }
    )


async def _chat(request: Request) -> Response:
    """An LLM-like answer: usage in the JSON body, or in the last event of a stream."""
    body = await request.body()
    words = len(body.split()) + 5
    if request.query_params.get("stream"):

        async def events() -> AsyncIterator[bytes]:
            for word in ("Hello", "from", "the", "demo"):
                yield f"data: {json.dumps({'delta': word})}\n\n".encode()
                await asyncio.sleep(0.05)
            yield f"data: {json.dumps({'usage': {'total_tokens': words}})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({"reply": "Hello from the demo", "usage": {"total_tokens": words}})


async def _delete(request: Request) -> Response:
    return Response(status_code=204)


demo_api = Starlette(
    routes=[
        Route("/v1/chat", _chat, methods=["POST"]),
        Route("/v1/projects/{id}", _delete, methods=["DELETE"]),
        Route("/v1/{path:path}", _echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
)


def run_demo(settings: Settings) -> int:
    from gateway.server import bind, serve
    from gateway.serving import serving

    if settings.workers > 1:
        raise ConfigError("gateway demo runs in one process: --workers is for gateway serve")
    listening = bind(settings.host, settings.port)  # before any other start-up work
    api = bind("127.0.0.1", 0)
    settings.upstream = f"http://127.0.0.1:{api.getsockname()[1]}"
    return serve(settings, listening=listening, alongside=lambda: serving(demo_api, api), started=_welcome)


async def _welcome(app: GatewayApp) -> None:
    """Once the gateway serves: a key for the demo billable, its welcome credits, and what to try."""
    settings = app.settings
    keys = app.gateway.keys
    assert keys is not None
    created = await keys.create(DEMO_BILLABLE, "demo")
    assert app.gateway.grants is not None
    # Enough purchased credits for the metered chat route, granted once (money first, idempotent).
    await app.gateway.grants.grant(DEMO_BILLABLE, 5000, reason="demo welcome credits", idempotency_key="demo-welcome")
    base = f"http://{settings.host}:{settings.port}"
    auth = f'-H "Authorization: Bearer {created.key}"'
    print(
        f"""
The gateway is running at {base} in front of a demo API, on the embedded defaults
(in-process Redis emulation, {settings.database_url}), with the plans of {settings.plans}.

API key for billable "{DEMO_BILLABLE}" (plan "{app.gateway.catalog.settings.default_plan}"): {created.key}

  # an allowed call
  curl -s {base}/v1/hello {auth}
  # its headers: RateLimit-Policy, RateLimit, X-RateLimit-*, X-Credits-Remaining
  curl -s -D - -o /dev/null {base}/v1/hello {auth}
  # a denial: the free plan lacks Flux HD (403 problem+json naming the plan to upgrade to)
  curl -s -X POST {base}/v1/images {auth}

  # more: a metered LLM-style call (reserve held, settled to the tokens in the answer; add ?stream=1),
  # a project (the free plan's cap is 1: the second is 403), and what the key has left
  curl -s -X POST {base}/v1/chat {auth} -d 'hello there'
  curl -s -X POST {base}/v1/projects {auth}
  curl -s {base}/_gateway/usage {auth}

Press Ctrl+C to stop.
""",
        flush=True,
    )
