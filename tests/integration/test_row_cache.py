"""The SQLite store's read-model cache: never a row the log does not hold, and bounded.

The cache (orchestrator/store/_cache.py) is filled at commit time and by lookups
that miss; these tests break commits for real (a trigger that aborts the
transaction inside SQLite) and check what reads return afterwards.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from orchestrator import state
from orchestrator.errors import StoreError, VersionConflict
from orchestrator.model import Connection, ConnectionRef
from orchestrator.records import Record
from orchestrator.store import Appended, EventStore, open_store
from orchestrator.store._cache import UNKNOWN, RowCache
from orchestrator.store.sqlite import SQLiteEventStore
from tests.contract.test_store_contract import created, validated
from tests.support.clock import FakeClock

pytestmark = pytest.mark.anyio

REF = ConnectionRef("dev", "salesforce", "acme")


def sabotage(path: Path, *, on: bool) -> None:
    """Make every insert into the log fail inside SQLite (``on``), or stop doing so.

    A trigger that raises ABORT: the writer's transaction fails after some of its
    statements ran, as a constraint, an I/O error or a full disk would fail it.
    """
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("PRAGMA busy_timeout = 5000")
        if on:
            db.execute(
                "CREATE TRIGGER IF NOT EXISTS sabotage BEFORE INSERT ON events"
                " BEGIN SELECT RAISE(ABORT, 'sabotaged by the test'); END"
            )
        else:
            db.execute("DROP TRIGGER IF EXISTS sabotage")


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


def cache_of(store: EventStore) -> RowCache:
    assert isinstance(store, SQLiteEventStore) and store._writer is not None
    return store._writer.cache


async def test_a_connection_known_to_be_absent_is_created_by_the_next_append(database: Path) -> None:
    """A lookup that finds no row is cached as absent; the append that creates the connection replaces it."""
    async with open_store(f"sqlite://{database}", clock=FakeClock()) as store:
        assert await store.get_connection(REF) is None
        assert cache_of(store).get(REF.stream) is None, "known to be absent"
        appended = await store.append(REF, 0, validated())
        assert await store.get_connection(REF) == appended.connection
    async with open_store(f"sqlite://{database}", clock=FakeClock()) as store:  # and so the log says
        assert await store.get_connection(REF) == appended.connection


@pytest.mark.parametrize("cache_rows", [8192, 1], ids=["cached", "evicted"])
async def test_a_failed_append_leaves_no_row_behind(database: Path, cache_rows: int) -> None:
    """After an append fails in SQLite, reads return the last committed row, and the next append builds on it.

    With a one-row cache, another connection evicts ours first, so the read after the failure
    is a lookup in the database rather than a cache hit: both must give the committed row.
    """
    async with open_store(f"sqlite://{database}", clock=FakeClock(), cache_rows=cache_rows) as store:
        first = await store.append(REF, 0, validated())
        assert first.connection.version == 2
        if cache_rows == 1:
            await store.append(ConnectionRef("dev", "salesforce", "other"), 0, validated())
            assert len(cache_of(store)) == 1
        sabotage(database, on=True)
        with pytest.raises(StoreError, match="sabotaged by the test"):
            await store.append(REF, 2, created())
        after_failure = await store.get_connection(REF)
        assert after_failure == first.connection, "the failed append's row was served"

        sabotage(database, on=False)
        # Built on version 2, as the log holds it: a row kept from the failed batch would make this a conflict.
        second = await store.append(REF, 2, created())
        assert second.connection.version == 3
        assert second.records[0].position == (3 if cache_rows == 8192 else 5), "positions of the failure reused"
        assert await store.get_connection(REF) == second.connection


async def test_a_failed_batch_fails_only_its_own_rows(database: Path) -> None:
    """Appends committed in the same batch as a refused one are cached; the refused one's row is not."""
    async with open_store(f"sqlite://{database}", clock=FakeClock()) as store:
        good, bad = ConnectionRef("dev", "salesforce", "good"), ConnectionRef("dev", "salesforce", "bad")
        await store.append(bad, 0, validated())
        results: dict[str, Appended | Exception] = {}

        async def append(ref: ConnectionRef, expected: int) -> None:
            try:
                results[ref.connection_id] = await store.append(ref, expected, created())
            except VersionConflict as exc:
                results[ref.connection_id] = exc

        async with anyio.create_task_group() as tg:  # queued together: one batch
            tg.start_soon(append, good, 0)
            tg.start_soon(append, bad, 0)  # wrong expected version: refused inside the batch
        assert isinstance(results["bad"], VersionConflict)
        assert isinstance(results["good"], Appended)
        assert cache_of(store).known([bad.stream])[bad.stream].version == 2
        bad_row = await store.get_connection(bad)
        good_row = await store.get_connection(good)
        assert bad_row is not None and bad_row.version == 2
        assert good_row == results["good"].connection


async def test_the_cache_is_bounded_and_reads_stay_right(database: Path) -> None:
    """With room for 16 rows, 200 connections leave 16 cached, and every read still returns its own row."""
    async with open_store(f"sqlite://{database}", clock=FakeClock(), cache_rows=16) as store:
        refs = [ConnectionRef("dev", "salesforce", f"c{i:03}") for i in range(200)]
        for ref in refs:
            await store.append(ref, 0, validated())
            assert len(cache_of(store)) <= 16
        for ref in refs:
            await store.append(ref, 2, created())
        cache = cache_of(store)
        assert len(cache) == 16
        misses = cache.misses
        for ref in refs:
            row = await store.get_connection(ref)
            assert row is not None and (row.ref, row.version) == (ref, 3)
        assert cache.misses - misses >= 200 - 16, "evicted rows were read from the log"
        assert len(cache) == 16


async def test_a_lookup_that_would_wait_reads_through_the_reader(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the loop's lookup would have to wait for a lock (SQLITE_BUSY), the read goes to the reader's thread."""
    async with open_store(f"sqlite://{database}", clock=FakeClock(), cache_rows=1) as store:
        assert isinstance(store, SQLiteEventStore)
        appended = await store.append(REF, 0, validated())
        await store.append(ConnectionRef("dev", "salesforce", "other"), 0, validated())  # evicts REF

        class Busy:
            def execute(self, *args: object) -> object:
                raise sqlite3.OperationalError("database is locked")

            def close(self) -> None:
                pass

        real = store._lookup
        monkeypatch.setattr(store, "_lookup", Busy())
        try:
            assert await store.get_connection(REF) == appended.connection
            assert REF.stream not in cache_of(store).known([REF.stream]), "a read that awaited filled the cache"
        finally:
            monkeypatch.setattr(store, "_lookup", real)


def test_row_cache_evicts_the_least_recently_used() -> None:
    """Reading a row keeps it; the row unread longest goes first."""

    def row(name: str) -> Connection:
        return _connection(ConnectionRef("dev", "salesforce", name))

    cache = RowCache(3)
    cache.committed([row("a"), row("b")])
    cache.put("dev/salesforce/gone", None)  # known to have no row
    assert cache.get("dev/salesforce/a") is not None  # a is now the most recent
    cache.put("dev/salesforce/c", row("c"))  # evicts b, the least recently used
    assert cache.get("dev/salesforce/b") is UNKNOWN
    assert cache.get("dev/salesforce/gone") is None
    assert cache.known(["dev/salesforce/a", "dev/salesforce/gone", "dev/salesforce/c"]).keys() == {
        "dev/salesforce/a",
        "dev/salesforce/c",
    }
    with pytest.raises(ValueError, match="at least one row"):
        RowCache(0)


def _connection(ref: ConnectionRef) -> Connection:
    record = Record(
        position=1,
        stream=ref.stream,
        version=1,
        event_id="e1",
        type="post-connection-creation",
        data={"config": {}, "payload": {}},
        recorded_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return state.apply(None, record)
