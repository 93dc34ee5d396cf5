"""API keys while the record is down (DESIGN §5): decisions go on for the keys a process knows; a key it has
never seen cannot be checked, and gets 503 `urn:gateway:unavailable`, never a 500 or a 401 (the key may well
be valid: the client should retry, not throw it away). A malformed key is still 401: it needs no I/O.

The record is a private Postgres that the tests stop; Redis is real (the shared one under the test's own
prefix, or a private server for `gateway serve`'s app, whose keys have the default prefix).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from engine_support import BASE
from http_servers import serve_in_thread
from services import PostgresServer, RedisServer, RedisSpace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from waiting import wait_until

from gateway.app import GatewayApp
from gateway.catalog import parse_catalog
from gateway.identity import TTL_S, KeyStore
from gateway.middleware import GatewayMiddleware
from gateway.settings import Settings
from gateway.store.db import Database

ADMIN = "admin-secret-for-tests"
NEVER_ISSUED = "gw_AbCdEf012345_0123456789abcdefghijABCDEFGHIJ01"  # well-formed, in no record


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A Postgres of our own: these tests stop and start it."""
    with PostgresServer() as server:
        yield server


async def _fresh_schema(url: str) -> None:
    db = await Database.connect(url)
    try:
        async with db.engine.begin() as conn:
            await conn.exec_driver_sql("DROP SCHEMA public CASCADE")
            await conn.exec_driver_sql("CREATE SCHEMA public")
        await db.upgrade()
    finally:
        await db.close()


def record(pg: PostgresServer) -> str:
    """The private server running, its schema empty and migrated."""
    pg.start()
    asyncio.run(_fresh_schema(pg.url))
    return pg.url


async def echo(request: Request) -> Response:
    return JSONResponse({"billable": request.headers.get("x-billable-id")})


def upstream() -> Starlette:
    return Starlette(routes=[Route("/{rest:path}", echo, methods=["GET", "POST"])])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_known_key_works_from_memory_and_an_unseen_key_is_503(pg: PostgresServer, redis_space: RedisSpace) -> None:
    """With the record stopped, a key this process checked before works past its TTL (the record cannot be
    asked, so what the process last knew stands); one it never checked, issued or not, is 503; a malformed one
    401. With the record back, the unseen key works."""
    url = record(pg)
    now = [1000.0]

    async def main() -> None:
        db = await Database.connect(url)
        keys = KeyStore(db, clock=lambda: now[0])
        engine = redis_space.engine(parse_catalog(BASE))
        app = GatewayMiddleware(upstream(), engine=engine, keys=keys)
        try:
            known = await keys.create("org-known", "ci")
            unseen = await keys.create("org-unseen", "ci")  # issued, never used through this process
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
                first = await client.get("/v1/x", headers=bearer(known.key))
                assert first.status_code == 200 and first.json() == {"billable": "org-known"}

                pg.stop()
                now[0] += TTL_S + 1  # past the TTL: the process asks the record, which does not answer
                again = await client.get("/v1/x", headers=bearer(known.key))
                assert again.status_code == 200 and again.json() == {"billable": "org-known"}
                for key in (unseen.key, NEVER_ISSUED):
                    r = await client.get("/v1/x", headers=bearer(key))
                    assert r.status_code == 503, r.text
                    assert r.headers["content-type"] == "application/problem+json"
                    assert r.json()["type"] == "urn:gateway:unavailable"
                malformed = await client.get("/v1/x", headers=bearer("gw_short"))
                assert malformed.status_code == 401 and malformed.json()["type"] == "urn:gateway:unauthorized"

                pg.start()
                now[0] += 2  # past the pause after a failure, during which the record is not asked again
                back = await client.get("/v1/x", headers=bearer(unseen.key))
                assert back.status_code == 200 and back.json() == {"billable": "org-unseen"}
                assert (await client.get("/v1/x", headers=bearer(NEVER_ISSUED))).status_code == 401
        finally:
            pg.start()
            await keys.close()
            await engine.store.close()
            await db.close()

    asyncio.run(main())


def test_the_running_gateway_keeps_serving_known_keys_with_the_record_stopped(
    tmp_path: Path, pg: PostgresServer, private_redis: RedisServer
) -> None:
    """`gateway serve` over HTTP, Postgres stopped: the key in use keeps working, a key issued meanwhile by
    another process (this one never saw it) is 503 problem+json, and health says the database is down; once
    Postgres is back that key works."""
    url = record(pg)
    plans = tmp_path / "plans.toml"
    plans.write_text(BASE)
    admin = {"Authorization": f"Bearer {ADMIN}"}

    async def issue(billable: str) -> str:
        """A key created through another process (the CLI, another gateway) straight in the record."""
        db = await Database.connect(url)
        keys = KeyStore(db)
        try:
            return (await keys.create(billable, "ci")).key
        finally:
            await keys.close()
            await db.close()

    with serve_in_thread(upstream()) as upstream_url:
        settings = Settings(plans=str(plans), upstream=upstream_url, redis_url=private_redis.url, database_url=url,
                            admin_token=ADMIN)  # fmt: skip
        with serve_in_thread(GatewayApp(settings)) as gw:
            created = httpx.post(f"{gw}/_gateway/admin/keys", json={"billable": "org-live", "name": "ci"}, headers=admin)
            assert created.status_code == 201, created.text
            live = created.json()["key"]
            assert httpx.get(f"{gw}/v1/x", headers=bearer(live)).json() == {"billable": "org-live"}
            later = asyncio.run(issue("org-later"))
            pg.stop()
            try:
                for _ in range(3):
                    r = httpx.get(f"{gw}/v1/x", headers=bearer(live))
                    assert r.status_code == 200 and r.json() == {"billable": "org-live"}
                refused = httpx.get(f"{gw}/v1/x", headers=bearer(later))
                assert refused.status_code == 503, refused.text
                assert refused.headers["content-type"] == "application/problem+json"
                assert refused.json()["type"] == "urn:gateway:unavailable"
                wait_until(lambda: httpx.get(f"{gw}/_gateway/health", headers=admin).json()["database"] == "down",
                           "health to say the database is down")
            finally:
                pg.start()

            def checked() -> httpx.Response | None:
                r = httpx.get(f"{gw}/v1/x", headers=bearer(later))
                return r if r.status_code == 200 else None

            back = wait_until(checked, "the key issued meanwhile to be checked against the record")
            assert back.json() == {"billable": "org-later"}
