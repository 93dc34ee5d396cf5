from __future__ import annotations

import asyncio

import pytest
from services import free_port
from sqlalchemy.exc import IntegrityError

from gateway.errors import DatabaseUnavailable
from gateway.store.db import Database, answering

pytestmark = pytest.mark.unit  # no service: `pytest -m unit` runs these in seconds


def test_a_driver_error_becomes_database_unavailable_with_its_context() -> None:
    """A socket error under `answering` is DatabaseUnavailable carrying the database shown and the reason."""
    with pytest.raises(DatabaseUnavailable) as caught, answering("postgresql://u@db/x"):
        raise ConnectionRefusedError(111, "Connection refused")
    assert caught.value.url == "postgresql://u@db/x" and "Connection refused" in caught.value.reason
    assert str(caught.value).startswith("the database at postgresql://u@db/x did not answer: ConnectionRefusedError")


def test_a_deadline_names_the_setting() -> None:
    """A timeout under `answering` says within how long, and that GATEWAY_DB_TIMEOUT sets it."""
    with pytest.raises(DatabaseUnavailable, match=r"within 2 s \(GATEWAY_DB_TIMEOUT\)") as caught, answering("db", 2):
        raise TimeoutError
    assert caught.value.reason == "within 2 s (GATEWAY_DB_TIMEOUT)"


def test_an_outer_answering_says_what_was_left_undone() -> None:
    """An outage already mapped keeps its context and gains what the caller's operation left undone."""
    with pytest.raises(DatabaseUnavailable) as caught, answering("db", undone="the grant was not made."), answering("db"):
        raise OSError("gone")
    assert str(caught.value) == "the database at db did not answer: OSError: gone; the grant was not made."
    assert caught.value.url == "db" and caught.value.reason == "OSError: gone"


def test_a_conflict_is_the_callers() -> None:
    """IntegrityError passes through `answering` untouched: a conflict is not an outage."""
    with pytest.raises(IntegrityError), answering("db"):
        raise IntegrityError("insert", {}, Exception("duplicate key"))


def test_a_dead_database_raises_it_from_every_operation() -> None:
    """Any operation on a Database that cannot be reached is DatabaseUnavailable naming that database."""

    async def main() -> DatabaseUnavailable:
        db = await Database.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/x", timeout=5)
        try:
            with pytest.raises(DatabaseUnavailable) as caught:
                await db.revision()
            return caught.value
        finally:
            await db.close()

    outage = asyncio.run(main())
    assert outage.url.startswith("postgresql://postgres@127.0.0.1:") and outage.reason
