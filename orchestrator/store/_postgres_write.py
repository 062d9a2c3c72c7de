"""One write to the PostgreSQL log: a transaction of its own, serialised per connection, its positions in commit order.

A :class:`Write` is one transaction on one connection of the pool, about one
connection's stream (an append, a job's outcome, a retry, a shredding):

1. :meth:`Write.begin` locks the stream: a transaction-level advisory lock on
   the stream's key (a stream with no row yet is locked too), then the read-model
   row, read ``FOR UPDATE`` in a statement after the lock, so that it is the row
   the previous write of the connection committed. Every write of one connection,
   from any daemon, runs after the one before it. The job rows a write changes are
   locked ``FOR UPDATE`` after the stream (the one order of locks: stream, jobs,
   head; a claim skips locked jobs and locks no stream).
2. The write checks and folds its records with the rules every backend shares
   (:mod:`orchestrator.store._append`), numbered from a guess of the next position.
3. :meth:`Write.take_positions` takes them: one ``UPDATE`` of the one-row table
   ``log_head``, whose row lock the transaction then holds until it commits, so
   the next write takes its positions only once this one is committed (:meth:`Write.commit`). Positions
   are thus given in commit order, without gaps (a rolled-back write gives its
   positions back): a reader that sees position N sees every position before it.
   If the guess was wrong (another write came first) or another daemon stamped a
   later time, the records are folded again with the positions and time taken
   (the fold is pure; its checks passed already). Then one statement writes the
   records, the read-model row, the jobs, the sealed row and the notifications, and
   the transaction commits: two round trips and the commit under the head's lock.

Errors of the driver are wrapped here (:func:`wrap`): ``UNAVAILABLE`` for what
passes (the database unreachable, restarting, read-only after a failover, a full
disk), :class:`~orchestrator.errors.StoreError` for the rest, the driver's
exception chained.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import asyncpg

from orchestrator import codec
from orchestrator.errors import (
    IdempotencyConflict,
    InvalidArgument,
    LeaseLost,
    OrchestratorError,
    StoreError,
    Unavailable,
)
from orchestrator.model import LIVE_JOBS, Connection, ConnectionRef, Job, JobStatus, NewJob, SealedCredentials
from orchestrator.records import NewEvent, Record
from orchestrator.store._append import (
    ENDED,
    FINISHABLE,
    check_retry,
    finished,
    plan_append,
    sealed_version,
    shredding,
)
from orchestrator.store._base import Appended
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
from orchestrator.store._tail import weight

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Db: TypeAlias = asyncpg.Connection | PoolConnectionProxy
    """A connection: of the pool, or one of its own."""

log = logging.getLogger(__name__)

BROKEN = (
    OSError,
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # class 57: the server ended the connection, or is restarting
    asyncpg.InterfaceError,  # the connection is closed
    asyncpg.exceptions.InternalClientError,  # the driver met a connection the server had ended while it was idle
)
"""What a statement raises on a connection that the server ended or lost (the pool replaces it)."""


class Stale(Exception):
    """The connection was found broken before the write did anything on it: the write may be made again."""


Row: TypeAlias = Sequence[Any]
"""A row as the row helpers of :mod:`~orchestrator.store._sqlite_rows` read it (``asyncpg.Record`` is one)."""


async def fetch(con: Db, sql: str, *args: Any) -> list[Row]:
    """The rows of ``sql``."""
    return cast("list[Row]", await con.fetch(sql, *args))


async def fetchrow(con: Db, sql: str, *args: Any) -> Row | None:
    """The first row of ``sql``, or None."""
    return cast("Row | None", await con.fetchrow(sql, *args))


_EVENT_ARRAYS = ("bigint", "text", "int", "text", "text", "text", "bigint", "text", "text", "text", "int")
"""The types of :data:`RECORD_COLUMNS`, for ``unnest``."""
_JOB_ARRAYS = (
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "text",
    "bigint",
    "int",
    "bigint",
    "bigint",
    "text",
    "text",
    "bigint",
    "bigint",
    "int",
)
"""The types of :data:`JOB_COLUMNS`, for ``unnest``."""
_UPSERT_CONNECTION = (
    "INSERT INTO connections (stream, environment, integration, connection_id, state, version, last_position, body)"
    " VALUES ({}) ON CONFLICT (stream) DO UPDATE SET state = EXCLUDED.state, version = EXCLUDED.version,"
    " last_position = EXCLUDED.last_position, body = EXCLUDED.body"
)
_UPSERT_SEALED = (
    f"INSERT INTO credentials ({SEALED_COLUMNS}, updated_at) VALUES ({{}}) ON CONFLICT (stream) DO UPDATE SET"
    " incarnation = EXCLUDED.incarnation, key_id = EXCLUDED.key_id, nonce = EXCLUDED.nonce,"
    " ciphertext = EXCLUDED.ciphertext, fingerprint = EXCLUDED.fingerprint, version = EXCLUDED.version,"
    " updated_at = EXCLUDED.updated_at"
)
_TAKE_POSITIONS = (
    "UPDATE log_head SET position = position + $1, recorded_at = GREATEST(recorded_at, $2)"
    " RETURNING position, recorded_at"
)


@dataclass(frozen=True, slots=True)
class Names:
    """What one log's writes name: its advisory lock keys, its channels, and the store writing (its payloads)."""

    schema: str
    log_channel: str
    jobs_channel: str
    instance: str
    """This store's id, in its notifications, so that it ignores its own."""


class Write:
    """One transaction about one connection's stream (see the module)."""

    def __init__(self, con: Db, ref: ConnectionRef, names: Names, *, first: int, at: int) -> None:
        self.con = con
        self.ref = ref
        self.names = names
        self.first = first
        """The first position of the records: a guess until :meth:`commit` takes them."""
        self.at = at
        """The records' ``recorded_at``, in microseconds: a guess until :meth:`commit` takes the positions."""
        self.start: Connection | None = None
        """The read-model row before the write."""
        self.connection: Connection | None = None
        """The read-model row as the write leaves it."""
        self.records: list[Record] = []
        self.rows: list[tuple[Any, ...]] = []
        self._steps: list[tuple[int | None, Sequence[NewEvent]]] = []
        self.new_jobs: list[NewJob] = []
        self.incarnation = 0
        """The incarnation the new jobs belong to."""
        self.changed_jobs: dict[str, Job] = {}
        """Existing jobs as the write leaves them (ended, requeued), by id."""
        self.seal: SealedCredentials | None = None
        """Sealed credentials to store."""
        self.shred = False
        """The sealed row is deleted (``credentials-destroyed`` is among the records)."""
        self.committing = False
        """COMMIT was sent: an error from now on leaves the outcome unknown."""

    # -- the transaction -------------------------------------------------------------------

    async def begin(self, key: int) -> None:
        """Begin, lock the stream (``key``: its advisory lock key), then read its read-model row.

        Raises :class:`Stale` when the connection is found broken by the first statement: nothing was done.
        """
        try:
            # One round trip: ``key`` is an integer, nothing of a caller's text is in the statement.
            await self.con.execute(f"BEGIN; SELECT pg_advisory_xact_lock({int(key)})")
        except BROKEN as exc:
            raise Stale() from exc
        row = await fetchrow(self.con, "SELECT body FROM connections WHERE stream = $1 FOR UPDATE", self.ref.stream)
        self.start = self.connection = connection_from_body(row[0]) if row is not None else None

    async def take_positions(self) -> tuple[int, int] | None:
        """Take the records' positions (the head's row stays locked until the commit); the first and the last.

        The records are folded again if the positions or the time differ from the guess. None: no records.
        """
        count = len(self.records)
        if not count:
            return None
        taken = await fetchrow(self.con, _TAKE_POSITIONS, count, self.at)
        assert taken is not None  # the one row of log_head
        last, at = taken
        if last - count + 1 != self.first or at != self.at:
            self.first, self.at = last - count + 1, at
            self._fold_again()
        return self.first, last

    async def commit(self) -> None:
        """Write everything the write changes (and its notifications) in one statement, and commit."""
        statement, params = self._statement()
        await self.con.execute(statement, *params)
        self.committing = True
        await self.con.execute("COMMIT")

    async def rollback(self) -> None:
        """Roll back if a transaction is open (a lost connection has none left to roll back)."""
        try:
            if self.con.is_closed() or not self.con.is_in_transaction():
                return
            await self.con.execute("ROLLBACK")
        except (*BROKEN, asyncpg.PostgresError) as exc:
            log.debug("rollback failed (the pool drops the connection): %r", exc)
            self.discard()

    def discard(self) -> None:
        """Close the connection at once: the pool makes a new one in its place."""
        try:
            self.con.terminate()
        except asyncpg.InterfaceError:  # released already: the pool has dropped it
            pass

    # -- what a write does ------------------------------------------------------------------

    def add(self, expected_version: int | None, events: Sequence[NewEvent]) -> Appended:
        """Number and fold ``events`` after what the write holds already (refused as every backend refuses)."""
        for event in events:
            if "\x00" in (event.event_id + event.type + event.causation_id + event.traceparent + event.idempotency_key):
                raise InvalidArgument("a record's id, type, causation, traceparent or key holds a NUL character")
        records, connection = plan_append(
            self.connection,
            self.ref,
            expected_version,
            events,
            first_position=self.first + len(self.records),
            recorded_at=codec.from_micros(self.at),
        )
        try:
            rows = [record_to_row(record) for record in records]
        except (TypeError, ValueError) as exc:  # data JSON cannot hold, as the other backends refuse it
            raise InvalidArgument(f"the record cannot be stored: {exc}") from None
        self._steps.append((expected_version, events))
        self.records += records
        self.rows += rows
        self.connection = connection
        return Appended(tuple(records), connection)

    def _fold_again(self) -> None:
        """Fold the write's records again from the row before it, with the positions and time taken."""
        steps, self._steps = self._steps, []
        self.records, self.rows, self.connection = [], [], self.start
        for expected_version, events in steps:
            self.add(expected_version, events)

    async def check_keys(self, events: Sequence[NewEvent]) -> None:
        """Refuse idempotency keys used already on the stream, or twice in ``events``."""
        keys = [event.idempotency_key for event in events if event.idempotency_key]
        if not keys:
            return
        taken = await fetch(
            self.con,
            "SELECT idempotency_key FROM events WHERE stream = $1 AND idempotency_key = ANY($2::text[])",
            self.ref.stream,
            keys,
        )
        repeated = [key for key in keys if keys.count(key) > 1]
        if taken or repeated:
            key = taken[0][0] if taken else repeated[0]
            raise IdempotencyConflict(f"idempotency key {key!r} is already used on {self.ref}")

    def schedule(self, jobs: Sequence[NewJob], incarnation: int) -> None:
        """Queue ``jobs`` for the connection's ``incarnation`` (written at :meth:`commit`)."""
        self.new_jobs += jobs
        self.incarnation = incarnation

    async def _locked_jobs(self, job_ids: Sequence[str]) -> dict[str, Job]:
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ANY($1::text[]) FOR UPDATE"
        rows = await fetch(self.con, sql, job_ids)
        return {row[0]: job_from_row(row) for row in rows}

    async def cancel(self, jobs: Sequence[Job]) -> None:
        """End ``jobs`` as cancelled, if each is still live under the token it was read or claimed with."""
        current = await self._locked_jobs([job.job_id for job in jobs])
        for job in jobs:
            now = current.get(job.job_id)
            if now is None or now.status not in LIVE_JOBS or now.lease_token != job.lease_token:
                raise LeaseLost(
                    f"{self.ref}: a job to cancel was claimed again or ended meanwhile; nothing was written"
                )
        for job in jobs:
            self.changed_jobs[job.job_id] = dataclasses.replace(
                current[job.job_id], status=JobStatus.CANCELLED, leased=False
            )

    async def finish(self, job: Job, events: Sequence[NewEvent], retry_at: int | None) -> None:
        """Record an attempt's outcome and end ``job`` (or queue it again at ``retry_at``), fenced by its token."""
        current = (await self._locked_jobs([job.job_id])).get(job.job_id)
        # Running under this token, or still queued under it (a job an emit took over, see Worker.take_over).
        if current is None or current.lease_token != job.lease_token or current.status not in FINISHABLE:
            raise LeaseLost(f"job {job.job_id} ({job.function} on {job.stream}) was claimed again; outcome dropped")
        if events:
            self.add(None, events)
        status, error = finished(events, requeued=retry_at is not None, last_error=current.last_error)
        self.changed_jobs[job.job_id] = dataclasses.replace(
            current,
            status=status,
            last_error=error,
            leased=False,
            run_at=codec.from_micros(retry_at) if retry_at is not None else current.run_at,
        )

    async def retry(self, job: Job, events: Sequence[NewEvent], run_at: int) -> None:
        """Queue ``job`` (ended) again with a fresh budget, and append ``events``, if it is still as it was read."""
        current = (await self._locked_jobs([job.job_id])).get(job.job_id)
        check_retry(current, job)
        assert current is not None
        self.add(None, events)
        self.changed_jobs[job.job_id] = dataclasses.replace(
            current, status=JobStatus.QUEUED, attempt=0, leased=False, run_at=codec.from_micros(run_at)
        )

    def store_seal(self, seal: SealedCredentials) -> None:
        """Store ``seal`` with its ``credentials-updated`` record, which the write holds."""
        self.seal = sealed_version(seal, self.records)
        self.shred = False

    async def shred_if_due(self) -> bool:
        """Apply the shredding rule to the connection as the write leaves it; whether it applied."""
        connection = self.connection
        if connection is None or connection.state not in ENDED:
            return False  # the common case: no query
        sealed = self.seal
        if sealed is None and not self.shred:
            row = await fetchrow(
                self.con, f"SELECT {SEALED_COLUMNS} FROM credentials WHERE stream = $1 FOR UPDATE", self.ref.stream
            )
            sealed = sealed_from_row(row) if row is not None else None
        if sealed is None:
            return False
        stored = await fetch(self.con, f"SELECT job_id FROM jobs WHERE stream = $1 AND {LIVE}", self.ref.stream)
        changed = self.changed_jobs
        left = [row[0] for row in stored if row[0] not in changed or changed[row[0]].status in LIVE_JOBS]
        event = shredding(connection, sealed, bool(left or self.new_jobs), self.records[-1] if self.records else None)
        if event is None:
            return False
        self.add(None, [event])
        self.seal, self.shred = None, True
        return True

    # -- the one statement ------------------------------------------------------------------

    def weights(self) -> list[int]:
        """The records' weights in the tail."""
        return [weight(record, row[5]) for record, row in zip(self.records, self.rows, strict=True)]

    def _statement(self) -> tuple[str, list[Any]]:
        """One statement for everything the write changes, and its parameters."""
        params: list[Any] = []

        def bind(value: Any, cast: str = "") -> str:
            params.append(value)
            return f"${len(params)}{cast}"

        def arrays(rows: Sequence[tuple[Any, ...]], types: Sequence[str]) -> str:
            columns = list(zip(*rows, strict=True))
            return ", ".join(bind(list(column), f"::{kind}[]") for column, kind in zip(columns, types, strict=True))

        parts: list[str] = []
        notify: list[str] = []
        stream = self.ref.stream
        if self.records:
            assert self.connection is not None
            events = arrays(self.rows, _EVENT_ARRAYS)
            parts.append(f"e AS (INSERT INTO events ({RECORD_COLUMNS}) SELECT * FROM unnest({events}))")
            row = connection_to_row(self.connection)
            parts.append(f"c AS ({_UPSERT_CONNECTION.format(', '.join(bind(v) for v in row))})")
            payload = f"{self.names.instance}:{self.records[-1].position}"
            notify.append(f"pg_notify({bind(self.names.log_channel)}, {bind(payload)})")
        if self.new_jobs:
            try:
                rows = [(*job_to_row(job, stream, self.at), self.incarnation) for job in self.new_jobs]
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"the job cannot be stored: {exc}") from None
            _no_nul(rows)
            parts.append(f"j AS (INSERT INTO jobs ({JOB_COLUMNS}) SELECT * FROM unnest({arrays(rows, _JOB_ARRAYS)}))")
        if self.changed_jobs:
            jobs = list(self.changed_jobs.values())
            updates = [
                (j.job_id, j.status.value, j.last_error.replace("\x00", "\ufffd"), codec.to_micros(j.run_at), j.attempt)
                for j in jobs
            ]
            parts.append(
                "u AS (UPDATE jobs SET status = u.status, last_error = u.last_error, run_at = u.run_at,"
                f" attempt = u.attempt, lease_until = NULL, updated_at = {bind(self.at)}"
                f" FROM unnest({arrays(updates, ('text', 'text', 'text', 'bigint', 'int'))})"
                " AS u(job_id, status, last_error, run_at, attempt) WHERE jobs.job_id = u.job_id)"
            )
        if self.new_jobs or self.changed_jobs:
            notify.append(f"pg_notify({bind(self.names.jobs_channel)}, {bind(self.names.instance)})")
        if self.seal is not None:
            values = ", ".join(bind(v) for v in sealed_to_row(self.seal, self.at))
            parts.append(f"s AS ({_UPSERT_SEALED.format(values)})")
        elif self.shred:
            parts.append(f"s AS (DELETE FROM credentials WHERE stream = {bind(stream)})")
        head = f"WITH {', '.join(parts)} " if parts else ""
        return f"{head}SELECT {', '.join(notify) or '1'}", params


def _no_nul(rows: Sequence[tuple[Any, ...]]) -> None:
    """Refuse text PostgreSQL cannot store (a NUL character: JSON text holds it escaped, names cannot hold it)."""
    for row in rows:
        for value in row:
            if isinstance(value, str) and "\x00" in value:
                raise InvalidArgument(f"{value[:40]!r}... holds a NUL character, which PostgreSQL cannot store")


# -- errors --------------------------------------------------------------------------------------

_PASSING = (
    *BROKEN,
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: a full disk, too many connections
    asyncpg.exceptions.TransactionRollbackError,  # class 40: a deadlock or serialisation failure, retried by the caller
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after a failover: writable again once promoted
    TimeoutError,
)


def wrap(exc: BaseException, *, committing: bool = False) -> BaseException:
    """What a caller gets for ``exc``, raised by a store's query: itself when it is ours, else wrapped."""
    if isinstance(exc, OrchestratorError) or not isinstance(exc, Exception):
        return exc
    error: OrchestratorError
    if committing:
        error = Unavailable(
            f"the database connection failed while the write was committing ({_describe(exc)}): it may or may not"
            " be recorded; read it back (or repeat it with its idempotency key) before writing again"
        )
    elif isinstance(exc, asyncpg.UniqueViolationError) and exc.constraint_name == "events_idempotency":
        error = IdempotencyConflict(f"an idempotency key is already used: {exc}")
    elif isinstance(exc, _PASSING):
        error = Unavailable(f"the database is unavailable ({_describe(exc)}); nothing of this write was stored")
    else:
        error = StoreError(f"the event log could not be used: {_describe(exc)}")
    error.__cause__ = exc
    return error


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "it did not answer in time"
    return str(exc) or type(exc).__name__
