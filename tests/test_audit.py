"""The audit log (DESIGN §4, issue 13 item 5): every change made through the admin API or the CLI appears
once, newest first, with the name of the token that made it and what was before and after; named tokens
come from GATEWAY_ADMIN_TOKENS. A gateway under uvicorn on a private redis-server, the record on SQLite and
Postgres, `gateway keys` and `gateway audit` as real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import ADMIN_HEADERS, Served, serving
from services import RedisServer

from gateway.errors import ConfigError
from gateway.settings import Settings, admin_tokens

GATEWAY = str(Path(sys.executable).parent / "gateway")
OPS = {"Authorization": "Bearer ops-secret-for-tests"}
BILLING = {"Authorization": "Bearer billing-secret-for-tests"}

CATALOG = """
[catalog]
default_plan = "free"

[plans.free]
price = 0
allows = ["api_access"]
credits = 10
limits.projects = { to = 5 }

[plans.pro]
price = 29
allows = ["api_access"]
credits = 100
limits.projects = { to = 50 }

[operations.thing]
cost = 1

[[routes]]
match = "POST /projects"
limit = "projects"

[[routes]]
match = "* /*"
"""


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def gw(tmp_path: Path, redis_server: RedisServer, empty_db_url: str) -> Iterator[Served]:
    tokens = {"ops": "ops-secret-for-tests", "billing": "billing-secret-for-tests"}
    with serving(tmp_path, CATALOG, redis_port=redis_server.port, db_url=empty_db_url, admin_tokens=tokens) as served:
        yield served


def log(gw: Served, headers: dict[str, str] = ADMIN_HEADERS, **query: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{gw.url}/_gateway/admin/audit", params=query, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    entries: list[dict[str, Any]] = answer.json()["entries"]
    return entries


def test_every_admin_change_is_recorded_once_with_its_tokens_name_before_and_after(gw: Served) -> None:
    """Keys, plans, grants, a cap's count, auto-recharge and a catalog: each change once (a repeated revoke
    or grant is no change), newest first, with "ops", "billing" or "admin", and its before and after."""
    base = f"{gw.url}/_gateway/admin"
    created = httpx.post(f"{base}/keys", json={"billable": "org_1", "name": "ci"}, headers=OPS, timeout=10).json()
    assert httpx.delete(f"{base}/keys/{created['id']}", headers=OPS, timeout=10).status_code == 204
    assert httpx.delete(f"{base}/keys/{created['id']}", headers=OPS, timeout=10).status_code == 204
    assert httpx.put(f"{base}/billables/org_1/plan", json={"plan": "pro"}, headers=BILLING, timeout=10).status_code == 200
    assert httpx.delete(f"{base}/billables/org_1/plan", headers=BILLING, timeout=10).status_code == 200
    grant = {"amount": 500, "reason": "goodwill", "idempotency_key": "g-1"}
    for _ in range(2):
        assert httpx.post(f"{base}/billables/org_1/credits", json=grant, headers=BILLING, timeout=10).status_code == 200
    assert httpx.put(f"{base}/billables/org_1/limits/projects", json={"usage": 3}, headers=ADMIN_HEADERS, timeout=10).status_code == 200
    recharge = {"enabled": True, "amount_cents": 2000, "threshold": 100}
    for threshold in (100, 200):
        body = {**recharge, "threshold": threshold}
        assert httpx.put(f"{base}/billables/org_1/auto-recharge", json=body, headers=BILLING, timeout=10).status_code == 200
    published = httpx.post(f"{base}/catalog", content=CATALOG.replace("credits = 10\n", "credits = 20\n").encode(), headers=OPS, timeout=30)
    assert published.status_code == 201
    assert httpx.put(f"{base}/billables/org_2/plan", json={"plan": "pro"}, headers=OPS, timeout=10).status_code == 200

    mine = log(gw, billable="org_1")
    assert [(e["action"], e["token"]) for e in reversed(mine)] == [
        ("key.create", "ops"),
        ("key.revoke", "ops"),
        ("plan.assign", "billing"),
        ("plan.remove", "billing"),
        ("credits.grant", "billing"),
        ("limit.set", "admin"),
        ("auto_recharge.set", "billing"),
        ("auto_recharge.set", "billing"),
    ]
    by_action = {e["action"]: e for e in reversed(mine)}  # the first of each
    assert by_action["key.create"]["before"] is None
    assert by_action["key.create"]["after"] == {"id": created["id"], "name": "ci"}
    assert (by_action["key.revoke"]["before"], by_action["key.revoke"]["after"]) == (
        {"id": created["id"], "revoked": False}, {"id": created["id"], "revoked": True})
    assert by_action["plan.assign"]["before"] == {"plan": "free", "source": "default"}
    assert by_action["plan.assign"]["after"] == {"plan": "pro", "source": "assignment"}
    assert by_action["plan.remove"]["after"] == {"plan": "free", "source": "default"}
    granted = by_action["credits.grant"]
    assert granted["before"] == {"balance": 10}
    assert granted["after"] == {"amount": 500, "reason": "goodwill", "idempotency_key": "g-1", "sequence": 1, "balance": 510}
    assert (by_action["limit.set"]["before"], by_action["limit.set"]["after"]) == ({"limit": "projects", "usage": 0}, {"limit": "projects", "usage": 3})
    first, second = [e for e in reversed(mine) if e["action"] == "auto_recharge.set"]
    assert first["before"] is None and second["before"] == first["after"] == recharge
    assert second["after"] == {**recharge, "threshold": 200}
    times = [e["at"] for e in mine]
    assert times == sorted(times, reverse=True)

    everything = log(gw)
    assert everything[0]["billable"] == "org_2" and everything[0]["token"] == "ops"
    catalog = next(e for e in everything if e["action"] == "catalog.publish" and e["token"] == "ops")
    assert catalog["billable"] is None
    assert catalog["before"]["version"] == 1 and catalog["after"]["version"] == 2
    assert log(gw, since=datetime.now(UTC).replace(year=2100).isoformat()) == []
    assert httpx.get(f"{base}/audit", params={"since": "yesterday"}, headers=OPS, timeout=10).status_code == 400
    assert httpx.get(f"{base}/audit", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401


def test_a_named_token_opens_health_details_and_metrics_like_the_admin_token(gw: Served) -> None:
    """A named token is an admin token everywhere the admin token is accepted."""
    assert "redis" in httpx.get(f"{gw.url}/_gateway/health", headers=OPS, timeout=10).json()
    assert httpx.get(f"{gw.url}/_gateway/metrics", headers=BILLING, timeout=10).status_code == 200


def _cli(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([GATEWAY, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_cli_changes_are_recorded_as_cli_and_gateway_audit_prints_the_log(tmp_path: Path, empty_db_url: str) -> None:
    """`gateway keys create` and `keys revoke` are recorded with token "cli"; `gateway audit --billable`
    prints the entries the endpoint answers, newest first."""
    flags = ["--database-url", empty_db_url]
    assert _cli(tmp_path, "db", "upgrade", *flags).returncode == 0  # a Postgres is upgraded by this command only
    created = _cli(tmp_path, "keys", "create", "org_9", "--name", "ops", *flags)
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.strip().split("_")[1]
    assert _cli(tmp_path, "keys", "revoke", key_id, *flags).returncode == 0
    printed = _cli(tmp_path, "audit", "--billable", "org_9", *flags)
    assert printed.returncode == 0, printed.stderr
    entries = json.loads(printed.stdout)["entries"]
    assert [(e["action"], e["token"], e["billable"]) for e in entries] == [("key.revoke", "cli", "org_9"), ("key.create", "cli", "org_9")]
    assert entries[1]["after"] == {"id": key_id, "name": "ops"}
    assert json.loads(_cli(tmp_path, "audit", "--billable", "org_other", *flags).stdout) == {"entries": []}


def test_named_tokens_parse_and_bad_syntax_is_one_clear_line(tmp_path: Path) -> None:
    """GATEWAY_ADMIN_TOKENS="ops=...,billing=..." is name → token; a malformed list, a reserved or repeated
    name, an empty, short or shared token is a ConfigError naming it, and `gateway serve` ends on that one line."""
    a, b = "a1" * 8, "b2" * 8  # 16 characters: the shortest token taken
    assert admin_tokens(f"ops={a}, billing={b}") == {"ops": a, "billing": b}
    assert Settings.load(environ={"GATEWAY_ADMIN_TOKENS": f"ops={a}"}).admin_tokens == {"ops": a}
    for raw, said in [("ops", "NAME=TOKEN"), (f"ops={a},ops={b}", "twice"), (f"cli={a}", "cli"), ("ops=", "empty"),
                      (f"ops={a},billing={a}", "same token"), (f"o ps={a}", "not a name"),
                      (f"ops={a[:-1]}", '"ops": a token of 15 characters is too easy to guess')]:  # fmt: skip
        with pytest.raises(ConfigError, match=said):
            admin_tokens(raw)
    with pytest.raises(ConfigError, match="GATEWAY_ADMIN_TOKEN"):
        Settings.load(environ={"GATEWAY_ADMIN_TOKENS": f"ops={a}", "GATEWAY_ADMIN_TOKEN": a})
    for variable in ("GATEWAY_ADMIN_TOKEN", "GATEWAY_METRICS_TOKEN", "GATEWAY_ACCOUNT_SECRET"):
        with pytest.raises(ConfigError, match=f"{variable}: a token of 5 characters is too easy to guess: use at least 16"):
            Settings.load(environ={variable: "t0ken"})
    short = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {"GATEWAY_ADMIN_TOKEN": "t0ken"}
    ended = subprocess.run([GATEWAY, "serve", "--upstream", "http://127.0.0.1:9"], cwd=tmp_path, env=short,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert ended.returncode != 0 and ended.stderr.strip().count("\n") == 0 and "at least 16" in ended.stderr, ended.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | {"GATEWAY_ADMIN_TOKENS": "ops"}
    ended = subprocess.run([GATEWAY, "serve", "--upstream", "http://127.0.0.1:9"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert ended.returncode != 0
    assert ended.stderr.strip().count("\n") == 0 and "GATEWAY_ADMIN_TOKENS" in ended.stderr, ended.stderr
