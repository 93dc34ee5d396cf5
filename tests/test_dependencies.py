"""FastAPI dependencies: one endpoint guarded by a feature, another spending an operation."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from engine_support import BASE
from fastapi import Depends, FastAPI
from starlette.testclient import TestClient

from gateway.catalog import parse_catalog
from gateway.decision import Decision
from gateway.dependencies import Guard
from gateway.engine import Engine
from gateway.middleware import GatewayMiddleware
from gateway.store.redis import open_redis

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds


def make_app(with_middleware: bool) -> tuple[FastAPI, Engine]:
    engine = Engine(open_redis(None), parse_catalog(BASE), prefix=f"gwt{uuid.uuid4().hex[:8]}")
    gate = Guard(engine, billable=lambda request: request.headers.get("x-org"))
    app = FastAPI(exception_handlers=gate.exception_handlers)

    @app.post("/hd", dependencies=[Depends(gate.require_feature("hd"))])
    async def hd() -> dict[str, bool]:
        return {"ok": True}

    spend_image = gate.spend("image")

    @app.post("/image")
    async def image(decision: Decision = Depends(spend_image)) -> dict[str, int | None]:
        return {"credits": decision.credits}

    own_status = gate.status()

    @app.get("/me")
    async def me(status: dict[str, Any] = Depends(own_status)) -> dict[str, Any]:
        return status

    if with_middleware:
        app.add_middleware(GatewayMiddleware, engine=engine, billable=lambda scope: dict(scope["headers"]).get(b"x-org", b"").decode() or None)  # type: ignore[arg-type]
    return app, engine


def test_feature_dependency_denies_with_problem_json() -> None:
    """require_feature answers 403 problem+json naming the upgrade when the plan lacks the feature."""
    app, _ = make_app(with_middleware=False)
    with TestClient(app) as client:
        denied = client.post("/hd", headers={"x-org": "a"})
        assert denied.status_code == 403 and denied.headers["content-type"] == "application/problem+json"
        assert denied.json()["violated_policies"] == ["hd"]
        assert "Please upgrade to Pro" in denied.json()["detail"]
        assert client.post("/hd").status_code == 401


def test_spend_dependency_spends_and_402s() -> None:
    """spend() takes the operation's credits once per call and answers 402 when they run out."""
    app, _ = make_app(with_middleware=False)
    with TestClient(app) as client:
        assert client.post("/image", headers={"x-org": "b"}).json() == {"credits": 5}
        assert client.post("/image", headers={"x-org": "b"}).json() == {"credits": 0}
        third = client.post("/image", headers={"x-org": "b"})
        assert third.status_code == 402 and third.json()["type"] == "urn:gateway:insufficient-credits"


def test_behind_the_middleware_the_feature_check_reuses_its_decision() -> None:
    """Behind the middleware, require_feature reads the middleware's decision (plan) instead of deciding again."""
    app, engine = make_app(with_middleware=True)
    with TestClient(app) as client:
        assert client.post("/hd", headers={"x-org": "c"}).status_code == 403
    assert "c" in engine.take_touched()


def test_guard_answers_carry_the_headers_and_record_the_endpoints_route() -> None:
    """An admitted answer has the middleware's headers (RateLimit, X-Credits-Remaining); a denial too; the
    usage history counts the endpoint's own route, not a catch-all."""
    app, engine = make_app(with_middleware=False)
    with TestClient(app) as client:
        admitted = client.post("/image", headers={"x-org": "d"})
        assert admitted.status_code == 200 and admitted.headers["x-credits-remaining"] == "5"
        assert "ratelimit-policy" in admitted.headers and "ratelimit" in admitted.headers
        assert admitted.headers["x-ratelimit-resource"]
        client.post("/image", headers={"x-org": "d"})
        denied = client.post("/image", headers={"x-org": "d"})
        assert denied.status_code == 402 and denied.headers["x-credits-remaining"] == "0"
    snapshot = asyncio.run(engine.snapshot("d"))
    counted = {field.split("|", 1)[1]: value for field, value in snapshot.state.items() if field.startswith("qr:")}
    assert counted == {"POST /image|image": "2"}


def test_status_dependency_answers_the_callers_status_with_its_severities() -> None:
    """gate.status() gives the endpoint the caller's status, severities and overall included, after its spending."""
    app, _ = make_app(with_middleware=False)
    with TestClient(app) as client:
        client.post("/image", headers={"x-org": "c"})
        client.post("/image", headers={"x-org": "c"})
        status = client.get("/me", headers={"x-org": "c"}).json()
        assert status["billable"] == "c" and status["credits"]["balance"] == 0
        assert status["credits"]["severity"] == "blocked" and status["overall"]["keys"] == ["credits"]
        assert client.get("/me").status_code == 401
