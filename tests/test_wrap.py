"""`GatewayApp.wrap(app, ...)`: the whole gateway around an ASGI app, from keyword settings; the app's own
lifespan runs inside the gateway's. A private redis-server (the gateway's keys use the default prefix)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_servers import serve_in_thread
from services import RedisServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import GatewayApp

CATALOG = '[plans.free]\nallows = ["api_access"]\nlimits.projects = { to = 1 }\n' \
          '[[routes]]\nmatch = "POST /v1/projects"\nfeatures = ["api_access"]\nlimit = "projects"\n'


def api(events: list[str]) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    async def create(request: Request) -> Response:
        return JSONResponse({"org": request.headers["x-billable-id"]}, status_code=201)

    return Starlette(routes=[Route("/v1/projects", create, methods=["POST"])], lifespan=lifespan)


def test_wrap_runs_the_whole_gateway_and_the_apps_lifespan(tmp_path: Path) -> None:
    """Keyword settings; API keys from the record; the wrapped app's startup and shutdown both run; the admin
    API answers under /_gateway."""
    (tmp_path / "plans.toml").write_text(CATALOG)
    events: list[str] = []
    with RedisServer() as redis_server:
        app = GatewayApp.wrap(api(events), plans=str(tmp_path / "plans.toml"), redis_url=redis_server.url,
                              database_url=f"sqlite:///{tmp_path}/gw.db", admin_token="t0ken-for-the-tests")
        with serve_in_thread(app, lifespan="on") as url:
            assert events == ["startup"]
            admin = {"Authorization": "Bearer t0ken-for-the-tests"}
            created = httpx.post(f"{url}/_gateway/admin/keys", headers=admin, json={"billable": "org_1"})
            auth = {"Authorization": f"Bearer {created.json()['key']}"}
            assert httpx.post(f"{url}/v1/projects", headers=auth).json() == {"org": "org_1"}
            assert httpx.post(f"{url}/v1/projects", headers=auth).status_code == 403
            status = httpx.get(f"{url}/_gateway/admin/billables/org_1", headers=admin)
            assert status.json()["limits"]["projects"]["usage"] == 1
        assert events == ["startup", "shutdown"]


def test_wrap_with_the_apps_own_billable(tmp_path: Path) -> None:
    """`billable=` names the billable from the scope instead of keys; a 401 says the app named none."""
    (tmp_path / "plans.toml").write_text(CATALOG)
    with RedisServer() as redis_server:
        app = GatewayApp.wrap(api([]), billable=lambda scope: dict(scope["headers"]).get(b"x-user", b"").decode() or None,
                              plans=str(tmp_path / "plans.toml"), redis_url=redis_server.url,
                              database_url=f"sqlite:///{tmp_path}/gw.db")
        with serve_in_thread(app, lifespan="on") as url:
            assert httpx.post(f"{url}/v1/projects", headers={"X-User": "org_9"}).json() == {"org": "org_9"}
            refused = httpx.post(f"{url}/v1/projects")
            assert refused.status_code == 401 and refused.json()["detail"].startswith("The app named no billable")


def test_wrap_refuses_an_unknown_setting() -> None:
    """A misspelt keyword is an error naming the settings, not silently ignored."""
    with pytest.raises(TypeError, match=r"unknown setting\(s\) redis_ulr: the settings are .*redis_url"):
        GatewayApp.wrap(api([]), redis_ulr="redis://127.0.0.1:6379/0")
