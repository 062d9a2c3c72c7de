"""The embedded backend: one SQLite file in WAL mode, written by one group-committing task.

Durability: ``synchronous=FULL``, so an append is acknowledged only after
its transaction is on disk. Throughput: appends queue up while a commit is in
flight and the writer commits all of them in the next transaction (group
commit), so fsyncs are shared. One daemon owns a file (an ``flock`` on
``<file>.lock``); any number of read-only readers (``orchestrator replay``)
may open it while it runs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import logging
import os
import sqlite3
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite
import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from orchestrator import codec
from orchestrator.clock import Clock
from orchestrator.errors import (
    IdempotencyConflict,
    InvalidArgument,
    LeaseLost,
    OrchestratorError,
    ResourceExhausted,
    StoreError,
    Unavailable,
)
from orchestrator.model import (
    Connection,
    ConnectionQuery,
    ConnectionRef,
    Job,
    LifecycleEvent,
    NewEvent,
    NewJob,
    Record,
)
from orchestrator.store import Appended, Stats
from orchestrator.store._append import plan_append

log = logging.getLogger(__name__)

MAX_BATCH = 512
"""Appends committed together at most (bounds a transaction's size and latency)."""
QUEUE_SIZE = 4096
ROW_CACHE = 8192
"""Read-model rows the writer keeps in memory, so a busy connection's append skips a read and a decode."""
"""Appends waiting for the writer at most; more are refused with RESOURCE_EXHAUSTED."""
_RECORD_COLUMNS = (
    "position, stream, version, event_id, type, data, recorded_at, "
    "causation_id, traceparent, idempotency_key, schema_version"
)


@dataclass(eq=False)
class _Op:
    """One write waiting for the writer; ``stream`` is None for job claims."""

    stream: str | None
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass(eq=False)
class _Append(_Op):
    ref: ConnectionRef = field(default=None)  # type: ignore[assignment]  # always given
    expected_version: int | None = None
    events: Sequence[NewEvent] = ()
    jobs: Sequence[NewJob] = ()
    cancel_jobs: Sequence[str] = ()


@dataclass(eq=False)
class _Claim(_Op):
    now: int = 0
    limit: int = 0
    lease_until: int = 0
    exclude: frozenset[str] = frozenset()


@dataclass(eq=False)
class _Finish(_Op):
    job: Job = field(default=None)  # type: ignore[assignment]  # always given
    events: Sequence[NewEvent] = ()
    retry_at: int | None = None


@dataclass(eq=False)
class _Txn:
    """What one batch writes, gathered for ``executemany``."""

    current: dict[str, Connection]
    position: int
    recorded_at: datetime
    event_rows: list[tuple[Any, ...]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    job_rows: list[tuple[Any, ...]] = field(default_factory=list)
    deleted_jobs: list[str] = field(default_factory=list)
    rescheduled: list[tuple[int, str]] = field(default_factory=list)


_JOB_COLUMNS = (
    "job_id, stream, function, event, causation_id, payload, traceparent, run_at, attempt, lease_until, lease_token"
)


def _row_to_job(row: Sequence[Any]) -> Job:
    return Job(
        job_id=row[0],
        stream=row[1],
        function=row[2],
        event=LifecycleEvent(row[3]),
        causation_id=row[4],
        payload=json.loads(row[5]),
        traceparent=row[6],
        run_at=codec.from_micros(row[7]),
        attempt=row[8],
        leased=row[9] is not None,
        lease_token=row[10],
    )


@functools.cache
def _migrations() -> list[tuple[int, str, str]]:
    """(number, file name, SQL) of every migration shipped, in order (read once)."""
    folder = resources.files("orchestrator.store") / "sql" / "sqlite"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number = int(entry.name.split("_", 1)[0])
            found.append((number, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def _row_to_record(row: Sequence[Any]) -> Record:
    return Record(
        position=row[0],
        stream=row[1],
        version=row[2],
        event_id=row[3],
        type=row[4],
        data=json.loads(row[5]),
        recorded_at=codec.from_micros(row[6]),
        causation_id=row[7],
        traceparent=row[8],
        idempotency_key=row[9],
        schema_version=row[10],
    )


def _record_to_row(record: Record) -> tuple[Any, ...]:
    return (
        record.position,
        record.stream,
        record.version,
        record.event_id,
        record.type,
        codec.dumps(record.data),
        codec.to_micros(record.recorded_at),
        record.causation_id,
        record.traceparent,
        record.idempotency_key,
        record.schema_version,
    )


def _connection_to_row(connection: Connection) -> tuple[Any, ...]:
    ref = connection.ref
    return (
        ref.stream,
        ref.environment,
        ref.integration,
        ref.connection_id,
        connection.state.value,
        connection.version,
        connection.last_position,
        codec.dumps(codec.connection_to_json(connection)),
    )


class SQLiteEventStore:
    """The :class:`~orchestrator.store.EventStore` contract on one SQLite file."""

    def __init__(self, path: Path, *, clock: Clock, readonly: bool) -> None:
        self._path = path
        self._clock = clock
        self._readonly = readonly
        self._reader: aiosqlite.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        # The writer's copies of recently written read-model rows (bounded, least recently used out).
        self._rows: OrderedDict[str, Connection] = OrderedDict()
        # The writer connection is only ever used by one thread at a time, through this limiter.
        self._writer_thread = anyio.CapacityLimiter(1)
        send, receive = anyio.create_memory_object_stream[_Op](QUEUE_SIZE)
        self._send: MemoryObjectSendStream[_Op] = send
        self._receive: MemoryObjectReceiveStream[_Op] = receive
        self._head = 0
        self._last_micros = 0
        self._changed = anyio.Event()
        self._jobs_event = anyio.Event()
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, *, clock: Clock, readonly: bool = False) -> AsyncIterator[SQLiteEventStore]:
        """Open (creating and migrating unless ``readonly``) the log at ``path``."""
        store = cls(path, clock=clock, readonly=readonly)
        try:
            async with store._open():
                yield store
        finally:
            # Closed on every path, including refused and read-only opens.
            store._send.close()
            store._receive.close()

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[None]:
        store, path, readonly = self, self._path, self._readonly
        if readonly:
            if not await anyio.Path(path).exists():
                raise StoreError(f"no event log at {path}")
            store._reader = await store._connect_reader()
            try:
                await store._check_schema(store._reader)
                store._head = await store.head()
                yield
            finally:
                store._closed = True
                with anyio.CancelScope(shield=True):  # closed even when the owner is cancelled
                    await store._reader.close()
            return
        await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        async with _exclusive(path):
            try:
                await anyio.to_thread.run_sync(store._start_writer, limiter=store._writer_thread)
                store._reader = await store._connect_reader()
                failed: Exception | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(store._write_loop)
                    try:
                        yield
                    except Exception as exc:
                        # Re-raised below, unwrapped: the caller's error is not ours to group.
                        failed = exc
                    finally:
                        # Stop taking appends; the writer commits what is queued, then ends.
                        store._send.close()
                if failed is not None:
                    raise failed
            finally:
                store._closed = True
                store._notify()
                with anyio.CancelScope(shield=True):  # closed even when the owner is cancelled
                    if store._reader is not None:
                        await store._reader.close()
                    if store._writer is not None:
                        await anyio.to_thread.run_sync(store._writer.close, limiter=store._writer_thread)

    async def _connect_reader(self) -> aiosqlite.Connection:
        """A reader: aiosqlite, read-only."""
        try:
            db = await aiosqlite.connect(f"file:{quote(str(self._path))}?mode=ro", uri=True, isolation_level=None)
            await db.execute("PRAGMA busy_timeout = 5000")
            return db
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the event log at {self._path}: {exc}") from exc

    def _start_writer(self) -> None:
        """Open, migrate and read the writer's starting point (in the writer's thread)."""
        try:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the event log at {self._path}: {exc}") from exc
        self._writer = db
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            self._migrate(db)
            # We hold the file's lock, so whoever leased a job before is dead:
            # its attempt is retried now rather than after the lease runs out.
            db.execute("UPDATE jobs SET lease_until = NULL WHERE lease_until IS NOT NULL")
            self._head = db.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0]
            self._last_micros = db.execute("SELECT COALESCE(MAX(recorded_at), 0) FROM events").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the event log at {self._path}: {exc}") from exc

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at INTEGER NOT NULL)"
        )
        applied = self._check_known({row[0] for row in db.execute("SELECT version FROM schema_migrations")})
        for number, name, sql in _migrations():
            if number in applied:
                continue
            log.info("applying migration %s to %s", name, self._path)
            stamp = codec.to_micros(self._clock.now())
            db.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\n"
                f"INSERT INTO schema_migrations (version, name, applied_at) VALUES ({number}, '{name}', {stamp});\n"
                "COMMIT;"
            )

    async def _check_schema(self, db: aiosqlite.Connection) -> set[int]:
        try:
            rows = await db.execute_fetchall("SELECT version FROM schema_migrations")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"{self._path} is not an orchestrator event log ({exc})") from exc
        await anyio.to_thread.run_sync(_migrations)  # reads package files: off the loop, once
        return self._check_known({row[0] for row in rows})

    def _check_known(self, applied: set[int]) -> set[int]:
        known = {number for number, _, _ in _migrations()}
        if applied - known:
            raise StoreError(
                f"{self._path} has schema version {max(applied)}, newer than this orchestrator knows"
                f" ({max(known)}): upgrade the orchestrator"
            )
        return applied

    # -- writing -----------------------------------------------------------

    async def _submit(self, op: _Op) -> Any:
        if self._closed or self._readonly:
            raise Unavailable("the event store is closed" if self._closed else "the event store is read-only")
        try:
            self._send.send_nowait(op)
        except anyio.WouldBlock:
            raise ResourceExhausted(
                f"the write queue is full ({QUEUE_SIZE} writes waiting); retry with backoff"
            ) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise Unavailable("the event store is closing") from None
        # Once queued the write will be committed or refused even if the caller
        # goes away: shield the wait so that its outcome is always collected.
        with anyio.CancelScope(shield=True):
            await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result

    async def append(
        self,
        ref: ConnectionRef,
        expected_version: int | None,
        events: Sequence[NewEvent],
        *,
        jobs: Sequence[NewJob] = (),
        cancel_jobs: Sequence[str] = (),
    ) -> Appended:
        """See :meth:`EventStore.append`. Waits for the group commit that includes it."""
        op = _Append(
            ref.stream, ref=ref, expected_version=expected_version, events=events, jobs=jobs, cancel_jobs=cancel_jobs
        )
        result: Appended = await self._submit(op)
        return result

    async def claim_jobs(self, *, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> list[Job]:
        """See :meth:`EventStore.claim_jobs`."""
        now = codec.to_micros(self._clock.now())
        op = _Claim(None, now=now, limit=limit, lease_until=now + int(lease * 1_000_000), exclude=exclude)
        jobs: list[Job] = await self._submit(op)
        return jobs

    async def finish_job(self, job: Job, events: Sequence[NewEvent], *, retry_at: datetime | None = None) -> Appended:
        """See :meth:`EventStore.finish_job`."""
        op = _Finish(
            job.stream, job=job, events=events, retry_at=codec.to_micros(retry_at) if retry_at is not None else None
        )
        result: Appended = await self._submit(op)
        return result

    async def _write_loop(self) -> None:
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                # A commit takes milliseconds; finishing it keeps every
                # caller's outcome certain even when shutdown cancels us.
                with anyio.CancelScope(shield=True):
                    await self._commit_isolating(batch)

    async def _commit_isolating(self, batch: list[_Op]) -> None:
        now = max(codec.to_micros(self._clock.now()), self._last_micros)
        try:
            txn = await anyio.to_thread.run_sync(self._commit, batch, now, limiter=self._writer_thread)
        except Exception as exc:  # the writer must outlive any one write; its callers get the error
            if len(batch) == 1:
                batch[0].error = self._wrap(exc, batch[0])
            else:
                # One bad write must not fail its neighbours: retry each alone.
                for op in batch:
                    await self._commit_isolating([op])
                return
        else:
            self._last_micros = now
            if txn.position - 1 > self._head:
                self._head = txn.position - 1
                self._notify()
            if txn.job_rows or txn.rescheduled or txn.deleted_jobs:
                self._jobs_changed()
        for op in batch:
            op.done.set()

    def _wrap(self, exc: Exception, op: _Op) -> OrchestratorError:
        if isinstance(exc, sqlite3.IntegrityError) and "idempotency_key" in str(exc) and isinstance(op, _Append):
            keys = ", ".join(repr(e.idempotency_key) for e in op.events if e.idempotency_key)
            return IdempotencyConflict(f"idempotency key {keys} is already used on {op.ref}")
        log.error("write to %s failed: %r", op.stream, exc)
        return StoreError(f"the event log could not be written: {exc}")

    def _commit(self, batch: list[_Op], now: int) -> _Txn:
        """One transaction for the whole batch; runs in the writer's thread (one hop per batch)."""
        db = self._writer
        assert db is not None
        for op in batch:
            op.error = op.result = None
        db.execute("BEGIN IMMEDIATE")
        try:
            txn = _Txn(
                current=self._load_connections(db, {op.stream for op in batch if op.stream}),
                position=self._head + 1,
                recorded_at=codec.from_micros(now),
            )
            for op in batch:
                try:
                    if isinstance(op, _Append):
                        op.result = self._apply_append(db, txn, op)
                    elif isinstance(op, _Finish):
                        op.result = self._apply_finish(db, txn, op)
                    elif isinstance(op, _Claim):
                        op.result = self._apply_claim(db, op)
                except OrchestratorError as exc:
                    op.error = exc
                except (TypeError, ValueError) as exc:  # data that cannot be encoded as JSON
                    op.error = InvalidArgument(f"the record cannot be stored: {exc}")
            self._flush(db, txn)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # Only the writer changes rows, so after a commit its copies are the truth.
        for stream in txn.touched:
            self._rows[stream] = txn.current[stream]
            self._rows.move_to_end(stream)
        while len(self._rows) > ROW_CACHE:
            self._rows.popitem(last=False)
        return txn

    def _add_records(
        self, txn: _Txn, ref: ConnectionRef, expected_version: int | None, events: Sequence[NewEvent]
    ) -> Appended:
        records, connection = plan_append(
            txn.current.get(ref.stream),
            ref,
            expected_version,
            events,
            first_position=txn.position,
            recorded_at=txn.recorded_at,
        )
        rows = [_record_to_row(r) for r in records]  # may raise: before anything is staged
        txn.current[ref.stream] = connection
        txn.touched.add(ref.stream)
        txn.position += len(records)
        txn.event_rows.extend(rows)
        return Appended(tuple(records), connection)

    def _apply_append(self, db: sqlite3.Connection, txn: _Txn, op: _Append) -> Appended:
        if op.cancel_jobs:
            marks = ",".join("?" * len(op.cancel_jobs))
            sql = f"SELECT job_id FROM jobs WHERE job_id IN ({marks}) AND lease_until IS NULL"
            free = {row[0] for row in db.execute(sql, list(op.cancel_jobs))}
            if free != set(op.cancel_jobs):
                raise LeaseLost(f"{op.ref}: a job to cancel has started meanwhile; retry")
        created = codec.to_micros(txn.recorded_at)
        job_rows = [
            (
                j.job_id,
                op.ref.stream,
                j.function,
                j.event.value,
                j.causation_id,
                codec.dumps(j.payload),
                j.traceparent,
                codec.to_micros(j.run_at),
                j.attempt,
                None,
                0,
                created,
            )
            for j in op.jobs
        ]
        appended = self._add_records(txn, op.ref, op.expected_version, op.events)
        txn.deleted_jobs.extend(op.cancel_jobs)
        txn.job_rows.extend(job_rows)
        return appended

    def _apply_finish(self, db: sqlite3.Connection, txn: _Txn, op: _Finish) -> Appended | None:
        job = op.job
        row = db.execute("SELECT lease_token FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()
        if row is None or row[0] != job.lease_token:
            raise LeaseLost(f"job {job.job_id} ({job.function} on {job.stream}) was claimed again; outcome dropped")
        appended = self._add_records(txn, job.ref, None, op.events) if op.events else None
        if op.retry_at is None:
            txn.deleted_jobs.append(job.job_id)
        else:
            txn.rescheduled.append((op.retry_at, job.job_id))
        return appended

    def _apply_claim(self, db: sqlite3.Connection, op: _Claim) -> list[Job]:
        excluded = list(op.exclude)
        marks = ",".join("?" * len(excluded))
        not_excluded = f" AND stream NOT IN ({marks})" if excluded else ""
        sql = (
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE run_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
            f"{not_excluded} ORDER BY run_at LIMIT ?"
        )
        rows = db.execute(sql, [op.now, op.now, *excluded, op.limit]).fetchall()
        claimed = []
        for row in rows:
            job = _row_to_job(row)
            job = dataclasses.replace(job, attempt=job.attempt + 1, lease_token=job.lease_token + 1, leased=True)
            claimed.append(job)
        db.executemany(
            "UPDATE jobs SET attempt = ?, lease_token = ?, lease_until = ? WHERE job_id = ?",
            [(j.attempt, j.lease_token, op.lease_until, j.job_id) for j in claimed],
        )
        return claimed

    def _flush(self, db: sqlite3.Connection, txn: _Txn) -> None:
        if txn.event_rows:
            db.executemany(f"INSERT INTO events ({_RECORD_COLUMNS}) VALUES ({','.join('?' * 11)})", txn.event_rows)
            db.executemany(
                "INSERT OR REPLACE INTO connections (stream, environment, integration, connection_id,"
                " state, version, last_position, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [_connection_to_row(txn.current[s]) for s in txn.touched],
            )
        if txn.job_rows:
            db.executemany(f"INSERT INTO jobs ({_JOB_COLUMNS}, created_at) VALUES ({','.join('?' * 12)})", txn.job_rows)
        if txn.deleted_jobs:
            db.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in txn.deleted_jobs])
        if txn.rescheduled:
            db.executemany("UPDATE jobs SET run_at = ?, lease_until = NULL WHERE job_id = ?", txn.rescheduled)

    def _load_connections(self, db: sqlite3.Connection, streams: Iterable[str]) -> dict[str, Connection]:
        found: dict[str, Connection] = {}
        wanted = []
        for stream in streams:
            cached = self._rows.get(stream)
            if cached is None:
                wanted.append(stream)
            else:
                found[stream] = cached
                self._rows.move_to_end(stream)
        for start in range(0, len(wanted), 500):  # stay under SQLite's host-parameter limit
            chunk = wanted[start : start + 500]
            sql = f"SELECT body FROM connections WHERE stream IN ({','.join('?' * len(chunk))})"
            for (body,) in db.execute(sql, chunk):
                connection = codec.connection_from_json(json.loads(body))
                found[connection.ref.stream] = connection
        return found

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _jobs_changed(self) -> None:
        changed, self._jobs_event = self._jobs_event, anyio.Event()
        changed.set()

    def jobs_changed(self) -> anyio.Event:
        """An event set at the next commit that adds or reschedules jobs."""
        return self._jobs_event

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
        """See :meth:`EventStore.get_connection`."""
        rows = await self._fetch("SELECT body FROM connections WHERE stream = ?", (ref.stream,))
        return codec.connection_from_json(json.loads(rows[0][0])) if rows else None

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
        return [codec.connection_from_json(json.loads(row[0])) for row in rows]

    async def find_idempotent(self, ref: ConnectionRef, key: str) -> Record | None:
        """See :meth:`EventStore.find_idempotent`."""
        rows = await self._fetch(
            f"SELECT {_RECORD_COLUMNS} FROM events WHERE stream = ? AND idempotency_key = ?",
            (ref.stream, key),
        )
        return _row_to_record(rows[0]) if rows else None

    async def read(
        self, *, from_position: int = 1, ref: ConnectionRef | None = None, limit: int = 1000
    ) -> list[Record]:
        """See :meth:`EventStore.read`."""
        if ref is None:
            sql = f"SELECT {_RECORD_COLUMNS} FROM events WHERE position >= ? ORDER BY position LIMIT ?"
            rows = await self._fetch(sql, (from_position, limit))
        else:
            sql = f"SELECT {_RECORD_COLUMNS} FROM events WHERE stream = ? AND position >= ? ORDER BY version LIMIT ?"
            rows = await self._fetch(sql, (ref.stream, from_position, limit))
        return [_row_to_record(row) for row in rows]

    async def jobs(self, ref: ConnectionRef | None = None) -> list[Job]:
        """See :meth:`EventStore.jobs`."""
        if ref is None:
            rows = await self._fetch(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY run_at", ())
        else:
            sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE stream = ? ORDER BY run_at"
            rows = await self._fetch(sql, (ref.stream,))
        return [_row_to_job(row) for row in rows]

    async def stats(self) -> Stats:
        """See :meth:`EventStore.stats`."""
        jobs = await self._fetch("SELECT COUNT(*), MIN(run_at) FROM jobs", ())
        states = await self._fetch("SELECT state, COUNT(*) FROM connections GROUP BY state", ())
        count, oldest = jobs[0]
        return Stats(
            count,
            codec.from_micros(oldest) if oldest is not None else None,
            {str(s): int(n) for s, n in states} if states else {},
        )

    async def next_job_at(self) -> datetime | None:
        """See :meth:`EventStore.next_job_at`."""
        rows = await self._fetch(
            "SELECT MIN(CASE WHEN lease_until IS NULL THEN run_at ELSE MAX(run_at, lease_until) END) FROM jobs", ()
        )
        return codec.from_micros(rows[0][0]) if rows[0][0] is not None else None

    async def head(self) -> int:
        """See :meth:`EventStore.head`."""
        if not self._readonly:
            return self._head
        return await self._query_head()

    async def _query_head(self) -> int:
        rows = await self._fetch("SELECT MAX(position) FROM events", ())
        return int(rows[0][0] or 0)

    async def wait_for(self, position: int) -> None:
        """See :meth:`EventStore.wait_for`."""
        while self._head < position:
            if self._closed:
                raise Unavailable("the event store is closed")
            await self._changed.wait()


@asynccontextmanager
async def _exclusive(path: Path) -> AsyncIterator[None]:
    """Hold ``<path>.lock`` so that a second daemon on the same file refuses to start."""
    lock = _LockFile(path.with_name(path.name + ".lock"))
    await anyio.to_thread.run_sync(lock.acquire)  # file I/O stays off the event loop
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lock.release)


class _LockFile:
    """An ``flock``-ed file holding the owner's pid."""

    def __init__(self, lock_path: Path) -> None:
        self._lock_path = lock_path
        self._fd = -1

    def acquire(self) -> None:
        self._fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 32).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise StoreError(
                f"the event log {self._lock_path.with_suffix('')} is in use by pid {holder}:"
                " one daemon owns an SQLite log (use PostgreSQL to run several)"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
