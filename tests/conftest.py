from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import pytest
import redis
from services import RedisCluster, RedisServer, RedisSpace, delete_prefix, shared_redis_url


@pytest.fixture(scope="session")
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of our own: tests may flush, stop and restart it."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private 3-master Redis Cluster (about 2 s to start: Redis waits before a master turns writable)."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def key_prefix() -> Iterator[str]:
    """A unique string for this run's keys on the shared Redis; they are deleted at session end."""
    prefix = f"gwt{secrets.token_hex(5)}"
    yield prefix
    with contextlib.suppress(redis.RedisError):  # the shared Redis is gone: nothing of ours is left on it
        delete_prefix(shared_redis_url(), prefix)


@pytest.fixture
def redis_space(key_prefix: str) -> Iterator[RedisSpace]:
    """The shared Redis under a key prefix of this test's own; the test's keys are deleted when it ends.

    For a test that must flush, stop or restart Redis, use `private_redis` (or a RedisServer of its own)."""
    space = RedisSpace(shared_redis_url(), f"{key_prefix}{secrets.token_hex(4)}")
    yield space
    with contextlib.suppress(redis.RedisError):  # the shared Redis is gone: nothing of ours is left on it
        delete_prefix(shared_redis_url(), space.prefix)


# ---- Postgres: a private database per test run on the shared server ---------------------------------------

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_admin_url() -> str:
    import os

    return os.environ.get("GATEWAY_TEST_POSTGRES_URL", PG_ADMIN_URL)


def _pg_execute(url: str, sql: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of our own (gwt_<hex>) on the shared Postgres, created for this run and dropped after it."""
    import os

    from sqlalchemy.engine import make_url

    admin = _pg_admin_url()
    name = f"gwt_{secrets.token_hex(6)}"
    try:
        _pg_execute(admin, f'CREATE DATABASE "{name}"')
    except Exception as exc:  # noqa: BLE001 - whatever stops us, CI must fail and a laptop may skip
        message = f"Postgres at {admin} unavailable: {type(exc).__name__}: {exc}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE ends connections a failed test left open: they can only be ours, to our database.
        _pg_execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """An empty database on each backend: a new SQLite file, or this run's Postgres database emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gateway.db"
    url: str = request.getfixturevalue("pg_url")
    _pg_execute(url, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    return url
