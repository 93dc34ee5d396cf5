"""Catalog publishing (DESIGN §3, issue 13 item 4): two gateways on one private redis-server and one record
(SQLite and Postgres). A catalog published on one is run by both within 2 s while the other serves a
bounded load loop (every request answered, none charged twice); a bad catalog changes nothing and names
every problem; archived plans keep their billables; `gateway catalog push` and SIGHUP publish too; a
restarted gateway runs the newest published version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import ADMIN_HEADERS, Served, serving
from services import RedisServer
from waiting import wait_until

pytestmark = pytest.mark.slow

GATEWAY = str(Path(sys.executable).parent / "gateway")

V1 = """
[catalog]
default_plan = "free"
highlighted_plan = "pro"
on_redis_down = "closed"

[plans.free]
price = 0
allows = ["api_access"]
limits.exports = { to = 100000, per = "month" }

[plans.pro]
price = 29
allows = ["api_access"]
limits.exports = { to = 500000, per = "month" }

[[routes]]
match = "POST /exports"
limit = "exports"

[[routes]]
match = "* /*"
"""
V2 = V1.replace("to = 100000", "to = 200000")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """An empty record on each backend (SQLite, Postgres)."""
    return empty_db_url


def running(gw: Served) -> dict[str, Any]:
    answer = httpx.get(f"{gw.url}/_gateway/admin/catalog", headers=ADMIN_HEADERS, timeout=10)
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def publish(gw: Served, text: str, headers: dict[str, str] = ADMIN_HEADERS) -> httpx.Response:
    return httpx.post(f"{gw.url}/_gateway/admin/catalog", content=text.encode(), headers=headers, timeout=30)


def exports_quota(response: httpx.Response) -> int:
    """The `q` of the exports policy in RateLimit-Policy: which catalog decided the request."""
    for item in response.headers["ratelimit-policy"].split(","):
        name, *params = item.strip().split(";")
        if name == '"exports"':
            return int(next(p for p in params if p.startswith("q="))[2:])
    raise AssertionError(response.headers["ratelimit-policy"])


def usage(gw: Served, billable: str, limit: str) -> int:
    answer = httpx.get(f"{gw.url}/_gateway/admin/billables/{billable}", headers=ADMIN_HEADERS, timeout=10)
    return int(answer.json()["limits"][limit]["usage"])


def test_a_catalog_published_on_one_gateway_runs_on_both_within_2_s_under_load(
    tmp_path: Path, redis_server: RedisServer, db_url: str
) -> None:
    """While gateway B answers a bounded loop of charged requests, V2 is published on gateway A: both run
    version 2 within 2 s, every request of the loop is answered 200, B decides with V2's numbers soon after,
    and the usage Redis counted is exactly the requests admitted (none dropped, none charged twice)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        serving(tmp_path / "a", V1, redis_port=redis_server.port, db_url=db_url, billable_header="X-Org") as a,
        serving(tmp_path / "b", V1, redis_port=redis_server.port, db_url=db_url, billable_header="X-Org") as b,
    ):
        first = running(a)
        assert first["version"] == running(b)["version"] == 1
        assert first["plans"] == ["free", "pro"]
        statuses: list[int] = []
        quotas: list[int] = []
        published = threading.Event()
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=b.url, headers={"X-Org": "org_load"}, timeout=30) as client:
                for _ in range(3000):  # bounded: ends when B decided with V2 for a while, or at 3000
                    answer = client.post("/exports")
                    statuses.append(answer.status_code)
                    if answer.status_code == 200:
                        quotas.append(exports_quota(answer))
                    if stop.is_set() or (published.is_set() and quotas[-20:] == [200000] * 20):
                        return

        loader = threading.Thread(target=load)
        loader.start()
        try:
            wait_until(lambda: len(statuses) >= 50, "the load loop to get going")
            answer = publish(a, V2)
            assert answer.status_code == 201, answer.text
            assert answer.json()["version"] == 2 and answer.json()["changed"] is True
            published.set()
            wait_until(lambda: running(a)["version"] == running(b)["version"] == 2, "both gateways on version 2", timeout=2.0)
        finally:
            loader.join(120)
            stop.set()
        assert set(statuses) == {200}, sorted(set(statuses))
        assert quotas[0] == 100000 and quotas[-1] == 200000
        switched = quotas.index(200000)
        assert set(quotas[:switched]) == {100000} and set(quotas[switched:]) == {200000}  # one switch, never back
        assert usage(a, "org_load", "exports") == len(statuses)
        second = running(b)
        assert second["sha256"] != first["sha256"] and second["published_at"] > first["published_at"]


def test_a_catalog_that_does_not_load_is_refused_with_every_problem_and_changes_nothing(
    tmp_path: Path, redis_server: RedisServer, db_url: str
) -> None:
    """A bad catalog answers 400 problem+json listing each problem with its place; the running version, the
    record and the decisions stay as they were. Publishing the running text again is no new version."""
    with serving(tmp_path, V1, redis_port=redis_server.port, db_url=db_url, billable_header="X-Org") as gw:
        bad = V1.replace('per = "month" }', 'per = "fortnight" }', 1).replace('match = "POST /exports"\nlimit = "exports"', 'match = "POST /exports"\nlimit = "imports"')
        bad = bad.replace('default_plan = "free"', 'default_plan = "gratis"')
        answer = publish(gw, bad)
        assert answer.status_code == 400 and answer.headers["content-type"] == "application/problem+json"
        body = answer.json()
        places = {p["place"] for p in body["problems"]}
        assert {"plans.free.limits.exports.per", "catalog.default_plan"} <= places, body
        assert "nothing changed" in body["detail"] and "fortnight" in body["detail"]
        not_toml = publish(gw, "[plans.free\n")
        assert not_toml.status_code == 400 and "TOML" in not_toml.json()["detail"]
        assert running(gw)["version"] == 1
        assert gw.query("select count(*) from catalog_versions") == [(1,)]
        decided = httpx.post(f"{gw.url}/exports", headers={"X-Org": "org_1"}, timeout=10)
        assert decided.status_code == 200 and exports_quota(decided) == 100000
        again = publish(gw, V1)
        assert again.status_code == 200 and again.json()["version"] == 1 and again.json()["changed"] is False
        refused = httpx.post(f"{gw.url}/_gateway/admin/catalog", content=V2.encode(), timeout=10)
        assert refused.status_code == 401 and running(gw)["version"] == 1


ARCHIVED = V1.replace('[plans.pro]\nprice = 29', '[plans.pro]\nprice = 29\nstatus = "archived"').replace(
    'highlighted_plan = "pro"', 'highlighted_plan = "pro_2027"'
) + '\n[plans.pro_2027]\nprice = 39\nallows = ["api_access"]\nlimits.exports = { to = 400000, per = "month" }\n'


def test_an_archived_plan_keeps_its_billables_refuses_new_ones_and_leaves_the_pricing_page(
    tmp_path: Path, redis_server: RedisServer, db_url: str
) -> None:
    """After pro is archived by a published catalog, a billable assigned to it before keeps pro's terms (and
    may be assigned it again); a new assignment to pro is 409 problem+json in one sentence; the pricing page
    shows pro_2027, not pro."""
    with serving(tmp_path, V1, redis_port=redis_server.port, db_url=db_url, billable_header="X-Org") as gw:
        put = httpx.put(f"{gw.url}/_gateway/admin/billables/org_old/plan", json={"plan": "pro"}, headers=ADMIN_HEADERS, timeout=10)
        assert put.status_code == 200
        assert publish(gw, ARCHIVED).status_code == 201
        kept = httpx.post(f"{gw.url}/exports", headers={"X-Org": "org_old"}, timeout=10)
        assert kept.status_code == 200 and exports_quota(kept) == 500000
        status = httpx.get(f"{gw.url}/_gateway/admin/billables/org_old", headers=ADMIN_HEADERS, timeout=10).json()
        assert (status["plan"], status["plan_source"]) == ("pro", "assignment")
        again = httpx.put(f"{gw.url}/_gateway/admin/billables/org_old/plan", json={"plan": "pro"}, headers=ADMIN_HEADERS, timeout=10)
        assert again.status_code == 200
        refused = httpx.put(f"{gw.url}/_gateway/admin/billables/org_new/plan", json={"plan": "pro"}, headers=ADMIN_HEADERS, timeout=10)
        assert refused.status_code == 409 and refused.headers["content-type"] == "application/problem+json"
        detail = refused.json()["detail"]
        assert detail.count(". ") == 0 and "archived" in detail and "pro_2027" in detail, detail
        new_status = httpx.get(f"{gw.url}/_gateway/admin/billables/org_new", headers=ADMIN_HEADERS, timeout=10).json()
        assert new_status["plan"] == "free"
        page = httpx.get(f"{gw.url}/_gateway/pricing", timeout=10).text
        assert 'data-plan="pro_2027"' in page and 'data-plan="pro"' not in page


def _cli(folder: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([GATEWAY, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=check)


def test_gateway_catalog_push_publishes_to_running_gateways_and_refuses_a_bad_file(
    tmp_path: Path, redis_server: RedisServer, db_url: str
) -> None:
    """`gateway catalog push` works on the record and Redis directly: a running gateway runs the pushed
    version within 2 s; a file that does not load exits 1 with every problem and publishes nothing; the
    audit log shows the push made by "cli"."""
    with serving(tmp_path, V1, redis_port=redis_server.port, db_url=db_url, billable_header="X-Org") as gw:
        (tmp_path / "v2.toml").write_text(V2)
        (tmp_path / "bad.toml").write_text(V1.replace('per = "month" }', 'per = "fortnight" }', 1).replace('default_plan = "free"', 'default_plan = "x"'))
        flags = ["--redis-url", redis_server.url, "--database-url", db_url]
        bad = _cli(tmp_path, "catalog", "push", "bad.toml", *flags, check=False)
        assert bad.returncode == 1 and "plans.free.limits.exports.per" in bad.stderr and "catalog.default_plan" in bad.stderr, bad.stderr
        pushed = _cli(tmp_path, "catalog", "push", "v2.toml", *flags)
        assert "catalog version 2" in pushed.stdout, pushed.stdout
        wait_until(lambda: running(gw)["version"] == 2, "the gateway on version 2", timeout=2.0)
        again = _cli(tmp_path, "catalog", "push", "v2.toml", *flags)
        assert "already" in again.stdout
        import json

        entries = json.loads(_cli(tmp_path, "audit", "--database-url", db_url).stdout)["entries"]
        pushes = [e for e in entries if e["action"] == "catalog.publish"]
        assert [(e["token"], e["after"]["version"]) for e in pushes] == [("cli", 2), ("serve", 1)]
        assert pushes[0]["before"]["version"] == 1


def test_sighup_publishes_the_plans_file_and_every_worker_runs_it(tmp_path: Path, redis_server: RedisServer) -> None:
    """`gateway serve --workers 2`: a SIGHUP to the parent re-reads --plans and publishes it once; every
    worker runs the new version; a restarted gateway starts on the newest published version, and says so."""
    from gateway_support import recording_upstream
    from http_servers import serve_in_thread
    from services import free_port

    plans = tmp_path / "plans.toml"
    plans.write_text(V1)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_ADMIN_TOKEN": ADMIN_HEADERS["Authorization"].split()[1], "GATEWAY_BILLABLE_HEADER": "X-Org"}
    db_url = f"sqlite:///{tmp_path}/gateway.db"
    with serve_in_thread(recording_upstream([])) as upstream:
        args = [GATEWAY, "serve", "--upstream", upstream, "--port", str(port), "--plans", str(plans), "--workers", "2",
                "--redis-url", redis_server.url, "--database-url", db_url]  # fmt: skip
        log_path = tmp_path / "serve.log"
        url = f"http://127.0.0.1:{port}"

        def versions_seen() -> set[int]:
            seen = set()
            for _ in range(20):  # a new connection each: the kernel hands them to either worker
                with httpx.Client(timeout=5) as fresh:
                    seen.add(fresh.get(f"{url}/_gateway/admin/catalog", headers=ADMIN_HEADERS).json()["version"])
            return seen

        def up() -> bool:
            try:
                return httpx.get(f"{url}/_gateway/health", timeout=2).status_code in (200, 503)
            except httpx.HTTPError:
                return False

        with log_path.open("w") as log:
            proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(up, "gateway serve to answer", timeout=60)
            assert versions_seen() == {1}
            plans.write_text(V2)
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: versions_seen() == {2}, "every worker on version 2", timeout=10)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        assert "published as version 2" in log_path.read_text(), log_path.read_text()[-3000:]
        plans.write_text(V1)  # the file now differs from the newest published version
        with log_path.open("w") as log:
            proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(up, "gateway serve to answer again", timeout=60)
            assert versions_seen() == {2}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        text = log_path.read_text()
        assert "running version 2 from the record, which differs from" in text, text[-3000:]


DEEP = {
    "arrays": V1 + "\n[plans.free.meta]\nx = " + "[" * 5000 + "]" * 5000 + "\n",
    "inline tables": V1 + "\n[plans.free.meta]\nx = " + "{a = " * 100_000 + "1" + "}" * 100_000 + "\n",
    "a dotted key": V1 + "\n[plans.free.meta]\n" + ".".join(["a"] * 100_000) + " = 1\n",
}


def test_a_catalog_nested_thousands_deep_is_refused_with_one_line(tmp_path: Path, redis_server: RedisServer) -> None:
    """Arrays 5,000 deep, inline tables or a dotted key 100,000 deep: the admin API answers 400 with one line and
    publishes nothing; `gateway check` and `gateway catalog push` exit 1 with one line, never a RecursionError,
    a 500 or exit 70."""
    db_url = f"sqlite:///{tmp_path}/gw.db"
    with serving(tmp_path, V1, redis_port=redis_server.port, db_url=db_url, billable_header="X-Org") as gw:
        for name, text in DEEP.items():
            answer = publish(gw, text)
            assert answer.status_code == 400, (name, answer.status_code, answer.text[:200])
            assert "nested deeper than 64 levels" in answer.json()["detail"] and "\n" not in answer.json()["detail"]
            (tmp_path / "deep.toml").write_text(text)
            for args in (["check", "deep.toml"], ["catalog", "push", "deep.toml", "--redis-url", redis_server.url,
                                                  "--database-url", db_url]):
                done = _cli(tmp_path, *args, check=False)
                assert done.returncode == 1 and "Traceback" not in done.stderr, (name, args, done.stderr[-500:])
                line = "gateway: deep.toml: nested deeper than 64 levels (tables, arrays and dotted keys): a catalog needs a handful"
                assert done.stderr.splitlines() == [line], done.stderr[-500:]
        assert running(gw)["version"] == 1


WITHOUT_PRO = V1.replace('highlighted_plan = "pro"\n', "").replace(
    '[plans.pro]\nprice = 29\nallows = ["api_access"]\nlimits.exports = { to = 500000, per = "month" }\n', "")


def test_a_catalog_without_a_plan_billables_are_on_is_refused_naming_it_and_how_many(tmp_path: Path, redis_server: RedisServer) -> None:
    """Two billables assigned to pro: a catalog that drops pro is 409 naming plans.pro and the count through the admin
    API, and exit 1 through `gateway catalog push`; nothing is published, they stay on pro; archiving it instead publishes."""
    db_url = f"sqlite:///{tmp_path}/gw.db"
    assert "[plans.pro]" not in WITHOUT_PRO
    with serving(tmp_path, V1, redis_port=redis_server.port, db_url=db_url, billable_header="X-Org") as gw:
        for org in ("org_1", "org_2"):
            assigned = httpx.put(f"{gw.url}/_gateway/admin/billables/{org}/plan", json={"plan": "pro"}, headers=ADMIN_HEADERS, timeout=10)
            assert assigned.status_code == 200, assigned.text
        answer = publish(gw, WITHOUT_PRO)
        assert answer.status_code == 409 and answer.json()["type"] == "urn:gateway:conflict", answer.text
        assert [p["place"] for p in answer.json()["problems"]] == ["plans.pro"]
        assert "2 billables are on it" in answer.json()["detail"] and "archived" in answer.json()["detail"]
        (tmp_path / "without-pro.toml").write_text(WITHOUT_PRO)
        pushed = _cli(tmp_path, "catalog", "push", "without-pro.toml", "--redis-url", redis_server.url, "--database-url", db_url, check=False)
        assert pushed.returncode == 1 and "plans.pro: 2 billables are on it" in pushed.stderr, pushed.stderr
        assert running(gw)["version"] == 1
        assert httpx.get(f"{gw.url}/_gateway/admin/billables/org_1", headers=ADMIN_HEADERS, timeout=10).json()["plan"] == "pro"
        archived = publish(gw, V1.replace("[plans.pro]\nprice = 29", '[plans.pro]\nprice = 29\nstatus = "archived"').replace(
            'highlighted_plan = "pro"\n', ""))
        assert archived.status_code == 201, archived.text
