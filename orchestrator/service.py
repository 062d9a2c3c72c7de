"""The application service: what each RPC does, independent of gRPC.

:class:`Service` is the emit pipeline: it checks a request, serialises the
events of one connection (one lock per stream, so different connections
proceed in parallel), answers idempotent repeats, checks ``expected_version``,
asks the fold whether the event is allowed, has the
:class:`~orchestrator.delivery.Delivery` plan the event's contract, and
appends the plan in one atomic append. It also answers the queries. The gRPC
server (:mod:`orchestrator.rpc.server`) only converts messages and maps
errors. :func:`assemble` wires a service, its delivery, the worker and the
dispatcher over one store.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

import anyio
import httpx
from opentelemetry import metrics, trace
from opentelemetry.util.types import AttributeValue

from orchestrator import limits, records, state, tracing
from orchestrator.clock import Clock
from orchestrator.config import DispatchConfig, Integration
from orchestrator.credentials import Resolver, Updated, Vault
from orchestrator.delivery import Delivery, Plan
from orchestrator.dispatch import Dispatcher
from orchestrator.errors import (
    FailedPrecondition,
    IdempotencyConflict,
    InvalidArgument,
    LeaseLost,
    NotFound,
    OrchestratorError,
    Unavailable,
    VersionConflict,
)
from orchestrator.ids import uuid7
from orchestrator.isolation import ProcessPool
from orchestrator.model import (
    RETRYABLE_JOBS,
    Connection,
    ConnectionQuery,
    ConnectionRef,
    ConnectionState,
    EmitRequest,
    EmitResult,
    FunctionStatus,
    Job,
    JobQuery,
    JobStatus,
    LifecycleEvent,
    Outcome,
    check_job_id,
)
from orchestrator.plugins import Registry
from orchestrator.records import Fact, Record
from orchestrator.sealing import Keyring
from orchestrator.store import Appended, Counts, EventStore, scan
from orchestrator.watchdog import LoopWatchdog
from orchestrator.worker import Worker

READ_PAGE = 500
Row = TypeVar("Row")
CANCELLED_BY_REQUEST = "cancelled by request"
"""The reason a ``CancelJob`` without one records."""
MAX_REASON = 1000
"""Characters a ``CancelJob`` reason may have."""
JOB_WEIGHT = 256
"""Bytes a job takes in a ListJobs reply besides its strings (ids, numbers, timestamps, framing), counted high."""
log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
meter = metrics.get_meter(__name__)
EMITS = meter.create_counter("orchestrator.emits", description="Lifecycle events emitted, by event and outcome")
APPEND_MS = meter.create_histogram(
    "orchestrator.append.duration", unit="ms", description="Time to make an emit's records durable"
)
_VERDICTS = frozenset({Fact.CONNECTION_VALIDATED, Fact.CONNECTION_REJECTED, Fact.CONNECTION_DELETED})


def _span_attributes(request: EmitRequest) -> dict[str, AttributeValue]:
    """What the RPC span says of an emit (only built when traces are on)."""
    ref = request.ref
    return {
        "orchestrator.environment": ref.environment,
        "orchestrator.integration": ref.integration,
        "orchestrator.connection_id": ref.connection_id,
        "orchestrator.event": request.event.value,
    }


@functools.cache
def _emit_labels(event: LifecycleEvent, outcome: str) -> Mapping[str, str]:
    """The attributes of one ``orchestrator.emits`` count, made once per (event, outcome): a few dozen at most.

    ``outcome`` is ``ok``, ``deduplicated`` or the name of an error class of ours.
    """
    return MappingProxyType({"event": event.value, "outcome": outcome})


@dataclass(frozen=True, slots=True)
class Page:
    """One page of connections and the token of the next (empty on the last page)."""

    connections: list[Connection]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of jobs and the token of the next (empty on the last page)."""

    jobs: list[Job]
    next_page_token: str


def _anywhere(environment: str) -> None:
    """The scope check of a caller who may touch every environment."""


class _StreamLocks:
    """One lock per stream, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, stream: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(stream, (None, 0))
        if lock is None:
            lock = anyio.Lock()
        self._locks[stream] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[stream]
            if users == 1:
                del self._locks[stream]
            else:
                self._locks[stream] = (lock, users - 1)


class Service:
    """Emits lifecycle events and answers queries over one :class:`EventStore`."""

    def __init__(self, store: EventStore, delivery: Delivery, worker: Worker, clock: Clock) -> None:
        self._store = store
        self._delivery = delivery
        self._worker = worker
        self._clock = clock
        self._locks = _StreamLocks()
        self._draining = anyio.Event()
        self._inflight = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._working: set[anyio.CancelScope] = set()
        self._following: set[anyio.CancelScope] = set()
        """The waits of the log's followers, cancelled by :meth:`drain`."""

    def drain(self) -> None:
        """Begin shutting down: new calls and followers of the log end with UNAVAILABLE."""
        self._draining.set()
        for scope in list(self._following):
            scope.cancel()

    def abort(self) -> None:
        """The drain's grace period is over: stop the emits still at work (nothing of theirs is written)."""
        for scope in list(self._working):
            scope.cancel()

    @contextmanager
    def _shielded(self) -> Iterator[anyio.CancelScope]:
        """A scope the caller's cancellation does not reach, which :meth:`abort` can still cancel."""
        scope = anyio.CancelScope(shield=True)
        self._working.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._working.discard(scope)

    async def idle(self) -> None:
        """Return once no emit is in flight (after :meth:`drain`, none can start)."""
        await self._idle.wait()

    def _open(self) -> None:
        if self._draining.is_set():
            raise Unavailable("the daemon is shutting down: retry on another instance, or once it is back")

    # -- emitting ------------------------------------------------------------

    async def emit(self, request: EmitRequest) -> EmitResult:
        """Append one lifecycle event and apply its delivery contract."""
        limits.check_emit(request)
        ref = request.ref
        # Records carry the RPC span's context, so that later attempts (even after a
        # restart) join this trace; without tracing, the caller's own traceparent.
        # A traceparent that is not a valid W3C one is dropped, never stored (the RPC edge drops it already).
        traceparent = tracing.current_traceparent()
        if not traceparent and request.traceparent:
            traceparent = tracing.valid_traceparent(request.traceparent)
        if traceparent != request.traceparent:
            request = dataclasses.replace(request, traceparent=traceparent)
        try:
            self._open()
            self._inflight += 1
            self._idle = anyio.Event() if self._inflight == 1 else self._idle
            try:
                result = await self._emit(request)
            finally:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.set()
        except OrchestratorError as exc:
            if tracing.metrics_on():
                EMITS.add(1, _emit_labels(request.event, type(exc).__name__))
            if tracing.traces_on():
                trace.get_current_span().set_attributes(_span_attributes(request))
            # A refused emit is one INFO line: the caller was told why, the operator may need to know.
            log.info(
                "%s %s refused: %s",
                request.event.value,
                ref,
                exc,
                extra={"event": request.event.value, "connection": ref.stream, "refused": type(exc).__name__},
            )
            raise
        if tracing.metrics_on():
            EMITS.add(1, _emit_labels(request.event, "deduplicated" if result.deduplicated else "ok"))
        if tracing.traces_on():
            attributes = _span_attributes(request)
            attributes["orchestrator.state"] = result.state.value
            attributes["orchestrator.position"] = result.position
            trace.get_current_span().set_attributes(attributes)
        # Per emit, a DEBUG line; a rejection (the one state change an operator must hear of) at INFO.
        rejected = result.state is ConnectionState.REJECTED and not result.deduplicated
        level = logging.INFO if rejected else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s %s: %s%s",
                request.event.value,
                ref,
                result.state.value,
                f" ({result.rejection_reason})" if rejected else "",
                extra={
                    "event": request.event.value,
                    "connection": ref.stream,
                    "state": result.state.value,
                    "position": result.position,
                    "version": result.version,
                    "event_id": result.event_id,
                    "deduplicated": result.deduplicated,
                    "rejection_reason": result.rejection_reason,
                },
            )
        return result

    async def _emit(self, request: EmitRequest) -> EmitResult:
        ref = request.ref
        async with self._locks.hold(ref.stream):
            if request.idempotency_key:
                earlier = await self._store.find_idempotent(ref, request.idempotency_key)
                if earlier is not None:
                    return await self._repeat(request, earlier)
            current = await self._store.get_connection(ref)
            version = current.version if current is not None else 0
            if request.expected_version is not None and request.expected_version != version:
                raise VersionConflict(ref.stream, request.expected_version, version)
            rule = state.admit(current, request.event, ref)
            if rule.verdict is state.Verdict.REPEAT:
                assert current is not None and current.deletion is not None
                return EmitResult(
                    event_id=current.deletion.event_id,
                    position=current.deletion.position,
                    version=current.version,
                    state=current.state,
                    outcomes=current.outcomes,
                )
            fresh = current is None or rule.verdict is state.Verdict.NEW_INCARNATION
            # Once admitted, the event's work is done and recorded even if the caller goes away
            # (a deletion whose client deadline is shorter than its cleanup); the drain's
            # deadline still stops it (see abort()).
            with self._shielded() as scope:
                async with self._delivery.exclusive(request) as hold:
                    plan = await self._delivery.plan(request, current, fresh=fresh, hold=hold)
                    appended = await self._append(request, plan)
            if scope.cancelled_caught:
                raise Unavailable("the daemon stopped before the event was recorded; nothing was written")
        lifecycle = appended.records[0]
        connection = appended.connection
        outcomes = connection.outcomes
        if plan.jobs:
            self._delivery.scheduled(plan)
            if request.wait:
                await self._delivery.settled(plan, request)
                connection = await self.get_connection(ref)
                outcomes = await self._outcomes_of(lifecycle)
            elif request.event is LifecycleEvent.POST_CONNECTION_CREATION:
                outcomes = tuple(Outcome(job.function, FunctionStatus.SCHEDULED) for job in plan.jobs)
            elif request.event is LifecycleEvent.VALIDATE_CONNECTION:  # a rejection's cleanup, due now
                outcomes += tuple(Outcome(job.function, FunctionStatus.SCHEDULED) for job in plan.jobs)
        return EmitResult(
            event_id=lifecycle.event_id,
            position=lifecycle.position,
            version=connection.version,  # after every record this call appended: pass it back as expected_version
            state=connection.state,
            outcomes=outcomes,
            rejection_reason=connection.rejection_reason,
        )

    async def _append(self, request: EmitRequest, plan: Plan) -> Appended:
        """The emit's one atomic append, traced and timed (when traces and metrics are on)."""
        if not tracing.traces_on():
            started = time.perf_counter() if tracing.metrics_on() else 0.0
            appended = await self._store.append(
                request.ref,
                plan.expected_version,
                plan.events,
                jobs=plan.jobs,
                cancel_jobs=plan.cancel_jobs,
                seal=plan.seal,
            )
            if started:
                APPEND_MS.record((time.perf_counter() - started) * 1000)
            return appended
        attributes = {"orchestrator.records": len(plan.events), "orchestrator.jobs": len(plan.jobs)}
        with tracer.start_as_current_span("append", attributes=attributes) as span:
            started = time.perf_counter()
            appended = await self._store.append(
                request.ref,
                plan.expected_version,
                plan.events,
                jobs=plan.jobs,
                cancel_jobs=plan.cancel_jobs,
                seal=plan.seal,
            )
            if tracing.metrics_on():
                APPEND_MS.record((time.perf_counter() - started) * 1000)
            first = appended.records[0]
            span.set_attributes({"orchestrator.position": first.position, "orchestrator.version": first.version})
            return appended

    async def _outcomes_of(self, lifecycle: Record) -> tuple[Outcome, ...]:
        """The latest outcome of each function run for ``lifecycle``, from the log."""
        outcomes: tuple[Outcome, ...] = ()
        async for record in scan(self._store, from_position=lifecycle.position, ref=lifecycle.ref, page=READ_PAGE):
            outcome = state.outcome_of(record) if record.causation_id == lifecycle.event_id else None
            if outcome is not None:
                outcomes = state.merge_outcome(outcomes, outcome)
        return outcomes

    async def _repeat(self, request: EmitRequest, earlier: Record) -> EmitResult:
        """Answer a repeated request with the original response, or refuse a different one."""
        original = records.parse(earlier.type, earlier.data)
        same = (
            isinstance(original, records.Lifecycle)
            and original.event is request.event
            and original.config == request.config
            and original.payload == request.payload
        )
        if not same:
            raise IdempotencyConflict(
                f"idempotency key {request.idempotency_key!r} was already used on {request.ref} for a different"
                f" request ({earlier.type} at position {earlier.position}); use a new key"
            )
        connection = await self._state_after(earlier)
        return EmitResult(
            event_id=earlier.event_id,
            position=earlier.position,
            version=connection.version,
            state=connection.state,
            outcomes=connection.outcomes,
            rejection_reason=connection.rejection_reason,
            deduplicated=True,
        )

    async def _state_after(self, lifecycle: Record) -> Connection:
        """The connection as the original request left it: folded up to its verdict.

        A creation has none: its append ends with the lifecycle record, or with the
        ``credentials-updated`` record the emit's credentials brought right after it.
        """
        connection: Connection | None = None
        created = False
        async for record in scan(self._store, ref=lifecycle.ref, page=READ_PAGE):
            if created:
                if record.causation_id == lifecycle.event_id and record.type == Fact.CREDENTIALS_UPDATED:
                    body = records.parse(record.type, record.data)
                    if isinstance(body, records.CredentialsUpdated) and body.source == "emit":
                        connection = state.apply(connection, record)
                break
            connection = state.apply(connection, record)
            if record.event_id == lifecycle.event_id and record.type == LifecycleEvent.POST_CONNECTION_CREATION:
                created = True
            elif record.causation_id == lifecycle.event_id and record.type in _VERDICTS:
                break
        assert connection is not None
        return connection

    # -- credentials -----------------------------------------------------------

    async def update_credentials(
        self, ref: ConnectionRef, credentials: Mapping[str, str], *, traceparent: str = ""
    ) -> Updated:
        """Seal new credentials for ``ref`` (``credentials-updated`` in the log); the same ones again change nothing.

        Refused for an unknown connection (NOT_FOUND) and for one that has ended with nothing of
        it left to run (FAILED_PRECONDITION: they would be destroyed at once).
        """
        self._open()
        if not credentials:
            raise InvalidArgument("credentials is required: at least one NAME=VALUE")
        limits.check_credentials(credentials)
        if tracing.traces_on():
            trace.get_current_span().set_attributes(
                {
                    "orchestrator.environment": ref.environment,
                    "orchestrator.integration": ref.integration,
                    "orchestrator.connection_id": ref.connection_id,
                }
            )
        traceparent = tracing.current_traceparent() or tracing.valid_traceparent(traceparent)
        async with self._locks.hold(ref.stream):
            connection = await self._store.get_connection(ref)
            if connection is None:
                raise NotFound(f"connection {ref} not found: credentials belong to a connection that exists")
            if connection.state in (ConnectionState.DELETED, ConnectionState.REJECTED) and not await self._store.jobs(
                ref
            ):
                raise FailedPrecondition(
                    f"connection {ref} is {connection.state.value} and nothing of it runs any more: its credentials"
                    " would be destroyed at once; send them with the event that creates it again"
                )
            with self._shielded():
                updated = await self._delivery.vault.update(
                    ref, connection.incarnation, credentials, source="update", traceparent=traceparent
                )
        # New credentials are a change an operator may need to trace; the same ones again are not.
        log.log(
            logging.INFO if updated.changed else logging.DEBUG,
            "credentials of %s %s: fingerprint %s (key id %s)",
            ref,
            "updated" if updated.changed else "unchanged",
            updated.fingerprint,
            updated.key_id,
            extra={"connection": ref.stream, "fingerprint": updated.fingerprint, "version": updated.version},
        )
        return updated

    # -- jobs ----------------------------------------------------------------

    async def list_jobs(
        self,
        *,
        ref: ConnectionRef | None = None,
        statuses: frozenset[JobStatus] = frozenset(),
        page_size: int = 0,
        page_token: str = "",
        environments: frozenset[str] | None = None,
    ) -> JobPage:
        """One page of jobs (of ``ref``, or every connection), in (stream, job id) order.

        ``environments`` (a caller's scope; None: all) leaves out the jobs of other environments
        when no connection is named: each environment of the scope is read in order, as
        :meth:`list_connections` does. A page also stops at a size, so that a reply never
        outgrows the gRPC message limit (at least one job).
        """
        self._open()
        limit = limits.clamp_page_size(page_size)
        after = _decode_job_token(page_token, ref)

        async def read(name: str, wanted: int) -> list[Job]:
            return await self._store.list_jobs(JobQuery(environment=name, statuses=statuses, after=after, limit=wanted))

        if ref is not None:
            query = JobQuery(stream=ref.stream, statuses=statuses, after=after, limit=limit + 1)
            rows = await self._store.list_jobs(query)
        elif environments is None:
            rows = await read("", limit + 1)
        else:
            rows = await _in_scope(environments, limit + 1, read)
        rows, more = _page(rows, limit, _job_bytes)
        token = _encode_job_token(rows[-1]) if more and rows else ""
        return JobPage([self._budgeted(row) for row in rows], token)

    async def get_job(self, job_id: str) -> Job:
        """The job ``job_id`` (with its function's attempt budget); :class:`NotFound` if there is none."""
        self._open()
        check_job_id(job_id)
        return self._budgeted(await self._job(job_id))

    async def retry_job(
        self, job_id: str, *, by: str = "", check: Callable[[str], None] = _anywhere, traceparent: str = ""
    ) -> Job:
        """Queue a job that gave up or was cancelled again, due now, with a fresh attempt budget (``function-retried``).

        ``check`` is the caller's scope: it raises for the job's environment before anything is
        written; ``by`` names the caller in the record. Refused (FAILED_PRECONDITION, nothing
        written) for a job in another status, a creation job of a connection whose deletion began
        or that was rejected, a job of an earlier incarnation, and a function no longer installed.
        """
        self._open()
        check_job_id(job_id)
        job = await self._job(job_id)
        check(job.ref.environment)
        traceparent = tracing.current_traceparent() or tracing.valid_traceparent(traceparent)
        async with self._locks.hold(job.stream):  # not while an emit of the connection decides about its jobs
            job = await self._job(job_id)
            what = _described(job)
            if job.status not in RETRYABLE_JOBS:
                raise FailedPrecondition(
                    f"{what} is {job.status.value}: only a job that gave up or was cancelled can be retried"
                )
            connection = await self._store.get_connection(job.ref)
            if connection is None:
                raise NotFound(f"connection {job.ref} of {what} not found")
            if job.event is not LifecycleEvent.PRE_CONNECTION_DELETION:
                if connection.state in (ConnectionState.DELETING, ConnectionState.DELETED):
                    raise FailedPrecondition(
                        f"{what} cannot be retried: connection {job.ref} is {connection.state.value} and its cleanup"
                        " has begun; only its cleanup jobs can be retried"
                    )
                if connection.state is ConnectionState.REJECTED:
                    raise FailedPrecondition(
                        f"{what} cannot be retried: connection {job.ref} is rejected; creating it again runs its"
                        " functions anew"
                    )
            if job.incarnation != connection.incarnation:
                raise FailedPrecondition(
                    f"{what} cannot be retried: it ran for an earlier incarnation of connection {job.ref},"
                    " which has been created anew since"
                )
            if self._worker.max_attempts(job) is None:
                raise FailedPrecondition(
                    f"{what} cannot be retried: function {job.function} is no longer installed for integration"
                    f" {job.ref.integration} ({job.event.value}); install it, then retry"
                )
            body = records.FunctionRetried(job.function, job.job_id, job.attempt, job.status.value, by)
            event = records.new(body, causation_id=job.causation_id, traceparent=traceparent or job.traceparent)
            with self._shielded():
                try:
                    await self._store.retry_job(job, [event], run_at=self._clock.now())
                except LeaseLost as exc:
                    raise FailedPrecondition(f"{what} changed meanwhile; nothing was written: {exc}") from None
        self._worker.wake()
        log.info(
            "%s queued again by %s (%d attempt(s) made before, %s)",
            what,
            by or "a caller",
            job.attempt,
            job.status.value,
            extra={"connection": job.stream, "job_id": job.job_id, "function": job.function},
        )
        return self._budgeted(await self._job(job_id))

    async def cancel_job(
        self,
        job_id: str,
        *,
        reason: str = "",
        by: str = "",
        check: Callable[[str], None] = _anywhere,
        traceparent: str = "",
    ) -> Job:
        """Cancel a queued job (``function-cancelled``, with ``reason`` and ``by``).

        ``check`` is the caller's scope, as for :meth:`retry_job`. A running job is refused
        (FAILED_PRECONDITION): its attempt is not stopped; it can be cancelled once it is queued
        for another attempt. An ended job is refused too.
        """
        self._open()
        check_job_id(job_id)
        if len(reason) > MAX_REASON:
            raise InvalidArgument(f"reason is {len(reason)} characters long; the maximum is {MAX_REASON}")
        if not reason.isprintable():
            raise InvalidArgument("reason contains a control or non-printable character")
        job = await self._job(job_id)
        check(job.ref.environment)
        traceparent = tracing.current_traceparent() or tracing.valid_traceparent(traceparent)
        async with self._locks.hold(job.stream):
            job = await self._job(job_id)
            what = _described(job)
            if job.status is JobStatus.RUNNING:
                raise FailedPrecondition(
                    f"{what} is running (attempt {job.attempt}): a running attempt is not stopped; wait for it to"
                    " end, then cancel the job if it is queued for another attempt"
                )
            if job.status is not JobStatus.QUEUED:
                raise FailedPrecondition(f"{what} has ended ({job.status.value}): only a queued job can be cancelled")
            body = records.FunctionCancelled(job.function, reason or CANCELLED_BY_REQUEST, job.attempt, by)
            event = records.new(body, causation_id=job.causation_id, traceparent=traceparent or job.traceparent)
            with self._shielded():
                try:
                    await self._store.append(job.ref, None, [event], cancel_jobs=[job])
                except LeaseLost:
                    raise FailedPrecondition(
                        f"{what} started an attempt meanwhile; nothing was written: wait for the attempt to end"
                    ) from None
        log.info(
            "%s cancelled by %s: %s",
            what,
            by or "a caller",
            reason or CANCELLED_BY_REQUEST,
            extra={"connection": job.stream, "job_id": job.job_id, "function": job.function},
        )
        return self._budgeted(await self._job(job_id))

    async def _job(self, job_id: str) -> Job:
        job = await self._store.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def _budgeted(self, job: Job) -> Job:
        """``job`` with the attempts its function may make (0 when it is no longer installed)."""
        return dataclasses.replace(job, max_attempts=self._worker.max_attempts(job) or 0)

    # -- reading -------------------------------------------------------------

    async def get_connection(self, ref: ConnectionRef) -> Connection:
        """The connection's read-model row; :class:`NotFound` if it has no events."""
        self._open()
        connection = await self._store.get_connection(ref)
        if connection is None:
            raise NotFound(f"connection {ref} not found")
        return connection

    async def list_connections(
        self,
        *,
        environment: str = "",
        integration: str = "",
        state: ConnectionState | None = None,
        page_size: int = 0,
        page_token: str = "",
        environments: frozenset[str] | None = None,
    ) -> Page:
        """One page of the read model, ordered by stream.

        ``environments`` (a caller's scope; None: all) leaves out the rows of
        other environments when no ``environment`` is asked for: each
        environment of the scope is read in stream order, so pages and page
        tokens work as without it.
        """
        self._open()
        limit = limits.clamp_page_size(page_size)
        after = _decode_token(page_token)

        async def read(name: str, wanted: int) -> list[Connection]:
            query = ConnectionQuery(name, integration, state, after_stream=after, limit=wanted)
            return await self._store.list_connections(query)

        if environment or environments is None:
            rows = await read(environment, limit + 1)
        else:
            rows = await _in_scope(environments, limit + 1, read)
        rows, more = _page(rows, limit, lambda row: limits.page_bytes(row.metadata, row.config))
        token = _encode_token(rows[-1].ref.stream) if more and rows else ""
        return Page(rows, token)

    async def head(self) -> int:
        """The position of the log's last committed record (0 when it is empty)."""
        self._open()
        return await self._store.head()

    async def counts(self, *, environments: frozenset[str] | None = None) -> Counts:
        """Connections by (environment, state) and jobs by (environment, status), of ``environments`` (None: all)."""
        self._open()
        counts = await self._store.counts()
        if environments is None:
            return counts
        return Counts(
            {key: n for key, n in counts.connections.items() if key[0] in environments},
            {key: n for key, n in counts.jobs.items() if key[0] in environments},
        )

    async def read_events(
        self, *, from_position: int = 0, ref: ConnectionRef | None = None, follow: bool = False
    ) -> AsyncIterator[Record]:
        """Records from ``from_position`` (inclusive; 0 = the start); with ``follow``, then new ones as committed.

        A reader within the store's in-memory tail of recent commits (a caught-up
        follower) is served from it, with no query; one behind it pages through the
        log until it is back within the tail. Each commit wakes a follower once (a
        follower of one connection, only a commit of that connection).
        """
        self._open()
        if from_position < 0:
            raise InvalidArgument(f"from_position must be 0 or more, not {from_position}")
        position = max(from_position, 1)
        while True:
            page = self._store.read_tail(from_position=position, ref=ref, limit=READ_PAGE)
            if page is not None:
                records, more, after = page.records, page.more, page.next_position
            else:
                # Behind the tail: a page of the log. The head is taken before the read, so that a
                # record committed meanwhile is either in this page or at or after ``after``.
                head = await self._store.head()
                records = await self._store.read(from_position=position, ref=ref, limit=READ_PAGE)
                more = len(records) == READ_PAGE
                after = records[-1].position + 1 if records else position
                if not more:
                    after = max(after, head + 1)
            for record in records:
                yield record
            position = after
            if more:
                continue
            if not follow:
                return
            await self._wait_for(position, ref)

    async def _wait_for(self, position: int, ref: ConnectionRef | None) -> None:
        """Wait for a commit at ``position`` or later (of ``ref``), or raise :class:`Unavailable` when draining."""
        scope = anyio.CancelScope()
        self._following.add(scope)
        try:
            with scope:
                if not self._draining.is_set():
                    await self._store.wait_for(position, ref)
        finally:
            self._following.discard(scope)
        if self._draining.is_set():
            raise Unavailable(f"the daemon is shutting down; resume reading from position {position}")


async def _in_scope(
    environments: frozenset[str], limit: int, read: Callable[[str, int], Awaitable[list[Row]]]
) -> list[Row]:
    """Up to ``limit`` rows of a scope's environments, in stream order: ``read(environment, wanted)`` of each in turn.

    Streams are "environment/...", and names hold no "/": ordering the names as "name/" orders their rows.
    """
    rows: list[Row] = []
    for name in sorted(environments, key=lambda e: e + "/"):
        rows += await read(name, limit - len(rows))
        if len(rows) >= limit:
            break
    return rows


def _page(rows: list[Row], limit: int, weight: Callable[[Row], int]) -> tuple[list[Row], bool]:
    """The page of ``rows`` (read one beyond ``limit``), and whether more follow.

    A page also stops at a size, so that a reply never outgrows the gRPC message limit (at least one row).
    """
    more = len(rows) > limit
    rows = rows[:limit]
    total = 0
    for kept, row in enumerate(rows):
        total += weight(row)
        if kept and total > limits.MAX_PAGE_BYTES:
            return rows[:kept], True
    return rows, more


def _job_bytes(job: Job) -> int:
    """What one job weighs in a ListJobs reply."""
    return JOB_WEIGHT + len(job.last_error.encode()) + len(job.stream.encode()) + len(job.function.encode())


def _described(job: Job) -> str:
    return f"job {job.job_id} ({job.function} on {job.ref})"


def _encode_job_token(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.stream}\n{job.job_id}".encode()).decode().rstrip("=")


def _decode_job_token(token: str, ref: ConnectionRef | None) -> tuple[str, str]:
    """The (stream, job id) a ListJobs page token names; a token the server did not issue is INVALID_ARGUMENT."""
    if not token:
        return ("", "")
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        stream, newline, job_id = text.partition("\n")
        if not newline:
            raise ValueError(token)
        ConnectionRef.from_stream(stream)
        check_job_id(job_id)
    except (ValueError, InvalidArgument):  # binascii.Error, UnicodeDecodeError, or not ours at all
        raise InvalidArgument("page_token is not a token this server returned") from None
    if ref is not None and stream != ref.stream:
        raise InvalidArgument(f"page_token is of another listing than the jobs of {ref}: send the same filters")
    return (stream, job_id)


def _encode_token(stream: str) -> str:
    return base64.urlsafe_b64encode(stream.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        stream = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        ConnectionRef.from_stream(stream)
    except (ValueError, InvalidArgument):  # binascii.Error, UnicodeDecodeError, or not ASCII at all
        raise InvalidArgument("page_token is not a token this server returned") from None
    return stream


@dataclass(frozen=True, slots=True)
class Engine:
    """The service and the parts it drives, wired together (see :func:`assemble`)."""

    service: Service
    worker: Worker
    dispatcher: Dispatcher
    vault: Vault


def assemble(
    store: EventStore,
    registry: Registry,
    clock: Clock,
    *,
    http: httpx.AsyncClient,
    integrations: Mapping[str, Integration] | None = None,
    config: DispatchConfig | None = None,
    keyring: Keyring | None = None,
    resolver: Resolver | None = None,
    rng: random.Random | None = None,
    new_id: Callable[[], str] = lambda: str(uuid7()),
    watchdog: LoopWatchdog | None = None,
    pool: ProcessPool | None = None,
) -> Engine:
    """The service over ``store`` with ``registry``'s functions; the caller runs ``worker.run()`` (and ``pool.run()``).

    ``keyring`` seals the credentials (an ephemeral key when not given: tests); ``resolver`` is
    asked for fresh credentials after a provider's 401. With a ``pool``, attempts run in its
    worker processes (the credentials are opened per attempt in the daemon, as without one).
    """
    dispatcher = Dispatcher(clock, http=http, integrations=integrations, config=config, watchdog=watchdog, pool=pool)
    vault = Vault(store, keyring, resolver=resolver)
    worker = Worker(store, registry, dispatcher, clock, rng=rng, vault=vault)
    delivery = Delivery(store, registry, dispatcher, worker, vault=vault, rng=rng, new_id=new_id)
    return Engine(Service(store, delivery, worker, clock), worker, dispatcher, vault)
