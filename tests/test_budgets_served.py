"""Budgets through the admin API and the proxy (issue 20, items 1-2): a team under its org, a key with its own
terms given at creation and changed later, each seen by both gateway processes; refusals name their place.
Two gateways on one private redis-server, the record on SQLite and Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_support import ADMIN_HEADERS, Served, serving
from services import RedisServer
from test_overrides import CATALOG
from waiting import wait_until


@pytest.fixture
def pair(tmp_path: Path, empty_db_url: str) -> Iterator[tuple[Served, Served]]:
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        yield tuple(stack.enter_context(serving(tmp_path, CATALOG, redis_port=redis.port, db_url=empty_db_url)) for _ in range(2))  # type: ignore[misc]


def admin(gw: Served, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{gw.url}/_gateway/admin{path}", json=body, headers=ADMIN_HEADERS, timeout=30)


def call(gw: Served, key: str, path: str = "/images") -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_a_key_budget_under_a_team_under_an_org(pair: tuple[Served, Served]) -> None:
    a, b = pair
    assert admin(a, "PUT", "/billables/team_a/parent", {"parent": "org_1"}).json() == {"billable": "team_a", "parent": "org_1"}
    cycle = admin(a, "PUT", "/billables/org_1/parent", {"parent": "team_a"})
    assert cycle.status_code == 409 and "would be a cycle" in cycle.json()["detail"]
    for method, path, sent in [("PUT", "/plan", {"plan": "pro"}), ("POST", "/credits", {"amount": 5}), ("PUT", "/overrides", {"credits": 5})]:
        member = admin(a, method, f"/billables/team_a{path}", sent)
        assert member.status_code == 409 and member.json()["detail"].startswith("team_a is a member of org_1: its plan, credits"), path
    third = admin(a, "PUT", "/billables/sub/parent", {"parent": "team_a"})
    assert third.status_code == 409 and "two levels at most (org → team → key)" in third.json()["detail"]

    bad = admin(a, "POST", "/keys", {"billable": "team_a", "terms": {"limits": {"exports": {"to": -3}}, "allows": ["hd"]}})
    assert bad.status_code == 400 and "terms.limits.exports.to" in bad.json()["detail"] and "terms.allows" in bad.json()["detail"]
    assert admin(a, "GET", "/billables/team_a/keys").json() == []  # nothing was created

    made = admin(a, "POST", "/keys", {"billable": "team_a", "name": "ci", "terms": {"credits": 2, "rate_limit": "100/second"}})
    assert made.status_code == 201, made.text
    assert made.json()["terms"] == {"credits": 2, "rate_limit": "100/second"}
    key, key_id = made.json()["key"], made.json()["id"]

    assert [call(a, key).status_code, call(b, key).status_code] == [200, 200]
    assert [s.split()[-1] for s in a.upstream_saw + b.upstream_saw] == ["org_1", "org_1"]  # the upstream is told the org
    spent = call(a, key)
    assert spent.status_code == 402
    assert spent.json()["detail"] == "This key's monthly budget of 2 credits is spent; the organization has 8 left."
    assert spent.json()["violated_policies"] == ["key-credits"]
    usage = httpx.get(f"{b.url}/_gateway/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert usage["billable"] == "org_1" and usage["credits"]["balance"] == 8
    assert usage["members"] == [
        {"member": f"key:{key_id}", "level": "key", "suspended": False, "terms": {"credits": 2, "rate_limit": "100/second"},
         "credits": {"allowance": 2, "spent": 2, "balance": 0, "per": "month"},
         "this_month": {"requests": 2, "units": 0, "credits": 2}},
        {"member": "team_a", "level": "team", "suspended": False, "terms": None},
    ]  # fmt: skip

    raised = admin(a, "PUT", f"/keys/{key_id}/terms", {"credits": 3})
    assert raised.status_code == 200 and raised.json() == {"id": key_id, "billable": "team_a", "terms": {"credits": 3}}
    wait_until(lambda: call(b, key).status_code == 200, timeout=30, what="the other process to decide with the new terms")
    assert call(a, key).status_code == 402

    wrong = admin(a, "PUT", f"/keys/{key_id}/terms", {"credits_per": "fortnight"})
    assert wrong.status_code == 400 and "terms.credits_per" in wrong.json()["detail"]
    entries = admin(a, "GET", "/audit?billable=team_a").json()["entries"]
    assert [e["action"] for e in entries][:3] == ["key.terms", "key.terms", "key.create"]
    assert entries[0]["before"] == {"id": key_id, "terms": {"credits": 2, "rate_limit": "100/second"}}
    assert "parent.set" in [e["action"] for e in entries]


SEATS = CATALOG.replace("credits = 10\n", "credits = 10\nseats = { to = 2 }\n", 1).replace("credits = 100\n", "credits = 100\nseats = { to = 10 }\n", 1)


def test_seats_count_the_orgs_and_its_teams_keys(tmp_path: Path, empty_db_url: str) -> None:
    """Free has 2 seats: a key of the org and one of its team take them; the third is 403 with the upgrade
    sentence and makes nothing; a revocation gives a seat back."""
    with RedisServer() as redis, serving(tmp_path, SEATS, redis_port=redis.port, db_url=empty_db_url) as gw:
        assert admin(gw, "PUT", "/billables/team_a/parent", {"parent": "org_1"}).status_code == 200
        first = admin(gw, "POST", "/keys", {"billable": "org_1"})
        assert first.status_code == 201 and admin(gw, "POST", "/keys", {"billable": "team_a"}).status_code == 201
        refused = admin(gw, "POST", "/keys", {"billable": "org_1"})
        assert refused.status_code == 403 and refused.json()["type"] == "urn:gateway:no-seat"
        assert refused.json()["detail"] == (
            "Your current plan (Free) includes 2 seats, all in use by org_1's keys. Upgrade to Pro for more seats, or revoke a key."
        )
        assert len(admin(gw, "GET", "/billables/org_1/keys").json()) == 1
        assert admin(gw, "POST", "/keys", {"billable": "other_org"}).status_code == 201  # its own seats
        assert admin(gw, "DELETE", f"/keys/{first.json()['id']}").status_code == 204
        assert admin(gw, "POST", "/keys", {"billable": "org_1"}).status_code == 201


def test_cli_keys_create_with_a_budget(tmp_path: Path) -> None:
    """`gateway keys create ... --credits 1 --rate 100/second` makes a key with its own budget (a running
    gateway refuses its second image with key-credits); a bad --rate is refused naming its place."""
    import subprocess

    from gateway_support import recording_upstream
    from http_servers import serve_in_thread
    from test_keys_cli import GATEWAY, cli, gateway

    (tmp_path / "plans.toml").write_text(CATALOG)
    bad = subprocess.run([GATEWAY, "keys", "create", "org_1", "--rate", "2/fortnight"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    assert bad.returncode != 0 and "terms.rate_limit" in bad.stderr
    created = cli(tmp_path, "keys", "create", "org_1", "--name", "ci", "--credits", "1", "--rate", "100/second")
    key = created.stdout.strip()
    with serve_in_thread(recording_upstream([])) as upstream, gateway(tmp_path, upstream) as url:
        assert call_url(url, key).status_code == 200
        refused = call_url(url, key)
        assert refused.status_code == 402 and refused.json()["violated_policies"] == ["key-credits"]


def call_url(url: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/images", headers={"Authorization": f"Bearer {key}"}, timeout=30)


METERED = CATALOG.replace("[plans.free]", """[operations.chat]
per_unit = 1
units = "response.json:usage.total_tokens"
reserve = 5
max_units = 50

[plans.free]""", 1).replace('[[routes]]\nmatch = "* /*"', '[[routes]]\nmatch = "POST /chat"\nspend = "chat"\n\n[[routes]]\nmatch = "* /*"', 1)


def test_a_members_consuming_check_and_its_settle_give_back_at_every_level(tmp_path: Path, empty_db_url: str) -> None:
    """A key with its own terms (under a team with terms) checks with consume:true on one gateway and
    settles on the other with its own API key: a failure gives back at the key, the team and the org (limit
    units and credits); a metered success charges each level the settled units. A team without terms (a
    billable with a parent) settles its own hold too; another billable's key cannot settle them."""
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        for name in "ab":
            (tmp_path / name).mkdir()
        a, b = (stack.enter_context(serving(tmp_path / name, METERED, redis_port=redis.port, db_url=empty_db_url)) for name in "ab")
        assert admin(a, "PUT", "/billables/team_a/parent", {"parent": "org_1"}).status_code == 200
        assert admin(a, "PUT", "/billables/team_a/terms", {"credits": 8}).status_code == 200
        terms = {"credits": 6, "limits": {"exports": {"to": 3, "per": "day"}}}
        made = admin(a, "POST", "/keys", {"billable": "team_a", "name": "ci", "terms": terms})
        assert made.status_code == 201, made.text
        key, member = made.json()["key"], f"key:{made.json()['id']}"
        own = {"Authorization": f"Bearer {key}"}
        org_key = {"Authorization": f"Bearer {admin(a, 'POST', '/keys', {'billable': 'org_1'}).json()['key']}"}

        def levels() -> tuple[Any, ...]:
            usage = httpx.get(f"{a.url}/_gateway/usage", headers=own, timeout=30).json()
            mine, team = usage["members"]
            return (mine["credits"]["spent"], team["credits"]["spent"], usage["credits"]["balance"],
                    mine["limits"]["exports"]["usage"], usage["limits"]["exports"]["usage"])  # fmt: skip

        def take(route: str) -> str:
            r = httpx.post(f"{a.url}/_gateway/check", json={"route": route, "consume": True}, headers=own, timeout=30)
            assert r.status_code == 200 and r.json()["allowed"], r.text
            hold: str = r.json()["hold"]
            return hold

        def settle(hold: str, headers: dict[str, str], **body: Any) -> httpx.Response:
            return httpx.post(f"{b.url}/_gateway/settle", json={"hold": hold, **body}, headers=headers, timeout=30)

        before = levels()
        assert before == (0, 0, 10, 0, 0)
        export = take("POST /exports")
        assert export.endswith(f".{member}") and levels() == (0, 0, 10, 1, 1)
        assert settle(export, org_key, outcome="failure").status_code == 403  # another billable's credentials
        assert settle(export, own, outcome="failure").status_code == 200
        assert levels() == before
        image = take("POST /images")
        assert levels() == (1, 1, 9, 0, 0)
        r = settle(image, own, outcome="failure")
        assert r.status_code == 200 and r.json()["balance"] == 10 and levels() == before
        chat = take("POST /chat")
        assert levels()[:3] == (5, 5, 5)  # the reserve, held at every level
        r = settle(chat, ADMIN_HEADERS, outcome="success", units=3)
        assert r.status_code == 200 and r.json()["balance"] == 7, r.text
        assert levels() == (3, 3, 7, 0, 0)
        assert settle(chat, own, outcome="success", units=3).status_code == 409  # once

        assert admin(a, "PUT", "/billables/team_b/parent", {"parent": "org_1"}).status_code == 200
        team_key = {"Authorization": f"Bearer {admin(a, 'POST', '/keys', {'billable': 'team_b'}).json()['key']}"}
        r = httpx.post(f"{a.url}/_gateway/check", json={"route": "POST /exports", "consume": True}, headers=team_key, timeout=30)
        assert r.json()["allowed"] and r.json()["hold"].endswith(".team_b") and levels()[4] == 1
        assert settle(r.json()["hold"], team_key, outcome="failure").status_code == 200
        assert levels() == (3, 3, 7, 0, 0)


def test_cli_keys_create_checks_seats_or_says_why_it_cannot(tmp_path: Path) -> None:
    """`gateway keys create` takes a seat as the admin API does (the org's plan read from the gateways'
    Redis): Free's 2 seats go to two keys of the org, the third is refused with the
    upgrade sentence and makes nothing; without GATEWAY_REDIS_URL it says it cannot check and makes nothing."""
    import os
    import subprocess

    from test_keys_cli import GATEWAY

    (tmp_path / "plans.toml").write_text(SEATS)

    def cli(*args: str, redis_url: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | ({"GATEWAY_REDIS_URL": redis_url} if redis_url else {})
        return subprocess.run([GATEWAY, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)

    with RedisServer() as redis:
        blind = cli("keys", "create", "org_1", redis_url=None)
        assert blind.returncode == 2 and "cannot check org_1's seats" in blind.stderr and "GATEWAY_REDIS_URL" in blind.stderr
        for _ in range(2):
            assert cli("keys", "create", "org_1", redis_url=redis.url).returncode == 0
        refused = cli("keys", "create", "org_1", redis_url=redis.url)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip() == ("gateway: no seat for a key of org_1: Your current plan (Free) includes 2 seats, all in use "
                                          "by org_1's keys. Upgrade to Pro for more seats, or revoke a key.")  # fmt: skip
        listed = cli("keys", "list", "org_1", redis_url=redis.url)
        assert len(listed.stdout.strip().splitlines()) == 1 + 2  # the header and the two keys


def test_simultaneous_creates_never_both_take_the_last_seat(empty_db_url: str) -> None:
    """Twelve creates at once for an org of 3 seats (its team's keys among them), each on its own
    connection: exactly 3 keys are made, the others refused NoSeat (on Postgres the org's advisory lock,
    on SQLite BEGIN IMMEDIATE)."""
    import asyncio

    from gateway.catalog import parse_catalog
    from gateway.identity import KeyStore
    from gateway.members import set_parent
    from gateway.seats import NoSeat, seat_taker, seats_used
    from gateway.store.db import Database

    catalog = parse_catalog(SEATS.replace("seats = { to = 2 }", "seats = { to = 3 }", 1))

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        await db.upgrade()
        try:
            await set_parent(db, "team_a", "org_1")
            keys = KeyStore(db)
            seat = seat_taker(db, catalog, "free", "org_1")

            async def one(i: int) -> bool:
                try:
                    await keys.create("team_a" if i % 2 else "org_1", f"k{i}", seat=seat)
                except NoSeat:
                    return False
                return True

            made = await asyncio.gather(*(one(i) for i in range(12)))
            async with db.engine.connect() as conn:
                assert sum(made) == 3 == await seats_used(conn, "org_1")
            await keys.close()
        finally:
            await db.close()

    asyncio.run(main())
