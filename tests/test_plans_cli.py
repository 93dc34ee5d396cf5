"""The CLI as an operator meets it (issue 17): `gateway plans assign | unassign` on the record and the Redis a
running gateway uses (audited as "cli", decided from the gateway's next request), and every command taking
every setting of serve as a flag. Real `gateway` processes, a private redis-server, real HTTP."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from http_servers import serve_in_thread
from services import RedisServer
from test_keys_cli import GATEWAY, UPSTREAM, gateway

from gateway.cli import _parser

CATALOG = """
[catalog]
default_plan = "free"

[plans.free]
price = 0

[plans.pro]
price = 10
allows = ["reports"]

[plans.legacy]
price = 5
status = "archived"

[[routes]]
match = "GET /v1/reports"
features = ["reports"]

[[routes]]
match = "* /*"
"""


def run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([GATEWAY, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and action of the CLI, as the words that name it (`("keys", "create")`)."""
    found: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*path, name), *commands(sub, (*path, name))]
    return found


@pytest.mark.parametrize("words", commands(_parser()), ids=" ".join)
def test_every_commands_help_lists_the_redis_and_the_database(words: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway COMMAND --help` names --redis-url and --database-url, for every command and action."""
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args([*words, "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert "--redis-url" in shown and "--database-url" in shown and "--plans" in shown


def test_a_setting_a_command_does_not_use_is_accepted_and_ignored(tmp_path: Path, private_redis: RedisServer) -> None:
    """`keys create`, `keys list` and `audit` take the flags serve takes (--redis-url, --upstream, --port ...) and
    work as without them."""
    db = f"sqlite:///{tmp_path}/record.db"
    serve_like = ["--redis-url", private_redis.url, "--database-url", db, "--upstream", "http://127.0.0.1:9",
                  "--port", "9999", "--workers", "2", "--trust-forwarded", "--plans", "nowhere.toml"]  # fmt: skip
    created = run(tmp_path, "keys", "create", "org_z", *serve_like)
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("gw_")
    listed = run(tmp_path, "keys", "list", "org_z", *serve_like)
    assert listed.returncode == 0 and "org_z" not in listed.stderr and len(listed.stdout.splitlines()) == 2, listed
    audit = run(tmp_path, "audit", *serve_like)
    assert audit.returncode == 0, audit.stderr
    assert [e["action"] for e in json.loads(audit.stdout)["entries"]] == ["key.create"]
    assert run(tmp_path, "keys", "--redis-url", private_redis.url, "list", "org_z", "--database-url", db).returncode == 0


def test_plans_assign_and_unassign_reach_a_running_gateway_from_its_next_request(
    tmp_path: Path, private_redis: RedisServer
) -> None:
    """A gateway on a private Redis: `gateway plans assign org_1 pro` opens pro's feature on the very next request,
    `unassign` closes it again, both audited as "cli"; an archived or unknown plan is one line and exit 1."""
    (tmp_path / "plans.toml").write_text(CATALOG)
    db = f"sqlite:///{tmp_path}/record.db"
    settings = ["--redis-url", private_redis.url, "--database-url", db]
    with serve_in_thread(UPSTREAM) as upstream, gateway(tmp_path, upstream, *settings, "--billable-header", "X-Org") as url:

        def reports() -> int:
            return httpx.get(f"{url}/v1/reports", headers={"X-Org": "org_1"}, timeout=30).status_code

        assert reports() == 403  # on free, which does not allow reports
        assigned = run(tmp_path, "plans", "assign", "org_1", "pro", *settings)
        assert assigned.returncode == 0, assigned.stderr
        assert assigned.stdout.startswith("org_1 is on pro")
        assert reports() == 200

        for plan, problem in (("legacy", 'Plan "legacy" is archived'), ("gold", "Unknown plan 'gold'")):
            refused = run(tmp_path, "plans", "assign", "org_1", plan, *settings)
            assert refused.returncode == 1 and refused.stdout == ""
            assert len(refused.stderr.splitlines()) == 1 and problem in refused.stderr, refused.stderr
        assert reports() == 200  # nothing changed

        removed = run(tmp_path, "plans", "unassign", "org_1", *settings)
        assert removed.returncode == 0, removed.stderr
        assert reports() == 403

        audit = json.loads(run(tmp_path, "audit", "--billable", "org_1", *settings).stdout)["entries"]
        assert [(e["action"], e["token"], e["after"]["plan"]) for e in audit] == [
            ("plan.remove", "cli", "free"), ("plan.assign", "cli", "pro")
        ]  # fmt: skip
