"""The event log behind one interface, :class:`EventStore`, with one backend per module.

- :mod:`orchestrator.store._base`: the :class:`EventStore` protocol every backend implements;
- :mod:`orchestrator.store.memory`: in-process, for tests;
- :mod:`orchestrator.store.sqlite`: the embedded default (its group-committing writer in
  :mod:`orchestrator.store._sqlite_writer`, row mapping in :mod:`orchestrator.store._sqlite_rows`);
- :mod:`orchestrator.store.postgres`: several daemons on one PostgreSQL database (its writes in
  :mod:`orchestrator.store._postgres_write`, jobs in :mod:`orchestrator.store._postgres_jobs`, the
  tail's feed and the notifications in :mod:`orchestrator.store._postgres_feed`, the schema in
  :mod:`orchestrator.store._postgres_schema`; its tables have the SQLite log's columns and rows);
- :mod:`orchestrator.store._cache`: the read model's last committed rows, owned by the event loop;
- :mod:`orchestrator.store._tail`: the last committed records in memory, which every backend fills
  at commit time and serves caught-up followers from (:meth:`EventStore.read_tail`);
- :mod:`orchestrator.store._migrations`: numbered ``.sql`` migrations under ``sql/<backend>/``;
- :mod:`orchestrator.store._location`: the checks of a log's path before it is opened (``serve --check``);
- :mod:`orchestrator.store._sqlite_scan`: ``orchestrator replay``'s direct, read-only reads of an SQLite log.

Every backend passes ``tests/contract/test_store_contract.py``. Backends are
chosen by URL with :func:`open_store`. Nothing here imports the RPC layer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from orchestrator.clock import Clock, SystemClock
from orchestrator.errors import InvalidArgument
from orchestrator.store._base import Appended, Counts, EventStore, Stats, scan
from orchestrator.store._cache import ROW_CACHE
from orchestrator.store._location import SUPPORTED, Location, inspect, is_postgres, locate, shown
from orchestrator.store._tail import DEFAULT_TAIL, TailBounds, TailPage

__all__ = [
    "Appended",
    "Counts",
    "EventStore",
    "Location",
    "Stats",
    "TailBounds",
    "TailPage",
    "inspect",
    "is_postgres",
    "locate",
    "open_store",
    "scan",
    "shown",
    "sqlite_path",
]


def sqlite_path(url: str) -> Path | None:
    """The file path of an SQLite URL, or None for other schemes.

    Accepted: ``sqlite:///abs/path.db`` (also ``sqlite:////abs/path.db``),
    ``sqlite:relative/path.db`` and a bare path. The path is taken literally:
    ``#`` and ``?`` are part of it, not a fragment or a query.
    """
    if not url.startswith("sqlite:"):
        if "://" in url or url.startswith(("memory:", "postgres")):
            return None
        return Path(url)
    rest = url.removeprefix("sqlite:")
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if host:
            raise InvalidArgument(f"database URL {url!r}: use sqlite:///absolute/path or sqlite:relative/path")
        rest = slash + path
    if not rest or rest == "/":
        raise InvalidArgument(f"database URL {url!r} names no file")
    # sqlite:////abs/path (SQLAlchemy's spelling) means the same as sqlite:///abs/path.
    return Path("/" + rest.lstrip("/")) if rest.startswith("//") else Path(rest)


@asynccontextmanager
async def open_store(
    url: str,
    *,
    readonly: bool = False,
    clock: Clock | None = None,
    init: bool = False,
    tail: TailBounds = DEFAULT_TAIL,
    cache_rows: int = ROW_CACHE,
    pool_size: int | None = None,
    lease: float | None = None,
) -> AsyncIterator[EventStore]:
    """Open the store that ``url`` names for the duration of the ``async with`` block.

    ``init`` lets a new log start in an existing file that holds none (``serve --init``),
    or in a PostgreSQL schema that holds other tables; a missing file is created without it.
    ``tail`` bounds the in-memory tail of recent commits that caught-up followers are served
    from; ``cache_rows`` the read-model rows an SQLite store keeps in memory (see
    :mod:`orchestrator.store._cache`); ``pool_size`` the connections of a PostgreSQL store's pool, ``lease``
    the longest its claims hold before they are renewed (see :mod:`orchestrator.store._postgres_jobs`).
    """
    clock = clock or SystemClock()
    path = sqlite_path(url)
    if path is not None:
        from orchestrator.store.sqlite import SQLiteEventStore

        async with SQLiteEventStore.open(
            path, readonly=readonly, clock=clock, init=init, tail=tail, cache_rows=cache_rows
        ) as store:
            yield store
        return
    if is_postgres(url):
        from orchestrator.store.postgres import POOL_SIZE, PostgresEventStore

        async with PostgresEventStore.open(
            url, readonly=readonly, clock=clock, init=init, tail=tail, pool_size=pool_size or POOL_SIZE, lease=lease
        ) as postgres:
            yield postgres
        return
    if url.startswith("memory:"):
        from orchestrator.store.memory import MemoryEventStore

        memory = MemoryEventStore(clock=clock, tail=tail)
        try:
            yield memory
        finally:
            memory.close()
        return
    raise InvalidArgument(f"database URL {url!r} is not supported: {SUPPORTED}")
