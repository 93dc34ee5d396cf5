"""A real nginx in front of an API, asking the gateway with `auth_request` (the README's configuration, read
from the README): admitted calls reach the API with the billable, denials reach the client as the gateway
meant them. The gateway is `gateway serve`'s app under uvicorn on a private redis-server and this run's
Postgres database; nginx is Debian's package, run by the test on a free port (tests/nginx_support.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from gateway_support import ADMIN_HEADERS, Served, serving
from http_servers import serve_in_thread
from nginx_support import nginx
from services import RedisServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

CATALOG = """
[catalog]
default_plan = "free"
mode = "forward-auth"

[features]
api_access = "API access"
hd = "HD images"

[operations.image]
cost = 10

[plans.free]
price = 0
allows = ["api_access"]
credits = 5
limits.projects = { to = 100 }

[[routes]]
match = "POST /v1/images"
features = ["api_access", "hd"]
spend = "image"

[[routes]]
match = "POST /v1/generate"
features = ["api_access"]
spend = "image"

[[routes]]
match = "GET /v1/once"
rate_limit = "1/hour"

[[routes]]
match = "POST /v1/projects"
limit = "projects"
"""

PROBLEM = "application/problem+json"


@dataclass
class Api:
    """The API behind nginx: what reached it, with the identity headers it was given."""

    saw: list[dict[str, str | None]] = field(default_factory=list)

    def app(self) -> Starlette:
        async def answer(request: Request) -> Response:
            h = request.headers
            self.saw.append({"method": request.method, "target": request.scope["raw_path"].decode(), "billable": h.get("x-billable-id"),
                             "plan": h.get("x-plan"), "authorization": h.get("authorization"), "x-api-key": h.get("x-api-key")})  # fmt: skip
            return JSONResponse({"from": "api"})

        return Starlette(routes=[Route("/{rest:path}", answer, methods=["GET", "POST"])])


@dataclass
class Edge:
    url: str
    gateway: Served
    api: Api

    def key(self) -> tuple[str, str]:
        """A new billable on the default plan and its key."""
        billable = f"org_{uuid.uuid4().hex[:10]}"
        r = httpx.post(f"{self.gateway.url}/_gateway/admin/keys", json={"billable": billable}, headers=ADMIN_HEADERS, timeout=30)
        assert r.status_code == 201, r.text
        return billable, r.json()["key"]


@pytest.fixture
def edge(tmp_path: Path, private_redis: RedisServer, pg_url: str) -> Iterator[Edge]:
    api = Api()
    with (
        serving(tmp_path, CATALOG, redis_port=private_redis.port, db_url=pg_url) as gateway,
        serve_in_thread(api.app()) as api_url,
        nginx(tmp_path, gateway.url.removeprefix("http://"), api_url.removeprefix("http://")) as url,
    ):
        yield Edge(url, gateway, api)


def test_nginx_relays_the_gateways_answers_with_its_headers(edge: Edge) -> None:
    """Through nginx: an admitted call reaches the API with the billable; 403, 402, 429, 401 and 400 reach the client."""
    billable, key = edge.key()
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        admitted = client.get("/v1/items?page=2", headers={**auth, "X-Billable-Id": "someone_else"})
        feature = client.post("/v1/images", headers={**auth, "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/v1/items"})
        credits = client.post("/v1/generate", headers=auth)
        once = client.get("/v1/once", headers=auth)
        rate = client.get("/v1/once", headers=auth)
        anonymous = client.get("/v1/items")
    assert admitted.status_code == 200 and admitted.json() == {"from": "api"}
    assert admitted.headers["x-credits-remaining"] == "5"
    assert "x-gateway-problem" not in admitted.headers and "retry-after" not in admitted.headers
    assert once.status_code == 200 and once.headers["ratelimit-policy"] == '"rate:GET /v1/once";q=1;w=3600'
    assert once.headers["ratelimit"].startswith('"rate:GET /v1/once";r=0;t=') and once.headers["x-ratelimit-remaining"] == "0"
    assert edge.api.saw[0] == {"method": "GET", "target": "/v1/items", "billable": billable, "plan": "free", "authorization": None,
                               "x-api-key": None}  # fmt: skip

    # The client's own X-Forwarded-* are cleared by nginx: POST /v1/images is decided, not GET /v1/items.
    assert (feature.status_code, feature.headers["content-type"]) == (403, PROBLEM)
    assert feature.json()["type"] == "urn:gateway:feature-not-in-plan" and feature.json()["plan"] == "free"
    assert (credits.status_code, credits.headers["content-type"]) == (402, PROBLEM)
    assert credits.json()["detail"] == "You're out of credits: this request needs 10 and you have 5."
    assert credits.headers["x-credits-remaining"] == "5"
    assert (rate.status_code, rate.headers["content-type"]) == (429, PROBLEM)
    assert rate.json()["violated_policies"] == ["rate:GET /v1/once"] and int(rate.headers["retry-after"]) > 3000
    assert rate.headers["x-ratelimit-resource"] == "rate:GET /v1/once"
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert anonymous.json()["type"] == "urn:gateway:unauthorized"
    assert [s["target"] for s in edge.api.saw] == ["/v1/items", "/v1/once"]


def test_nginx_refuses_a_path_the_gateway_cannot_make_canonical(edge: Edge) -> None:
    """nginx would forward `..%2F` raw; the gateway's 400 reaches the client and the API sees nothing."""
    _, key = edge.key()
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        r = client.send(client.build_request("POST", httpx.URL(edge.url + "/v1/x/..%2Fimages"), headers={"X-Api-Key": key}))
    assert (r.status_code, r.headers["content-type"]) == (400, PROBLEM)
    assert 'an encoded "/"' in r.json()["detail"]
    assert edge.api.saw == []


def test_nginx_200_concurrent_requests_against_a_cap_of_100_admit_exactly_100(edge: Edge) -> None:
    """200 concurrent POST /v1/projects through nginx on a cap of 100: exactly 100 reach the API, 100 are 403."""
    billable, key = edge.key()

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=edge.url, timeout=120, limits=limits) as client:
            answers = await asyncio.gather(*(client.post("/v1/projects", headers={"X-Api-Key": key}) for _ in range(200)))
        return [r.status_code for r in answers]

    started = time.perf_counter()
    statuses = asyncio.run(burst())
    elapsed = time.perf_counter() - started
    print(f"nginx auth_request: 200 concurrent, {statuses.count(200)} admitted, {statuses.count(403)} refused, {elapsed:.2f}s")
    assert (statuses.count(200), statuses.count(403)) == (100, 100)
    assert len([s for s in edge.api.saw if s["target"] == "/v1/projects"]) == 100
    status = httpx.get(f"{edge.gateway.url}/_gateway/admin/billables/{billable}", headers=ADMIN_HEADERS, timeout=30).json()
    assert status["limits"]["projects"]["usage"] == 100
