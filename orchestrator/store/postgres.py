"""The PostgreSQL backend: several daemons on one database, through asyncpg.

Chosen with ``--database postgresql://user@host:port/database`` (or ``postgres://``).
Everything a daemon keeps of the log is in the database; what it holds in memory
is per daemon and never authoritative: the tail of recent commits (filled in
position order with its own commits and, on notification, with the others'), the
claims it is renewing, and nothing of the read model (another daemon may have
written any row since: every read asks the database).

- **Writes** (:mod:`orchestrator.store._postgres_write`): one transaction per
  write on a connection of the pool, serialised per connection by an advisory
  lock on its stream, positions taken in commit order under the head row's lock.
  Every write is durable once acknowledged (the server's ``synchronous_commit``).
  At most :data:`WAITING` writes wait for a connection; more are refused with
  ``RESOURCE_EXHAUSTED``. A write in progress is shielded from cancellation, so
  its outcome is always known to the store.
- **Jobs** (:mod:`orchestrator.store._postgres_jobs`): claimed ``FOR UPDATE SKIP
  LOCKED``, fenced by their token, with short leases renewed while held.
- **Wake-ups** (:mod:`orchestrator.store._postgres_feed`): ``LISTEN`` on the
  log's and the jobs' channels, on a connection of its own that is made again
  whenever it is lost; every write ``NOTIFY`` s in its transaction.
- **Schema** (:mod:`orchestrator.store._postgres_schema`): migrated at start under
  an advisory lock.

The pool holds up to ``pool_size`` connections, and one more listens.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread
import asyncpg

from orchestrator import codec
from orchestrator.clock import Clock
from orchestrator.config import DEFAULT_DATABASE_POOL_SIZE
from orchestrator.errors import ResourceExhausted, StoreError, Unavailable
from orchestrator.model import Connection, ConnectionQuery, ConnectionRef, Job, JobQuery, NewJob, SealedCredentials
from orchestrator.records import NewEvent, Record
from orchestrator.store import _postgres_schema as schema
from orchestrator.store._append import check_seal
from orchestrator.store._base import Appended, Counts, Stats
from orchestrator.store._location import check_url, shown
from orchestrator.store._migrations import migrations
from orchestrator.store._postgres_feed import Feed, Listener
from orchestrator.store._postgres_jobs import Leases, claim
from orchestrator.store._postgres_write import BROKEN, Names, Row, Stale, Write, fetch, fetchrow, wrap
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
from orchestrator.store._tail import DEFAULT_TAIL, Tail, TailBounds, TailPage, weight
from orchestrator.store._transfer import PostgresImport

if TYPE_CHECKING:
    from orchestrator.store._postgres_write import Db

T = TypeVar("T")

POOL_SIZE = DEFAULT_DATABASE_POOL_SIZE
"""Connections of a store's pool unless told otherwise (``--database-pool-size``)."""
WAITING = 4096
"""Writes waiting for a connection of the pool at most; more are refused with RESOURCE_EXHAUSTED."""
CONNECT_TIMEOUT = 10.0
"""Seconds to connect to the database."""
STATEMENT_TIMEOUT = 30.0
"""Seconds one statement may take (a lock wait included) before it fails with UNAVAILABLE."""


async def _keep(con: Any) -> None:
    """A pool connection needs no reset when released: the store changes no session state on it."""


class PostgresEventStore:
    """The :class:`~orchestrator.store.EventStore` contract on one PostgreSQL database, shared by several daemons."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock,
        readonly: bool = False,
        init: bool = False,
        tail: TailBounds = DEFAULT_TAIL,
        pool_size: int = POOL_SIZE,
        lease: float | None = None,
    ) -> None:
        check_url(url)
        if pool_size < 1:
            raise ValueError(f"a pool holds at least one connection, not {pool_size}")
        self._url = url
        self._where = shown(url)
        self._clock = clock
        self._readonly = readonly
        self._init = init
        self._pool_size = pool_size
        self._bounds = tail
        self._pool: asyncpg.Pool | None = None
        self._names = Names("", "", "", uuid.uuid4().hex)
        self._tail = Tail(0, tail)
        self._feed = Feed(self._tail, self._read_after)
        self._listener: Listener | None = None
        self.leases = Leases(clock) if lease is None else Leases(clock, lease)
        self._jobs_event = anyio.Event()
        self._last_micros = 0
        """The latest ``recorded_at`` known: the next write's guess."""
        self._waiting = 0
        self._writing = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        clock: Clock,
        readonly: bool = False,
        init: bool = False,
        tail: TailBounds = DEFAULT_TAIL,
        pool_size: int = POOL_SIZE,
        lease: float | None = None,
    ) -> AsyncIterator[PostgresEventStore]:
        """Connect to the database at ``url``, migrate it (unless ``readonly``), and listen for other daemons' commits.

        A schema with other tables and no log is refused unless ``init``. ``lease`` is the
        longest a claim's lease runs in the database before it is renewed (tests shorten it).
        """
        store = cls(url, clock=clock, readonly=readonly, init=init, tail=tail, pool_size=pool_size, lease=lease)
        try:
            async with store._run():
                yield store
        finally:
            store._closed = True
            store._tail.close()

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(migrations, schema.BACKEND)  # reads package files: off the loop, once
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=1,
                max_size=self._pool_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=STATEMENT_TIMEOUT,
                reset=_keep,
                server_settings={"application_name": "orchestrator"},
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StoreError(f"cannot connect to the event log's database {self._where}: {exc}") from exc
        try:
            await self._start()
            if self._readonly:
                yield
                return
            failed: Exception | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._feed.run)
                tg.start_soon(self.leases.run, self._pool)
                assert self._listener is not None
                await tg.start(self._listener.run)
                try:
                    yield
                except Exception as exc:
                    failed = exc  # re-raised below, unwrapped: the caller's error is not ours to group
                finally:
                    self._closed = True
                    with anyio.CancelScope(shield=True), anyio.move_on_after(STATEMENT_TIMEOUT):
                        await self._idle.wait()  # writes in progress end (shielded) before the pool closes
                    tg.cancel_scope.cancel()
            if failed is not None:
                raise failed
        finally:
            self._closed = True
            self._tail.close()
            with anyio.CancelScope(shield=True):
                await self._close_pool()

    async def _close_pool(self) -> None:
        pool = self._pool
        if pool is None:
            return
        with anyio.move_on_after(STATEMENT_TIMEOUT) as scope:
            await pool.close()
        if scope.cancelled_caught:
            pool.terminate()

    async def _start(self) -> None:
        """Check or migrate the schema, and take the log's head (in one connection of the pool)."""
        pool = self._pool
        assert pool is not None
        try:
            async with pool.acquire() as con:
                name = await schema.current_schema(con, self._where)
                if self._readonly:
                    await schema.check_schema(con, name, self._where)
                else:
                    await schema.migrate(con, name, self._where, self._clock, init=self._init)
                    taken = await fetchrow(con, "SELECT position, recorded_at FROM log_head")
                    assert taken is not None  # its one row
                    head, self._last_micros = taken
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot open the event log in {self._where}: {exc}") from exc
        self._names = Names(name, schema.channel(name, "log"), schema.channel(name, "jobs"), self._names.instance)
        if self._readonly:
            return
        self._tail = Tail(head, self._bounds)
        self._feed = Feed(self._tail, self._read_after)
        self._listener = Listener(
            self._connect,
            {self._names.log_channel: self._on_log, self._names.jobs_channel: self._on_jobs},
            self._caught_up,
        )

    @property
    def waiting(self) -> int:
        """Writes waiting for a connection of the pool (at most :data:`WAITING`)."""
        return self._waiting

    @property
    def listener(self) -> Listener | None:
        """The connection listening for other daemons' commits (None: read-only, or not open)."""
        return self._listener

    @property
    def feed(self) -> Feed:
        """What fills the tail (its catch-up reads are counted)."""
        return self._feed

    async def _connect(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool (the listener's)."""
        con: asyncpg.Connection = await asyncpg.connect(
            self._url,
            timeout=CONNECT_TIMEOUT,
            command_timeout=STATEMENT_TIMEOUT,
            server_settings={"application_name": "orchestrator (listening)"},
        )
        return con

    # -- notifications ------------------------------------------------------------------------

    def _on_log(self, payload: str) -> None:
        """Another daemon committed records up to the position in ``payload`` (``instance:position``)."""
        instance, _, position = payload.partition(":")
        if instance != self._names.instance and position.isdigit():
            self._feed.seen(int(position))

    def _on_jobs(self, payload: str) -> None:
        """Another daemon scheduled, ended or queued jobs again."""
        if payload != self._names.instance:
            self._jobs_changed()

    async def _caught_up(self) -> None:
        """Listening (again): whatever was committed before is at most the head read now."""
        self._feed.seen(await self._head())
        self._jobs_changed()  # a notification may have been missed while not listening

    # -- writes -------------------------------------------------------------------------------

    async def _write(self, ref: ConnectionRef, body: Callable[[Write], Awaitable[None]]) -> Write:
        """Run ``body`` in a write's transaction on ``ref``'s stream (:mod:`~orchestrator.store._postgres_write`)."""
        if self._readonly:
            raise Unavailable("the event store is read-only")
        if self._closed:
            raise Unavailable("the event store is closed")
        if self._waiting >= WAITING:
            raise ResourceExhausted(f"{WAITING} writes are waiting for the database; retry with backoff")
        self._writing += 1
        if self._writing == 1:
            self._idle = anyio.Event()
        try:
            try:
                return await self._write_once(ref, body)
            except Stale:
                # The pool's connection was found broken before anything was done on it (the server
                # restarted, or ended it): the write is made once more, on a new connection.
                return await self._write_once(ref, body)
        finally:
            self._writing -= 1
            if not self._writing:
                self._idle.set()

    async def _write_once(self, ref: ConnectionRef, body: Callable[[Write], Awaitable[None]]) -> Write:
        pool = self._pool
        assert pool is not None
        self._waiting += 1
        try:
            con = await pool.acquire()
        except Exception as exc:
            raise wrap(exc) from None
        finally:
            self._waiting -= 1
        token = object()
        try:
            # Once begun, a write ends (commits or rolls back) even if its caller goes away: its outcome is known.
            with anyio.CancelScope(shield=True):
                write = Write(
                    con,
                    ref,
                    self._names,
                    first=self._feed.known + 1,
                    at=max(codec.to_micros(self._clock.now()), self._last_micros),
                )
                try:
                    if self._closed:
                        raise Unavailable("the event store is closed")
                    await write.begin(schema.lock_key(self._names.schema, ref.stream))
                    await body(write)
                    taken = await write.take_positions()
                    if taken is not None:
                        self._feed.reserved(token, *taken)
                    await write.commit()
                except Stale:
                    write.discard()
                    raise
                except BaseException as exc:
                    self._feed.released(token)
                    await write.rollback()
                    raise wrap(exc, committing=write.committing) from None
                self._last_micros = max(self._last_micros, write.at)
                self._feed.committed(token, write.records, write.weights())
                if write.new_jobs or write.changed_jobs:
                    self._jobs_changed()
        finally:
            with anyio.CancelScope(shield=True):
                await pool.release(con)
        return write

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
        """See :meth:`EventStore.append`."""
        check_seal(ref, events, seal)

        async def body(write: Write) -> None:
            if cancel_jobs:
                await write.cancel(cancel_jobs)
            await write.check_keys(events)
            appended = write.add(expected_version, events)
            write.schedule(jobs, appended.connection.incarnation)
            if seal is not None:
                write.store_seal(seal)
            await write.shred_if_due()

        write = await self._write(ref, body)
        for job in cancel_jobs:
            self.leases.released(job.job_id)
        assert write.connection is not None
        return Appended(tuple(write.records), write.connection)

    @asynccontextmanager
    async def importing(self) -> AsyncIterator[PostgresImport]:
        """A bulk copy of a whole log into this one, which must hold no row (``orchestrator migrate``).

        Rows are copied verbatim (positions, versions, ids, jobs, sealed rows) in one transaction,
        committed when the block ends (rolled back if it raises): an interrupted copy leaves the
        log empty. The head's row is locked from the start, so that the appends of a daemon started
        on this log meanwhile wait and then continue after the copied positions. See
        :mod:`orchestrator.store._transfer`.
        """
        pool = self._pool
        if self._readonly or pool is None or self._closed:
            raise Unavailable("the event store is read-only" if self._readonly else "the event store is closed")
        async with pool.acquire() as con, con.transaction():  # the driver's errors are wrapped by PostgresImport
            copy = PostgresImport(con, self._names.schema, self._where)
            await copy.start()
            yield copy

    async def claim_jobs(self, *, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> list[Job]:
        """See :meth:`EventStore.claim_jobs`: ``FOR UPDATE SKIP LOCKED``, leased as :mod:`_postgres_jobs` says."""
        if self._readonly or self._closed:
            raise Unavailable("the event store is closed" if self._closed else "the event store is read-only")
        now = codec.to_micros(self._clock.now())
        jobs = await self._on_pool(
            lambda con: claim(
                con, now=now, limit=limit, lease_until=self.leases.database_lease(now, lease), exclude=exclude
            )
        )
        self.leases.held(jobs, now, lease)
        return jobs

    async def finish_job(
        self, job: Job, events: Sequence[NewEvent], *, retry_at: datetime | None = None
    ) -> Appended | None:
        """See :meth:`EventStore.finish_job`."""
        retry = codec.to_micros(retry_at) if retry_at is not None else None
        self.leases.released(job.job_id)  # recorded, refused or failed: the claim is no longer renewed

        async def body(write: Write) -> None:
            await write.finish(job, events, retry)
            await write.shred_if_due()

        write = await self._write(job.ref, body)
        if not write.records:
            return None
        assert write.connection is not None
        return Appended(tuple(write.records), write.connection)

    async def retry_job(self, job: Job, events: Sequence[NewEvent], *, run_at: datetime) -> Appended:
        """See :meth:`EventStore.retry_job`."""

        async def body(write: Write) -> None:
            await write.retry(job, events, codec.to_micros(run_at))
            await write.shred_if_due()

        write = await self._write(job.ref, body)
        assert write.connection is not None
        return Appended(tuple(write.records), write.connection)

    async def sweep_credentials(self) -> int:
        """See :meth:`EventStore.sweep_credentials`: one write per connection to shred."""
        rows = await self._fetch(
            "SELECT c.stream FROM credentials c JOIN connections n ON n.stream = c.stream"
            " WHERE n.state IN ('deleted', 'rejected')"
            f" AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.stream = c.stream AND j.{LIVE}) ORDER BY c.stream",
        )
        shredded = 0
        for (stream,) in rows:
            shredded += await self._shred(ConnectionRef.from_stream(stream))
        return shredded

    async def _shred(self, ref: ConnectionRef) -> bool:
        """Apply the shredding rule to ``ref`` in a write of its own; whether it shredded."""
        shredded = False

        async def body(write: Write) -> None:
            nonlocal shredded
            shredded = await write.shred_if_due()  # checked again under the stream's lock

        await self._write(ref, body)
        return shredded

    def jobs_changed(self) -> anyio.Event:
        """See :meth:`EventStore.jobs_changed`: set by this store's writes and by other daemons' notifications."""
        return self._jobs_event

    def _jobs_changed(self) -> None:
        changed, self._jobs_event = self._jobs_event, anyio.Event()
        changed.set()

    # -- reads --------------------------------------------------------------------------------

    async def _on_pool(self, use: Callable[[Db], Awaitable[T]]) -> T:
        """``use`` a connection of the pool; once more on a new one if that one was found broken (a read, a claim:
        either is made whole or not at all)."""
        pool = self._pool
        if pool is None or self._closed:
            raise Unavailable("the event store is closed")
        for attempt in (1, 2):
            try:
                async with pool.acquire() as con:
                    try:
                        return await use(con)
                    except BROKEN:
                        con.terminate()  # the pool makes a new one in its place
                        raise
            except BROKEN as exc:
                if attempt == 1:
                    continue
                raise wrap(exc) from None
            except Exception as exc:
                raise wrap(exc) from None
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, *params: Any) -> list[Row]:
        return await self._on_pool(lambda con: fetch(con, sql, *params))

    async def _read_after(self, position: int, limit: int) -> list[tuple[Record, int]]:
        """The feed's catch-up read: committed records from ``position`` on, with their weights."""
        rows = await self._fetch(
            f"SELECT {RECORD_COLUMNS} FROM events WHERE position >= $1 ORDER BY position LIMIT $2", position, limit
        )
        return [(record, weight(record, row[5])) for row in rows for record in (record_from_row(row),)]

    async def get_connection(self, ref: ConnectionRef) -> Connection | None:
        """See :meth:`EventStore.get_connection` (asked of the database: another daemon may have written it)."""
        rows = await self._fetch("SELECT body FROM connections WHERE stream = $1", ref.stream)
        return connection_from_body(rows[0][0]) if rows else None

    async def sealed_credentials(self, ref: ConnectionRef) -> SealedCredentials | None:
        """See :meth:`EventStore.sealed_credentials`."""
        rows = await self._fetch(f"SELECT {SEALED_COLUMNS} FROM credentials WHERE stream = $1", ref.stream)
        return sealed_from_row(rows[0]) if rows else None

    async def sealed_keys(self) -> dict[str, int]:
        """See :meth:`EventStore.sealed_keys`."""
        rows = await self._fetch("SELECT key_id, COUNT(*) FROM credentials GROUP BY key_id")
        return {str(key): int(count) for key, count in rows}

    async def list_connections(self, query: ConnectionQuery) -> list[Connection]:
        """See :meth:`EventStore.list_connections`."""
        params: list[Any] = [query.after_stream]
        where = ["stream > $1"]
        for column, value in (
            ("environment", query.environment),
            ("integration", query.integration),
            ("state", query.state.value if query.state is not None else ""),
        ):
            if value:
                params.append(value)
                where.append(f"{column} = ${len(params)}")
        params.append(query.limit)
        sql = f"SELECT body FROM connections WHERE {' AND '.join(where)} ORDER BY stream LIMIT ${len(params)}"
        return [connection_from_body(row[0]) for row in await self._fetch(sql, *params)]

    async def find_idempotent(self, ref: ConnectionRef, key: str) -> Record | None:
        """See :meth:`EventStore.find_idempotent`."""
        rows = await self._fetch(
            f"SELECT {RECORD_COLUMNS} FROM events WHERE stream = $1 AND idempotency_key = $2", ref.stream, key
        )
        return record_from_row(rows[0]) if rows else None

    async def read(
        self, *, from_position: int = 1, ref: ConnectionRef | None = None, limit: int = 1000
    ) -> list[Record]:
        """See :meth:`EventStore.read` (only committed records: a later position is never visible before an earlier)."""
        if ref is None:
            sql = f"SELECT {RECORD_COLUMNS} FROM events WHERE position >= $1 ORDER BY position LIMIT $2"
            rows = await self._fetch(sql, from_position, limit)
        else:
            sql = f"SELECT {RECORD_COLUMNS} FROM events WHERE stream = $1 AND position >= $2 ORDER BY version LIMIT $3"
            rows = await self._fetch(sql, ref.stream, from_position, limit)
        return [record_from_row(row) for row in rows]

    def read_tail(
        self, *, from_position: int = 1, ref: ConnectionRef | None = None, limit: int = 1000
    ) -> TailPage | None:
        """See :meth:`EventStore.read_tail` (a read-only store follows no commits: it keeps no tail)."""
        if self._readonly or self._closed:
            return None
        return self._tail.read(from_position=from_position, ref=ref, limit=limit)

    async def head(self) -> int:
        """See :meth:`EventStore.head`: the last position committed by any daemon."""
        return await self._head()

    async def _head(self) -> int:
        rows = await self._fetch("SELECT position FROM log_head")
        return int(rows[0][0]) if rows else 0

    async def wait_for(self, position: int, ref: ConnectionRef | None = None) -> None:
        """See :meth:`EventStore.wait_for`: woken by this store's commits and by other daemons' notifications."""
        if self._readonly:
            raise Unavailable("the event store is read-only: it is told of no commits")
        await self._tail.wait_for(position, ref)

    async def jobs(self, ref: ConnectionRef | None = None) -> list[Job]:
        """See :meth:`EventStore.jobs`."""
        if ref is None:
            rows = await self._fetch(f"SELECT {JOB_COLUMNS} FROM jobs WHERE {LIVE} ORDER BY run_at, job_id")
        else:
            rows = await self._fetch(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE stream = $1 AND {LIVE} ORDER BY run_at, job_id", ref.stream
            )
        return [job_from_row(row) for row in rows]

    async def list_jobs(self, query: JobQuery) -> list[Job]:
        """See :meth:`EventStore.list_jobs`: keyset paging on (stream, job id)."""
        params: list[Any] = list(query.after)
        where = ["(stream, job_id) > ($1, $2)"]
        if query.stream:
            params.append(query.stream)
            where.append(f"stream = ${len(params)}")
        if query.environment:
            # Names hold no "/" and "0" follows "/": the environment's streams are exactly this range.
            params += [query.environment + "/", query.environment + "0"]
            where.append(f"stream > ${len(params) - 1} AND stream < ${len(params)}")
        if query.statuses:
            params.append(sorted(status.value for status in query.statuses))
            where.append(f"status = ANY(${len(params)}::text[])")
        params.append(query.limit)
        sql = f"SELECT {JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY stream, job_id LIMIT ${len(params)}"
        return [job_from_row(row) for row in await self._fetch(sql, *params)]

    async def get_job(self, job_id: str) -> Job | None:
        """See :meth:`EventStore.get_job`."""
        rows = await self._fetch(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1", job_id)
        return job_from_row(rows[0]) if rows else None

    async def stats(self) -> Stats:
        """See :meth:`EventStore.stats`."""
        jobs = await self._fetch(f"SELECT COUNT(*), MIN(run_at) FROM jobs WHERE {LIVE}")
        states = await self._fetch("SELECT state, COUNT(*) FROM connections GROUP BY state")
        count, oldest = jobs[0]
        return Stats(
            int(count),
            codec.from_micros(oldest) if oldest is not None else None,
            {str(state): int(n) for state, n in states},
        )

    async def counts(self) -> Counts:
        """See :meth:`EventStore.counts`."""
        states = await self._fetch("SELECT environment, state, COUNT(*) FROM connections GROUP BY 1, 2")
        statuses = await self._fetch("SELECT split_part(stream, '/', 1), status, COUNT(*) FROM jobs GROUP BY 1, 2")
        return Counts(
            {(str(e), str(s)): int(n) for e, s, n in states}, {(str(e), str(s)): int(n) for e, s, n in statuses}
        )

    async def next_job_at(self) -> datetime | None:
        """See :meth:`EventStore.next_job_at` (a lease held by any daemon counts until it expires)."""
        rows = await self._fetch(
            "SELECT MIN(CASE WHEN lease_until IS NULL THEN run_at ELSE GREATEST(run_at, lease_until) END)"
            f" FROM jobs WHERE {LIVE}"
        )
        return codec.from_micros(rows[0][0]) if rows[0][0] is not None else None
