"""`gateway demo`: the gateway on its embedded defaults in front of a small built-in API."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import tempfile
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.catalog import Events
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
    """The demo on a fresh record each run (deleted when it stops), so every run starts the same way."""
    from gateway.server import bind, serve
    from gateway.serving import serving

    if settings.workers > 1:
        raise ConfigError("gateway demo runs in one process: --workers is for gateway serve")
    listening = bind(settings.host, settings.port)  # before any other start-up work
    api = bind("127.0.0.1", 0)
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as folder:
        demo = dataclasses.replace(
            settings, upstream=f"http://127.0.0.1:{api.getsockname()[1]}", redis_url=None, billable_header=None,
            database_url=f"sqlite:///{folder}/gateway.db", admin_token=settings.admin_token or secrets.token_urlsafe(16),
        )  # fmt: skip
        logging.getLogger("gateway.store.db").setLevel(logging.WARNING)  # a fresh record every run is no news
        return serve(demo, listening=listening, alongside=lambda: serving(demo_api, api, quiet=True), started=_say_welcome, make_app=_app)


def _app(settings: Settings) -> GatewayApp:
    from gateway.app import GatewayApp

    app = GatewayApp(settings)
    catalog = app.prepared.catalog
    # The catalog's webhook receiver is an example's; the demo sends its events nowhere.
    app.prepared.catalog = dataclasses.replace(catalog, file=catalog.file.model_copy(update={"events": Events()}))
    return app


async def _say_welcome(app: GatewayApp) -> None:
    print(await _welcome(app, app.settings), flush=True)


async def _welcome(app: GatewayApp, settings: Settings) -> str:
    """A key for the demo billable, and what to try with it."""
    keys = app.gateway.keys
    assert keys is not None
    created = await keys.create(DEMO_BILLABLE, "demo")
    catalog = app.gateway.catalog
    plan = catalog.settings.default_plan
    credits = catalog.plans[plan].credits or 0
    chat = catalog.operations.get("chat")
    hold = chat.hold if chat is not None else 0
    base = f"http://{settings.host}:{settings.port}"
    auth = '-H "Authorization: Bearer $KEY"'
    return f"""
The gateway is running at {base} in front of a demo API, with the plans of {settings.plans}, on the
in-process Redis emulation and a fresh record ({settings.database_url}, deleted when the demo stops).

A key for billable "{DEMO_BILLABLE}", on the default plan {catalog.plan_title(plan)} ({credits} credits a month). In another shell:

  export KEY={created.key}

  # 200, and what is left: RateLimit-Policy, RateLimit, X-RateLimit-* (the burst), X-Credits-Remaining
  curl -i {base}/v1/hello {auth}
  # 403 problem+json: {catalog.plan_title(plan)} lacks Flux HD, and the sentence names the plan that has it
  curl -s -X POST {base}/v1/images {auth}
  # 200, metered: {hold} credits held (X-Credits-Remaining shows them held), then settled to the tokens the answer reports
  curl -i -X POST {base}/v1/chat {auth} -d 'hello there'
  # 200 the first time, then 403: {catalog.plan_title(plan)} allows 1 project
  curl -s -X POST {base}/v1/projects {auth}
  # 200: the plan, limits and credits this key has left
  curl -s {base}/_gateway/usage {auth}

The admin API (its token is GATEWAY_ADMIN_TOKEN, or a new one each run):

  export ADMIN={settings.admin_token}

  # 201: a key for another customer, shown once
  curl -s -X POST {base}/_gateway/admin/keys -H "Authorization: Bearer $ADMIN" -d '{{"billable": "org_2", "name": "ci"}}'

Press Ctrl+C to stop.
"""
