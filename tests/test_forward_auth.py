"""Forward-auth (`/_gateway/auth`): the request an edge proxy names is decided as if it passed through, and
nothing is forwarded. GatewayMiddleware with a trusted header, deciding on the shared Redis under the test's
prefix; the edge's three ways of naming the request are sent as the edges send them. The real nginx in
front is tests/test_nginx.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile_support import raw_request
from http_servers import serve_in_thread
from services import RedisSpace
from test_middleware import status_of

from gateway.catalog import parse_catalog
from gateway.cli import main
from gateway.engine import Engine
from gateway.middleware import GatewayMiddleware

CATALOG = """
[catalog]
default_plan = "free"
mode = "forward-auth"

[features]
api_access = "API access"
hd = "HD images"

[operations.image]
cost = 50

[operations.chat]
per_unit = 1
units = "response.json:usage.total_tokens"
reserve = 20

[operations.priced]
per_unit = 1
units = "request.json:n"

[plans.free]
price = 0
allows = ["api_access"]
credits = 30
rate_limit = "1000/minute"
limits.projects = { to = 2 }

[[routes]]
match = "POST /v1/images"
features = ["api_access", "hd"]
spend = "image"

[[routes]]
match = "POST /v1/generate"
features = ["api_access"]
spend = "image"

[[routes]]
match = "POST /v1/chat"
spend = "chat"

[[routes]]
match = "POST /v1/priced"
spend = "priced"

[[routes]]
match = "POST /v1/projects"
limit = "projects"

[[routes]]
match = "GET /v1/once"
rate_limit = "1/hour"

[[routes]]
match = "GET /v1/public"
public = true
"""

ORG = {"x-org": "acme"}
BAD_REQUEST = "urn:gateway:bad-request"


class Recorder:
    """An ASGI app that answers 200 and remembers every path that reached it (the app, or the endpoints)."""

    def __init__(self) -> None:
        self.saw: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.saw.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"from the app"})


@dataclass
class Reply:
    status_code: int
    headers: httpx.Headers
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


class Edge:
    """The middleware under uvicorn; requests go out as the edges send them (Envoy's target byte for byte)."""

    def __init__(self, engine: Engine, url: str, app: Recorder, endpoints: Recorder) -> None:
        self.engine, self.url, self.app, self.endpoints = engine, url, app, endpoints

    def get(self, path: str, headers: Any = ()) -> Reply:
        r = httpx.get(self.url + path, headers=headers, timeout=30)
        return Reply(r.status_code, r.headers, r.content)

    def nginx(self, method: str, uri: str) -> Reply:
        return self.get("/_gateway/auth", {"X-Original-Method": method, "X-Original-URI": uri, **ORG})

    def traefik(self, method: str, uri: str) -> Reply:
        return self.get("/_gateway/auth", {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, **ORG})

    def envoy(self, method: str, uri: str) -> Reply:
        r = raw_request(self.url, method, b"/_gateway/auth" + uri.encode(), list(ORG.items()))
        return Reply(r.status, httpx.Headers(r.headers), r.body)


@pytest.fixture
def edge(redis_space: RedisSpace) -> Iterator[Edge]:
    engine = redis_space.engine(parse_catalog(CATALOG))
    app, endpoints = Recorder(), Recorder()
    with serve_in_thread(GatewayMiddleware(app, engine=engine, billable_header="x-org", endpoints=endpoints)) as url:
        yield Edge(engine, url, app, endpoints)


@pytest.mark.parametrize("convention", ["nginx", "traefik", "envoy"])
def test_each_convention_decides_the_request_it_names_and_forwards_nothing(edge: Edge, convention: str) -> None:
    """Each edge's way of naming a request is decided as that request: 200 with the identity and quota headers."""
    r = getattr(edge, convention)("POST", "/v1/generate?size=large")
    assert r.status_code == 402  # the route's cost (50) is more than the plan's 30 credits: it was decided
    r = getattr(edge, convention)("GET", "/v1/items?page=2")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["x-billable-id"] == "acme" and r.headers["x-plan"] == "free"
    assert r.headers["ratelimit-policy"] == '"rate";q=1000;w=60'
    assert r.headers["x-ratelimit-remaining"] == "999"  # the denied one took nothing
    assert edge.app.saw == [] and edge.endpoints.saw == []


def test_denials_carry_status_problem_and_headers(edge: Edge) -> None:
    """403, 402, 429 and 401 come back with the problem body and headers; behind nginx the problem is a header too."""
    feature = edge.traefik("POST", "/v1/images")
    credits = edge.nginx("POST", "/v1/generate")
    assert edge.envoy("GET", "/v1/once").status_code == 200
    rate = edge.envoy("GET", "/v1/once")
    anonymous = edge.get("/_gateway/auth", {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/v1/items"})
    assert (feature.status_code, feature.json()["type"]) == (403, "urn:gateway:feature-not-in-plan")
    assert feature.json()["violated_policies"] == ["hd", "credits"] and "x-gateway-problem" not in feature.headers
    assert (credits.status_code, credits.json()["type"]) == (402, "urn:gateway:insufficient-credits")
    assert credits.headers["x-gateway-problem"].encode() == credits.content
    assert credits.headers["x-credits-remaining"] == "30"
    assert (rate.status_code, rate.json()["violated_policies"]) == (429, ["rate:GET /v1/once"])
    assert int(rate.headers["retry-after"]) > 3000
    assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"
    assert edge.app.saw == [] and edge.endpoints.saw == []


def test_forwarded_path_is_made_canonical_or_refused(edge: Edge) -> None:
    """The named path is decided as its canonical form; one that cannot be made canonical is 400, charged nothing."""
    dotted = edge.nginx("POST", "/v1/x/../%69mages")
    encoded_slash = edge.traefik("POST", "/v1%2fgenerate")
    above_root = edge.envoy("GET", "/../usage")
    escaped_dots = edge.envoy("GET", "/%2e%2e/_gateway/usage")
    after = edge.traefik("GET", "/v1/items")
    assert dotted.status_code == 403 and dotted.json()["violated_policies"] == ["hd", "credits"]
    for refused in (encoded_slash, above_root, escaped_dots):
        assert (refused.status_code, refused.json()["type"]) == (400, BAD_REQUEST)
    assert '".." above the root' in above_root.json()["detail"]
    assert after.headers["x-ratelimit-remaining"] == "999"  # the refused and the denied ones took nothing
    assert edge.app.saw == [] and edge.endpoints.saw == []


@pytest.mark.parametrize(
    ("headers", "said"),
    [
        ({"X-Original-Method": "GET", "X-Original-URI": "/v1/items", "X-Forwarded-Method": "POST",
          "X-Forwarded-Uri": "/v1/images"}, "name different requests"),
        ({"X-Original-URI": "/v1/items"}, "X-Original-URI came without X-Original-Method"),
        ({"X-Forwarded-Method": "GET"}, "X-Forwarded-Method came without X-Forwarded-Uri"),
        ({}, "Name the request to decide"),
        ({"X-Forwarded-Method": "get", "X-Forwarded-Uri": "/v1/items"}, "upper-case HTTP method"),
    ],
)  # fmt: skip
def test_unreadable_or_ambiguous_question_is_400(edge: Edge, headers: dict[str, str], said: str) -> None:
    """Two ways of naming that disagree, half a pair, none, or a bad method: 400 naming it, nothing decided."""
    r = edge.get("/_gateway/auth", {**ORG, **headers})
    assert (r.status_code, r.json()["type"]) == (400, BAD_REQUEST)
    assert said in r.json()["detail"]


def test_a_header_sent_twice_is_400(edge: Edge) -> None:
    """A client's own X-Original-URI beside the edge's: which is the edge's cannot be told, so 400."""
    r = edge.get("/_gateway/auth", [("X-Original-Method", "GET"), ("X-Original-URI", "/v1/items"),
                                                   ("X-Original-URI", "/v1/public"), ("x-org", "acme")])  # fmt: skip
    assert r.status_code == 400 and "X-Original-URI was sent 2 times" in r.json()["detail"]


def test_limit_holds_are_kept_as_a_2xx_keeps_them(edge: Edge) -> None:
    """Each admitted POST /v1/projects keeps its unit: a cap of 2 admits two, then 403."""
    answers = [edge.nginx("POST", "/v1/projects").status_code for _ in range(3)]
    assert answers == [200, 200, 403]
    assert status_of(edge.engine, "acme")["limits"]["projects"]["usage"] == 2


def test_metered_route_is_charged_its_reserve(edge: Edge) -> None:
    """A response-metered route is settled at its reserve right away: the credits go, no hold stays open."""
    first = edge.traefik("POST", "/v1/chat")
    second = edge.traefik("POST", "/v1/chat")
    assert first.status_code == 200 and first.headers["x-credits-remaining"] == "10"
    assert second.status_code == 402
    credits = status_of(edge.engine, "acme")["credits"]
    assert (credits["balance"], credits["held"]) == (10, 0)


def test_public_route_and_preflight_need_no_identity(edge: Edge) -> None:
    """A public route or an OPTIONS preflight is admitted without a billable, as when it passes through."""
    public = edge.get("/_gateway/auth", {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/v1/public"})
    preflight = edge.get("/_gateway/auth", {"X-Forwarded-Method": "OPTIONS", "X-Forwarded-Uri": "/v1/images"})
    assert public.status_code == 200 and "x-billable-id" not in public.headers
    assert preflight.status_code == 200


def test_other_gateway_paths_still_reach_the_endpoints(edge: Edge) -> None:
    """Only /_gateway/auth is forward-auth's: /_gateway/authx and /_gateway/usage stay the endpoints'."""
    edge.get("/_gateway/authx", headers=ORG)
    edge.get("/_gateway/usage", headers=ORG)
    assert edge.endpoints.saw == ["/_gateway/authx", "/_gateway/usage"]


def test_gateway_check_warns_in_forward_auth_mode_about_what_it_cannot_price(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway check` with mode = "forward-auth" warns about a route metered from the answer and one priced
    from the request body; without the mode it does not; a mode it does not know is an error naming it."""
    plans = tmp_path / "plans.toml"
    plans.write_text(CATALOG)
    assert main(["check", str(plans)]) == 0
    warned = capsys.readouterr().err
    assert "warning: routes[2]: POST /v1/chat is metered from the answer (response.json:usage.total_tokens)" in warned
    assert "each request is charged its reserve of 20 credits" in warned
    assert "warning: routes[3]: POST /v1/priced is priced from the request body (request.json:n)" in warned
    plans.write_text(CATALOG.replace('mode = "forward-auth"', ""))
    assert main(["check", str(plans)]) == 0
    assert "forward-auth" not in capsys.readouterr().err
    plans.write_text(CATALOG.replace('mode = "forward-auth"', 'mode = "forwardauth"'))
    assert main(["check", str(plans)]) == 1
    assert "catalog.mode: 'forwardauth' is not one of 'proxy' or 'forward-auth'" in capsys.readouterr().err
