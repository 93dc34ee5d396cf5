"""The record: tables (SQLAlchemy Core), the async engine, and the schema's Alembic migrations.

    await Database.connect(url)                      an engine (asyncpg or aiosqlite); no I/O yet
    await Database.connect(url, auto_upgrade=True)   SQLite is migrated to the head; a Postgres behind is refused
    await db.upgrade()                               what `gateway db upgrade` runs
    async with db.engine.begin() as conn: ...        one record operation, under the deadline (below)

Every connection taken from `db.engine` or `db.reader` is one record operation with a deadline
(GATEWAY_DB_TIMEOUT, DESIGN §5): from its checkout to its return to the pool, nothing waits longer, and
every way the database fails to answer leaves it as DatabaseUnavailable naming the database.

The tables below are the one description of the schema; migrations under gateway/migrations create
them, and a test compares the two so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Dialect, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from gateway.errors import ConfigError, DatabaseUnavailable

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///gateway.db"
ACCEPTED = "postgresql://USER@HOST:PORT/DB or sqlite:///PATH"
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
DB_TIMEOUT_S = 5.0  # GATEWAY_DB_TIMEOUT's default
PING_TIMEOUT_S = 2.0
# Any constant will do: it only has to be the same in every gateway process.
_MIGRATION_LOCK = 0x6761746577617931

_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def database_url(url: str | None) -> str:
    """The SQLAlchemy URL (with the async driver) for a user's database URL; None means the embedded default."""
    text = (url or "").strip() or DEFAULT_URL
    try:
        parsed = make_url(text)
    except ArgumentError:
        raise ConfigError(f"database URL {text!r} is not a URL: use {ACCEPTED}") from None
    driver = _DRIVERS.get(parsed.drivername, parsed.drivername)
    if driver == "postgresql+asyncpg":
        if not parsed.host or not parsed.database:
            raise ConfigError(f"database URL {_shown(parsed)} names no host or database: use {ACCEPTED}")
    elif driver == "sqlite+aiosqlite":
        if not parsed.database or parsed.host:
            raise ConfigError(f"database URL {_shown(parsed)} names no file: use {ACCEPTED}")
    else:
        raise ConfigError(f"database URL {_shown(parsed)} is not supported: use {ACCEPTED}")
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def sqlite_path(url: str | None) -> Path | None:
    """The file of a SQLite record (None for Postgres or an in-memory SQLite)."""
    parsed = make_url(database_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _shown(url: URL) -> str:
    """The URL as the user would write it, without its password."""
    base = url.drivername.split("+")[0]
    return url.set(drivername="postgresql" if base == "postgres" else base).render_as_string(
        hide_password=True
    )


# ---- tables -------------------------------------------------------------------------------------------


class UTCDateTime(sa.TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite keeps no offset: it stores UTC and reads back UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the record keeps aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Deterministic constraint names, so later migrations can name what they alter on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING)
Text, Int, Time = sa.Text, sa.BigInteger, UTCDateTime
ZERO = sa.text("0")

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", Text, primary_key=True),
    sa.Column("billable", Text, nullable=False),
    sa.Column("name", Text, nullable=False, server_default=""),
    sa.Column("hash", Text, nullable=False, unique=True),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("last_used_at", Time),
    sa.Column("revoked_at", Time),
    sa.Index("ix_api_keys_billable", "billable"),
)

plan_assignments = sa.Table(
    "plan_assignments",
    metadata,
    sa.Column("billable", Text, primary_key=True),
    sa.Column("plan", Text, nullable=False),
    sa.Column("updated_at", Time, nullable=False),
)

stripe_customers = sa.Table(
    "stripe_customers",
    metadata,
    sa.Column("customer", Text, primary_key=True),
    sa.Column("billable", Text, nullable=False, unique=True),
)

subscriptions = sa.Table(
    "subscriptions",
    metadata,
    sa.Column("id", Text, primary_key=True),
    sa.Column("billable", Text),  # None until the customer maps to a billable
    sa.Column("customer", Text, nullable=False),
    sa.Column("plan", Text),  # None when the price is not in the catalog
    sa.Column("status", Text, nullable=False),
    sa.Column("current_period_start", Time),
    sa.Column("current_period_end", Time),
    sa.Column("cancel_at_period_end", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("past_due_since", Time),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("price", Text),  # the Stripe price of the item that names the plan
    sa.Column("trial_end", Time),
    sa.Index("ix_subscriptions_billable", "billable"),
)

credit_grants = sa.Table(
    "credit_grants",
    metadata,
    sa.Column("billable", Text, primary_key=True),
    sa.Column("seq", Int, primary_key=True, autoincrement=False),
    sa.Column("amount", Int, nullable=False),
    sa.Column("reason", Text, nullable=False, server_default=""),
    sa.Column("idempotency_key", Text, nullable=False, unique=True),
    sa.Column("amount_cents", Int, nullable=False, server_default=ZERO),
    sa.Column("source", Text, nullable=False),
    sa.Column("created_at", Time, nullable=False),
    sa.Column("applied_at", Time),  # None until Redis holds it
    sa.Index("ix_credit_grants_billable_applied_at", "billable", "applied_at"),
)

grant_sequences = sa.Table(
    "grant_sequences",
    metadata,
    sa.Column("billable", Text, primary_key=True),
    sa.Column("last_seq", Int, nullable=False, server_default=ZERO),
)

snapshots = sa.Table(
    "snapshots",
    metadata,
    sa.Column("billable", Text, primary_key=True),
    sa.Column("state", Text, nullable=False),  # JSON
    sa.Column("chg", Int, nullable=False, server_default=ZERO),
    sa.Column("updated_at", Time, nullable=False),
    sa.Column("members", Text),  # JSON {member: its state hash}: read and restored with the state (Snapshot.members)
)

usage_totals = sa.Table(
    "usage_totals",
    metadata,
    sa.Column("billable", Text, primary_key=True),
    sa.Column("period", Text, primary_key=True),  # 2026-11
    sa.Column("route", Text, primary_key=True),
    sa.Column("operation", Text, primary_key=True),  # "" when the route spends nothing
    sa.Column("requests", Int, nullable=False, server_default=ZERO),
    sa.Column("units", Int, nullable=False, server_default=ZERO),
    sa.Column("credits", Int, nullable=False, server_default=ZERO),
    sa.Column("amount_cents", Int, nullable=False, server_default=ZERO),
    sa.Column("shadow_denials", Int, nullable=False, server_default=ZERO),  # admitted in shadow, would have been denied
)

usage_daily = sa.Table(
    "usage_daily",
    metadata,
    sa.Column("billable", Text, primary_key=True),
    sa.Column("day", Text, primary_key=True),  # 2026-11-30, in the catalog's timezone at the flush
    sa.Column("route", Text, primary_key=True),
    sa.Column("operation", Text, primary_key=True),
    sa.Column("requests", Int, nullable=False, server_default=ZERO),
    sa.Column("units", Int, nullable=False, server_default=ZERO),
    sa.Column("credits", Int, nullable=False, server_default=ZERO),
)

events_outbox = sa.Table(
    "events_outbox",
    metadata,
    sa.Column("id", Text, primary_key=True),
    sa.Column("billable", Text, nullable=False),
    sa.Column("type", Text, nullable=False),
    sa.Column("body", Text, nullable=False),  # JSON, exactly as signed and sent
    sa.Column("created_at", Time, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=ZERO),
    sa.Column("next_attempt_at", Time, nullable=False),
    sa.Column("delivered_at", Time),
    sa.Column("dead_at", Time),
    sa.Column("last_error", Text),
)
_UNDELIVERED = sa.and_(events_outbox.c.delivered_at.is_(None), events_outbox.c.dead_at.is_(None))
sa.Index(
    "ix_events_outbox_due",
    events_outbox.c.next_attempt_at,
    postgresql_where=_UNDELIVERED,
    sqlite_where=_UNDELIVERED,
)

# Billed units (overage, pay-as-you-go; gateway/billing/outbox.py): each meter's absolute count per window
# as the record last took it from the state, and the increases, per (billable, meter, minute of the flush),
# waiting to be sent to Stripe as one meter event each (gateway/billing/meters.py).
meter_totals = sa.Table(
    "meter_totals",
    metadata,
    sa.Column("billable", Text, primary_key=True),
    sa.Column("meter", Text, primary_key=True),
    sa.Column("window", Int, primary_key=True, autoincrement=False),  # the counting window's start (ms)
    sa.Column("units", Int, nullable=False, server_default=ZERO),
)

meter_outbox = sa.Table(
    "meter_outbox",
    metadata,
    sa.Column("billable", Text, primary_key=True),
    sa.Column("meter", Text, primary_key=True),
    sa.Column("minute", Int, primary_key=True, autoincrement=False),  # unix seconds, a multiple of 60
    sa.Column("units", Int, nullable=False, server_default=ZERO),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=ZERO),
    sa.Column("next_attempt_at", Time, nullable=False),
    sa.Column("sent_at", Time),
    sa.Column("last_error", Text),
)
_UNSENT = meter_outbox.c.sent_at.is_(None)
sa.Index("ix_meter_outbox_due", meter_outbox.c.next_attempt_at, postgresql_where=_UNSENT, sqlite_where=_UNSENT)

stripe_events = sa.Table(
    "stripe_events",
    metadata,
    sa.Column("id", Text, primary_key=True),
    sa.Column("type", Text, nullable=False),
    sa.Column("processed_at", Time, nullable=False),
    sa.Column("billable", Text),  # whose state the event changed: a redelivery re-applies it to Redis
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", Text, primary_key=True),
    sa.Column("value", Text, nullable=False),
)

catalog_versions = sa.Table(
    "catalog_versions",
    metadata,
    sa.Column("version", Int, primary_key=True, autoincrement=False),
    sa.Column("text", Text, nullable=False),  # the plans.toml as published
    sa.Column("sha256", Text, nullable=False),  # of the text's UTF-8 bytes
    sa.Column("published_at", Time, nullable=False),
    sa.Column("token", Text, nullable=False),  # the name of the token that published it
)

billable_overrides = sa.Table(
    "billable_overrides",
    metadata,
    sa.Column("billable", Text, primary_key=True),
    sa.Column("overrides", Text),  # JSON (gateway.overrides), None for none
    sa.Column("expires_at", Time),  # the overrides' own expiry, for queries
    sa.Column("suspension", Text),  # the reason, None when not suspended
    sa.Column("suspended_at", Time),
    sa.Column("updated_at", Time, nullable=False),
)

billable_members = sa.Table(
    "billable_members",
    metadata,
    sa.Column("billable", Text, primary_key=True),  # a team, or a key's member id (gateway.members.key_member)
    sa.Column("parent", Text, nullable=False),
    sa.Column("terms", Text),  # JSON (gateway.terms), None for none
    sa.Column("updated_at", Time, nullable=False),
    sa.Index("ix_billable_members_parent", "parent"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", Int().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("at", Time, nullable=False),
    sa.Column("token", Text, nullable=False),
    sa.Column("action", Text, nullable=False),
    sa.Column("billable", Text),  # None for changes of no one billable (a catalog)
    sa.Column("before", Text),  # JSON
    sa.Column("after", Text),  # JSON
    sa.Index("ix_audit_log_billable_at", "billable", "at"),
    sa.Index("ix_audit_log_at", "at"),
)


# ---- the deadline of a record operation ---------------------------------------------------------------


@contextmanager
def answering(shown: str, deadline: float | None = None, *, undone: str = "") -> Iterator[None]:
    """The one map from "the database did not answer" (a deadline, a socket, a driver's error) to
    DatabaseUnavailable, naming the database and the reason. A conflict (IntegrityError) is the caller's.

    Every connection of a `Database` runs under it; a caller wraps an operation again to say what the
    outage left `undone` ("the grant was not made")."""
    more = f"; {undone}" if undone else ""
    try:
        yield
    except IntegrityError:
        raise
    except DatabaseUnavailable as exc:
        if not more:
            raise
        raise exc.also(more) from exc.__cause__
    except TimeoutError as exc:  # the deadline (asyncio's is the builtin), or the driver's own
        within = f"within {deadline:g} s (GATEWAY_DB_TIMEOUT)" if deadline is not None else "in time"
        raise DatabaseUnavailable(f"the database at {shown} did not answer {within}{more}", url=shown, reason=within) from exc
    except (DBAPIError, PoolTimeout, DisconnectionError, OSError) as exc:
        reason = _reason(exc)
        raise DatabaseUnavailable(f"the database at {shown} did not answer: {reason}{more}", url=shown, reason=reason) from exc


def _reason(exc: BaseException) -> str:
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__


class _Operation(AsyncConnection):
    """A pooled connection whose use, from checkout to its return, is one record operation: under the
    engine's deadline, and answering as DatabaseUnavailable when the database does not."""

    async def __aenter__(self) -> Self:
        self._scope = self._bounded()
        return await self._scope.__aenter__()

    async def __aexit__(
        self, type_: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self._scope.__aexit__(type_, value, traceback)  # never swallows: the operation's error is raised

    @asynccontextmanager
    async def _bounded(self) -> AsyncIterator[Self]:
        engine = self.engine
        assert isinstance(engine, _Engine)
        with answering(engine.shown, engine.deadline):
            # The deadline cancels whatever waits: the pool, a connect, the check on checkout, a statement.
            # A connection abandoned that way is invalidated, and so cut (see _cut_on_invalidate).
            deadline = asyncio.timeout(engine.deadline)
            try:
                async with deadline:
                    await self.start(is_ctxmanager=True)
                    # A connection's return to the pool (its rollback) runs to completion whatever cancels
                    # it: at the deadline its socket is cut, so a server that stopped answering cannot hold it.
                    when = deadline.when()
                    cut = None if when is None else asyncio.get_running_loop().call_at(when, _cut, self)
                    try:
                        yield self
                    finally:
                        try:
                            await AsyncConnection.__aexit__(self, None, None, None)
                        finally:
                            if cut is not None:
                                cut.cancel()
            except (DBAPIError, OSError) as exc:
                if deadline.expired():
                    raise TimeoutError("cut at the deadline") from exc
                raise


class _Engine(AsyncEngine):
    """An AsyncEngine whose connections are record operations under `deadline` seconds (None: the
    driver's own bound, SQLite's busy timeout: a statement running in aiosqlite's thread cannot be abandoned)."""

    _connection_cls = _Operation

    def __init__(self, engine: AsyncEngine, shown: str, deadline: float | None) -> None:
        super().__init__(engine.sync_engine)
        self.shown = shown
        self.deadline = deadline


def _cut(conn: AsyncConnection) -> None:
    """Close the driver's socket at once: no goodbye to a server that may never read it."""
    sync = conn.sync_connection
    if sync is not None and not sync.closed and not sync.invalidated:
        _terminate(sync.connection.driver_connection)


def _terminate(driver: Any) -> None:
    terminate = getattr(driver, "terminate", None)  # asyncpg's: closes the transport without waiting
    if terminate is not None:
        terminate()


def _cut_on_invalidate(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "invalidate")
    def _on_invalidate(dbapi_connection: Any, _record: Any, _exc: Any) -> None:
        # SQLAlchemy closes an invalidated connection gracefully, waiting up to 2 s for a server that may
        # not answer (and longer when a cancel of the statement is pending): cut it first.
        _terminate(dbapi_connection.driver_connection)


# ---- the database -------------------------------------------------------------------------------------


class Database:
    """Async engines over the record (every connection a record operation, see the module), and the schema."""

    def __init__(self, engine: AsyncEngine, url: URL, reader: AsyncEngine | None = None, timeout: float = DB_TIMEOUT_S) -> None:
        self.engine = engine
        self.timeout = timeout  # the deadline of one record operation (GATEWAY_DB_TIMEOUT)
        # Reads on the request path (restores, key lookups) use `reader`: on SQLite its transactions
        # begin DEFERRED, so WAL lets them run beside a flush instead of queueing for the write lock.
        self.reader = reader or engine
        self.url = url
        self.is_sqlite = url.get_backend_name() == "sqlite"
        self.shown = _shown(url)

    @classmethod
    async def connect(
        cls, url: str | None = None, *, auto_upgrade: bool = False, timeout: float = DB_TIMEOUT_S
    ) -> Database:
        """Engines for the URL, each operation under `timeout` seconds; no I/O unless `auto_upgrade`, which
        upgrades SQLite and checks a Postgres."""
        parsed = make_url(database_url(url))
        shown = _shown(parsed)
        reader = None
        if parsed.get_backend_name() == "sqlite":
            engine = _Engine(create_async_engine(parsed), shown, None)
            _configure_sqlite(engine, busy_timeout=timeout)
            reader = _Engine(create_async_engine(parsed), shown, None)
            _configure_sqlite(reader, busy_timeout=timeout, immediate=False)
        else:
            # A Postgres restart leaves dead pooled connections: check each on checkout rather than fail a request.
            created = create_async_engine(parsed, pool_pre_ping=True, connect_args={"timeout": timeout})
            engine = _Engine(created, shown, timeout)
            _cut_on_invalidate(engine)
        db = cls(engine, parsed, reader, timeout)
        if auto_upgrade:
            try:
                if db.is_sqlite:
                    await db.upgrade()
                else:
                    await db.check_current()
            except BaseException:
                await db.close()
                raise
        return db

    async def close(self) -> None:
        await self.engine.dispose()
        if self.reader is not self.engine:
            await self.reader.dispose()

    async def ping(self) -> bool:
        """True when the database answers a trivial query within a short timeout; never raises."""
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                async with self.engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - health reports any failure as "down"
            return False

    def insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        """The backend's INSERT, which has `on_conflict_do_nothing` / `on_conflict_do_update` on both."""
        return sqlite.insert(table) if self.is_sqlite else postgresql.insert(table)

    # ---- schema ---------------------------------------------------------------------------------------

    @staticmethod
    def head() -> str:
        """The revision this gateway's code needs."""
        head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
        assert head is not None, "gateway/migrations holds no revision"
        return head

    async def revision(self) -> str | None:
        """The database's current revision; None for an empty database."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(_current_revision)

    async def upgrade(self) -> None:
        """Run every migration up to the head, in one transaction where the backend allows.

        Not a record operation: a migration (or waiting for another process's) may take longer than the deadline."""
        with answering(self.shown):
            async with AsyncEngine(self.engine.sync_engine).begin() as conn:
                if not self.is_sqlite:
                    # Two processes upgrading at once: the second waits, then finds nothing to do.
                    await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
                before = await conn.run_sync(_current_revision)
                await conn.run_sync(_upgrade_to_head)
                after = await conn.run_sync(_current_revision)
        if before != after:
            log.info("database %s upgraded from %s to %s", self.shown, before or "base", after)

    async def check_current(self) -> None:
        """Raise ConfigError unless the database is at the head revision this gateway needs."""
        current, head = await self.revision(), self.head()
        if current == head:
            return
        try:
            if current is not None:
                ScriptDirectory.from_config(_alembic_config()).get_revision(current)
        except CommandError:
            raise ConfigError(
                f"the database at {self.shown} is at revision {current}, which this gateway does not know "
                f"(a newer gateway migrated it); this gateway needs {head}: upgrade the gateway"
            ) from None
        raise ConfigError(
            f"the database at {self.shown} is at revision {current or 'base (empty)'}, the gateway needs {head}: "
            "run `gateway db upgrade`"
        )


def _configure_sqlite(engine: AsyncEngine, *, busy_timeout: float, immediate: bool = True) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy, not the driver, begins transactions (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # SQLite does not answer only while another connection holds the write lock: this bounds the wait.
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock at BEGIN, waiting up to the busy timeout: code written for
        # Postgres (SELECT ... FOR UPDATE, then UPDATE) is then serialized too, instead of failing with
        # "database is locked" when two transactions that both read try to write. DDL becomes
        # transactional as well, so a migration applies whole or not at all.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# ---- Alembic, run on a connection we already hold --------------------------------------------------------


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config(attributes={"connection": connection} if connection is not None else {})
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    return config


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade_to_head(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")
