"""Copy a whole event log to another backend, verbatim, and verify the copy: ``orchestrator migrate``.

The source is an SQLite log, read while the copy holds the daemon's lock on it
(a daemon running on it refuses the migration; none can start on it until the
copy is verified). The target is an empty log: a PostgreSQL database (or schema)
or an SQLite file, made if missing. Every row of the four tables is copied as
it is, in batches of ``batch`` rows (memory stays bounded whatever the log's
size): records with their positions, versions, event ids, times, causation,
traceparent, idempotency keys and schema versions; the read model; jobs of
every status with their history; sealed credentials, as opaque bytes. The
PostgreSQL head is set to the source's, so the first append on the target
continues its positions.

The copy is **one transaction** on the target: interrupted (killed, the
database lost), it leaves the target empty, and the same command run again
starts over; a daemon started on the target meanwhile waits for it. Then the
copy is verified: each table's rows hash the same on both sides (byte for byte),
and the target's read model is the fold of its log (:func:`orchestrator.replay.verify`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread

from orchestrator.clock import Clock, SystemClock
from orchestrator.errors import InvalidArgument
from orchestrator.store import is_postgres, open_store, shown, sqlite_path
from orchestrator.store._transfer import TABLES, Digest, Row, SQLiteImport, SQLiteSource, Table

BATCH = 2000
"""Rows read from the source and written to the target at a time."""

Progress = Callable[[int, int], None]
"""Told (rows copied, rows in all) after each batch."""


@dataclass(slots=True)
class Migrated:
    """What a migration copied and what its verification found."""

    source: str
    target: str
    counts: dict[str, int] = field(default_factory=dict)
    """Rows copied, per table."""
    head: int = 0
    """The last position copied."""
    copy_seconds: float = 0.0
    verify_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    """How the target differs from the source, or its read model from its log: empty when the copy is verified."""

    @property
    def ok(self) -> bool:
        """Whether the copy was verified."""
        return not self.problems


def _source_path(url: str) -> Path:
    path = sqlite_path(url)
    if path is None:
        raise InvalidArgument(
            f"--from {shown(url)}: migrate copies from an SQLite log (sqlite:///path/to/events.db);"
            " a PostgreSQL log is moved with the database's own tools (pg_dump, a replica)"
        )
    return path


def _check_target(url: str, source: Path) -> Path | None:
    """The target's SQLite path (None: PostgreSQL); refuses other URLs and the source itself."""
    if is_postgres(url):
        return None
    path = sqlite_path(url)
    if path is None:
        raise InvalidArgument(f"--to {shown(url)}: the target is a PostgreSQL database (postgresql://...) or SQLite")
    if path.resolve() == source.resolve():
        raise InvalidArgument(f"--to names the source itself ({path}): migrate copies into another log")
    return path


async def migrate(
    source_url: str,
    target_url: str,
    *,
    batch: int = BATCH,
    clock: Clock | None = None,
    progress: Progress | None = None,
) -> Migrated:
    """Copy the log at ``source_url`` into the empty log at ``target_url`` and verify it (see the module)."""
    if batch < 1:
        raise InvalidArgument(f"a batch holds at least one row, not {batch}")
    clock = clock or SystemClock()
    path = _source_path(source_url)
    target_path = _check_target(target_url, path)
    out = Migrated(shown(source_url), shown(target_url))
    source = SQLiteSource(path)
    await anyio.to_thread.run_sync(source.open)
    try:
        out.counts = await anyio.to_thread.run_sync(source.counts)
        out.head, recorded_at = await anyio.to_thread.run_sync(source.head)
        started = time.monotonic()
        copied = _Copied(sum(out.counts.values()), progress)
        if target_path is None:
            await _to_postgres(source, target_url, batch, clock, copied, out.head, recorded_at)
        else:
            await _to_sqlite(source, target_path, batch, clock, copied)
        out.copy_seconds = time.monotonic() - started
        started = time.monotonic()
        out.problems = await _verify(source, target_url, target_path, batch)
        out.verify_seconds = time.monotonic() - started
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(source.close)
    return out


@dataclass(slots=True)
class _Copied:
    total: int
    progress: Progress | None
    done: int = 0

    def add(self, rows: int) -> None:
        self.done += rows
        if self.progress is not None:
            self.progress(self.done, self.total)


async def _pages(source: SQLiteSource, table: Table, batch: int) -> AsyncIterator[list[Row]]:
    """Every row of ``table`` in the source, ``batch`` at a time (each page read on a worker thread)."""
    after = None
    while rows := await anyio.to_thread.run_sync(source.page, table, after, batch):
        yield rows
        after = rows[-1][0]


async def _to_postgres(
    source: SQLiteSource, url: str, batch: int, clock: Clock, copied: _Copied, head: int, recorded_at: int
) -> None:
    from orchestrator.store.postgres import PostgresEventStore

    # Opening the store makes the log's tables (migrations) in an empty database or schema.
    async with PostgresEventStore.open(url, clock=clock, pool_size=1) as store, store.importing() as copy:
        for table in TABLES:
            async for rows in _pages(source, table, batch):
                await copy.load(table, rows)
                copied.add(len(rows))
        await copy.finish(head, recorded_at)


async def _to_sqlite(source: SQLiteSource, path: Path, batch: int, clock: Clock, copied: _Copied) -> None:
    target = SQLiteImport(path, clock)
    await anyio.to_thread.run_sync(target.open)
    try:
        for table in TABLES:
            async for rows in _pages(source, table, batch):
                await anyio.to_thread.run_sync(target.load, table, rows)
                copied.add(len(rows))
        await anyio.to_thread.run_sync(target.commit)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(target.close)


async def _verify(source: SQLiteSource, url: str, path: Path | None, batch: int) -> list[str]:
    """How the target differs from the source (each table's rows, hashed), and its read model from its log."""
    from orchestrator.replay import verify

    problems: list[str] = []
    for table in TABLES:
        want = Digest()
        async for rows in _pages(source, table, batch):
            want.update(rows)
        have = await _target_digest(url, path, table, batch)
        if (have.rows, have.hexdigest()) != (want.rows, want.hexdigest()):
            problems.append(
                f"{table.name}: the target's {have.rows} row(s) differ from the source's {want.rows}"
                f" (sha256 {have.hexdigest()[:12]} against {want.hexdigest()[:12]})"
            )
    async with open_store(url, readonly=True) as store:
        problems += [f"the target's read model: {d}" for d in await verify(store)]
    return problems


async def _target_digest(url: str, path: Path | None, table: Table, batch: int) -> Digest:
    digest = Digest()
    if path is not None:
        await anyio.to_thread.run_sync(_sqlite_digest, path, table, batch, digest)
        return digest
    import asyncpg

    from orchestrator.store._transfer import postgres_page

    con = await asyncpg.connect(url, timeout=10)
    try:
        after = None
        while rows := await postgres_page(con, table, after, batch):
            digest.update(rows)
            after = rows[-1][0]
    finally:
        await con.close()
    return digest


def _sqlite_digest(path: Path, table: Table, batch: int, digest: Digest) -> None:
    import sqlite3
    from contextlib import closing
    from urllib.parse import quote

    from orchestrator.store._transfer import sqlite_rows

    with closing(sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)) as db:
        for rows in sqlite_rows(db, table, batch):
            digest.update(rows)
