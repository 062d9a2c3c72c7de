"""The embedded backend: one SQLite file in WAL mode, written by one group-committing writer.

Durability: ``synchronous=FULL``, so an append is acknowledged only after
its transaction is on disk. Writes go through the :class:`~orchestrator.store._sqlite_writer.Writer`
(group commit); reads use their own read-only connection, whose snapshot
never blocks the writer. One daemon owns a file (an ``flock`` on the
database file itself, see :mod:`orchestrator.store._sqlite_file`, which also
creates a missing log whole and refuses an empty or damaged one); any number
of read-only readers (``orchestrator replay``) may open it while it runs.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite
import anyio
import anyio.to_thread

from orchestrator import codec
from orchestrator.clock import Clock
from orchestrator.errors import OrchestratorError, StoreError, Unavailable
from orchestrator.model import (
    Connection,
    ConnectionQuery,
    ConnectionRef,
    Job,
    JobQuery,
    NewJob,
    SealedCredentials,
)
from orchestrator.records import NewEvent, Record
from orchestrator.store import _sqlite_file
from orchestrator.store._base import Appended, Counts, Stats
from orchestrator.store._cache import ROW_CACHE, UNKNOWN
from orchestrator.store._migrations import check_known, migrations
from orchestrator.store._sqlite_rows import (
    JOB_COLUMNS,
    LIVE,
    RECORD_COLUMNS,
    SEALED_COLUMNS,
    connection_from_body,
    job_from_row,
    record_from_row,
    sealed_from_row,
)
from orchestrator.store._sqlite_writer import Writer
from orchestrator.store._tail import DEFAULT_TAIL, TailBounds, TailPage


class SQLiteEventStore:
    """The :class:`~orchestrator.store.EventStore` contract on one SQLite file."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock,
        readonly: bool,
        init: bool = False,
        tail: TailBounds = DEFAULT_TAIL,
        cache_rows: int = ROW_CACHE,
    ) -> None:
        self._path = path
        self._clock = clock
        self._reader: aiosqlite.Connection | None = None
        self._lookup: sqlite3.Connection | None = None
        """A read-only connection used on the event loop itself, for one-row lookups by key (see get_connection)."""
        self._writer = None if readonly else Writer(path, clock, init=init, tail=tail, cache_rows=cache_rows)
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: Path,
        *,
        clock: Clock,
        readonly: bool = False,
        init: bool = False,
        tail: TailBounds = DEFAULT_TAIL,
        cache_rows: int = ROW_CACHE,
    ) -> AsyncIterator[SQLiteEventStore]:
        """Open (creating and migrating unless ``readonly``) the log at ``path``.

        An existing file with no log in it is refused unless ``init`` (see
        :mod:`orchestrator.store._sqlite_file`); a missing one is created. ``tail``
        bounds the writer's in-memory tail of recent commits and ``cache_rows`` its cache of
        read-model rows (a read-only store has neither).
        """
        store = cls(path, clock=clock, readonly=readonly, init=init, tail=tail, cache_rows=cache_rows)
        try:
            async with store._open():
                yield store
        finally:
            # Closed on every path, including refused and read-only opens.
            store._closed = True
            if store._writer is not None:
                store._writer.closed()

    @property
    def file(self) -> Path:
        """The database file (``orchestrator replay`` reads it directly, read-only)."""
        return self._path

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[None]:
        writer, path = self._writer, self._path
        if writer is None:
            if not await anyio.Path(path).exists():
                raise StoreError(f"no event log at {path}")
            self._reader = await self._connect_reader()
            try:
                await self._check_schema(self._reader)
                yield
            finally:
                self._closed = True
                with anyio.CancelScope(shield=True):  # closed even when the owner is cancelled
                    await self._reader.close()
            return
        async with _exclusive(path, self._clock) as status:
            try:
                await writer.start(status)
                self._reader = await self._connect_reader()
                self._lookup = await anyio.to_thread.run_sync(self._connect_lookup)
                failed: Exception | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(writer.run)
                    try:
                        yield
                    except Exception as exc:
                        # Re-raised below, unwrapped: the caller's error is not ours to group.
                        failed = exc
                    finally:
                        # Stop taking appends; the writer commits what is queued, then ends.
                        writer.stop_taking()
                if failed is not None:
                    raise failed
            finally:
                self._closed = True
                writer.closed()
                with anyio.CancelScope(shield=True):  # closed even when the owner is cancelled
                    if self._lookup is not None:
                        await anyio.to_thread.run_sync(self._lookup.close)
                    if self._reader is not None:
                        await self._reader.close()
                    await writer.close()

    async def _connect_reader(self) -> aiosqlite.Connection:
        """A reader: aiosqlite, read-only."""
        try:
            db = await aiosqlite.connect(f"file:{quote(str(self._path))}?mode=ro", uri=True, isolation_level=None)
            await db.execute("PRAGMA busy_timeout = 5000")
            return db
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the event log at {self._path}: {exc}") from exc

    def _connect_lookup(self) -> sqlite3.Connection:
        """The loop's own read-only connection: it never waits for a lock (busy_timeout 0), see :meth:`_look_up`."""
        try:
            db = sqlite3.connect(
                f"file:{quote(str(self._path))}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA busy_timeout = 0")
            return db
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the event log at {self._path}: {exc}") from exc

    async def _check_schema(self, db: aiosqlite.Connection) -> set[int]:
        try:
            rows = await db.execute_fetchall("SELECT version FROM schema_migrations")
        except sqlite3.DatabaseError as exc:  # no such table, not a database, a damaged file
            raise StoreError(f"{self._path} is not an orchestrator event log, or it is damaged ({exc})") from exc
        await anyio.to_thread.run_sync(migrations, "sqlite")  # reads package files: off the loop, once
        return check_known("sqlite", {row[0] for row in rows}, self._path)

    # -- writing (through the writer) ----------------------------------------------

    def _writing(self) -> Writer:
        if self._writer is None:
            raise Unavailable("the event store is read-only")
        return self._writer

    async def append(
        self,
        ref: ConnectionRef,
        expected_version: int | None,
        events: Sequence[NewEvent],
        *,
        jobs: Sequence[NewJob] = (),
        cancel_jobs: Sequence[Job] = (),
        seal: SealedCredentials | None = None,
    ) -> Appended:
        """See :meth:`EventStore.append`. Waits for the group commit that includes it."""
        return await self._writing().append(
            ref, expected_version, events, jobs=jobs, cancel_jobs=cancel_jobs, seal=seal
        )

    async def claim_jobs(self, *, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> list[Job]:
        """See :meth:`EventStore.claim_jobs`."""
        return await self._writing().claim_jobs(limit=limit, lease=lease, exclude=exclude)

    async def finish_job(
        self, job: Job, events: Sequence[NewEvent], *, retry_at: datetime | None = None
    ) -> Appended | None:
        """See :meth:`EventStore.finish_job`."""
        return await self._writing().finish_job(job, events, retry_at=retry_at)

    async def retry_job(self, job: Job, events: Sequence[NewEvent], *, run_at: datetime) -> Appended:
        """See :meth:`EventStore.retry_job`."""
        return await self._writing().retry_job(job, events, run_at=run_at)

    async def sweep_credentials(self) -> int:
        """See :meth:`EventStore.sweep_credentials`."""
        return await self._writing().sweep_credentials()

    def jobs_changed(self) -> anyio.Event:
        """See :meth:`EventStore.jobs_changed`."""
        return self._writing().jobs_changed()

    # -- reading -----------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        db = self._reader
        if db is None or self._closed:
            raise Unavailable("the event store is closed")
        try:
            # One hop for execute and fetch: a statement left open between the two would
            # pin its snapshot for other readers of this connection (stale reads).
            return list(await db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"the event log could not be read: {exc}") from exc

    async def get_connection(self, ref: ConnectionRef) -> Connection | None:
        """See :meth:`EventStore.get_connection`.

        From the writer's cache of committed rows when it has the connection; else one
        lookup by primary key, made on the event loop itself (see :meth:`_look_up`).
        """
        writer = self._writer
        if writer is not None:
            cached = writer.cache.get(ref.stream)
            if cached is not UNKNOWN:
                return cached
        rows = self._look_up(_ONE_CONNECTION, ref.stream)
        if rows is not None:
            found = connection_from_body(rows[0][0]) if rows else None
            if writer is not None:
                # Safe: nothing was awaited since the cache missed, so no commit can have been applied
                # in between; a commit whose thread finished meanwhile is applied after, over this row.
                writer.cache.put(ref.stream, found)
            return found
        # Read through the reader's thread, and cache nothing: a commit may be applied while it is awaited.
        rows = await self._fetch(_ONE_CONNECTION, (ref.stream,))
        return connection_from_body(rows[0][0]) if rows else None

    async def sealed_credentials(self, ref: ConnectionRef) -> SealedCredentials | None:
        """See :meth:`EventStore.sealed_credentials` (a lookup by primary key, on the loop: see :meth:`_look_up`)."""
        rows = self._look_up(_ONE_SEALED, ref.stream)
        if rows is None:
            rows = await self._fetch(_ONE_SEALED, (ref.stream,))
        return sealed_from_row(rows[0]) if rows else None

    def _look_up(self, sql: str, stream: str) -> list[sqlite3.Row] | None:
        """The rows of one lookup by primary key, made on the event loop: no thread hop, no lock wait.

        Costs a few microseconds from the page cache (a B-tree descent of a few pages), less than
        the hand-off to the reader's thread it replaces. ``busy_timeout`` 0 makes SQLite answer
        SQLITE_BUSY at once rather than block the loop for a lock (a checkpoint resetting the WAL,
        a recovery): then None, and the caller reads through the reader's thread. The statement
        is stepped to its end (``fetchall``) so that it holds no read snapshot afterwards.
        """
        db = self._lookup
        if db is None or self._closed:
            return None
        try:
            rows: list[sqlite3.Row] = db.execute(sql, (stream,)).fetchall()
        except sqlite3.OperationalError:
            return None
        except sqlite3.Error as exc:
            raise StoreError(f"the event log could not be read: {exc}") from exc
        return rows

    async def sealed_keys(self) -> dict[str, int]:
        """See :meth:`EventStore.sealed_keys`."""
        rows = await self._fetch("SELECT key_id, COUNT(*) FROM credentials GROUP BY key_id", ())
        return {str(key): int(count) for key, count in rows}

    async def list_connections(self, query: ConnectionQuery) -> list[Connection]:
        """See :meth:`EventStore.list_connections`."""
        where, params = ["stream > ?"], [query.after_stream]
        if query.environment:
            where.append("environment = ?")
            params.append(query.environment)
        if query.integration:
            where.append("integration = ?")
            params.append(query.integration)
        if query.state is not None:
            where.append("state = ?")
            params.append(query.state.value)
        sql = f"SELECT body FROM connections WHERE {' AND '.join(where)} ORDER BY stream LIMIT ?"
        rows = await self._fetch(sql, [*params, query.limit])
        return [connection_from_body(row[0]) for row in rows]

    async def find_idempotent(self, ref: ConnectionRef, key: str) -> Record | None:
        """See :meth:`EventStore.find_idempotent`."""
        rows = await self._fetch(
            f"SELECT {RECORD_COLUMNS} FROM events WHERE stream = ? AND idempotency_key = ?",
            (ref.stream, key),
        )
        return record_from_row(rows[0]) if rows else None

    async def read(
        self, *, from_position: int = 1, ref: ConnectionRef | None = None, limit: int = 1000
    ) -> list[Record]:
        """See :meth:`EventStore.read`."""
        if ref is None:
            sql = f"SELECT {RECORD_COLUMNS} FROM events WHERE position >= ? ORDER BY position LIMIT ?"
            rows = await self._fetch(sql, (from_position, limit))
        else:
            sql = f"SELECT {RECORD_COLUMNS} FROM events WHERE stream = ? AND position >= ? ORDER BY version LIMIT ?"
            rows = await self._fetch(sql, (ref.stream, from_position, limit))
        return [record_from_row(row) for row in rows]

    def read_tail(
        self, *, from_position: int = 1, ref: ConnectionRef | None = None, limit: int = 1000
    ) -> TailPage | None:
        """See :meth:`EventStore.read_tail` (a read-only store sees no commits: it keeps no tail)."""
        if self._writer is None or self._closed:
            return None
        return self._writer.tail.read(from_position=from_position, ref=ref, limit=limit)

    async def jobs(self, ref: ConnectionRef | None = None) -> list[Job]:
        """See :meth:`EventStore.jobs`."""
        if ref is None:
            sql = f"SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_due WHERE {LIVE} ORDER BY run_at"
            rows = await self._fetch(sql, ())
        else:
            sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE stream = ? AND {LIVE} ORDER BY run_at"
            rows = await self._fetch(sql, (ref.stream,))
        return [job_from_row(row) for row in rows]

    async def list_jobs(self, query: JobQuery) -> list[Job]:
        """See :meth:`EventStore.list_jobs`.

        Keyset paging on (stream, job id), by the indexes ``jobs_by_stream`` and ``jobs_by_status``:
        with a status filter, one bounded query per status, merged (each walks its index in order).
        """
        where, params = ["(stream, job_id) > (?, ?)"], list(query.after)
        if query.stream:
            where.append("stream = ?")
            params.append(query.stream)
        if query.environment:
            # Names hold no "/" and "0" follows "/": the environment's streams are exactly this range.
            where.append("stream > ? AND stream < ?")
            params += [query.environment + "/", query.environment + "0"]
        columns = f"SELECT {JOB_COLUMNS} FROM jobs WHERE"
        if not query.statuses:
            sql = f"{columns} {' AND '.join(where)} ORDER BY stream, job_id LIMIT ?"
            rows = await self._fetch(sql, [*params, query.limit])
        else:
            one = f"SELECT * FROM ({columns} status = ? AND {' AND '.join(where)} ORDER BY stream, job_id LIMIT ?)"
            statuses = sorted(query.statuses)
            sql = " UNION ALL ".join([one] * len(statuses)) + " ORDER BY stream, job_id LIMIT ?"
            bound = [value for status in statuses for value in (status.value, *params, query.limit)]
            rows = await self._fetch(sql, [*bound, query.limit])
        return [job_from_row(row) for row in rows]

    async def get_job(self, job_id: str) -> Job | None:
        """See :meth:`EventStore.get_job`."""
        rows = await self._fetch(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return job_from_row(rows[0]) if rows else None

    async def stats(self) -> Stats:
        """See :meth:`EventStore.stats`."""
        jobs = await self._fetch(f"SELECT COUNT(*), MIN(run_at) FROM jobs INDEXED BY jobs_due WHERE {LIVE}", ())
        states = await self._fetch("SELECT state, COUNT(*) FROM connections GROUP BY state", ())
        count, oldest = jobs[0]
        return Stats(
            count,
            codec.from_micros(oldest) if oldest is not None else None,
            {str(s): int(n) for s, n in states} if states else {},
        )

    async def counts(self) -> Counts:
        """See :meth:`EventStore.counts`."""
        states = await self._fetch("SELECT environment, state, COUNT(*) FROM connections GROUP BY 1, 2", ())
        statuses = await self._fetch(
            "SELECT substr(stream, 1, instr(stream, '/') - 1), status, COUNT(*) FROM jobs GROUP BY 1, 2", ()
        )
        return Counts(
            {(str(e), str(s)): int(n) for e, s, n in states}, {(str(e), str(s)): int(n) for e, s, n in statuses}
        )

    async def next_job_at(self) -> datetime | None:
        """See :meth:`EventStore.next_job_at`."""
        rows = await self._fetch(
            "SELECT MIN(CASE WHEN lease_until IS NULL THEN run_at ELSE MAX(run_at, lease_until) END)"
            f" FROM jobs INDEXED BY jobs_due WHERE {LIVE}",
            (),
        )
        return codec.from_micros(rows[0][0]) if rows[0][0] is not None else None

    async def head(self) -> int:
        """See :meth:`EventStore.head`."""
        if self._writer is not None:
            return self._writer.tail.head
        rows = await self._fetch("SELECT MAX(position) FROM events", ())
        return int(rows[0][0] or 0)

    async def wait_for(self, position: int, ref: ConnectionRef | None = None) -> None:
        """See :meth:`EventStore.wait_for` (a read-only store sees no commits: it waits until closed)."""
        if self._writer is None:
            raise Unavailable("the event store is read-only: it is told of no commits")
        await self._writer.tail.wait_for(position, ref)


_ONE_CONNECTION = "SELECT body FROM connections WHERE stream = ?"
_ONE_SEALED = f"SELECT {SEALED_COLUMNS} FROM credentials WHERE stream = ?"


@asynccontextmanager
async def _exclusive(path: Path, clock: Clock) -> AsyncIterator[os.stat_result]:
    """Own the log at ``path`` (created whole if missing) for the block: a second daemon on it refuses to start.

    Yields the database file's status, taken once it is locked.
    """
    lock = await anyio.to_thread.run_sync(_own, path, clock)  # file I/O stays off the event loop
    try:
        assert lock.status is not None
        yield lock.status
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lock.release)


def _own(path: Path, clock: Clock) -> _sqlite_file.Lock:
    try:
        real = path.resolve()  # a symlink leads to the file it names: one lock per file, whatever the path
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise StoreError(f"cannot find the event log {path}: {exc}") from exc
    _sqlite_file.make_directories(real.parent)
    if not real.exists():
        _sqlite_file.create(real, clock)
    lock = _sqlite_file.Lock(real, shown=path)
    lock.acquire()
    return lock


RESEAL_BATCH = 200
"""Rows resealed per transaction by :func:`reseal_sqlite` (short transactions: the daemon writes between them)."""


def reseal_sqlite(
    path: Path,
    reseal: Callable[[SealedCredentials], SealedCredentials | None],
    *,
    clock: Clock,
    batch: int = RESEAL_BATCH,
) -> tuple[int, int, list[str]]:
    """Run ``reseal`` over every sealed row of the log at ``path``, storing what it returns; safe while the daemon runs.

    The daemon owns the log's records, not this table's rows one by one: each batch is one short
    ``BEGIN IMMEDIATE`` transaction, and a row is replaced only if it is still the one that was
    read (same nonce), so credentials the daemon sealed meanwhile are never overwritten. Returns
    (rows resealed, rows that changed meanwhile and were left as they are, one problem per row
    that ``reseal`` refused). Blocks: call it off the event loop.
    """
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the event log at {path}: {exc}") from exc
    resealed = skipped = 0
    problems: list[str] = []
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("PRAGMA secure_delete = ON")  # the old ciphertexts are overwritten, not left in free pages
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        if "credentials" not in tables:
            raise StoreError(
                f"{path} has no credentials table: it is not an event log, or no daemon of this release has opened it"
            )
        after = ""
        while True:
            rows = db.execute(
                f"SELECT {SEALED_COLUMNS} FROM credentials WHERE stream > ? ORDER BY stream LIMIT ?", (after, batch)
            ).fetchall()
            if not rows:
                break
            after = rows[-1][0]
            updates = []
            for row in rows:
                sealed = sealed_from_row(row)
                try:
                    fresh = reseal(sealed)
                except OrchestratorError as exc:
                    problems.append(f"{sealed.stream}: {exc}")
                    continue
                if fresh is not None:
                    updates.append((fresh, sealed.nonce))
            if not updates:
                continue
            now = codec.to_micros(clock.now())
            db.execute("BEGIN IMMEDIATE")
            try:
                for fresh, nonce in updates:
                    cursor = db.execute(
                        "UPDATE credentials SET key_id = ?, nonce = ?, ciphertext = ?, fingerprint = ?, updated_at = ?"
                        " WHERE stream = ? AND nonce = ?",
                        (fresh.key_id, fresh.nonce, fresh.ciphertext, fresh.fingerprint, now, fresh.stream, nonce),
                    )
                    if cursor.rowcount:
                        resealed += 1
                    else:
                        skipped += 1
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
    except sqlite3.Error as exc:
        raise StoreError(f"the credentials in {path} could not be resealed: {exc}") from exc
    finally:
        db.close()
    return resealed, skipped, problems
