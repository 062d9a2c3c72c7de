"""The embedded backend: one SQLite file in WAL mode, written by one group-committing task.

Durability: ``synchronous=FULL``, so an append is acknowledged only after
its transaction is on disk. Throughput: appends queue up while a commit is in
flight and the writer commits all of them in the next transaction (group
commit), so fsyncs are shared. One daemon owns a file (an ``flock`` on
``<file>.lock``); any number of read-only readers (``orchestrator replay``)
may open it while it runs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from orchestrator import codec
from orchestrator.clock import Clock
from orchestrator.errors import (
    IdempotencyConflict,
    OrchestratorError,
    ResourceExhausted,
    StoreError,
    Unavailable,
)
from orchestrator.model import Connection, ConnectionQuery, ConnectionRef, NewEvent, Record
from orchestrator.store import Appended
from orchestrator.store._append import plan_append

log = logging.getLogger(__name__)

MAX_BATCH = 512
"""Appends committed together at most (bounds a transaction's size and latency)."""
QUEUE_SIZE = 4096
"""Appends waiting for the writer at most; more are refused with RESOURCE_EXHAUSTED."""
_RECORD_COLUMNS = (
    "position, stream, version, event_id, type, data, recorded_at, "
    "causation_id, traceparent, idempotency_key, schema_version"
)


@dataclass(eq=False)
class _Pending:
    ref: ConnectionRef
    expected_version: int
    events: Sequence[NewEvent]
    done: anyio.Event = field(default_factory=anyio.Event)
    result: Appended | None = None
    error: BaseException | None = None


def _migrations() -> list[tuple[int, str, str]]:
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
        self._writer: aiosqlite.Connection | None = None
        send, receive = anyio.create_memory_object_stream[_Pending](QUEUE_SIZE)
        self._send: MemoryObjectSendStream[_Pending] = send
        self._receive: MemoryObjectReceiveStream[_Pending] = receive
        self._head = 0
        self._last_micros = 0
        self._changed = anyio.Event()
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, *, clock: Clock, readonly: bool = False) -> AsyncIterator[SQLiteEventStore]:
        """Open (creating and migrating unless ``readonly``) the log at ``path``."""
        store = cls(path, clock=clock, readonly=readonly)
        if readonly:
            if not await anyio.Path(path).exists():
                raise StoreError(f"no event log at {path}")
            store._reader = await store._connect(readonly=True)
            try:
                await store._check_schema(store._reader)
                store._head = await store.head()
                yield store
            finally:
                store._closed = True
                await store._reader.close()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(path):
            store._writer = await store._connect(readonly=False)
            try:
                await store._migrate(store._writer)
                store._reader = await store._connect(readonly=True)
                store._head = await store._query_head()
                async with store._writer.execute("SELECT MAX(recorded_at) FROM events") as cursor:
                    row = await cursor.fetchone()
                store._last_micros = (row[0] if row else None) or 0
                async with anyio.create_task_group() as tg:
                    tg.start_soon(store._write_loop)
                    try:
                        yield store
                    finally:
                        # Stop taking appends; the writer commits what is queued, then ends.
                        store._send.close()
            finally:
                store._closed = True
                store._notify()
                if store._reader is not None:
                    await store._reader.close()
                await store._writer.close()

    async def _connect(self, *, readonly: bool) -> aiosqlite.Connection:
        try:
            if readonly:
                db = await aiosqlite.connect(f"file:{self._path}?mode=ro", uri=True, isolation_level=None)
            else:
                db = await aiosqlite.connect(self._path, isolation_level=None)
            await db.execute("PRAGMA busy_timeout = 5000")
            if not readonly:
                await db.execute("PRAGMA journal_mode = WAL")
                await db.execute("PRAGMA synchronous = FULL")
            return db
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the event log at {self._path}: {exc}") from exc

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        await db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at INTEGER NOT NULL)"
        )
        applied = await self._check_schema(db)
        for number, name, sql in _migrations():
            if number in applied:
                continue
            log.info("applying migration %s to %s", name, self._path)
            stamp = codec.to_micros(self._clock.now())
            await db.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\n"
                f"INSERT INTO schema_migrations (version, name, applied_at) VALUES ({number}, '{name}', {stamp});\n"
                "COMMIT;"
            )

    async def _check_schema(self, db: aiosqlite.Connection) -> set[int]:
        try:
            async with db.execute("SELECT version FROM schema_migrations") as cursor:
                applied = {row[0] for row in await cursor.fetchall()}
        except sqlite3.OperationalError as exc:
            raise StoreError(f"{self._path} is not an orchestrator event log ({exc})") from exc
        known = {number for number, _, _ in _migrations()}
        if applied - known:
            raise StoreError(
                f"{self._path} has schema version {max(applied)}, newer than this orchestrator knows"
                f" ({max(known)}): upgrade the orchestrator"
            )
        return applied

    # -- writing -----------------------------------------------------------

    async def append(self, ref: ConnectionRef, expected_version: int, events: Sequence[NewEvent]) -> Appended:
        """See :meth:`EventStore.append`. Waits for the group commit that includes it."""
        if self._closed or self._readonly:
            raise Unavailable("the event store is closed" if self._closed else "the event store is read-only")
        pending = _Pending(ref, expected_version, events)
        try:
            self._send.send_nowait(pending)
        except anyio.WouldBlock:
            raise ResourceExhausted(
                f"the write queue is full ({QUEUE_SIZE} appends waiting); retry with backoff"
            ) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise Unavailable("the event store is closing") from None
        # Once queued the append will be committed or refused even if the
        # caller goes away: shield the wait so the outcome is never ambiguous
        # to the writer.
        with anyio.CancelScope(shield=True):
            await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

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

    async def _commit_isolating(self, batch: list[_Pending]) -> None:
        try:
            await self._commit(batch)
        except sqlite3.Error as exc:
            if len(batch) == 1:
                batch[0].error = self._wrap(exc, batch[0])
            else:
                # One bad append must not fail its neighbours: retry each alone.
                for pending in batch:
                    await self._commit_isolating([pending])
                return
        for pending in batch:
            pending.done.set()

    def _wrap(self, exc: sqlite3.Error, pending: _Pending) -> OrchestratorError:
        if isinstance(exc, sqlite3.IntegrityError) and "idempotency_key" in str(exc):
            keys = ", ".join(repr(e.idempotency_key) for e in pending.events if e.idempotency_key)
            return IdempotencyConflict(f"idempotency key {keys} is already used on {pending.ref}")
        log.error("append to %s failed: %s", pending.ref, exc)
        return StoreError(f"the event log could not be written: {exc}")

    async def _commit(self, batch: list[_Pending]) -> None:
        db = self._writer
        assert db is not None
        for pending in batch:
            pending.error = pending.result = None
        now = max(codec.to_micros(self._clock.now()), self._last_micros)
        recorded_at = codec.from_micros(now)
        await db.execute("BEGIN IMMEDIATE")
        try:
            current = await self._load_connections(db, {p.ref.stream for p in batch})
            position = self._head + 1
            rows: list[tuple[Any, ...]] = []
            accepted: list[_Pending] = []
            for pending in batch:
                try:
                    records, connection = plan_append(
                        current.get(pending.ref.stream),
                        pending.ref,
                        pending.expected_version,
                        pending.events,
                        first_position=position,
                        recorded_at=recorded_at,
                    )
                except OrchestratorError as exc:
                    pending.error = exc
                    continue
                current[pending.ref.stream] = connection
                position += len(records)
                rows.extend(_record_to_row(r) for r in records)
                pending.result = Appended(tuple(records), connection)
                accepted.append(pending)
            if accepted:
                await db.executemany(f"INSERT INTO events ({_RECORD_COLUMNS}) VALUES ({','.join('?' * 11)})", rows)
                touched = {p.ref.stream for p in accepted}
                await db.executemany(
                    "INSERT OR REPLACE INTO connections (stream, environment, integration, connection_id,"
                    " state, version, last_position, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [_connection_to_row(current[s]) for s in touched],
                )
            await db.execute("COMMIT")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await db.execute("ROLLBACK")
            raise
        self._last_micros = now
        if accepted:
            self._head = position - 1
            self._notify()

    async def _load_connections(self, db: aiosqlite.Connection, streams: Iterable[str]) -> dict[str, Connection]:
        wanted = list(streams)
        found: dict[str, Connection] = {}
        for start in range(0, len(wanted), 500):  # stay under SQLite's host-parameter limit
            chunk = wanted[start : start + 500]
            sql = f"SELECT body FROM connections WHERE stream IN ({','.join('?' * len(chunk))})"
            async with db.execute(sql, chunk) as cursor:
                for (body,) in await cursor.fetchall():
                    connection = codec.connection_from_json(json.loads(body))
                    found[connection.ref.stream] = connection
        return found

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    # -- reading -----------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        db = self._reader
        if db is None or self._closed:
            raise Unavailable("the event store is closed")
        try:
            async with db.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
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

    async def read_until_time(self, until: datetime) -> int:
        """The position of the last record recorded at or before ``until`` (0 if none)."""
        rows = await self._fetch("SELECT MAX(position) FROM events WHERE recorded_at <= ?", (codec.to_micros(until),))
        return int(rows[0][0] or 0)

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


class _exclusive:
    """Hold ``<path>.lock`` so that a second daemon on the same file refuses to start."""

    def __init__(self, path: Path) -> None:
        self._lock_path = path.with_name(path.name + ".lock")
        self._fd = -1

    def __enter__(self) -> None:
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

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
