"""The command line: `gateway check` prints a summary or every problem, with the exit code to match; every
mistake a user can make gets one line naming it and what to do, never a traceback (the real entry point)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from services import free_port

from gateway.cli import main

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds

EXAMPLE = Path(__file__).resolve().parents[1] / "plans.toml"


def test_check_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """A good catalog prints plans x features, limits, rates and credits, and exits 0."""
    assert main(["check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "3 plans, 7 routes, default plan free" in out
    assert "Flux HD" in out and "custom_models (per month)" in out and "1000/billing_cycle" in out


def test_check_lists_every_problem_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad catalog prints each problem with its place on stderr and exits non-zero."""
    bad = tmp_path / "plans.toml"
    bad.write_text('[catalog]\ndefault_plan = "gold"\n[plans.free]\nlimits.x = { to = 1, per = "fortnight" }\n')
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert 'catalog.default_plan: plan "gold" does not exist' in err
    assert 'plans.free.limits.x.per: unknown period "fortnight"' in err


def test_serve_without_upstream_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway serve` with no upstream exits 2 and names the flag and the variable."""
    assert main(["serve", "--plans", str(EXAMPLE)]) == 2
    assert "--upstream URL or GATEWAY_UPSTREAM" in capsys.readouterr().err


def test_bad_setting_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed number in a setting is refused with its source named."""
    assert main(["serve", "--upstream", "http://127.0.0.1:9", "--port", "eighty"]) == 2
    assert "--port: expected a number" in capsys.readouterr().err


# ---- every mistake a user can make on the command line: one line, never a traceback -------------------

GATEWAY = str(Path(sys.executable).parent / "gateway")
BAD_CATALOG = '[catalog]\ndefault_plan = "free"\n[plans.free]\nrate_limt = "5/second"\n[[route]]\nmatch = "GET /x"\n'


def run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([GATEWAY, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder as a user has one: the example plans.toml, a Latin-1 copy, a broken one and a subfolder."""
    (tmp_path / "plans.toml").write_text(EXAMPLE.read_text())
    (tmp_path / "latin1.toml").write_bytes('[catalog]\ndefault_plan = "fr\xe9e"\n'.encode("latin-1"))
    (tmp_path / "typos.toml").write_text(BAD_CATALOG)
    (tmp_path / "configs").mkdir()
    return tmp_path


MISTAKES = [
    # (what the user typed, the exit code, what the one line says)
    (["check", "configs"], 1, "gateway: configs is a directory: name the catalog file in it, e.g. configs/plans.toml"),
    (["check", "latin1.toml"], 1, "gateway: latin1.toml is not UTF-8 text (byte 28 is not): save it as UTF-8"),
    (["check", "nope.toml"], 1, "gateway: nope.toml not found: pass --plans PATH or set GATEWAY_PLANS"),
    (["serve", "--plans", "configs", "--upstream", "http://127.0.0.1:9"], 1, "gateway: configs is a directory"),
    (["serve", "--upstream", "not-a-url"], 2,
     "gateway: --upstream: the upstream is an http:// or https:// URL, like http://127.0.0.1:9000, not 'not-a-url'"),
    (["serve", "--upstream", "http://127.0.0.1:abc"], 2, "gateway: --upstream: the upstream is an http:// or https:// URL"),
    (["serve", "--upstream", "http://127.0.0.1:9", "--port", "eighty"], 2, "gateway: --port: expected a number, got 'eighty'"),
    (["serve", "--upstream", "http://127.0.0.1:9", "--database-url", "foo"], 2, "gateway: database URL 'foo' is not a URL"),
    (["serve", "--upstream", "http://127.0.0.1:9", "--redis-url", "nope"], 2, "gateway: Redis URL 'nope' is not supported"),
    (["usage", "org_1"], 2, "gateway: no record at sqlite:///gateway.db (gateway.db does not exist): run this where"),
    (["usage", "org_1", "--plans", "nope.toml"], 2, "gateway: no record at sqlite:///gateway.db"),
    (["keys", "list", "org_1"], 2, "gateway: no record at sqlite:///gateway.db"),
    (["keys", "revoke", "abc"], 2, "gateway: no record at sqlite:///gateway.db"),
    (["events", "replay"], 2, "gateway: no record at sqlite:///gateway.db"),
    (["keys", "create", "org_1", "--database-url", "sqlite:////nonexistent/dir/x.db"], 2,
     "gateway: the folder of the record sqlite:////nonexistent/dir/x.db does not exist: create /nonexistent/dir"),
    (["keys", "create", ""], 2, "gateway: name the billable the key is for, e.g. gateway keys create org_1"),
    (["reconcile", "--once"], 2, "gateway: gateway reconcile needs the Redis to read: --redis-url URL or GATEWAY_REDIS_URL"),
    (["stripe", "sync"], 2, "gateway: Stripe is not configured: set GATEWAY_STRIPE_API_KEY"),
    (["keys", "list", "org_1", "--database-url", "postgresql://postgres@127.0.0.1:1/x"], 2,
     "gateway: the database at postgresql://postgres@127.0.0.1:1/x did not answer"),
]


@pytest.mark.parametrize(("args", "code", "line"), MISTAKES, ids=[" ".join(m[0]) or "-" for m in MISTAKES])
def test_a_mistake_gets_one_line(folder: Path, args: list[str], code: int, line: str) -> None:
    """The real `gateway` entry point: the exit code, one line on stderr naming the problem, no traceback,
    and nothing left behind (a read-only command never creates an empty record)."""
    done = run(folder, *args)
    assert "Traceback" not in done.stdout + done.stderr
    assert done.returncode == code, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(line), done.stderr
    assert not (folder / "gateway.db").exists()


def test_mistakes_against_a_record(folder: Path) -> None:
    """With a record: an unknown key id, a bad --since or --period, Redis down for a revocation (the record
    has it and the line says to revoke again); `db upgrade` says one true thing each time."""
    first = run(folder, "db", "upgrade")
    assert first.returncode == 0 and re.fullmatch(r"sqlite:///gateway\.db: schema created \(revision \w+\)\n", first.stdout)
    again = run(folder, "db", "upgrade")
    assert re.fullmatch(r"sqlite:///gateway\.db: already at revision \w+, nothing to do\n", again.stdout), again.stdout
    assert first.stderr == again.stderr == ""
    created = run(folder, "keys", "create", "org_1")
    key_id = created.stdout.strip()[3:15]
    cases = [
        (["keys", "revoke", "nope"], "gateway: no API key nope in the record: `gateway keys list BILLABLE` shows the ids"),
        (["events", "replay", "--since", "yesterday"], "gateway: --since: 'yesterday' is not an ISO 8601 time"),
        (["usage", "org_1", "--period", "2026-13"], "gateway: --period: a month, YYYY-MM"),
        (["keys", "revoke", key_id, "--redis-url", f"redis://127.0.0.1:{free_port()}/0"],
         f"gateway: revoked {key_id} in the record, but Redis did not take the announcement"),
    ]
    for args, line in cases:
        done = run(folder, *args)
        assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(line), done.stderr
    assert "revoked" in run(folder, "keys", "list", "org_1").stdout.splitlines()[1]


def test_check_warns_and_suggests(folder: Path) -> None:
    """`gateway check` prints warnings on stderr and exits 0; a typo gets "did you mean"."""
    warned = folder / "warned.toml"
    warned.write_text(EXAMPLE.read_text().replace("reserve = 50 ", "reserve = 2000 "))
    done = run(folder, "check", "warned.toml")
    assert done.returncode == 0
    assert done.stderr.splitlines() == [
        "warning: plans.free: POST /v1/chat holds 2000 credits; the plan has 100 a month",
        "warning: plans.pro: POST /v1/chat holds 2000 credits; the plan has 1000 a billing cycle",
    ]
    assert run(folder, "check").stderr == ""  # the example catalog serves every route with its own numbers
    typos = run(folder, "check", "typos.toml")
    assert typos.returncode == 1
    assert '  - plans.free.rate_limt: unknown key "rate_limt": did you mean "rate_limit"?' in typos.stderr.splitlines()
    assert '  - route: unknown key "route": did you mean "routes"?' in typos.stderr.splitlines()


def test_version_help_and_options(folder: Path) -> None:
    """--version; every command and option has a description or help; the demo takes every setting like every
    command (issue 17), and ignores those it does not use."""
    from gateway import __version__
    from gateway.cli import _parser

    assert run(folder, "--version").stdout == f"gateway {__version__}\n"

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice, sub in action.choices.items():
                    walk(sub, f"{name} {choice}")
            elif not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"

    walk(_parser(), "gateway")
    demo = run(folder, "demo", "--help").stdout
    assert "--plans" in demo and "--port" in demo
    assert vars(_parser().parse_args(["demo", "--upstream", "http://127.0.0.1:9"]))["upstream"] == "http://127.0.0.1:9"
