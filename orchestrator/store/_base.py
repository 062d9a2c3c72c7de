"""The seam every backend implements: :class:`EventStore`, and what an append answers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import anyio

from orchestrator.model import Connection, ConnectionQuery, ConnectionRef, Job, JobQuery, NewJob, SealedCredentials
from orchestrator.records import NewEvent, Record
from orchestrator.store._tail import TailPage


@dataclass(frozen=True, slots=True)
class Stats:
    """Gauges of the store, for metrics."""

    jobs: int
    """Jobs queued or running."""
    oldest_job_at: datetime | None
    connections: dict[str, int]
    """Connections by state."""


@dataclass(frozen=True, slots=True)
class Counts:
    """How many connections are in each state and how many jobs in each status, per environment (the console)."""

    connections: dict[tuple[str, str], int]
    """(environment, state) -> connections."""
    jobs: dict[tuple[str, str], int]
    """(environment, status) -> jobs, ended ones included."""


@dataclass(frozen=True, slots=True)
class Appended:
    """What one committed append produced."""

    records: tuple[Record, ...]
    connection: Connection
    """The connection's read-model row after the append."""


class EventStore(Protocol):
    """An append-only log of records per connection stream, with a read model kept in step.

    Beside the log, each connection may have one row of sealed credentials
    (:class:`~orchestrator.model.SealedCredentials`, made by :mod:`orchestrator.sealing`;
    the store never sees them in the clear). **Shredding** is the store's own rule, applied in
    every write: when a write leaves a connection ``deleted`` or ``rejected`` with no job of
    it queued or running and a sealed row stored, the row is deleted and a
    ``credentials-destroyed`` record appended, in that same transaction.

    **Jobs** (the outbox) are kept once they end, with their status (succeeded, gave up,
    cancelled) and last error, so that they can be listed (:meth:`list_jobs`) and retried
    (:meth:`retry_job`); only queued and running ones are claimed, counted in :meth:`stats`,
    returned by :meth:`jobs`, or count as "left" to the shredding rule.
    """

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
        """Append ``events`` to ``ref``'s stream atomically, if its version is ``expected_version`` (None: any).

        In the same transaction, ``seal`` replaces the connection's sealed credentials (its
        ``version`` becomes that of the append's ``credentials-updated`` record, which must be
        among ``events``), ``jobs`` are scheduled (the outbox) and the
        jobs ``cancel_jobs`` are marked cancelled, each as it was read or claimed: one
        whose fencing token has moved on since (claimed again), or that is no longer
        queued or running, refuses the whole append with :class:`~orchestrator.errors.LeaseLost`.
        Returns once all of it is durable. Raises
        :class:`~orchestrator.errors.VersionConflict` when the stream moved,
        :class:`~orchestrator.errors.InvalidTransition` when the fold refuses a
        record, :class:`~orchestrator.errors.IdempotencyConflict` when a key is
        taken. Nothing is written when it raises.
        """
        ...

    async def claim_jobs(self, *, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> list[Job]:
        """Lease up to ``limit`` due jobs (not of the ``exclude`` streams) for ``lease`` seconds.

        Each claim counts an attempt, bumps the job's fencing token and makes it running.
        """
        ...

    async def finish_job(
        self, job: Job, events: Sequence[NewEvent], *, retry_at: datetime | None = None
    ) -> Appended | None:
        """Record an attempt's outcome ``events`` and end the job, or queue it again at ``retry_at``.

        The job's status and last error follow from ``events`` (see
        :func:`~orchestrator.store._append.finished`). Refused with
        :class:`~orchestrator.errors.LeaseLost` (nothing written) when the job was
        claimed again since ``job`` was (its token moved on), or is no longer running.
        """
        ...

    async def jobs(self, ref: ConnectionRef | None = None) -> list[Job]:
        """Queued and running jobs (of one connection, or all), by due time."""
        ...

    async def list_jobs(self, query: JobQuery) -> list[Job]:
        """Jobs of any status matching ``query``, ordered by (stream, job id), after ``query.after``."""
        ...

    async def get_job(self, job_id: str) -> Job | None:
        """The job ``job_id`` whatever its status, or None."""
        ...

    async def retry_job(self, job: Job, events: Sequence[NewEvent], *, run_at: datetime) -> Appended:
        """Queue ``job`` (given up or cancelled) again, due at ``run_at``, with no attempt made, and append
        ``events`` (its ``function-retried``) to its stream, in one transaction.

        Fenced like the other job changes: refused with :class:`~orchestrator.errors.LeaseLost`
        (nothing written) unless the job is still as ``job`` was read (same status and token).
        """
        ...

    async def next_job_at(self) -> datetime | None:
        """When the next job becomes claimable (None: no jobs)."""
        ...

    async def stats(self) -> Stats:
        """Jobs waiting, the oldest one's due time, and connections by state."""
        ...

    async def counts(self) -> Counts:
        """Connections by environment and state, jobs by environment and status."""
        ...

    def jobs_changed(self) -> anyio.Event:
        """An event set at the next commit that schedules, reschedules or removes jobs."""
        ...

    async def get_connection(self, ref: ConnectionRef) -> Connection | None:
        """The read model's row for ``ref``, or None."""
        ...

    async def sealed_credentials(self, ref: ConnectionRef) -> SealedCredentials | None:
        """``ref``'s sealed credentials, or None."""
        ...

    async def sealed_keys(self) -> dict[str, int]:
        """How many sealed rows each key id seals."""
        ...

    async def sweep_credentials(self) -> int:
        """Apply the shredding rule to every connection (at start-up); how many rows it deleted."""
        ...

    async def list_connections(self, query: ConnectionQuery) -> list[Connection]:
        """Read-model rows matching ``query``, ordered by stream, after ``query.after_stream``."""
        ...

    async def find_idempotent(self, ref: ConnectionRef, key: str) -> Record | None:
        """The lifecycle record appended to ``ref`` with idempotency ``key``, if any."""
        ...

    async def read(
        self, *, from_position: int = 1, ref: ConnectionRef | None = None, limit: int = 1000
    ) -> list[Record]:
        """Up to ``limit`` records at or after ``from_position``, of one stream or all, in log order."""
        ...

    def read_tail(
        self, *, from_position: int = 1, ref: ConnectionRef | None = None, limit: int = 1000
    ) -> TailPage | None:
        """What :meth:`read` returns, from the in-memory tail of the last commits: no query, no wait.

        None when ``from_position`` is older than the tail's first record (or the store
        keeps no tail, as a read-only one): then :meth:`read` the log. A page also
        stops at :data:`~orchestrator.limits.MAX_PAGE_BYTES` (see
        :class:`~orchestrator.store._tail.Tail`).
        """
        ...

    async def head(self) -> int:
        """The position of the last committed record (0 when the log is empty)."""
        ...

    async def wait_for(self, position: int, ref: ConnectionRef | None = None) -> None:
        """Return once a record at ``position`` or later is committed (of ``ref``'s stream, when given).

        One commit wakes each of its waiters once; a waiter for one stream is woken only
        by a commit of that stream. Raises :class:`~orchestrator.errors.Unavailable` when
        the store closes.
        """
        ...


async def scan(
    store: EventStore, *, from_position: int = 1, ref: ConnectionRef | None = None, page: int = 1000
) -> AsyncIterator[Record]:
    """Every record from ``from_position`` on (of one stream, or all), read page by page (bounded memory)."""
    position = from_position
    while True:
        records = await store.read(from_position=position, ref=ref, limit=page)
        for record in records:
            yield record
        if len(records) < page:
            return
        position = records[-1].position + 1
