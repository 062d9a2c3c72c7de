"""An in-process event store: the reference backend for tests. Nothing survives the process."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime, timedelta

import anyio

from orchestrator import codec
from orchestrator.clock import Clock, SystemClock
from orchestrator.errors import IdempotencyConflict, InvalidArgument, LeaseLost, Unavailable
from orchestrator.model import (
    LIVE_JOBS,
    Connection,
    ConnectionQuery,
    ConnectionRef,
    Job,
    JobQuery,
    JobStatus,
    NewJob,
    SealedCredentials,
)
from orchestrator.records import NewEvent, Record
from orchestrator.store import Appended, Counts, Stats
from orchestrator.store._append import (
    FINISHABLE,
    check_retry,
    check_seal,
    claimed,
    finished,
    matches,
    plan_append,
    sealed_version,
    shredding,
)
from orchestrator.store._tail import DEFAULT_TAIL, Tail, TailBounds, TailPage, weight


class MemoryEventStore:
    """The :class:`~orchestrator.store.EventStore` contract kept in lists and dicts."""

    def __init__(self, clock: Clock | None = None, tail: TailBounds = DEFAULT_TAIL) -> None:
        self._clock = clock or SystemClock()
        self._log: list[Record] = []
        self._tail = Tail(0, tail)
        self._streams: dict[str, list[Record]] = {}
        self._connections: dict[str, Connection] = {}
        self._keys: dict[tuple[str, str], Record] = {}
        self._lock = anyio.Lock()
        self._jobs: dict[str, Job] = {}
        """Every job, live or finished (kept for listing and retrying)."""
        self._leases: dict[str, datetime | None] = {}
        """The lease of each live job (None: not claimed)."""
        self._jobs_event = anyio.Event()
        self._sealed: dict[str, SealedCredentials] = {}
        self._closed = False
        self._last_time = self._clock.now()

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
        async with self._lock:
            if self._closed:
                raise Unavailable("the event store is closed")
            check_seal(ref, events, seal)
            if any(not self._live(j) for j in cancel_jobs):
                raise LeaseLost(f"{ref}: a job to cancel was claimed again or ended meanwhile; nothing was written")
            appended = self._append_locked(ref, expected_version, events)
            now = appended.records[-1].recorded_at
            for job in cancel_jobs:
                self._end(self._jobs[job.job_id], JobStatus.CANCELLED, now)
            for new in jobs:
                self._jobs[new.job_id] = Job(
                    new.job_id,
                    ref.stream,
                    new.function,
                    new.event,
                    new.causation_id,
                    new.payload,
                    new.run_at,
                    attempt=new.attempt,
                    lease_token=0,
                    leased=False,
                    traceparent=new.traceparent,
                    incarnation=appended.connection.incarnation,
                    created_at=now,
                    updated_at=now,
                )
                self._leases[new.job_id] = None
            if seal is not None:
                self._sealed[ref.stream] = sealed_version(seal, appended.records)
            if jobs or cancel_jobs:
                self._jobs_changed()
            return self._shred_locked(ref, appended) or appended

    def _append_locked(self, ref: ConnectionRef, expected_version: int | None, events: Sequence[NewEvent]) -> Appended:
        """Check, number and fold ``events``, then keep them (the caller holds the lock)."""
        texts = []
        for event in events:
            try:
                texts.append(codec.dumps(event.data))
            except (TypeError, ValueError) as exc:  # as the SQLite backend refuses it
                raise InvalidArgument(f"the record cannot be stored: {exc}") from None
        keys = [e.idempotency_key for e in events if e.idempotency_key]
        for key in keys:
            if (ref.stream, key) in self._keys or keys.count(key) > 1:
                raise IdempotencyConflict(f"idempotency key {key!r} is already used on {ref}")
        self._last_time = max(self._last_time, self._clock.now())
        records, connection = plan_append(
            self._connections.get(ref.stream),
            ref,
            expected_version,
            events,
            first_position=len(self._log) + 1,
            recorded_at=self._last_time,
        )
        self._log.extend(records)
        self._streams.setdefault(ref.stream, []).extend(records)
        self._connections[ref.stream] = connection
        for record in records:
            if record.idempotency_key:
                self._keys[(ref.stream, record.idempotency_key)] = record
        self._tail.add(records, [weight(r, text) for r, text in zip(records, texts, strict=True)])
        self._tail.wake()
        return Appended(tuple(records), connection)

    def _live(self, job: Job) -> bool:
        """Whether ``job`` is still queued or running, with the fencing token it was read or claimed with."""
        current = self._jobs.get(job.job_id)
        return current is not None and current.status in LIVE_JOBS and current.lease_token == job.lease_token

    def _end(self, job: Job, status: JobStatus, now: datetime, last_error: str | None = None) -> None:
        """Keep ``job`` as ended with ``status`` (the caller holds the lock)."""
        error = job.last_error if last_error is None else last_error
        self._jobs[job.job_id] = dataclasses.replace(job, status=status, leased=False, last_error=error, updated_at=now)
        self._leases.pop(job.job_id, None)

    def _shred_locked(self, ref: ConnectionRef, appended: Appended | None) -> Appended | None:
        """The shredding rule after a write (the caller holds the lock): ``appended`` and what it added."""
        jobs_left = any(j.stream == ref.stream and j.status in LIVE_JOBS for j in self._jobs.values())
        last = appended.records[-1] if appended is not None else None
        event = shredding(self._connections.get(ref.stream), self._sealed.get(ref.stream), jobs_left, last)
        if event is None:
            return appended
        shred = self._append_locked(ref, None, [event])
        del self._sealed[ref.stream]
        return Appended((appended.records if appended else ()) + shred.records, shred.connection)

    async def sealed_credentials(self, ref: ConnectionRef) -> SealedCredentials | None:
        """See :meth:`EventStore.sealed_credentials`."""
        return self._sealed.get(ref.stream)

    async def sealed_keys(self) -> dict[str, int]:
        """See :meth:`EventStore.sealed_keys`."""
        counts: dict[str, int] = {}
        for sealed in self._sealed.values():
            counts[sealed.key_id] = counts.get(sealed.key_id, 0) + 1
        return counts

    async def sweep_credentials(self) -> int:
        """See :meth:`EventStore.sweep_credentials`."""
        async with self._lock:
            before = len(self._sealed)
            for stream in list(self._sealed):
                self._shred_locked(ConnectionRef.from_stream(stream), None)
            return before - len(self._sealed)

    async def claim_jobs(self, *, limit: int, lease: float, exclude: frozenset[str] = frozenset()) -> list[Job]:
        """See :meth:`EventStore.claim_jobs`."""
        async with self._lock:
            now = self._clock.now()
            due = sorted(
                (
                    j
                    for j in self._jobs.values()
                    if j.status in LIVE_JOBS
                    and j.run_at <= now
                    and j.stream not in exclude
                    and _lease_free(self._leases[j.job_id], now)
                ),
                key=lambda j: j.run_at,
            )[:limit]
            leased = [claimed(job, now) for job in due]
            for job in leased:
                self._jobs[job.job_id] = job
                self._leases[job.job_id] = now + timedelta(seconds=lease)
            return leased

    async def finish_job(
        self, job: Job, events: Sequence[NewEvent], *, retry_at: datetime | None = None
    ) -> Appended | None:
        """See :meth:`EventStore.finish_job`."""
        async with self._lock:
            if self._closed:
                raise Unavailable("the event store is closed")
            current = self._jobs.get(job.job_id)
            # Running under this token, or still queued under it (a job an emit took over, see Worker.take_over).
            if current is None or current.lease_token != job.lease_token or current.status not in FINISHABLE:
                raise LeaseLost(f"job {job.job_id} ({job.function} on {job.stream}) was claimed again; outcome dropped")
            appended = self._append_locked(job.ref, None, events) if events else None
            self._last_time = max(self._last_time, self._clock.now())
            status, error = finished(events, requeued=retry_at is not None, last_error=current.last_error)
            if retry_at is None:
                self._end(current, status, self._last_time, error)
            else:
                self._jobs[job.job_id] = dataclasses.replace(
                    current, run_at=retry_at, leased=False, status=status, last_error=error, updated_at=self._last_time
                )
                self._leases[job.job_id] = None
            self._jobs_changed()
            return self._shred_locked(job.ref, appended)

    async def retry_job(self, job: Job, events: Sequence[NewEvent], *, run_at: datetime) -> Appended:
        """See :meth:`EventStore.retry_job`."""
        async with self._lock:
            if self._closed:
                raise Unavailable("the event store is closed")
            check_retry(self._jobs.get(job.job_id), job)
            appended = self._append_locked(job.ref, None, events)
            self._jobs[job.job_id] = dataclasses.replace(
                self._jobs[job.job_id],
                run_at=run_at,
                attempt=0,
                leased=False,
                status=JobStatus.QUEUED,
                updated_at=appended.records[-1].recorded_at,
            )
            self._leases[job.job_id] = None
            self._jobs_changed()
            return self._shred_locked(job.ref, appended) or appended

    async def jobs(self, ref: ConnectionRef | None = None) -> list[Job]:
        """See :meth:`EventStore.jobs`."""
        return sorted(
            (j for j in self._jobs.values() if j.status in LIVE_JOBS and (ref is None or j.stream == ref.stream)),
            key=lambda j: j.run_at,
        )

    async def list_jobs(self, query: JobQuery) -> list[Job]:
        """See :meth:`EventStore.list_jobs`."""
        rows = sorted((j for j in self._jobs.values() if matches(j, query)), key=lambda j: (j.stream, j.job_id))
        return rows[: query.limit]

    async def get_job(self, job_id: str) -> Job | None:
        """See :meth:`EventStore.get_job`."""
        return self._jobs.get(job_id)

    async def next_job_at(self) -> datetime | None:
        """See :meth:`EventStore.next_job_at`."""
        times = [
            max(self._jobs[job_id].run_at, lease) if lease is not None else self._jobs[job_id].run_at
            for job_id, lease in self._leases.items()
        ]
        return min(times, default=None)

    async def stats(self) -> Stats:
        """See :meth:`EventStore.stats`."""
        by_state: dict[str, int] = {}
        for connection in self._connections.values():
            by_state[connection.state.value] = by_state.get(connection.state.value, 0) + 1
        live = [j for j in self._jobs.values() if j.status in LIVE_JOBS]
        oldest = min((j.run_at for j in live), default=None)
        return Stats(len(live), oldest, by_state)

    async def counts(self) -> Counts:
        """See :meth:`EventStore.counts`."""
        connections: dict[tuple[str, str], int] = {}
        for connection in self._connections.values():
            key = (connection.ref.environment, connection.state.value)
            connections[key] = connections.get(key, 0) + 1
        jobs: dict[tuple[str, str], int] = {}
        for job in self._jobs.values():
            key = (job.stream.partition("/")[0], job.status.value)
            jobs[key] = jobs.get(key, 0) + 1
        return Counts(connections, jobs)

    def jobs_changed(self) -> anyio.Event:
        """See :meth:`EventStore.jobs_changed`."""
        return self._jobs_event

    def _jobs_changed(self) -> None:
        changed, self._jobs_event = self._jobs_event, anyio.Event()
        changed.set()

    async def get_connection(self, ref: ConnectionRef) -> Connection | None:
        """See :meth:`EventStore.get_connection`."""
        return self._connections.get(ref.stream)

    async def list_connections(self, query: ConnectionQuery) -> list[Connection]:
        """See :meth:`EventStore.list_connections`."""
        rows = (
            c
            for stream, c in sorted(self._connections.items())
            if stream > query.after_stream
            and (not query.environment or c.ref.environment == query.environment)
            and (not query.integration or c.ref.integration == query.integration)
            and (query.state is None or c.state is query.state)
        )
        out: list[Connection] = []
        for connection in rows:
            if len(out) == query.limit:
                break
            out.append(connection)
        return out

    async def find_idempotent(self, ref: ConnectionRef, key: str) -> Record | None:
        """See :meth:`EventStore.find_idempotent`."""
        return self._keys.get((ref.stream, key))

    async def read(
        self, *, from_position: int = 1, ref: ConnectionRef | None = None, limit: int = 1000
    ) -> list[Record]:
        """See :meth:`EventStore.read`."""
        if ref is None:
            start = max(from_position, 1) - 1
            return self._log[start : start + limit]
        stream = self._streams.get(ref.stream, [])
        return [r for r in stream if r.position >= from_position][:limit]

    def read_tail(
        self, *, from_position: int = 1, ref: ConnectionRef | None = None, limit: int = 1000
    ) -> TailPage | None:
        """See :meth:`EventStore.read_tail`."""
        return self._tail.read(from_position=from_position, ref=ref, limit=limit)

    async def head(self) -> int:
        """See :meth:`EventStore.head`."""
        return len(self._log)

    async def wait_for(self, position: int, ref: ConnectionRef | None = None) -> None:
        """See :meth:`EventStore.wait_for`."""
        await self._tail.wait_for(position, ref)

    def close(self) -> None:
        """Refuse further appends and wake every waiter."""
        self._closed = True
        self._tail.close()


def _lease_free(lease_until: datetime | None, now: datetime) -> bool:
    return lease_until is None or lease_until < now
