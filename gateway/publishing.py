"""Published catalogs: every version in the record, the newest announced on Redis, followed by every process.

    catalogs = Catalogs(db, store)
    running = await catalogs.start_with(catalog, text)   the newest in the record (`text` is published when none)
    catalogs.start(on_change=run_it)                     follow the announcement, about once a second
    published, changed = await catalogs.publish(text, token="ops")

Publishing writes the record first (the version, its text and sha256, with its audit entry, in one
transaction), then raises `<prefix>:catalog` (a hash; `v` the version) on Redis. Each process polls that
one field in the background (no cost on a request); a newer version is read from the record, loaded, and
swapped in between requests. A text identical to the newest version is no new version.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from gateway import audit, state
from gateway.background import Background
from gateway.catalog import Catalog, parse_catalog
from gateway.errors import (
    CatalogError,
    DatabaseUnavailable,
    PlansInUse,
    Problem,
    RedisUnavailable,
    StateUnavailable,
)
from gateway.store.db import Database, catalog_versions, plan_assignments, subscriptions
from gateway.store.redis import RedisStore

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Published:
    version: int
    sha256: str
    published_at: datetime
    token: str
    catalog: Catalog

    def describe(self) -> dict[str, Any]:
        """What GET /_gateway/admin/catalog answers."""
        return {
            "version": self.version,
            "sha256": self.sha256,
            "published_at": self.published_at.isoformat().replace("+00:00", "Z"),
            "plans": list(self.catalog.plans),
        }


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_of(version: int) -> str:
    return f"catalog version {version}"


class Catalogs:
    def __init__(
        self,
        db: Database,
        store: RedisStore,
        *,
        prefix: str = state.PREFIX,
        interval: float = POLL_INTERVAL_S,
    ) -> None:
        self.db = db
        self.store = store
        self.key = state.catalog_key(prefix)
        self.on_change: Callable[[Published], None] | None = None  # given by start: what runs a new version
        self.interval = interval
        self.running: Published | None = None  # what this process decides with
        self._following = Background("gateway-catalog")
        self._refused = 0  # a published version this process cannot load: said once, not every second

    # ---- the record -----------------------------------------------------------------------------------

    async def newest(self) -> Published | None:
        return await self._read(sa.select(catalog_versions).order_by(catalog_versions.c.version.desc()).limit(1))

    async def version(self, version: int) -> Published | None:
        return await self._read(sa.select(catalog_versions).where(catalog_versions.c.version == version))

    async def _read(self, query: sa.Select[Any]) -> Published | None:
        async with self.db.reader.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        catalog = parse_catalog(row.text, source_of(row.version))
        return Published(row.version, row.sha256, row.published_at, row.token, catalog)

    async def publish(self, text: str, *, token: str, catalog: Catalog | None = None) -> tuple[Published, bool]:
        """Record `text` as the next version (CatalogError, and nothing recorded, when it does not load),
        announce it, and run it here. `changed` is False when it is the newest version's text already.

        RedisUnavailable when the announcement failed: the record has the version (publishing again
        announces it), this process runs it, and others run it when they next start."""
        loaded = catalog or parse_catalog(text, "the published catalog")
        digest = sha256(text)
        for _ in range(10):  # another publisher took the version number: the next one
            try:
                published, changed = await self._record(text, digest, token, loaded)
                break
            except IntegrityError:
                continue
        else:
            raise DatabaseUnavailable("the record kept refusing a new catalog version (too many publishers at once?)")
        self._use(published)
        await self.store.run("catalog", [self.key], state.announce_argv(published.version))
        return published, changed

    async def _record(self, text: str, digest: str, token: str, catalog: Catalog) -> tuple[Published, bool]:
        c = catalog_versions.c
        async with self.db.engine.begin() as conn:
            newest = (await conn.execute(sa.select(c.version, c.sha256, c.published_at, c.token).order_by(c.version.desc()).limit(1))).first()
            if newest is not None and newest.sha256 == digest:
                return Published(newest.version, digest, newest.published_at, newest.token, _named(catalog, newest.version)), False
            in_use = await _plans_in_use(conn, catalog)
            if in_use:
                raise PlansInUse([Problem(f"plans.{plan}", f"{count} billable{'s are' if count != 1 else ' is'} on it: keep it with "
                                          'status = "archived" (they keep its terms, nobody new gets it) instead of removing it')
                                  for plan, count in sorted(in_use.items())], "the published catalog")  # fmt: skip
            version = (newest.version if newest is not None else 0) + 1
            now = datetime.now(UTC)
            await conn.execute(catalog_versions.insert().values(version=version, text=text, sha256=digest, published_at=now, token=token))
            before = None if newest is None else {"version": newest.version, "sha256": newest.sha256}
            await audit.record(
                self.db, token=token, action="catalog.publish", billable=None, before=before,
                after={"version": version, "sha256": digest, "plans": list(catalog.plans)}, conn=conn,
            )  # fmt: skip
        return Published(version, digest, now, token, _named(catalog, version)), True

    # ---- this process ---------------------------------------------------------------------------------

    async def start_with(self, catalog: Catalog, text: str, *, token: str = "serve") -> tuple[Published, str]:
        """The catalog to start on: the newest in the record, else `catalog` (whose file is `text`), published
        now as the first version. Answers it and the start-up line that says which runs."""
        newest = await self.newest()
        if newest is None:
            try:
                published, _ = await self.publish(text, token=token, catalog=catalog)
            except RedisUnavailable:  # recorded and running here; announced by the next publish
                assert self.running is not None
                published = self.running
            return published, f"catalog: {catalog.source} published as version {published.version} (the record had none)"
        self._use(newest, quiet=True)
        same = "the same as" if newest.sha256 == sha256(text) else "which differs from"
        hint = "" if newest.sha256 == sha256(text) else " (`gateway catalog push` or SIGHUP publishes it)"
        return newest, f"catalog: running version {newest.version} from the record, {same} {catalog.source}{hint}"

    def start(self, on_change: Callable[[Published], None]) -> None:
        """Run each newer version from now on (published here or announced by another process)."""
        self.on_change = on_change
        self._following.start(self._follow)

    async def stop(self) -> None:
        await self._following.stop()

    async def _follow(self) -> None:
        quiet = False  # one line per outage, not one per poll
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
                quiet = False
            except (RedisUnavailable, StateUnavailable, DatabaseUnavailable) as exc:
                if not quiet:
                    log.warning("cannot follow the published catalog: %s", exc)
                quiet = True
            except Exception:  # the poll goes on whatever one round did
                log.exception("following the published catalog failed")

    async def poll(self) -> bool:
        """Run the announced version when it is newer than this process's; True when it changed."""
        found = (await self.store.fields([self.key], "v"))[0]
        current = self.running.version if self.running is not None else 0
        if found is None or int(found) <= current or int(found) == self._refused:
            return False
        try:
            published = await self.version(int(found))
        except CatalogError as exc:
            self._refused = int(found)
            log.error("%s does not load here (published by another gateway version?); still running version %d:\n%s", source_of(int(found)), current, exc)
            return False
        if published is None:
            return False
        self._use(published)
        return True

    def _use(self, published: Published, *, quiet: bool = False) -> None:
        if self.running is not None and published.version <= self.running.version:
            return
        self.running = published
        if not quiet:
            log.info("catalog version %d runs now (sha256 %s)", published.version, published.sha256[:12])
        if self.on_change is not None:
            self.on_change(published)


_LIVE = ("active", "trialing", "past_due")  # a subscription that decides its billable's plan


async def _plans_in_use(conn: Any, catalog: Catalog) -> dict[str, int]:
    """Plans `catalog` lacks that billables are assigned to or subscribe to, with how many each."""
    kept = list(catalog.plans)
    a, s = plan_assignments.c, subscriptions.c
    assigned = sa.select(a.billable, a.plan).where(a.plan.not_in(kept))
    subscribed = sa.select(s.billable, s.plan).where(s.billable.is_not(None), s.plan.is_not(None), s.plan.not_in(kept), s.status.in_(_LIVE))
    on = sa.union(assigned, subscribed).subquery()
    rows = await conn.execute(sa.select(on.c.plan, sa.func.count(sa.distinct(on.c.billable))).group_by(on.c.plan))
    return {plan: int(count) for plan, count in rows}


def _named(catalog: Catalog, version: int) -> Catalog:
    """The catalog as the published version it is (its source names the version in problems and logs)."""
    return replace(catalog, source=source_of(version))
