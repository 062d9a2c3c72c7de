"""The SQLite store's one writer: every write goes through its queue and is group-committed.

Appends queue up while a commit is in flight, and the writer commits all of
them (up to :data:`MAX_BATCH`) in the next transaction, run in one hop on its
own thread, so concurrent callers share an fsync. Each write in a batch is
checked and folded on its own: a refused one fails alone while its
neighbours commit; a database error fails the batch, which is then retried
one write at a time so that a poisoned write cannot fail the others.
Positions are assigned here, so commit order is position order and a
follower never misses a record: the records of each commit go to the
store's :class:`~orchestrator.store._tail.Tail` before any of its writes is
acknowledged, and the tail wakes every follower once right after (so that
the writers' callers are answered first). The queue is bounded: beyond it,
writes are refused with RESOURCE_EXHAUSTED instead of growing memory. A commit in
progress is shielded from cancellation, so shutdown never leaves a write's
outcome unknown. A full disk (SQLITE_FULL) fails the whole batch with
UNAVAILABLE ("disk full: ..."), logged once at ERROR: nothing of it is
stored, and writing resumes by itself once there is room.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

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
from orchestrator.model import Connection, ConnectionRef, Job, JobStatus, NewJob, SealedCredentials
from orchestrator.records import NewEvent, Record
from orchestrator.store._append import (
    ENDED,
    FINISHABLE,
    check_retry,
    check_seal,
    claimed,
    finished,
    plan_append,
    sealed_version,
    shredding,
)
from orchestrator.store._base import Appended
from orchestrator.store._cache import ROW_CACHE, UNKNOWN, RowCache
from orchestrator.store._migrations import migrate_sqlite
from orchestrator.store._sqlite_file import check_is_a_log, check_quickly, refuse_zero_length
from orchestrator.store._sqlite_rows import (
    JOB_COLUMNS,
    LIVE,
    RECORD_COLUMNS,
    SEALED_COLUMNS,
    connection_from_body,
    connection_to_row,
    job_from_row,
    job_to_row,
    record_to_row,
    sealed_from_row,
    sealed_to_row,
)
from orchestrator.store._tail import DEFAULT_TAIL, Tail, TailBounds, weight
from orchestrator.store._thread import OwnThread

log = logging.getLogger(__name__)

MAX_BATCH = 512
"""Writes committed together at most (bounds a transaction's size and latency)."""
QUEUE_SIZE = 4096
"""Writes waiting for the writer at most; more are refused with RESOURCE_EXHAUSTED."""


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
    cancel_jobs: Sequence[Job] = ()
    seal: SealedCredentials | None = None


@dataclass(eq=False)
class _Sweep(_Op):
    """Apply the shredding rule to every connection with sealed credentials (at start-up)."""


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
class _Retry(_Op):
    job: Job = field(default=None)  # type: ignore[assignment]  # always given
    events: Sequence[NewEvent] = ()
    run_at: int = 0


@dataclass(frozen=True, slots=True)
class _Planned:
    """An append checked, numbered, folded and encoded, not staged yet (see :meth:`Writer._plan`)."""

    records: list[Record]
    connection: Connection
    rows: list[tuple[Any, ...]]
    job_rows: list[tuple[Any, ...]]


@dataclass(eq=False)
class _Txn:
    """What one batch writes, gathered for ``executemany``."""

    current: dict[str, Connection]
    position: int
    recorded_at: datetime
    event_rows: list[tuple[Any, ...]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    """The records staged, in position order, and their weights in the tail."""
    touched: set[str] = field(default_factory=set)
    job_rows: list[tuple[Any, ...]] = field(default_factory=list)
    """New jobs, inserted at the end of the batch."""
    jobs_changed: bool = False
    """Jobs were scheduled, rescheduled, ended or queued again (changes to existing jobs are made at once)."""
    sealed: dict[str, SealedCredentials | None] = field(default_factory=dict)
    """Sealed credentials written (or, None, deleted) by this batch, by stream."""
    encoded: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    """Read-model rows encoded on the loop, by stream (dropped when the writer's thread changes the row again)."""


class Writer:
    """The single writer of one SQLite file (the caller holds the file's lock)."""

    def __init__(
        self,
        path: Path,
        clock: Clock,
        *,
        init: bool = False,
        tail: TailBounds = DEFAULT_TAIL,
        cache_rows: int = ROW_CACHE,
    ) -> None:
        self._path = path
        self._clock = clock
        self._init = init
        self._bounds = tail
        self._full = False
        """Whether the last write failed for want of space (logged once, until a commit succeeds)."""
        self._db: sqlite3.Connection | None = None
        self.cache = RowCache(cache_rows)
        """The read-model rows last committed, owned by the event loop (see :mod:`orchestrator.store._cache`)."""
        # The connection is only ever used by one thread at a time, through this limiter.
        self._thread = OwnThread("orchestrator event-log writer")
        send, receive = anyio.create_memory_object_stream[_Op](QUEUE_SIZE)
        self._send: MemoryObjectSendStream[_Op] = send
        self._receive: MemoryObjectReceiveStream[_Op] = receive
        self.tail = Tail(0, tail)
        """The last committed records (its head is the last position committed); set anew by :meth:`start`."""
        self._last_micros = 0
        self._jobs_event = anyio.Event()
        self._closed = False

    # -- life ------------------------------------------------------------------

    async def start(self, status: os.stat_result) -> None:
        """Check, open, migrate and read the starting point (in the writer's thread).

        ``status`` is the database file's, taken under the file's lock (which the caller holds).
        """
        await anyio.to_thread.run_sync(self._thread.start)  # Thread.start waits for the thread: off the loop
        head = await self._thread.call(self._start, status)
        self.tail = Tail(head, self._bounds)

    def _start(self, status: os.stat_result) -> int:
        path = self._path
        # Before SQLite sees it: it would take a 0-byte file for a new database (and drop its -wal).
        refuse_zero_length(path, status, init=self._init)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the event log at {path}: {exc}") from exc
        self._db = db
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            # Nothing is written before these: a damaged or foreign file is left as it was.
            check_quickly(db, path)
            check_is_a_log(db, path, init=self._init)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            # Deleted content (a shredded credentials row above all) is overwritten, not left in free pages.
            db.execute("PRAGMA secure_delete = ON")
            migrate_sqlite(db, self._path, self._clock)
            # We hold the file's lock, so whoever leased a job before is dead:
            # its attempt is retried now rather than after the lease runs out.
            db.execute("UPDATE jobs SET lease_until = NULL, status = 'queued' WHERE status = 'running'")
            head: int = db.execute("SELECT COALESCE(MAX(position), 0) FROM events").fetchone()[0]
            self._last_micros = db.execute("SELECT COALESCE(MAX(recorded_at), 0) FROM events").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the event log at {self._path}: {exc}") from exc
        return head

    def stop_taking(self) -> None:
        """Take no more writes; :meth:`run` commits what is queued, then returns."""
        self._send.close()

    def closed(self) -> None:
        """The store is closed: refuse writes and wake every waiter."""
        self._closed = True
        self._send.close()
        self._receive.close()
        self.tail.close()

    async def close(self) -> None:
        """Close the database connection (shielded: also when the owner is cancelled)."""
        with anyio.CancelScope(shield=True):
            if self._db is not None:
                await self._thread.call(self._db.close)
                self._db = None
            self._thread.stop()
            await anyio.to_thread.run_sync(self._thread.join)

    def jobs_changed(self) -> anyio.Event:
        """An event set at the next commit that schedules, reschedules or removes jobs."""
        return self._jobs_event

    # -- writes ------------------------------------------------------------------

    async def submit(self, op: _Op) -> Any:
        """Queue ``op`` and return its result once committed (or raise why it was refused)."""
        if self._closed:
            raise Unavailable("the event store is closed")
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
        cancel_jobs: Sequence[Job] = (),
        seal: SealedCredentials | None = None,
    ) -> Appended:
        """Append through the group commit (see :meth:`~orchestrator.store.EventStore.append`)."""
        op = _Append(
            ref.stream,
            ref=ref,
            expected_version=expected_version,
            events=events,
            jobs=jobs,
            cancel_jobs=cancel_jobs,
            seal=seal,
        )
        result: Appended = await self.submit(op)
        return result

    async def claim_jobs(self, *, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> list[Job]:
        """Lease due jobs (see :meth:`~orchestrator.store.EventStore.claim_jobs`)."""
        now = codec.to_micros(self._clock.now())
        op = _Claim(None, now=now, limit=limit, lease_until=now + int(lease * 1_000_000), exclude=exclude)
        jobs: list[Job] = await self.submit(op)
        return jobs

    async def finish_job(
        self, job: Job, events: Sequence[NewEvent], *, retry_at: datetime | None = None
    ) -> Appended | None:
        """Record an outcome (see :meth:`~orchestrator.store.EventStore.finish_job`)."""
        op = _Finish(
            job.stream, job=job, events=events, retry_at=codec.to_micros(retry_at) if retry_at is not None else None
        )
        result: Appended | None = await self.submit(op)
        return result

    async def retry_job(self, job: Job, events: Sequence[NewEvent], *, run_at: datetime) -> Appended:
        """Queue a finished job again (see :meth:`~orchestrator.store.EventStore.retry_job`)."""
        result: Appended = await self.submit(_Retry(job.stream, job=job, events=events, run_at=codec.to_micros(run_at)))
        return result

    async def sweep_credentials(self) -> int:
        """Apply the shredding rule everywhere (see :meth:`~orchestrator.store.EventStore.sweep_credentials`)."""
        shredded: int = await self.submit(_Sweep(None))
        return shredded

    async def run(self) -> None:
        """Commit batches until :meth:`stop_taking` and the queue is empty."""
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
        added = False
        try:
            txn, rest = self._stage(batch, now)
            known = self.cache.known({op.stream for op in rest if op.stream})  # copies for the writer's thread
            txn = await self._thread.call(self._commit, txn, rest, known)
        except Exception as exc:  # the writer must outlive any one write; its callers get the error
            if len(batch) == 1 or _is_full(exc):
                # A full disk fails every write alike: retrying them one by one would only fail again.
                for op in batch:
                    op.result = None
                    op.error = self._wrap(exc, op)
            else:
                # One bad write must not fail its neighbours: retry each alone.
                for op in batch:
                    await self._commit_isolating([op])
                return
        else:
            if self._full:
                self._full = False
                log.warning("the event log %s is written again: the disk has room", self._path)
            self._last_micros = now
            # Before any write of the batch is acknowledged: whoever hears of one reads its row
            # in the cache and its records in the tail.
            self.cache.committed(txn.current[stream] for stream in txn.touched)
            added = self.tail.add(txn.records, txn.weights)
            if txn.job_rows or txn.jobs_changed:
                self._jobs_changed()
        for op in batch:
            op.done.set()
        if added:
            # The followers after the writers: an emit is answered before its record goes out to them all.
            self.tail.wake()

    def _stage(self, batch: list[_Op], now: int) -> tuple[_Txn, list[_Op]]:
        """On the loop: number, fold and encode the appends that need nothing of the database; return the rest.

        An append is staged here when the cache knows its connection's row (or that it has none),
        it cancels no job, and the fold does not end the connection (the shredding rule would read
        the database). Everything else (job outcomes, claims, the sweep, and every later write of a
        connection one of them touches, so each connection's writes keep their order) is left to the
        writer's thread, which continues the numbering inside the transaction. A refused append
        fails alone, before anything of it is staged. So the writer's thread runs SQL and little else.
        """
        txn = _Txn(current={}, position=self.tail.head + 1, recorded_at=codec.from_micros(now))
        rest: list[_Op] = []
        left: set[str | None] = set()
        for op in batch:
            op.error = op.result = None
            try:
                planned = self._planned_here(txn, op, left)
            except OrchestratorError as exc:
                op.error = exc
                continue
            except (TypeError, ValueError) as exc:  # data that cannot be encoded as JSON
                op.error = InvalidArgument(f"the record cannot be stored: {exc}")
                continue
            if planned is None:
                rest.append(op)
                left.add(op.stream)
                continue
            assert isinstance(op, _Append)  # only appends are planned here
            op.result = self._take(txn, op, planned)
        txn.encoded = {stream: connection_to_row(txn.current[stream]) for stream in txn.touched}
        return txn, rest

    def _planned_here(self, txn: _Txn, op: _Op, left: set[str | None]) -> _Planned | None:
        """``op`` planned on the loop, or None when it needs the database (see :meth:`_stage`)."""
        if not isinstance(op, _Append) or op.cancel_jobs or op.stream in left:
            return None
        stream = op.ref.stream
        current = txn.current[stream] if stream in txn.current else self.cache.get(stream)
        if current is UNKNOWN:
            return None
        planned = self._plan(txn, current, op)
        return None if planned.connection.state in ENDED else planned

    def _wrap(self, exc: Exception, op: _Op) -> OrchestratorError:
        error: OrchestratorError
        if isinstance(exc, sqlite3.IntegrityError) and "idempotency_key" in str(exc) and isinstance(op, _Append):
            keys = ", ".join(repr(e.idempotency_key) for e in op.events if e.idempotency_key)
            error = IdempotencyConflict(f"idempotency key {keys} is already used on {op.ref}")
        elif _is_full(exc):
            if not self._full:  # once per episode: every write fails alike until space returns
                self._full = True
                log.error(
                    "disk full: the event log %s cannot be written (%s); writes are refused with UNAVAILABLE"
                    " and nothing of them is stored, until space is freed (then writing resumes by itself)",
                    self._path,
                    exc,
                )
            error = Unavailable(
                f"disk full: the event log could not be written ({exc}); nothing of this write was stored,"
                " retry once the daemon's disk has room"
            )
        else:
            log.error("write to %s failed: %r", op.stream, exc)
            error = StoreError(f"the event log could not be written: {exc}")
        error.__cause__ = exc  # raised later, in the caller's task: the driver's error stays chained
        return error

    def _commit(self, txn: _Txn, rest: list[_Op], known: dict[str, Connection]) -> _Txn:
        """One transaction for the whole batch; runs in the writer's thread (one hop per batch).

        ``txn`` holds what the loop staged (see :meth:`_stage`); ``rest`` are the writes that need
        the database, applied here in order. ``known`` holds the committed rows the loop's cache
        had for their connections; the others are read here.
        """
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            wanted = {op.stream for op in rest if op.stream and op.stream not in txn.current}
            txn.current.update(self._load_connections(db, wanted, known))
            for op in rest:
                try:
                    if isinstance(op, _Append):
                        op.result = self._apply_append(db, txn, op)
                    elif isinstance(op, _Finish):
                        op.result = self._apply_finish(db, txn, op)
                    elif isinstance(op, _Retry):
                        op.result = self._apply_retry(db, txn, op)
                    elif isinstance(op, _Claim):
                        op.result = self._apply_claim(db, op)
                    elif isinstance(op, _Sweep):
                        op.result = self._apply_sweep(db, txn)
                except OrchestratorError as exc:
                    op.error = exc
                except (TypeError, ValueError) as exc:  # data that cannot be encoded as JSON
                    op.error = InvalidArgument(f"the record cannot be stored: {exc}")
            self._flush(db, txn)
            db.execute("COMMIT")
        except BaseException:
            # On some errors (SQLITE_FULL, SQLITE_IOERR, ...) SQLite has rolled the transaction back
            # itself: a ROLLBACK then fails ("no transaction is active") and would hide the cause.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
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
        rows = [record_to_row(r) for r in records]  # may raise: before anything is staged
        self._stage_records(txn, records, connection, rows)
        return Appended(tuple(records), connection)

    @staticmethod
    def _stage_records(txn: _Txn, records: list[Record], connection: Connection, rows: list[tuple[Any, ...]]) -> None:
        txn.current[connection.ref.stream] = connection
        txn.touched.add(connection.ref.stream)
        txn.encoded.pop(
            connection.ref.stream, None
        )  # in the writer's thread: the row changed after the loop encoded it
        txn.position += len(records)
        txn.event_rows.extend(rows)
        txn.records.extend(records)
        txn.weights.extend(weight(record, row[5]) for record, row in zip(records, rows, strict=True))

    @staticmethod
    def _plan(txn: _Txn, current: Connection | None, op: _Append) -> _Planned:
        """Check, number, fold and encode ``op`` onto ``current``; raises, having staged nothing, if refused."""
        check_seal(op.ref, op.events, op.seal)
        created = codec.to_micros(txn.recorded_at)
        jobs = [job_to_row(j, op.ref.stream, created) for j in op.jobs]
        records, connection = plan_append(
            current,
            op.ref,
            op.expected_version,
            op.events,
            first_position=txn.position,
            recorded_at=txn.recorded_at,
        )
        rows = [record_to_row(r) for r in records]
        # The jobs belong to the incarnation the append leaves the connection in.
        return _Planned(records, connection, rows, [(*row, connection.incarnation) for row in jobs])

    def _take(self, txn: _Txn, op: _Append, planned: _Planned) -> Appended:
        """Stage a planned append: its records, the connection's row, its jobs and its sealed credentials."""
        self._stage_records(txn, planned.records, planned.connection, planned.rows)
        txn.job_rows.extend(planned.job_rows)
        if op.seal is not None:
            txn.sealed[op.ref.stream] = sealed_version(op.seal, planned.records)
        return Appended(tuple(planned.records), planned.connection)

    # Each write below checks everything, then stages its records (``_add_records``, which refuses
    # before staging anything), and only then changes existing job rows, at once: a claim later in
    # the same batch sees those changes (it never claims a job this batch cancelled).

    def _apply_append(self, db: sqlite3.Connection, txn: _Txn, op: _Append) -> Appended:
        if op.cancel_jobs:
            wanted = {j.job_id: j.lease_token for j in op.cancel_jobs}
            marks = ",".join("?" * len(wanted))
            sql = f"SELECT job_id, lease_token FROM jobs WHERE job_id IN ({marks}) AND {LIVE}"
            if dict(db.execute(sql, list(wanted)).fetchall()) != wanted:
                raise LeaseLost(f"{op.ref}: a job to cancel was claimed again or ended meanwhile; nothing was written")
        appended = self._take(txn, op, self._plan(txn, txn.current.get(op.ref.stream), op))
        if op.cancel_jobs:
            db.executemany(
                "UPDATE jobs SET status = 'cancelled', lease_until = NULL, updated_at = ? WHERE job_id = ?",
                [(codec.to_micros(txn.recorded_at), j.job_id) for j in op.cancel_jobs],
            )
            txn.jobs_changed = True
        return self._shred(db, txn, op.ref, appended) or appended

    def _apply_finish(self, db: sqlite3.Connection, txn: _Txn, op: _Finish) -> Appended | None:
        job = op.job
        row = db.execute("SELECT lease_token, status, last_error FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()
        # Running under this token, or still queued under it (a job an emit took over, see Worker.take_over).
        if row is None or row[0] != job.lease_token or JobStatus(row[1]) not in FINISHABLE:
            raise LeaseLost(f"job {job.job_id} ({job.function} on {job.stream}) was claimed again; outcome dropped")
        appended = self._add_records(txn, job.ref, None, op.events) if op.events else None
        status, error = finished(op.events, requeued=op.retry_at is not None, last_error=row[2])
        now = codec.to_micros(txn.recorded_at)
        if op.retry_at is None:
            db.execute(
                "UPDATE jobs SET status = ?, last_error = ?, lease_until = NULL, updated_at = ? WHERE job_id = ?",
                (status.value, error, now, job.job_id),
            )
        else:
            db.execute(
                "UPDATE jobs SET status = ?, last_error = ?, run_at = ?, lease_until = NULL, updated_at = ?"
                " WHERE job_id = ?",
                (status.value, error, op.retry_at, now, job.job_id),
            )
        txn.jobs_changed = True
        return self._shred(db, txn, job.ref, appended)

    def _apply_retry(self, db: sqlite3.Connection, txn: _Txn, op: _Retry) -> Appended:
        job = op.job
        row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job.job_id,)).fetchone()
        check_retry(job_from_row(row) if row is not None else None, job)
        appended = self._add_records(txn, job.ref, None, op.events)
        db.execute(
            "UPDATE jobs SET status = 'queued', attempt = 0, run_at = ?, lease_until = NULL, updated_at = ?"
            " WHERE job_id = ?",
            (op.run_at, codec.to_micros(txn.recorded_at), job.job_id),
        )
        txn.jobs_changed = True
        return self._shred(db, txn, job.ref, appended) or appended

    def _shred(
        self, db: sqlite3.Connection, txn: _Txn, ref: ConnectionRef, appended: Appended | None
    ) -> Appended | None:
        """The shredding rule after a write: ``appended`` and the ``credentials-destroyed`` it adds, if any."""
        stream = ref.stream
        connection = txn.current.get(stream)
        if connection is None or connection.state not in ENDED:
            return appended  # the common case: no query
        if stream in txn.sealed:
            sealed = txn.sealed[stream]
        else:
            row = db.execute(f"SELECT {SEALED_COLUMNS} FROM credentials WHERE stream = ?", (stream,)).fetchone()
            sealed = sealed_from_row(row) if row is not None else None
        if sealed is None:
            return appended
        # Changes to existing jobs are made at once; new ones wait for the end of the batch.
        stored = {row[0] for row in db.execute(f"SELECT job_id FROM jobs WHERE stream = ? AND {LIVE}", (stream,))}
        left = stored | {row[0] for row in txn.job_rows if row[1] == stream}
        event = shredding(connection, sealed, bool(left), appended.records[-1] if appended else None)
        if event is None:
            return appended
        shred = self._add_records(txn, ref, None, [event])
        txn.sealed[stream] = None
        return Appended((appended.records if appended else ()) + shred.records, shred.connection)

    def _apply_sweep(self, db: sqlite3.Connection, txn: _Txn) -> int:
        streams = [
            row[0]
            for row in db.execute(
                "SELECT c.stream FROM credentials c JOIN connections n ON n.stream = c.stream"
                " WHERE n.state IN ('deleted', 'rejected')"
                f" AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.stream = c.stream AND j.{LIVE})"
            )
        ]
        txn.current.update(self._load_connections(db, [s for s in streams if s not in txn.current], {}))
        shredded = 0
        for stream in streams:
            if self._shred(db, txn, ConnectionRef.from_stream(stream), None) is not None:
                shredded += 1
        return shredded

    def _apply_claim(self, db: sqlite3.Connection, op: _Claim) -> list[Job]:
        excluded = list(op.exclude)
        marks = ",".join("?" * len(excluded))
        not_excluded = f" AND stream NOT IN ({marks})" if excluded else ""
        sql = (
            f"SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_due WHERE {LIVE} AND run_at <= ?"
            f" AND (lease_until IS NULL OR lease_until < ?){not_excluded} ORDER BY run_at LIMIT ?"
        )
        rows = db.execute(sql, [op.now, op.now, *excluded, op.limit]).fetchall()
        now = codec.from_micros(op.now)
        jobs = [claimed(job_from_row(row), now) for row in rows]
        db.executemany(
            "UPDATE jobs SET attempt = ?, lease_token = ?, lease_until = ?, status = 'running', updated_at = ?"
            " WHERE job_id = ?",
            [(j.attempt, j.lease_token, op.lease_until, op.now, j.job_id) for j in jobs],
        )
        return jobs

    def _flush(self, db: sqlite3.Connection, txn: _Txn) -> None:
        if txn.event_rows:
            db.executemany(f"INSERT INTO events ({RECORD_COLUMNS}) VALUES ({','.join('?' * 11)})", txn.event_rows)
            db.executemany(
                "INSERT OR REPLACE INTO connections (stream, environment, integration, connection_id,"
                " state, version, last_position, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [txn.encoded.get(s) or connection_to_row(txn.current[s]) for s in txn.touched],
            )
        if txn.job_rows:
            db.executemany(f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({','.join('?' * 16)})", txn.job_rows)
        if txn.sealed:
            updated = codec.to_micros(txn.recorded_at)
            kept = [sealed_to_row(s, updated) for s in txn.sealed.values() if s is not None]
            gone = [(stream,) for stream, s in txn.sealed.items() if s is None]
            if gone:
                db.executemany("DELETE FROM credentials WHERE stream = ?", gone)
            if kept:
                db.executemany(
                    f"INSERT OR REPLACE INTO credentials ({SEALED_COLUMNS}, updated_at) VALUES ({','.join('?' * 8)})",
                    kept,
                )

    @staticmethod
    def _load_connections(
        db: sqlite3.Connection, streams: Collection[str], known: dict[str, Connection]
    ) -> dict[str, Connection]:
        found = {stream: known[stream] for stream in streams if stream in known}
        wanted = [stream for stream in streams if stream not in known]
        for start in range(0, len(wanted), 500):  # stay under SQLite's host-parameter limit
            chunk = wanted[start : start + 500]
            sql = f"SELECT body FROM connections WHERE stream IN ({','.join('?' * len(chunk))})"
            for (body,) in db.execute(sql, chunk):
                connection = connection_from_body(body)
                found[connection.ref.stream] = connection
        return found

    def _jobs_changed(self) -> None:
        changed, self._jobs_event = self._jobs_event, anyio.Event()
        changed.set()


def _is_full(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's SQLITE_FULL: the disk (or the database's page limit) is full."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_FULL
