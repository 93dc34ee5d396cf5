"""The command line: `gateway check` prints a summary or every problem, with the exit code to match."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main

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
