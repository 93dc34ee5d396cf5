"""What a refused client reads: the 401 names how this gateway identifies a billable, every problem+json
carries the `error` member SDKs for LLM APIs show, no policy name is empty, and /_gateway answers its own
unknown paths and methods as problem+json. Real Redis, real HTTP through uvicorn where a server is named."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from engine_support import BASE
from fastapi import Depends, FastAPI
from http_servers import closed_port, serve_in_thread
from services import shared_redis_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app import GatewayApp
from gateway.catalog import parse_catalog
from gateway.decision import Decision, Violation
from gateway.dependencies import Guard
from gateway.engine import Engine
from gateway.identity import KeyStore
from gateway.middleware import GatewayMiddleware
from gateway.proxy import Proxy
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.redis import open_redis


def error_of(body: dict[str, Any]) -> dict[str, Any]:
    """The `error` member, checked against the body it repeats (DESIGN §3)."""
    error = body["error"]
    assert error == {"message": body["detail"], "type": body["type"].replace("#", ":").rsplit(":", 1)[-1],
                     "code": body["status"]}
    return dict(error)


async def echo(request: Request) -> Response:
    return JSONResponse({"billable": request.headers.get("x-billable-id")})


def app_with(middleware: dict[str, Any]) -> Starlette:
    engine = Engine(open_redis(shared_redis_url()), parse_catalog(BASE), prefix=f"gwt{uuid.uuid4().hex[:10]}")
    app = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])
    app.add_middleware(GatewayMiddleware, engine=engine, **middleware)  # type: ignore[arg-type]
    return app


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[KeyStore]:
    async def connect() -> Database:
        return await Database.connect(f"sqlite:///{tmp_path}/keys.db", auto_upgrade=True)

    db = asyncio.run(connect())
    yield KeyStore(db)
    asyncio.run(db.close())


def test_401_with_api_keys_asks_for_a_bearer_key(keys: KeyStore) -> None:
    """Key mode: WWW-Authenticate: Bearer, the key sentence, no plan and no violated_policies, the error member."""
    with serve_in_thread(app_with({"keys": keys})) as url:
        for headers in ({}, {"Authorization": "Bearer gw_not_a_key"}):
            r = httpx.get(f"{url}/v1/x", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            body = r.json()
            assert body["detail"] == "A valid API key is required: send Authorization: Bearer <key> or X-Api-Key: <key>."
            assert "plan" not in body and "violated_policies" not in body
            assert error_of(body) == {"message": body["detail"], "type": "unauthorized", "code": 401}


def test_401_in_trusted_header_mode_names_the_header() -> None:
    """Trusted-header mode: the sentence names the header to send; no Bearer challenge (keys are not asked for)."""
    with serve_in_thread(app_with({"billable_header": "X-Org"})) as url:
        r = httpx.get(f"{url}/v1/x")
        assert r.status_code == 401 and "www-authenticate" not in r.headers
        assert r.json()["detail"] == "This gateway reads the billable from the X-Org header: send X-Org: <billable id>."
        error_of(r.json())
        assert httpx.get(f"{url}/v1/x", headers={"X-Org": "org_1"}).json() == {"billable": "org_1"}


def test_401_when_the_app_names_no_billable() -> None:
    """The middleware with a callable, and Guard: "The app named no billable", no challenge."""
    with serve_in_thread(app_with({"billable": lambda scope: None})) as url:
        r = httpx.get(f"{url}/v1/x")
        assert r.status_code == 401 and "www-authenticate" not in r.headers
        assert r.json()["detail"].startswith("The app named no billable for this request")
        error_of(r.json())

    engine = Engine(open_redis(shared_redis_url()), parse_catalog(BASE), prefix=f"gwt{uuid.uuid4().hex[:10]}")
    gate = Guard(engine, billable=lambda request: None)
    api = FastAPI(exception_handlers=gate.exception_handlers)

    @api.post("/images", dependencies=[Depends(gate.spend("image"))])
    async def images() -> dict[str, bool]:
        return {"ok": True}

    with serve_in_thread(api) as url:
        r = httpx.post(f"{url}/images")
        assert r.status_code == 401 and r.json()["detail"].startswith("The app named no billable")
        error_of(r.json())


def test_every_decided_denial_has_the_error_member_and_no_empty_policy() -> None:
    """403, 402, 429, 503 and 404 bodies: the error member; a 503 or 404 names no policy, not [""]."""
    catalog = parse_catalog(BASE)
    cases = [
        Decision(False, "a", "free", violations=[Violation("hd", "feature")]),
        Decision(False, "a", "free", violations=[Violation("credits", "credits", cost=5, balance=2)]),
        Decision(False, "a", "free", violations=[Violation("rate", "rate", retry_after=3)]),
        Decision(False, "a", None, violations=[Violation("", "unavailable")]),
        Decision(False, "a", None, violations=[Violation("", "no_route")]),
    ]
    for decision in cases:
        body = decision.problem(catalog)
        assert body["status"] == decision.status
        assert "" not in body["violated_policies"]
        error_of(body)
    assert [d.problem(catalog)["error"]["type"] for d in cases] == [
        "feature-not-in-plan", "insufficient-credits", "quota-exceeded", "unavailable", "no-route",
    ]
    assert cases[3].problem(catalog)["violated_policies"] == []


def test_the_gateways_own_answers_are_problem_json_with_the_error_member(tmp_path: Path) -> None:
    """Admin 401 (with its Bearer challenge), an unknown /_gateway path (404), a wrong method (405), and the
    proxy's own 502: every one problem+json with the error member."""
    plans = tmp_path / "plans.toml"
    plans.write_text(BASE)
    settings = Settings(plans=str(plans), database_url=f"sqlite:///{tmp_path}/gw.db", admin_token="t0ken-for-the-tests",
                        upstream=f"http://127.0.0.1:{closed_port()}")
    with serve_in_thread(GatewayApp(settings), lifespan="on") as url:
        admin = httpx.get(f"{url}/_gateway/admin/billables/a")
        assert admin.status_code == 401 and admin.headers["www-authenticate"] == "Bearer"
        missing = httpx.get(f"{url}/_gateway/nope")
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["detail"] == "No gateway endpoint at /_gateway/nope: the README lists them."
        method = httpx.post(f"{url}/_gateway/health")
        assert method.status_code == 405 and method.headers["allow"] == "GET, HEAD"
        assert method.json()["detail"] == "/_gateway/health takes GET, HEAD, not POST."
        for r in (admin, missing, method):
            assert r.headers["content-type"] == "application/problem+json"
            error_of(r.json())

    async def through_proxy() -> tuple[int, dict[str, Any]]:
        proxy = Proxy(f"http://127.0.0.1:{closed_port()}")
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/x", "raw_path": b"/x", "query_string": b"",
                 "headers": [], "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
        await proxy(scope, receive, send)
        await proxy.aclose()
        return sent[0]["status"], json.loads(sent[1]["body"])

    status, body = asyncio.run(through_proxy())
    assert status == 502 and error_of(body)["type"] == "bad-gateway"
