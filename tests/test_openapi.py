"""`/_gateway/openapi.json`: a valid OpenAPI 3.1 document of every `/_gateway` route, made from the code's own
routes and typed bodies, that the running gateway's answers match. `gateway serve`'s app under uvicorn, on a
private redis-server and SQLite."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import ADMIN_HEADERS, Served, serving
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from services import RedisServer
from starlette.routing import Route

CATALOG = """
[catalog]
default_plan = "free"

[features]
hd = "HD images"

[plans.free]
price = 0
limits.projects = { to = 1 }

[plans.pro]
price = 29
allows = ["hd"]

[[routes]]
match = "POST /v1/images"
features = ["hd"]

[[routes]]
match = "POST /v1/projects"
limit = "projects"
"""


# Forward-auth answers any method: schemathesis's probe of a method the document cannot declare is not for it.
# A catalog is a plans.toml, and overrides and a member's terms are checked by the catalog's own rules (its
# periods and rates, a limit merged with the plan's, an expiry to come): the document says their shape, and a
# body of that shape may still break one of those rules (400, naming it).
SCHEMATHESIS_CONFIG = """
[[operations]]
include-path-regex = "^/_gateway/auth"
phases.coverage.unexpected-methods = []

[[operations]]
include-path = ["/_gateway/admin/catalog", "/_gateway/admin/billables/{billable}/overrides",
                "/_gateway/admin/billables/{billable}/terms", "/_gateway/admin/keys/{key_id}/terms"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409"]
"""


@pytest.fixture
def served(tmp_path: Path, private_redis: RedisServer) -> Iterator[Served]:
    with serving(tmp_path, CATALOG, redis_port=private_redis.port, db_url=f"sqlite:///{tmp_path}/gw.db") as gateway:
        yield gateway


def spec_of(served: Served) -> dict[str, Any]:
    r = httpx.get(f"{served.url}/_gateway/openapi.json", headers=ADMIN_HEADERS, timeout=30)
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


def conforms(spec: dict[str, Any], schema: str, body: Any) -> None:
    """`body` is valid against the document's component `schema` (its $refs resolved in the document)."""
    validator = Draft202012Validator({"$ref": f"#/components/schemas/{schema}", "components": spec["components"]})
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, f"{schema}: {errors}"


def test_the_document_is_valid_openapi_3_1_and_needs_the_admin_token(served: Served) -> None:
    """openapi-spec-validator accepts the served document; without the admin token it is a 401."""
    spec = spec_of(served)
    validate(spec)
    assert spec["openapi"] == "3.1.0"
    anonymous = httpx.get(f"{served.url}/_gateway/openapi.json", timeout=30)
    assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"


def test_every_route_is_one_operation(served: Served) -> None:
    """The document's operations are the router's routes, each method once, plus forward-auth's."""
    spec = spec_of(served)
    endpoints = served.app.middleware.endpoints if served.app.middleware else None
    routes = {(method.lower(), r.path) for r in endpoints.router.routes if isinstance(r, Route) for method in (r.methods or ()) if method != "HEAD"}  # type: ignore[union-attr]
    operations = {(verb, path) for path, item in spec["paths"].items() for verb in item}
    auth = {op for op in operations if op[1].startswith("/_gateway/auth")}
    print(f"OpenAPI: {len(operations)} operations; {len(routes)} router routes (method, path) + {len(auth)} forward-auth")
    assert operations - auth == routes
    assert {path for _, path in auth} == {"/_gateway/auth", "/_gateway/auth/{path}"}
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    assert spec["paths"]["/_gateway/admin/keys"]["post"]["security"] == [{"adminToken": []}]


def test_answers_match_their_schemas(served: Served) -> None:
    """A check, a consuming check's settle, a denial and a refusal as served match the document's schemas."""
    spec = spec_of(served)
    check = spec["paths"]["/_gateway/check"]["post"]
    assert check["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CheckQuestion"}
    with httpx.Client(base_url=served.url, headers=ADMIN_HEADERS, timeout=30) as client:
        denied = client.post("/_gateway/check", json={"billable": "org_1", "route": "POST /v1/images"}).json()
        held = client.post("/_gateway/check", json={"billable": "org_1", "limit": "projects", "consume": True}).json()
        settled = client.post("/_gateway/settle", json={"hold": held["hold"], "outcome": "failure"}).json()
        refused = client.post("/_gateway/check", json={"billable": "org_1", "colour": "red"})
        forward = client.get("/_gateway/auth", headers={"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/v1/images",
                                                         "Authorization": "Bearer gw_nope"})  # fmt: skip
    assert denied["allowed"] is False and denied["problem"]["status"] == 403
    conforms(spec, "CheckAnswer", denied)
    conforms(spec, "CheckAnswer", held)
    conforms(spec, "SettleAnswer", settled)
    conforms(spec, "Problem", denied["problem"])
    assert refused.status_code == 400
    conforms(spec, "Problem", refused.json())
    assert forward.status_code == 401
    conforms(spec, "Problem", forward.json())
    with pytest.raises(AssertionError):  # the schemas constrain: a wrong answer is caught
        conforms(spec, "SettleAnswer", {**settled, "outcome": "maybe"})


def test_schemathesis_finds_no_server_error_and_no_answer_off_its_schema(served: Served, tmp_path: Path) -> None:
    """schemathesis fuzzes every operation (bad inputs included) on the live gateway: no 5xx, every answer as
    described, every schema-violating request refused, 405 with Allow for a method a route lacks.

    Every check is on, `positive_data_acceptance` (every schema-valid request accepted) included: the document
    says the rules JSON Schema can hold (one of route/feature/limit/operation, the catalog's names, a path the
    canonical-path rules take, whole numbers sent as 10.0). Forward-auth takes the edge's method, any method,
    and OpenAPI 3.1 can declare only eight: the probe of a ninth (QUERY) is left out for its two paths alone;
    the catalog's TOML and the terms' rules against the catalog may refuse a body of the right shape
    (SCHEMATHESIS_CONFIG)."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    st = Path(sys.executable).parent / "st"
    run = subprocess.run(
        [str(st), "--config-file", str(config), "run", f"{served.url}/_gateway/openapi.json", "-H", f"Authorization: {ADMIN_HEADERS['Authorization']}",
         "--checks", "all", "--max-examples", "10", "--seed", "19",
         "--workers", "1", "--request-timeout", "30"],
        check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path,  # its cache stays out of the checkout
    )  # fmt: skip
    summary = [line for line in run.stdout.splitlines() if "generated" in line or "Tested:" in line]
    print("schemathesis:", *summary)
    assert run.returncode == 0, run.stdout[run.stdout.find('___'):][:60000] + run.stderr[-2000:]
    assert re.search(r"Tested: (\d+)", run.stdout) and int(re.search(r"Tested: (\d+)", run.stdout)[1]) >= 40  # type: ignore[index]
