from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from services import RedisServer, free_port
from waiting import until

from gateway.errors import DatabaseUnavailable, RedisUnavailable
from gateway.identity import KEY_LENGTH, KeyStore, key_from_headers, parse_key
from gateway.revocations import RevocationFeed
from gateway.store.db import Database, api_keys, settings
from gateway.store.redis import open_redis

T = TypeVar("T")
KEY = "gw_AbCdEf012345_0123456789abcdefghijABCDEFGHIJ01"


def go(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class CountingEngine:
    """The database's engines (writer and reader), counting every connection or transaction taken."""

    def __init__(self, engine: Any, reader: Any) -> None:
        self.engine = engine
        self.reader = reader
        self.calls = 0

    def connect(self) -> Any:
        self.calls += 1
        return self.engine.connect()

    def begin(self) -> Any:
        self.calls += 1
        return self.engine.begin()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


class _Reads:
    """The reader side of a CountingEngine, counted in the same total."""

    def __init__(self, counter: CountingEngine) -> None:
        self.counter = counter

    def connect(self) -> Any:
        self.counter.calls += 1
        return self.counter.reader.connect()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.counter.reader, name)


async def open_db(url: str) -> Database:
    db = await Database.connect(url)
    await db.upgrade()
    return db


def counted(db: Database) -> CountingEngine:
    engine = CountingEngine(db.engine, db.reader)
    db.engine = engine  # type: ignore[assignment]
    db.reader = _Reads(engine)  # type: ignore[assignment]
    return engine


def with_keys(url: str, test: Callable[[KeyStore, Database], Awaitable[None]], **options: Any) -> None:
    """Run `test` with a KeyStore over a migrated database, closing both after."""

    async def main() -> None:
        db = await open_db(url)
        keys = KeyStore(db, **options)
        try:
            await test(keys, db)
        finally:
            await keys.close()
            await db.close()

    go(main())


# ---- parsing, no I/O --------------------------------------------------------------------------------------


def test_parse_key_splits_a_well_formed_key() -> None:
    """A key is `gw_` + 12 id characters + `_` + 32 secret characters, all [A-Za-z0-9]."""
    assert len(KEY) == KEY_LENGTH == 48
    assert parse_key(KEY) == ("AbCdEf012345", "0123456789abcdefghijABCDEFGHIJ01")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "gw_",
        KEY[:-1],
        KEY + "x",
        " " + KEY[:-1],
        KEY[:-1] + "\n",
        "GW" + KEY[2:],
        "sk" + KEY[2:],
        KEY.replace("_0123", "-0123"),
        "gw_AbCdEf01234_50123456789abcdefghijABCDEFGHIJ01",  # 11 + 33: the separator moved
        KEY.replace("f0", "-0"),
        KEY[:-1] + "é",
        KEY.replace("A", "+"),
        KEY.replace("jA", "j_"),
        KEY.replace("gw_", "gw:"),
        "x" * 10_000,
    ],
)
def test_parse_key_refuses_malformed_keys(text: str) -> None:
    """Anything but the exact shape is refused, by length first and then by a strict pattern."""
    assert parse_key(text) is None


def test_key_from_headers_reads_bearer_or_x_api_key() -> None:
    """The key comes from `Authorization: Bearer` (any case of the scheme) or `X-Api-Key`; Bearer wins."""
    assert key_from_headers([(b"authorization", b"Bearer " + KEY.encode())]) == KEY
    assert key_from_headers([(b"authorization", b"bearer  " + KEY.encode() + b" ")]) == KEY
    assert key_from_headers([(b"x-api-key", KEY.encode())]) == KEY
    assert key_from_headers([(b"x-api-key", b"other"), (b"authorization", b"Bearer " + KEY.encode())]) == KEY
    assert key_from_headers([(b"authorization", b"Basic dXNlcjpwYXNz"), (b"x-api-key", KEY.encode())]) == KEY
    assert key_from_headers([(b"authorization", b"Basic dXNlcjpwYXNz")]) is None
    assert key_from_headers([(b"authorization", b"Bearer "), (b"x-api-key", b"")]) is None
    assert key_from_headers([(b"host", b"example.com")]) is None


# ---- the store --------------------------------------------------------------------------------------------


def test_create_list_revoke_authenticate(empty_db_url: str) -> None:
    """A created key authenticates to its billable, is listed without its secret, and is refused once revoked."""

    async def test(keys: KeyStore, db: Database) -> None:
        ci = await keys.create("org_1", "ci")
        laptop = await keys.create("org_1", "laptop")
        other = await keys.create("org_2", "")
        assert parse_key(ci.key) is not None and ci.key.startswith(f"gw_{ci.id}_")
        assert (ci.billable, ci.name) == ("org_1", "ci") and ci.created_at.tzinfo is not None
        assert await keys.authenticate(ci.key) == "org_1"
        assert await keys.authenticate(other.key) == "org_2"

        listed = await keys.list("org_1")
        assert [(k.id, k.name, k.revoked) for k in listed] == [
            (ci.id, "ci", False),
            (laptop.id, "laptop", False),
        ]
        assert all(ci.key.split("_")[2] not in repr(k) for k in listed)
        assert await keys.list("org_nobody") == []

        assert await keys.revoke(ci.id) is True
        assert await keys.revoke(ci.id) is True  # again: still revoked, still found
        assert await keys.revoke("AbCdEf012345") is False
        assert await keys.authenticate(ci.key) is None  # this process forgets at once
        assert await keys.authenticate(laptop.key) == "org_1"
        assert [(k.id, k.revoked) for k in await keys.list("org_1")] == [(ci.id, True), (laptop.id, False)]

    with_keys(empty_db_url, test)


def test_a_revoked_key_is_told_when_only_with_its_own_secret(empty_db_url: str) -> None:
    """Once refused, a revoked key's holder can be told when it was revoked (in the process that revoked it, from
    the negative cache, and in another process once it asks the record); a guessed secret for the same id learns
    nothing, like a key never issued."""

    async def test(keys: KeyStore, db: Database) -> None:
        created = await keys.create("org_1", "ci")
        other = KeyStore(db)
        try:
            assert await keys.authenticate(created.key) == await other.authenticate(created.key) == "org_1"
            assert await keys.revoked_at(created.key) is None  # not revoked
            before = datetime.now(UTC)
            await keys.revoke(created.id)
            forged = f"gw_{created.id}_{'A' * 32}"
            for store in (keys, keys, other):
                await until(lambda s=store: _refused(s, created.key), "the revocation to be seen", 10)
                at = await store.revoked_at(created.key)
                assert at is not None and before - timedelta(seconds=1) <= at <= datetime.now(UTC)
                assert await store.authenticate(forged) is None and await store.revoked_at(forged) is None
        finally:
            await other.close()

    with_keys(empty_db_url, test)


async def _refused(keys: KeyStore, key: str) -> bool:
    return await keys.authenticate(key) is None


def test_a_wrong_secret_for_a_real_id_is_refused(empty_db_url: str) -> None:
    """Knowing a key's id is not enough: the secret must hash to the stored value."""

    async def test(keys: KeyStore, db: Database) -> None:
        created = await keys.create("org_1", "ci")
        forged = f"gw_{created.id}_{'A' * 32}"
        assert await keys.authenticate(forged) is None
        assert await keys.authenticate(created.key) == "org_1"
        assert await keys.authenticate(forged) is None  # from the cache too

    with_keys(empty_db_url, test)


def test_malformed_keys_are_refused_without_io(empty_db_url: str) -> None:
    """A malformed key costs no connection, not even to load the pepper, however often it is sent."""

    async def test(keys: KeyStore, db: Database) -> None:
        engine = counted(db)
        for text in ("", "gw_short", KEY[:-1] + "!", "Bearer " + KEY, KEY.lower() + "x"):
            for _ in range(3):
                assert await keys.authenticate(text) is None
        assert engine.calls == 0

    with_keys(empty_db_url, test)


def test_an_unknown_key_is_refused_again_from_the_negative_cache(empty_db_url: str) -> None:
    """The first refusal of an unknown id asks the database; the next ones, within a few seconds, do not."""

    async def test(keys: KeyStore, db: Database) -> None:
        await keys.create("org_1", "ci")  # the pepper is loaded: only lookups are counted below
        engine = counted(db)
        assert await keys.authenticate(KEY) is None
        assert engine.calls == 1
        for _ in range(5):
            assert await keys.authenticate(KEY) is None
        assert engine.calls == 1

    with_keys(empty_db_url, test)


def test_the_negative_cache_is_bounded_and_expires(empty_db_url: str) -> None:
    """Past its size the oldest unknown id is forgotten, and every one is forgotten after its TTL."""
    now = [1000.0]
    ids = [f"gw_{c * 12}_{'s' * 32}" for c in "ABC"]

    async def test(keys: KeyStore, db: Database) -> None:
        await keys.create("org_1", "ci")
        engine = counted(db)
        for key in ids:
            assert await keys.authenticate(key) is None
        assert engine.calls == 3
        assert await keys.authenticate(ids[2]) is None and engine.calls == 3
        assert await keys.authenticate(ids[0]) is None and engine.calls == 4  # evicted by the third
        now[0] += 5.0
        assert await keys.authenticate(ids[2]) is None and engine.calls == 5  # expired

    with_keys(empty_db_url, test, negative_max=2, negative_ttl=5.0, clock=lambda: now[0])


def test_a_revocation_reaches_another_process_within_a_second(empty_db_url: str) -> None:
    """A key revoked through one process is refused by another, which had it cached, within a second."""

    async def main() -> None:
        db_a, db_b = await open_db(empty_db_url), await Database.connect(empty_db_url)
        a, b = KeyStore(db_a), KeyStore(db_b)
        try:
            created = await a.create("org_1", "ci")
            assert await b.authenticate(created.key) == "org_1"
            engine = counted(db_b)
            assert await b.authenticate(created.key) == "org_1"
            assert engine.calls == 0  # answered from memory

            assert await a.revoke(created.id)
            revoked_at = time.monotonic()
            while await b.authenticate(created.key) is not None:
                assert time.monotonic() - revoked_at < 1.0
                await asyncio.sleep(0.02)
            assert await b.authenticate(created.key) is None
        finally:
            for keys, db in ((a, db_a), (b, db_b)):
                await keys.close()
                await db.close()

    go(main())


def test_concurrent_lookups_of_one_key_share_one_query(empty_db_url: str) -> None:
    """Many requests with the same uncached key at once cost one query between them."""

    async def test(keys: KeyStore, db: Database) -> None:
        created = await keys.create("org_1", "ci")
        unknown = f"gw_{'Z' * 12}_{'z' * 32}"
        engine = counted(db)
        found = await asyncio.gather(*(keys.authenticate(created.key) for _ in range(50)))
        assert found == ["org_1"] * 50
        assert engine.calls == 2  # one lookup, one last-used update
        await keys.close()
        engine.calls = 0
        assert await asyncio.gather(*(keys.authenticate(unknown) for _ in range(50))) == [None] * 50
        assert engine.calls == 1

    with_keys(empty_db_url, test)


def test_last_used_at_is_written_at_most_once_a_minute(empty_db_url: str) -> None:
    """Use is recorded off the request path, once a minute per key at most, across processes too."""
    now = [1000.0]

    async def last_used(db: Database, key_id: str) -> Any:
        async with db.engine.connect() as conn:
            return (
                await conn.execute(sa.select(api_keys.c.last_used_at).where(api_keys.c.id == key_id))
            ).scalar()

    async def test(keys: KeyStore, db: Database) -> None:
        created = await keys.create("org_1", "ci")
        assert await last_used(db, created.id) is None
        assert await keys.authenticate(created.key) == "org_1"
        await keys.close()
        first = await last_used(db, created.id)
        assert first is not None and first.tzinfo is not None

        engine = counted(db)
        for _ in range(5):
            assert await keys.authenticate(created.key) == "org_1"
        await keys.close()
        assert engine.calls == 0

        # This process thinks a minute passed; the record says otherwise and keeps the first time.
        now[0] += 61
        assert await keys.authenticate(created.key) == "org_1"
        await keys.close()
        assert engine.calls == 2  # the lookup (its cache expired too) and one guarded update
        assert await last_used(db, created.id) == first
        assert (await keys.list("org_1"))[0].last_used_at == first

    with_keys(empty_db_url, test, clock=lambda: now[0])


def test_a_failing_last_used_update_is_logged_not_raised(
    empty_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The request is answered even when recording its use fails; the failure is logged."""

    async def test(keys: KeyStore, db: Database) -> None:
        created = await keys.create("org_1", "ci")
        real_touch = keys._touch

        async def broken(ids: list[str]) -> dict[str, None]:
            db_down = await Database.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
            keys.db, saved = db_down, keys.db
            try:
                return await real_touch(ids)
            finally:
                keys.db = saved
                await db_down.close()

        keys._touches.fetch = broken
        assert await keys.authenticate(created.key) == "org_1"
        await keys.close()
        assert "could not record the last use of 1 API keys" in caplog.text

    with_keys(empty_db_url, test)


def test_last_uses_are_recorded_in_one_write_for_many_keys(empty_db_url: str) -> None:
    """A burst of first uses (a restart under load) records last_used_at in a few writes, not one per key."""

    async def test(keys: KeyStore, db: Database) -> None:
        created = [await keys.create(f"org_{i}", "ci") for i in range(40)]
        writes: list[int] = []
        real_touch = keys._touch

        async def counting(ids: list[str]) -> dict[str, None]:
            writes.append(len(ids))
            return await real_touch(ids)

        keys._touches.fetch = counting
        assert await asyncio.gather(*(keys.authenticate(c.key) for c in created)) == [f"org_{i}" for i in range(40)]
        await keys.close()
        assert sum(writes) == 40 and len(writes) <= 2, writes
        async with db.engine.connect() as conn:
            assert (await conn.execute(sa.select(sa.func.count()).where(api_keys.c.last_used_at.is_not(None)))).scalar_one() == 40

    with_keys(empty_db_url, test)


def test_the_hash_is_keyed_by_a_persistent_pepper(empty_db_url: str) -> None:
    """The stored hash is HMAC-SHA256 under the installation's pepper, never the secret; another process reuses it."""

    async def main() -> None:
        db = await open_db(empty_db_url)
        first = KeyStore(db)
        created = await first.create("org_1", "ci")
        await first.close()
        async with db.engine.connect() as conn:
            stored = (
                await conn.execute(sa.select(api_keys.c.hash).where(api_keys.c.id == created.id))
            ).scalar_one()
            peppers = (await conn.execute(sa.select(settings.c.value))).scalars().all()
        await db.close()

        secret = created.key.split("_")[2]
        assert len(peppers) == 1 and len(bytes.fromhex(peppers[0])) == 32
        assert stored not in (secret, created.key) and secret not in stored
        assert stored != hashlib.sha256(created.key.encode()).hexdigest()
        assert stored == hmac.new(bytes.fromhex(peppers[0]), created.key.encode(), hashlib.sha256).hexdigest()

        again = await Database.connect(empty_db_url)  # a new process: nothing in memory
        second = KeyStore(again)
        try:
            assert await second.authenticate(created.key) == "org_1"
            other = await second.create("org_1", "laptop")
            assert await second.authenticate(other.key) == "org_1"
            async with again.engine.connect() as conn:
                assert (
                    await conn.execute(sa.select(sa.func.count()).select_from(settings))
                ).scalar_one() == 1
        finally:
            await second.close()
            await again.close()

    go(main())


def test_the_first_pepper_wins_when_processes_race(empty_db_url: str) -> None:
    """Processes that need the pepper at once all end up with the one stored first."""

    async def main() -> None:
        dbs = [await open_db(empty_db_url)] + [await Database.connect(empty_db_url) for _ in range(3)]
        stores = [KeyStore(db) for db in dbs]
        try:
            peppers = await asyncio.gather(*(keys._load_pepper() for keys in stores))
            assert len(set(peppers)) == 1
        finally:
            for db in dbs:
                await db.close()

    go(main())


def test_a_known_key_outlives_a_database_outage(empty_db_url: str) -> None:
    """With the record down, keys this process knows keep working; an unseen key raises DatabaseUnavailable."""
    now = [1000.0]

    async def test(keys: KeyStore, db: Database) -> None:
        created = await keys.create("org_1", "ci")
        assert await keys.authenticate(created.key) == "org_1"
        await keys.close()
        down = await Database.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
        keys.db = down
        try:
            now[0] += 10  # the cached answer is stale: the store asks, fails, and falls back on it
            assert await keys.authenticate(created.key) == "org_1"
            engine = counted(down)
            # The failure is remembered: no new attempt for a while.
            assert await keys.authenticate(created.key) == "org_1"
            assert engine.calls == 0
            with pytest.raises(DatabaseUnavailable):
                await keys.authenticate(f"gw_{'Q' * 12}_{'q' * 32}")
            assert await keys.authenticate("gw_malformed") is None
        finally:
            keys.db = db
            await down.close()

    with_keys(empty_db_url, test, clock=lambda: now[0])


# ---- the revocation feed (real Redis) ---------------------------------------------------------------------


def test_with_the_feed_keys_are_trusted_for_minutes_and_a_revocation_still_lands_within_a_second(
    empty_db_url: str, private_redis: RedisServer
) -> None:
    """Two processes hearing the revocation feed: a cached key costs no query after TTL, and a key revoked
    through one is refused by the other within a second; the feed survives a Redis that lost it."""

    async def main() -> None:
        store_a, store_b = open_redis(private_redis.url), open_redis(private_redis.url)
        db_a, db_b = await open_db(empty_db_url), await Database.connect(empty_db_url)
        a = KeyStore(db_a, feed=RevocationFeed(store_a, interval=0.05))
        b = KeyStore(db_b, feed=RevocationFeed(store_b, interval=0.05))
        try:
            ci, laptop = await a.create("org_1", "ci"), await a.create("org_1", "laptop")
            assert await b.authenticate(ci.key) == "org_1" and await b.authenticate(laptop.key) == "org_1"

            async def touched() -> bool:
                return all(k.last_used_at is not None for k in await a.list("org_1"))

            await until(touched, "the last-used updates of the first use to land before counting")
            engine = counted(db_b)
            await asyncio.sleep(1.5)  # past TTL (the thing under test): without the feed each key would be asked about again
            assert await b.authenticate(ci.key) == "org_1" and await b.authenticate(laptop.key) == "org_1"
            assert engine.calls == 0

            assert await a.revoke(ci.id)
            revoked_at = time.monotonic()
            while await b.authenticate(ci.key) is not None:
                assert time.monotonic() - revoked_at < 1.0
                await asyncio.sleep(0.02)
            assert await b.authenticate(laptop.key) == "org_1"  # only the revoked key was dropped

            calls = engine.calls
            private_redis.client().flushall()  # the feed is lost: every trusted key is asked about again

            async def asked_again() -> bool:
                assert await b.authenticate(laptop.key) == "org_1"
                return engine.calls > calls

            await until(asked_again, "the lost feed to make b ask the record again")
            assert await b.authenticate(laptop.key) == "org_1" and engine.calls == calls + 1
        finally:
            for keys, db in ((a, db_a), (b, db_b)):
                await keys.close()
                await db.close()
            await store_a.close()
            await store_b.close()

    go(main())


def test_without_redis_the_feed_falls_back_to_asking_the_record_each_second(
    empty_db_url: str, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A process that cannot hear the feed trusts a key for TTL only, so a revocation made straight in the
    record still lands within a second; revoking while Redis is down says so (the record has it)."""

    async def main() -> None:
        store = open_redis(private_redis.url)
        db = await open_db(empty_db_url)
        keys = KeyStore(db, feed=RevocationFeed(store, interval=0.05))
        try:
            created = await keys.create("org_1", "ci")
            assert await keys.authenticate(created.key) == "org_1"
            private_redis.stop()
            await until(lambda: "cannot hear API key revocations" in caplog.text, "the process to find the feed gone")
            async with db.engine.begin() as conn:  # another process revoked it while Redis was away
                await conn.execute(sa.update(api_keys).values(revoked_at=sa.func.current_timestamp()))
            began = time.monotonic()
            while await keys.authenticate(created.key) is not None:
                assert time.monotonic() - began < 1.2
                await asyncio.sleep(0.02)
            other = await keys.create("org_1", "other")
            with pytest.raises(RedisUnavailable):
                await keys.revoke(other.id)
            assert await keys.authenticate(other.key) is None  # revoked here, and in the record
        finally:
            await keys.close()
            await db.close()
            await store.close()
            private_redis.start()

    go(main())


def test_a_poll_of_the_revocation_feed_is_one_script_on_redis(private_redis: RedisServer) -> None:
    """Each poll of the feed (every 250 ms in every process) reads the revocations and the master's epoch in one
    script: 10 polls are 10 EVALSHA calls on the server (the commands those scripts run aside)."""

    async def main() -> None:
        store = open_redis(private_redis.url)
        feed = RevocationFeed(store, prefix=f"gwfeed{free_port()}")
        try:
            await feed.poll()  # loads the script; the first poll forgets every key
            with private_redis.client() as c:
                c.config_resetstat()
            for _ in range(10):
                assert await feed.poll() == ([], False)
            with private_redis.client() as c:
                stats = c.info("commandstats")
            scripts = {name: int(stat["calls"]) for name, stat in stats.items() if name.startswith(("cmdstat_eval", "cmdstat_fcall"))}
            assert scripts == {"cmdstat_evalsha": 10}, scripts
        finally:
            await store.close()

    asyncio.run(main())
