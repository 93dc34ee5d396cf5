"""`POST /_gateway/check` and `/_gateway/settle` (issue 13 item 6) on a real gateway, Redis and record: a dry
check writes nothing and agrees with what the proxy decides; a consuming check holds, and a settle from
another gateway process keeps or gives back as DESIGN §4 says, once; who may check and settle what."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import ADMIN_HEADERS, Served, serving
from http_servers import serve_in_thread
from services import RedisServer, RedisSpace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_engine_cluster import Monitor
from test_kill import ADMIN as OTHER_ADMIN
from test_kill import GatewayProcess
from waiting import until, wait_until

from gateway.app import GatewayApp
from gateway.catalog import parse_catalog
from gateway.check import Checker, HoldNotOpen
from gateway.errors import BadRequest

CATALOG = """
[catalog]
default_plan = "free"
highlighted_plan = "pro"
unmatched = "deny"

[features]
api_access = "API access"
flux_hd_access = "Flux HD"

[operations.generate_image]
cost = 5

[operations.chat]
per_unit = 1
units = "response.json:usage.total_tokens"
reserve = 50
max_units = 200

[plans.free]
price = 0
rate_limit = { limit = 100, per = "1s", burst = 100 }
allows = ["api_access"]
credits = 100
limits.projects = { to = 2 }
limits.exports = { to = 3, per = "month" }

[plans.pro]
price = 29
allows = ["api_access", "flux_hd_access"]
credits = 1000
limits.projects = { to = 25 }
limits.exports = { to = 100, per = "month" }

[[routes]]
match = "POST /v1/images"
features = ["api_access"]
spend = "generate_image"

[[routes]]
match = "POST /v1/chat"
features = ["api_access"]
spend = "chat"

[[routes]]
match = "POST /v1/projects"
features = ["api_access"]
limit = "projects"

[[routes]]
match = "DELETE /v1/projects/{id}"
features = ["api_access"]
release = "projects"

[[routes]]
match = "POST /v1/hd"
features = ["flux_hd_access"]

[[routes]]
match = "GET /v1/status"
public = true
"""

OPS = "ops-secret-for-tests"  # a named admin token (GATEWAY_ADMIN_TOKENS)
RATE_HEADERS = ("ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-resource",
                "x-credits-remaining")  # fmt: skip


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def gw(tmp_path: Path, redis_server: RedisServer) -> Iterator[Served]:
    with redis_server.client() as c:
        c.flushall()
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    with serving(tmp_path, CATALOG, redis_port=redis_server.port, db_url=db_url, admin_tokens={"ops": OPS}) as served:
        yield served


def key_for(gw: Served, billable: str) -> dict[str, str]:
    r = httpx.post(f"{gw.url}/_gateway/admin/keys", json={"billable": billable}, headers=ADMIN_HEADERS)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['key']}"}


def check(gw: Served, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/_gateway/check", json=body, headers=headers or ADMIN_HEADERS, timeout=10)


def settle(url: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/_gateway/settle", json=body, headers=headers or ADMIN_HEADERS, timeout=10)


def status(gw: Served, billable: str) -> dict[str, Any]:
    r = httpx.get(f"{gw.url}/_gateway/admin/billables/{billable}", headers=ADMIN_HEADERS)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    body.pop("rate_limits")  # its reset times follow the clock
    return body


def everything(gw: Served, billable: str) -> dict[str, Any]:
    """All of a billable's Redis keys and their contents, read from outside the gateway."""
    out: dict[str, Any] = {}
    with gw.redis() as client:
        for key in sorted(client.scan_iter(f"gw:{{{billable}}}*")):
            kind = client.type(key)
            out[key] = client.hgetall(key) if kind == "hash" else client.lrange(key, 0, -1)
    return out


def shown(r: httpx.Response) -> dict[str, str | None]:
    return {h: r.headers.get(h) for h in RATE_HEADERS}


def test_a_dry_check_writes_nothing_and_agrees_with_the_proxy(gw: Served) -> None:
    """Dry checks before and after each proxied request answer what the proxy then does, with the same
    problem body and headers on a denial, and leave the status and every Redis key as they were."""
    key = key_for(gw, "org_1")
    status(gw, "org_1")  # the first read restores the billable (new: from nothing); everything after is compared
    for attempt in range(3):
        # The reconciler takes the proxied request's events off Redis in its own time: compare after it has.
        wait_until(lambda: not any(k.endswith(":ev") for k in everything(gw, "org_1")), "the reconciler to take org_1's events")
        before, raw = status(gw, "org_1"), everything(gw, "org_1")
        for _ in range(3):
            dry = check(gw, billable="org_1", route="POST /v1/projects")
            assert dry.status_code == 200, dry.text
        assert status(gw, "org_1") == before and everything(gw, "org_1") == raw
        answer = dry.json()
        proxied = httpx.post(f"{gw.url}/v1/projects", headers=key)
        assert answer["allowed"] == (proxied.status_code == 200) == (attempt < 2)
        assert answer["status"] == proxied.status_code
        if not answer["allowed"]:
            assert answer["problem"] == proxied.json()
            assert answer["violated_policies"] == ["projects"]
            assert shown(dry) == shown(proxied)
        else:
            assert answer["problem"] is None and answer["violated_policies"] == []
            # What would be left once taken: what the proxy's answer then shows.
            assert answer["remaining"]["projects"] == 1 - attempt
            assert f'"projects";r={1 - attempt}' in proxied.headers["ratelimit"] and f'"projects";r={1 - attempt}' in dry.headers["ratelimit"]
    # A feature the plan lacks, and a public route.
    dry = check(gw, billable="org_1", route="POST /v1/hd")
    proxied = httpx.post(f"{gw.url}/v1/hd", headers=key)
    assert (dry.json()["status"], dry.json()["problem"]) == (403, proxied.json())
    assert check(gw, billable="org_1", route="GET /v1/status").json() == {
        "allowed": True, "status": 200, "violated_policies": [], "problem": None, "remaining": {}}  # fmt: skip
    # The other forms: a feature, a limit by some units, an operation's units.
    assert check(gw, billable="org_1", feature="flux_hd_access").json()["status"] == 403
    assert check(gw, billable="org_1", feature="api_access").json()["allowed"] is True
    assert check(gw, billable="org_1", limit="exports", by=3).json()["allowed"] is True
    over = check(gw, billable="org_1", limit="exports", by=4).json()
    assert (over["allowed"], over["status"], over["violated_policies"]) == (False, 403, ["exports"])
    assert check(gw, billable="org_1", operation="chat", units=100).json()["allowed"] is True
    poor = check(gw, billable="org_1", operation="chat", units=101).json()
    assert (poor["status"], poor["violated_policies"], poor["problem"]["type"]) == (402, ["credits"], "urn:gateway:insufficient-credits")
    assert status(gw, "org_1")["credits"]["balance"] == 100


@pytest.fixture
def other_process(gw: Served, tmp_path: Path) -> Iterator[GatewayProcess]:
    """`gateway serve` in a process of its own, on the same Redis and record as `gw`."""
    upstream = gw.app.settings.upstream
    assert upstream is not None
    proc = GatewayProcess(tmp_path / "b", "b", upstream, f"redis://127.0.0.1:{gw.redis_port}/0", gw.db_url,
                          catalog=CATALOG, billable_header=None)  # fmt: skip
    proc.tmp.mkdir()
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()


def test_a_consuming_check_holds_and_another_process_settles_it_once(gw: Served, other_process: GatewayProcess) -> None:
    """consume:true takes what the proxy takes at admission; a settle from another process keeps it
    (success; metered: charged the units, at most max_units) or gives it back (failure), and a second
    settle of the same hold changes nothing and says so."""
    b = other_process.url
    b_admin = {"Authorization": f"Bearer {OTHER_ADMIN}"}

    def take(route: str, **more: Any) -> str:
        r = check(gw, billable="org_1", route=route, consume=True, **more)
        assert r.status_code == 200 and r.json()["allowed"], r.text
        hold: str = r.json()["hold"]
        return hold

    projects = take("POST /v1/projects")
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 1
    r = settle(b, b_admin, hold=projects, outcome="failure")
    assert r.status_code == 200, r.text
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 0
    again = settle(b, b_admin, hold=projects, outcome="success")
    assert again.status_code == 409 and "settled already" in again.json()["detail"]
    assert settle(gw.url, hold=projects, outcome="failure").status_code == 409
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 0

    kept = take("POST /v1/projects")
    assert settle(b, b_admin, hold=kept, outcome="success").status_code == 200
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 1
    # A release route gives one back on success, as a 2xx DELETE does through the proxy.
    assert settle(b, b_admin, hold=take("DELETE /v1/projects/1"), outcome="success").status_code == 200
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 0

    # Credits: a fixed cost given back on failure; a metered reserve settled to the units reported.
    image = take("POST /v1/images")
    assert status(gw, "org_1")["credits"]["balance"] == 95
    assert settle(b, b_admin, hold=image, outcome="failure").json()["balance"] == 100
    chat = take("POST /v1/chat")
    credits = status(gw, "org_1")["credits"]
    assert (credits["balance"], credits["held"]) == (50, 50)
    r = settle(b, b_admin, hold=chat, outcome="success", units=12)
    assert r.json()["balance"] == 88 and r.headers["x-credits-remaining"] == "88"
    assert status(gw, "org_1")["credits"]["held"] == 0
    unreported = take("POST /v1/chat")
    assert settle(b, b_admin, hold=unreported, outcome="success").json()["balance"] == 88 - 50  # the whole reserve
    capped = take("POST /v1/chat", units=30)  # held for 30 units instead of the reserve
    assert status(gw, "org_1")["credits"]["held"] == 30
    assert settle(b, b_admin, hold=capped, outcome="success", units=10_000).json()["balance"] == 38 - 200  # max_units = 200
    failed = take("POST /v1/projects")
    assert settle(b, b_admin, hold=failed, outcome="failure", units=7).status_code == 200  # units count only for metered
    assert status(gw, "org_1")["limits"]["projects"]["usage"] == 0


def test_who_may_check_and_settle(gw: Served) -> None:
    """An admin token (named ones too) for any billable; a billable's own key for itself only (403 for
    another's); none: 401."""
    own, other = key_for(gw, "org_1"), key_for(gw, "org_2")
    mine = check(gw, own, route="POST /v1/projects", consume=True)
    assert mine.status_code == 200 and mine.json()["hold"].endswith(".org_1")
    assert check(gw, own, billable="org_1", route="POST /v1/projects").status_code == 200
    refused = check(gw, own, billable="org_2", route="POST /v1/projects")
    assert refused.status_code == 403 and refused.json()["type"] == "urn:gateway:forbidden"
    assert settle(gw.url, other, hold=mine.json()["hold"], outcome="failure").status_code == 403
    nobody = httpx.post(f"{gw.url}/_gateway/check", json={"billable": "org_1", "route": "POST /v1/projects"})
    assert nobody.status_code == 401 and nobody.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{gw.url}/_gateway/settle", json={"hold": mine.json()["hold"], "outcome": "failure"}).status_code == 401
    assert settle(gw.url, own, hold=mine.json()["hold"], outcome="failure").status_code == 200
    ops = {"Authorization": f"Bearer {OPS}"}
    theirs = check(gw, ops, billable="org_2", route="POST /v1/projects", consume=True)
    assert theirs.status_code == 200 and settle(gw.url, ops, hold=theirs.json()["hold"], outcome="success").status_code == 200


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"route": "POST /v1/projects"}, "billable is required"),
        ({"billable": "org_1"}, "Name one of route, feature, limit or operation"),
        ({"billable": "org_1", "route": "POST /v1/x", "feature": "api_access"}, "not route and feature"),
        ({"billable": "org_1", "route": "FETCH /v1/x"}, "route must be"),
        ({"billable": "org_1", "route": "POST /v1/project"}, 'Did you mean "POST /v1/projects"?'),
        ({"billable": "org_1", "route": "GET /v1/%2e%2e/%2e%2e/x"}, "route:"),
        ({"billable": "org_1", "feature": "api_acess"}, 'Did you mean "api_access"?'),
        ({"billable": "org_1", "limit": "project"}, 'Did you mean "projects"?'),
        ({"billable": "org_1", "operation": "nope"}, "plans.toml has chat, generate_image"),
        ({"billable": "org_1", "limit": "projects", "by": -1}, "by must be"),
        ({"billable": "org_1", "limit": "projects", "by": 1.5}, "by must be"),
        ({"billable": "org_1", "operation": "chat", "units": "many"}, "units must be"),
        ({"billable": "org_1", "route": "POST /v1/projects", "consume": "yes"}, "consume must be"),
        ({"billable": "org_1", "route": 7}, "route must be a string"),
        ({"billable": "a b", "route": "POST /v1/projects"}, "billable"),
        ({"billable": "org_1", "route": "POST /v1/projects", "dry": True}, "unknown field 'dry'"),
    ],
)
def test_a_bad_check_is_a_400_naming_the_field(gw: Served, body: dict[str, Any], named: str) -> None:
    """Each bad body is one 400 line naming what to fix (with a did-you-mean where one is near)."""
    r = check(gw, **body)
    assert r.status_code == 400 and r.json()["type"] == "urn:gateway:bad-request", r.text
    assert named in r.json()["detail"], r.json()["detail"]


def test_bad_settles(gw: Served) -> None:
    """A settle names its hold and outcome; a hold never given is not open (409), a malformed one a 400."""
    assert settle(gw.url, hold="nope", outcome="success").status_code == 400
    assert "outcome" in settle(gw.url, hold="0123456789abcdef.org_1", outcome="ok").json()["detail"]
    assert settle(gw.url, hold="0123456789abcdef.org_1", outcome="success").status_code == 409
    assert httpx.post(f"{gw.url}/_gateway/settle", content=b"{", headers=ADMIN_HEADERS).status_code == 400


def test_a_settle_of_a_denied_or_dry_checks_null_hold_says_there_is_nothing_to_settle(gw: Served) -> None:
    """What `jq .hold` hands on from a denied (or dry) check is null: the settle's 400 says why there is no hold,
    not that one is required."""
    for body in ({"feature": "flux_hd_access", "consume": True}, {"route": "POST /v1/projects"}):
        answered = check(gw, billable="org_nothing", **body).json()
        assert answered.get("hold") is None
        r = settle(gw.url, hold=answered.get("hold"), outcome="success")
        assert r.status_code == 400, r.text
        assert "nothing to settle, because the check was denied or dry" in r.json()["detail"]


def test_the_python_api(redis_space: RedisSpace) -> None:
    """Checker (what GatewayApp.check and .settle call): typed results, BadRequest and HoldNotOpen as exceptions."""
    catalog = parse_catalog(CATALOG)

    async def scenario() -> None:
        engine = redis_space.engine(catalog)
        checker = Checker(engine)
        try:
            assert (await checker.check("org_9", route="POST /v1/projects")).allowed
            taken = await checker.check("org_9", limit="projects", by=2, consume=True)
            assert taken.allowed and taken.hold is not None
            full = await checker.check("org_9", route="POST /v1/projects")
            assert (full.allowed, full.status, full.violated_policies) == (False, 403, ["projects"])
            assert (await checker.settle(taken.hold, outcome="failure")).billable == "org_9"
            assert (await checker.check("org_9", route="POST /v1/projects")).allowed
            with pytest.raises(HoldNotOpen):
                await checker.settle(taken.hold, outcome="failure")
            with pytest.raises(BadRequest, match="unknown feature"):
                await checker.check("org_9", feature="nope")
        finally:
            await engine.store.close()

    asyncio.run(scenario())


def readme_node_client() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = re.findall(r"^```js\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    return block


def test_the_readme_node_client_runs_against_a_gateway(tmp_path: Path, redis_server: RedisServer) -> None:
    """The README's Node client, as pasted, against a gateway on the project's plans.toml (Free: one project):
    `node --check` accepts it, and it prints what the README says it prints."""
    node = shutil.which("node")
    assert node is not None, "Node (20) is part of the test machine"
    script = tmp_path / "check.mjs"
    script.write_text(readme_node_client())
    subprocess.run([node, "--check", str(script)], check=True, capture_output=True, timeout=60)
    with redis_server.client() as c:
        c.flushall()
    plans = (Path(__file__).resolve().parents[1] / "plans.toml").read_text()
    with serving(tmp_path, plans, redis_port=redis_server.port, db_url=f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}") as gw:
        key = key_for(gw, "org_1")["Authorization"].removeprefix("Bearer ")
        env = {**os.environ, "GATEWAY_URL": gw.url, "KEY": key}
        done = subprocess.run([node, str(script)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "may create a project: true { rate: 4, projects: 0 }", done.stdout
    assert lines[1] == "200 project 1", done.stdout
    assert lines[2].startswith("403 You've reached your limit of 1 projects (currently using 1)."), done.stdout


def test_gateway_app_check_and_settle_inside_an_app(tmp_path: Path, redis_server: RedisServer) -> None:
    """`GatewayApp.check` and `.settle`, called by the wrapped app itself (an app that decides without the
    middleware): a consuming check holds, its settle gives back, a second settle raises HoldNotOpen."""
    gateway_app: GatewayApp

    async def handler(request: Request) -> JSONResponse:
        taken = await gateway_app.check("org_5", route="POST /v1/projects", consume=True)
        assert taken.hold is not None
        full = await gateway_app.check("org_5", limit="projects", by=2)
        settled = await gateway_app.settle(taken.hold, outcome="failure")
        again = ""
        try:
            await gateway_app.settle(taken.hold, outcome="failure")
        except HoldNotOpen as exc:
            again = str(exc)
        after = await gateway_app.check("org_5", limit="projects", by=2)
        return JSONResponse({"taken": taken.body(), "full": full.allowed, "settled": settled.body(), "again": again, "after": after.allowed})

    plans = tmp_path / "plans.toml"
    plans.write_text(CATALOG)
    with redis_server.client() as c:
        c.flushall()
    app = Starlette(routes=[Route("/v1/status", handler)])
    gateway_app = GatewayApp.wrap(app, plans=str(plans), redis_url=f"redis://127.0.0.1:{redis_server.port}/0",
                                  database_url=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")  # fmt: skip
    with serve_in_thread(gateway_app) as url:
        body = httpx.get(f"{url}/v1/status", timeout=30).json()
    assert body["taken"]["allowed"] and body["taken"]["hold"].endswith(".org_5")
    assert body["full"] is False and body["after"] is True
    assert body["settled"]["settled"] is True and "settled already" in body["again"]


def test_a_hold_is_settled_once_and_an_unsettled_one_ends_charged(redis_space: RedisSpace) -> None:
    """Two settles of one hold at once: exactly one settles. A hold never settled is kept as charged and,
    after its lifetime (GATEWAY_HOLD_TTL), is no longer open: a late settle changes nothing."""
    catalog = parse_catalog(CATALOG)

    async def scenario() -> None:
        engine = redis_space.engine(catalog, hold_ttl=1)
        checker = Checker(engine)
        try:
            taken = await checker.check("org_7", route="POST /v1/projects", consume=True)
            assert taken.hold is not None
            both = await asyncio.gather(*(checker.settle(taken.hold, outcome="failure") for _ in range(2)), return_exceptions=True)
            assert sorted(type(r).__name__ for r in both) == ["HoldNotOpen", "SettleResult"], both
            assert (await engine.status("org_7"))["limits"]["projects"]["usage"] == 0

            late = await checker.check("org_7", route="POST /v1/projects", consume=True)
            assert late.hold is not None
            hold_id = late.hold[:16]

            async def ended() -> bool:
                return await engine.held("org_7", hold_id) is None

            await until(ended, "the hold to outlive its lifetime")
            with pytest.raises(HoldNotOpen):
                await checker.settle(late.hold, outcome="failure")
            assert (await engine.status("org_7"))["limits"]["projects"]["usage"] == 1  # kept as charged
        finally:
            await engine.store.close()

    asyncio.run(scenario())


def test_a_settle_of_a_checks_hold_is_one_script_call(redis_server: RedisServer) -> None:
    """Issue 17 item 6: settling a consuming check's hold (a metered reserve, a cap it releases) takes one
    EVALSHA in the process that checked (scripts loaded), two in one that has not seen the billable's plan yet; its balance
    is the status's, a hold id altered to name another route is a 400 that writes nothing, and a hold id of
    the older form (no tag) still settles."""
    catalog = parse_catalog(CATALOG)
    space = RedisSpace(redis_server.url, f"gwone{os.getpid()}")

    async def scenario() -> None:
        engine, cold = space.engine(catalog), space.engine(catalog)
        checker = Checker(engine)
        try:
            warm = await checker.check("org_0", route="POST /v1/chat", consume=True)
            assert warm.hold is not None
            await checker.settle(warm.hold, outcome="success", units=1)  # loads the settle script
            chat = await checker.check("org_1", route="POST /v1/chat", consume=True)
            assert chat.allowed and chat.hold is not None
            with Monitor(redis_server.port) as monitor:
                settled = await checker.settle(chat.hold, outcome="success", units=12)
            assert monitor.commands() == ["EVALSHA"]
            assert settled.balance == 100 - 12 == (await engine.status("org_1"))["credits"]["balance"]

            made = await checker.check("org_1", route="POST /v1/projects", consume=True)
            assert made.hold is not None
            await checker.settle(made.hold, outcome="success")
            deleted = await checker.check("org_1", route="DELETE /v1/projects/7", consume=True)
            assert deleted.hold is not None
            assert (await engine.status("org_1"))["limits"]["projects"]["usage"] == 1
            with Monitor(redis_server.port) as monitor:
                await checker.settle(deleted.hold, outcome="success")  # settles and releases the cap: one call
            assert monitor.commands() == ["EVALSHA"]
            assert (await engine.status("org_1"))["limits"]["projects"]["usage"] == 0

            # A hold whose tag was changed to name another route: 400, nothing written, the hold still open.
            other = await checker.check("org_1", route="POST /v1/images", consume=True)
            assert other.hold is not None
            tags = {h[16:28] for h in (chat.hold, made.hold, deleted.hold)}
            forged = other.hold[:16] + next(iter(tags - {other.hold[16:28]})) + other.hold[28:]
            held = (await engine.snapshot("org_1")).holds
            with pytest.raises(BadRequest, match="another route"):
                await checker.settle(forged, outcome="failure")
            assert (await engine.snapshot("org_1")).holds == held

            # Another process, cold: it learns the plan from the script's answer, then settles.
            await cold.status("org_elsewhere")  # the cold process connected (it has not seen org_1)
            with Monitor(redis_server.port) as monitor:
                gave_back = await Checker(cold).settle(other.hold, outcome="failure")
            assert monitor.commands() == ["EVALSHA", "EVALSHA"]
            assert gave_back.balance == 100 - 12 == (await engine.status("org_1"))["credits"]["balance"]

            # The older hold id, without the tag: read, then settled.
            old = await checker.check("org_1", route="POST /v1/images", consume=True)
            assert old.hold is not None
            untagged = old.hold[:16] + old.hold[28:]
            assert (await checker.settle(untagged, outcome="failure")).balance == 100 - 12
            with pytest.raises(HoldNotOpen):
                await checker.settle(old.hold, outcome="failure")
        finally:
            await engine.store.close()
            await cold.store.close()

    asyncio.run(scenario())
