from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from services import free_port
from sqlalchemy.engine import Connection

from gateway.errors import ConfigError, DatabaseUnavailable
from gateway.store import db as tables
from gateway.store.db import Database, _alembic_config, database_url, metadata

T = TypeVar("T")


def go(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def unreachable_postgres() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"


async def table_names(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


# ---- URLs ---------------------------------------------------------------------------------------------


def test_database_url_picks_the_async_driver() -> None:
    """The two accepted forms gain their async driver; no URL means the embedded default."""
    assert (
        database_url("postgresql://gw@db.internal:5432/gateway")
        == "postgresql+asyncpg://gw@db.internal:5432/gateway"
    )
    assert (
        database_url("postgres://gw:s3cret@db:5432/gateway")
        == "postgresql+asyncpg://gw:s3cret@db:5432/gateway"
    )
    assert database_url("sqlite:///gateway.db") == "sqlite+aiosqlite:///gateway.db"
    assert (
        database_url("sqlite:////var/lib/gateway/gateway.db")
        == "sqlite+aiosqlite:////var/lib/gateway/gateway.db"
    )
    assert database_url(None) == database_url("") == "sqlite+aiosqlite:///gateway.db"
    assert database_url(database_url("postgresql://gw@db:5432/g")) == "postgresql+asyncpg://gw@db:5432/g"


@pytest.mark.parametrize(
    "url",
    [
        "mysql://gw@db:3306/gateway",
        "postgresql+psycopg2://gw@db:5432/gateway",
        "postgresql://gw@db:5432",
        "postgresql:///gateway",
        "sqlite://",
        "sqlite://host/gateway.db",
        "redis://127.0.0.1:6379/0",
        "gateway.db",
        "not a url at all",
    ],
)
def test_database_url_refuses_anything_else(url: str) -> None:
    """Any other URL is a ConfigError naming both accepted forms."""
    with pytest.raises(ConfigError) as caught:
        database_url(url)
    assert "postgresql://USER@HOST:PORT/DB or sqlite:///PATH" in str(caught.value)


def test_a_refused_url_does_not_show_its_password() -> None:
    """The error quotes the URL without the password in it."""
    with pytest.raises(ConfigError) as caught:
        database_url("mysql://gw:hunter2@db:3306/gateway")
    assert "hunter2" not in str(caught.value) and "mysql://gw:***@db:3306/gateway" in str(caught.value)


# ---- schema ---------------------------------------------------------------------------------------------


def test_upgrade_from_empty_creates_every_table(empty_db_url: str) -> None:
    """`upgrade` brings an empty database to the head revision with every table; running it again does nothing."""

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        try:
            assert await db.revision() is None
            await db.upgrade()
            assert await db.revision() == db.head() == "0010_member_state"
            assert await table_names(db) == set(metadata.tables) | {"alembic_version"}
            await db.upgrade()
            await db.check_current()
        finally:
            await db.close()

    go(main())


def test_the_migrations_build_exactly_the_tables(empty_db_url: str) -> None:
    """The schema the migrations build matches `metadata`, column types and indexes included."""

    def compare(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        try:
            await db.upgrade()
            async with db.engine.connect() as conn:
                assert await conn.run_sync(compare) == []
        finally:
            await db.close()

    go(main())


def test_concurrent_upgrades_both_succeed(empty_db_url: str) -> None:
    """Two processes upgrading the same empty database at once: one migrates, the other waits and finds it done."""

    async def main() -> None:
        a, b = await Database.connect(empty_db_url), await Database.connect(empty_db_url)
        try:
            await asyncio.gather(a.upgrade(), b.upgrade())
            assert await a.revision() == await b.revision() == Database.head()
        finally:
            await a.close()
            await b.close()

    go(main())


def test_a_postgres_behind_is_refused(pg_url: str) -> None:
    """A Postgres without the schema, or stamped at base, is refused with the hint; nothing is created in it."""
    url = pg_url

    def stamp_base(conn: Connection) -> None:
        command.stamp(_alembic_config(conn), "base")

    async def main() -> None:
        admin = await Database.connect(url)
        try:
            async with admin.engine.begin() as conn:
                await conn.execute(sa.text("DROP SCHEMA public CASCADE"))
                await conn.execute(sa.text("CREATE SCHEMA public"))
            shown = url
            expected = (
                f"the database at {shown} is at revision base (empty), the gateway needs {Database.head()}: "
                "run `gateway db upgrade`"
            )
            with pytest.raises(ConfigError) as caught:
                await Database.connect(url, auto_upgrade=True)
            assert str(caught.value) == expected
            assert await table_names(admin) == set()

            async with admin.engine.begin() as conn:
                await conn.run_sync(stamp_base)
            assert await table_names(admin) == {"alembic_version"}
            with pytest.raises(ConfigError) as caught:
                await admin.check_current()
            assert str(caught.value) == expected

            await admin.upgrade()  # what `gateway db upgrade` does
            ready = await Database.connect(url, auto_upgrade=True)
            await ready.close()
        finally:
            await admin.close()

    go(main())


def test_a_database_from_a_newer_gateway_is_refused(empty_db_url: str) -> None:
    """A revision this gateway does not know means a newer gateway migrated it: the hint says so."""

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        try:
            await db.upgrade()
            async with db.engine.begin() as conn:
                await conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099_future'"))
            with pytest.raises(
                ConfigError, match="is at revision 0099_future, which this gateway does not know"
            ):
                await db.check_current()
        finally:
            await db.close()

    go(main())


def test_the_embedded_sqlite_file_is_upgraded_automatically(tmp_path: Path) -> None:
    """`connect(auto_upgrade=True)` creates and migrates the SQLite file, in WAL mode with foreign keys and a busy timeout."""
    path = tmp_path / "sub" / "gateway.db"
    path.parent.mkdir()

    async def main() -> None:
        behind = await Database.connect(f"sqlite:///{path}")
        with pytest.raises(ConfigError, match="run `gateway db upgrade`"):
            await behind.check_current()
        await behind.close()

        db = await Database.connect(f"sqlite:///{path}", auto_upgrade=True)
        try:
            await db.check_current()
            assert set(metadata.tables) <= await table_names(db)
            async with db.engine.connect() as conn:
                pragma = {
                    name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
                    for name in ("journal_mode", "foreign_keys", "busy_timeout")
                }
            assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 5000}
        finally:
            await db.close()

    go(main())
    assert path.exists()


# ---- the engine -------------------------------------------------------------------------------------------


def test_ping_answers_and_never_raises(empty_db_url: str, tmp_path: Path) -> None:
    """ping is True on a live database and False, quickly, on an unreachable one."""

    async def main() -> None:
        live = await Database.connect(empty_db_url)
        assert await live.ping()
        await live.close()
        for url in (unreachable_postgres(), f"sqlite:///{tmp_path}/missing/dir/gateway.db"):
            # No I/O yet: connect without auto_upgrade never fails on a dead database.
            dead = await Database.connect(url)
            started = time.monotonic()
            assert await dead.ping() is False
            assert time.monotonic() - started < 3
            with pytest.raises(DatabaseUnavailable, match="did not answer"):
                await dead.revision()
            await dead.close()
        # aiosqlite stops the thread of a connection that failed to open without awaiting it: give it
        # time to finish before asyncio.run closes the loop it reports to.
        await asyncio.sleep(0.1)

    go(main())


def test_times_are_aware_utc_on_every_backend(empty_db_url: str) -> None:
    """A time written in any zone reads back as the same instant in UTC; a naive time is refused."""
    written = datetime(2026, 11, 3, 9, 30, 15, 123456, tzinfo=timezone(timedelta(hours=-5)))

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        try:
            await db.upgrade()
            async with db.engine.begin() as conn:
                await conn.execute(
                    tables.plan_assignments.insert().values(billable="org_1", plan="pro", updated_at=written)
                )
            async with db.engine.connect() as conn:
                read = (await conn.execute(sa.select(tables.plan_assignments.c.updated_at))).scalar_one()
            assert read == written and read.tzinfo == UTC
            with pytest.raises(sa.exc.StatementError, match="naive datetime"):
                async with db.engine.begin() as conn:
                    await conn.execute(
                        tables.plan_assignments.insert().values(
                            billable="org_2", plan="pro", updated_at=datetime(2026, 1, 1)
                        )
                    )
        finally:
            await db.close()

    go(main())


def test_read_then_write_transactions_serialize(empty_db_url: str) -> None:
    """SELECT ... FOR UPDATE then UPDATE from many connections at once loses no update, on SQLite too."""
    seqs = tables.grant_sequences

    async def bump(db: Database) -> None:
        async with db.engine.begin() as conn:
            query = sa.select(seqs.c.last_seq).where(seqs.c.billable == "org_1").with_for_update()
            last = (await conn.execute(query)).scalar_one()
            await asyncio.sleep(0.01)  # let the others try to read the same value meanwhile
            await conn.execute(seqs.update().where(seqs.c.billable == "org_1").values(last_seq=last + 1))

    async def main() -> None:
        a, b = await Database.connect(empty_db_url), await Database.connect(empty_db_url)
        try:
            await a.upgrade()
            async with a.engine.begin() as conn:
                await conn.execute(seqs.insert().values(billable="org_1", last_seq=0))
            await asyncio.gather(*(bump(db) for db in (a, b) * 5))
            async with a.engine.connect() as conn:
                assert (await conn.execute(sa.select(seqs.c.last_seq))).scalar_one() == 10
        finally:
            await a.close()
            await b.close()

    go(main())


def test_insert_offers_on_conflict_on_both_backends(empty_db_url: str) -> None:
    """`Database.insert` is the backend's INSERT, so an idempotent upsert reads the same everywhere."""
    totals = tables.usage_totals

    async def main() -> None:
        db = await Database.connect(empty_db_url)
        try:
            await db.upgrade()
            for requests in (3, 5):
                row = {
                    "billable": "org_1",
                    "period": "2026-11",
                    "route": "POST /v1/x",
                    "operation": "",
                    "requests": requests,
                }
                insert = db.insert(totals).values(**row)
                upsert = insert.on_conflict_do_update(
                    index_elements=["billable", "period", "route", "operation"],
                    set_={"requests": insert.excluded.requests},
                )
                async with db.engine.begin() as conn:
                    await conn.execute(upsert)
            async with db.engine.connect() as conn:
                assert (await conn.execute(sa.select(totals.c.requests, totals.c.units))).one() == (5, 0)
        finally:
            await db.close()

    go(main())
