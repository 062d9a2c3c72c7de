"""Running event functions: synchronously inside an RPC, or as durable jobs (the outbox worker).

:class:`Dispatcher` owns every function attempt. Synchronous runs
(validate-connection, pre-connection-deletion) run a set of functions
concurrently under one deadline and hand back their results and metadata
writes for the caller's atomic append. Asynchronous runs are jobs the store
wrote in the same transaction as their event: the worker loop claims due jobs
(a lease with a fencing token), runs each attempt under its timeout, and
records ``function-succeeded`` / ``function-failed`` / ``function-gave-up``
with the job's removal or rescheduling in one transaction. Retries back off
exponentially with full jitter on the injected clock. Every attempt is
bounded by one capacity limiter (the daemon's function concurrency).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import anyio
import httpx
from opentelemetry import metrics, trace

from orchestrator import telemetry
from orchestrator.clock import Clock
from orchestrator.context import AttemptLog, Buffered, ConnectionInfo, Context, EventInfo, MetadataSink
from orchestrator.errors import LeaseLost, OrchestratorError
from orchestrator.functions import DEFAULT_TIMEOUT
from orchestrator.ids import uuid7
from orchestrator.model import ConnectionRef, Fact, Job, JSONObject, LifecycleEvent, NewEvent, NewJob
from orchestrator.plugins import Installed, Registry
from orchestrator.provider import Integration, Provider, redact
from orchestrator.retry import DEFAULT_RETRY, RetryPolicy
from orchestrator.runner import TIMEOUT, AttemptResult, run_attempt
from orchestrator.store import EventStore

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)
meter = metrics.get_meter(__name__)
ATTEMPTS = meter.create_counter("orchestrator.function.attempts", description="Function attempts by outcome")
ATTEMPT_MS = meter.create_histogram("orchestrator.function.duration", unit="ms", description="Function attempt time")


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    """Delivery settings (DESIGN.md's defaults)."""

    concurrency: int = 64
    validate_deadline: float = 30.0
    deletion_deadline: float = 30.0
    running_wait: float = 10.0
    """How long a deletion waits for running creation attempts of its connection."""
    attempt_timeout: float = DEFAULT_TIMEOUT
    retry: RetryPolicy = DEFAULT_RETRY
    lease_margin: float = 30.0


@dataclass(slots=True)
class SyncRun:
    """What a synchronous run produced, for the caller's atomic append."""

    results: list[AttemptResult] = field(default_factory=list)
    cancelled: list[Installed] = field(default_factory=list)
    """Functions stopped before finishing because another failed (validation)."""
    metadata_writes: list[JSONObject] = field(default_factory=list)

    @property
    def failures(self) -> list[AttemptResult]:
        """The attempts that failed, in order of completion."""
        return [r for r in self.results if not r.ok]


class Credentials:
    """Credentials of each connection, from its emits (in memory until the security work seals them)."""

    def __init__(self) -> None:
        self._by_stream: dict[str, dict[str, str]] = {}

    def remember(self, ref: ConnectionRef, credentials: Mapping[str, str]) -> None:
        """Keep the latest non-empty credentials of ``ref``."""
        if credentials:
            self._by_stream[ref.stream] = dict(credentials)

    def get(self, ref: ConnectionRef) -> Mapping[str, str]:
        """The credentials of ``ref`` (empty when unknown)."""
        return self._by_stream.get(ref.stream, {})

    def forget(self, ref: ConnectionRef) -> None:
        """Drop ``ref``'s credentials (the connection is gone)."""
        self._by_stream.pop(ref.stream, None)


class _Immediate:
    """Metadata writes of an asynchronous attempt: appended at once."""

    def __init__(
        self, store: EventStore, ref: ConnectionRef, metadata: JSONObject, function: str, cause: str, traceparent: str
    ) -> None:
        self._traceparent = traceparent
        self._store = store
        self._ref = ref
        self._metadata = dict(metadata)
        self._function = function
        self._cause = cause

    def current(self) -> JSONObject:
        return dict(self._metadata)

    async def write(self, metadata: JSONObject, *, merge: bool) -> None:
        event = NewEvent(
            str(uuid7()),
            Fact.METADATA_UPDATED.value,
            {"function": self._function, "metadata": metadata, "merge": merge},
            causation_id=self._cause,
            # The attempt's span (inside the emit's trace), or the emit's own without tracing.
            traceparent=telemetry.current_traceparent() or self._traceparent,
        )
        appended = await self._store.append(self._ref, None, [event])
        self._metadata = dict(appended.connection.metadata)


async def _first(*waiters: anyio.Event) -> None:
    """Return when any of ``waiters`` is set."""
    async with anyio.create_task_group() as tg:
        for event in waiters:

            async def wait(event: anyio.Event = event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait)


class Dispatcher:
    """Runs event functions for the service, and the job worker for the daemon."""

    def __init__(
        self,
        store: EventStore,
        registry: Registry,
        clock: Clock,
        *,
        http: httpx.AsyncClient,
        integrations: Mapping[str, Integration] | None = None,
        config: DispatchConfig | None = None,
        credentials: Credentials | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self.config = config or DispatchConfig()
        self.credentials = credentials or Credentials()
        self._http = http
        self._integrations = dict(integrations or {})
        self._rng = rng or random.Random()
        self._limiter = anyio.CapacityLimiter(self.config.concurrency)
        self._threads = anyio.CapacityLimiter(self.config.concurrency)
        self._held: dict[str, int] = {}
        self._running: dict[str, dict[str, anyio.Event]] = {}
        self._wake = anyio.Event()
        self._finished = anyio.Event()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()

    # -- shared ----------------------------------------------------------------

    def integration(self, name: str) -> Integration:
        """The settings of integration ``name`` (no base URL when not configured)."""
        return self._integrations.get(name) or Integration(name)

    def _context(
        self,
        function: Installed,
        info: ConnectionInfo,
        event: EventInfo,
        sink: MetadataSink,
        log: AttemptLog,
        calls: list[str] | None = None,
    ) -> Context:
        provider = Provider(
            self._http,
            self.integration(info.ref.integration),
            info.config,
            self.credentials.get(info.ref),
            calls=calls,
        )
        return Context(
            connection=info,
            event=event,
            provider=provider,
            metadata_model=function.function.metadata,
            sink=sink,
            log=log,
        )

    def _timeout(self, function: Installed) -> float:
        return function.function.timeout or self.config.attempt_timeout

    def _policy(self, function: Installed) -> RetryPolicy:
        return function.function.retry or self.config.retry

    async def attempt(
        self,
        function: Installed,
        info: ConnectionInfo,
        event: EventInfo,
        sink: MetadataSink,
        *,
        time_limit: float | None = None,
        calls: list[str] | None = None,
        traceparent: str | None = None,
    ) -> AttemptResult:
        """One attempt, within the daemon's function concurrency, in its own span.

        The span's parent is the current span, or the span ``traceparent``
        names (a job's emit, possibly from before a restart).
        """
        limit = min(time_limit, self._timeout(function)) if time_limit is not None else self._timeout(function)
        parent = telemetry.context_from(traceparent) if traceparent is not None else None

        def make(log: AttemptLog) -> Context:  # the runner owns the attempt's log
            return self._context(function, info, event, sink, log, calls)

        ref = info.ref
        attributes = {
            "orchestrator.environment": ref.environment,
            "orchestrator.integration": ref.integration,
            "orchestrator.connection_id": ref.connection_id,
            "orchestrator.event": event.type.value,
            "orchestrator.function": function.name,
            "orchestrator.attempt": event.attempt,
            "orchestrator.plugin": f"{function.distribution} {function.version}",
        }
        with tracer.start_as_current_span(f"function {function.name}", context=parent, attributes=attributes) as span:
            async with self._limiter:
                result = await run_attempt(
                    function, make, attempt=event.attempt, time_limit=limit, limiter=self._threads
                )
            # Whatever a function raised or logged, the connection's secrets never reach the log.
            secrets = self.credentials.get(ref)
            result = dataclasses.replace(
                result, error=redact(result.error, secrets), logs=[redact(line, secrets) for line in result.logs]
            )
            outcome = "succeeded" if result.ok else ("rejected" if result.rejected else "failed")
            span.set_attribute("orchestrator.outcome", outcome)
            if not result.ok:
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{result.error_type}: {result.error}"[:500]))
                span.add_event("exception", {"exception.type": result.error_type, "exception.message": result.error})
            labels = {"function": function.name, "outcome": outcome}
            log.log(
                logging.INFO if result.ok else logging.WARNING,
                "function %s attempt %d on %s: %s%s",
                function.name,
                event.attempt,
                ref,
                outcome,
                f" ({result.error_type}: {result.error})" if not result.ok else "",
                extra={
                    "function": function.name,
                    "attempt": event.attempt,
                    "connection": ref.stream,
                    "event": event.type.value,
                    "outcome": outcome,
                    "duration_ms": result.duration_ms,
                    "error": result.error,
                },
            )

        ATTEMPTS.add(1, labels)
        ATTEMPT_MS.record(result.duration_ms, labels)
        return result

    # -- synchronous runs --------------------------------------------------------

    async def run_sync(
        self,
        functions: Sequence[Installed],
        info: ConnectionInfo,
        event: EventInfo,
        metadata: JSONObject,
        *,
        deadline: float,
        stop_on_failure: bool,
    ) -> SyncRun:
        """Run ``functions`` concurrently under one ``deadline``.

        With ``stop_on_failure`` (validation) the first failure cancels the
        others, which are reported in ``cancelled``. A function still running
        at the deadline fails with a timeout.
        """
        out = SyncRun()
        sink = Buffered(metadata)
        done: set[str] = set()
        started = self.clock.now()

        async def one(function: Installed, tg: anyio.abc.TaskGroup) -> None:
            remaining = deadline - (self.clock.now() - started).total_seconds()
            fn_sink = _Named(sink, function.name)
            result = await self.attempt(function, info, event, fn_sink, time_limit=max(remaining, 0.001))
            done.add(function.name)
            out.results.append(result)
            # At the shared deadline every function still running times out alike:
            # only a failure of its own stops the others.
            if not result.ok and stop_on_failure and result.error_type != TIMEOUT:
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for function in functions:
                tg.start_soon(one, function, tg)
        out.cancelled = [f for f in functions if f.name not in done]
        out.metadata_writes = sink.writes
        return out

    # -- the job worker ----------------------------------------------------------

    def wake(self) -> None:
        """Look for due jobs now (after an emit scheduled some)."""
        self._wake.set()

    @asynccontextmanager
    async def hold(self, ref: ConnectionRef) -> AsyncIterator[None]:
        """Claim no job of ``ref`` while held; on entry, wait (bounded) for its running attempts."""
        self._held[ref.stream] = self._held.get(ref.stream, 0) + 1
        try:
            running = list(self._running.get(ref.stream, {}).values())
            with anyio.move_on_after(self.config.running_wait):
                for finished in running:
                    await finished.wait()
            yield
        finally:
            self._held[ref.stream] -= 1
            if not self._held[ref.stream]:
                del self._held[ref.stream]
            self.wake()

    async def settled(self, cause: str, ref: ConnectionRef) -> None:
        """Return once no job caused by ``cause`` remains (``wait=true``)."""
        while True:
            finished, changed = self._finished, self.store.jobs_changed()
            if not any(j.causation_id == cause for j in await self.store.jobs(ref)):
                return
            await _first(finished, changed)  # a job ended, or jobs were added, moved or cancelled

    def stop_claiming(self) -> None:
        """Start draining: claim nothing more; running attempts go on (see :meth:`idle`)."""
        self._stopping.set()
        self.wake()

    async def idle(self) -> None:
        """Return once the worker has stopped and no job attempt is running."""
        await self._stopped.wait()

    async def run(self) -> None:
        """Claim and run due jobs until :meth:`stop_claiming` (then let running attempts finish) or cancelled.

        Unfinished jobs stay in the store for the next start.
        """
        try:
            await self._run()
        finally:
            self._stopped.set()

    async def _run(self) -> None:
        lease = self.config.attempt_timeout + self.config.lease_margin
        async with anyio.create_task_group() as tg:
            while not self._stopping.is_set():
                # Fresh before looking for work, so a wake() from now on is never missed.
                woken = self._wake = anyio.Event()
                changed, finished = self.store.jobs_changed(), self._finished
                free = int(self._limiter.available_tokens)
                claimed: list[Job] = []
                if free > 0:
                    claimed = await self.store.claim_jobs(limit=free, lease=lease, exclude=frozenset(self._held))
                    for job in claimed:
                        self._running.setdefault(job.stream, {})[job.job_id] = anyio.Event()
                        tg.start_soon(self._run_job, job)
                if claimed and len(claimed) == free:
                    await finished.wait()  # every slot is busy: wait for one to free up
                    continue
                if claimed:
                    continue  # there may be more due than we saw
                await self._idle(await self.store.next_job_at(), changed, woken, finished)

    async def _idle(self, next_at: datetime | None, *signals: anyio.Event) -> None:
        """Wait until the next job is due or any of ``signals`` is set."""
        async with anyio.create_task_group() as tg:

            async def timer(next_at: datetime) -> None:
                await self.clock.sleep(max((next_at - self.clock.now()).total_seconds(), 0) + 0.001)
                tg.cancel_scope.cancel()

            async def signal() -> None:
                await _first(*signals)
                tg.cancel_scope.cancel()

            if next_at is not None:
                tg.start_soon(timer, next_at)
            tg.start_soon(signal)

    async def _run_job(self, job: Job) -> None:
        try:
            await self._attempt_job(job)
        except LeaseLost as exc:
            log.warning("%s", exc)
        except OrchestratorError as exc:
            # The store refused or failed: the job keeps its lease and is retried when it runs out.
            log.error("job %s (%s on %s) could not be recorded: %s", job.job_id, job.function, job.stream, exc)
        except Exception:
            # A bug of ours must not end the worker; the job is retried when its lease runs out.
            log.exception("job %s (%s on %s) failed unexpectedly", job.job_id, job.function, job.stream)
        finally:
            self._running.get(job.stream, {}).pop(job.job_id, anyio.Event()).set()
            if not self._running.get(job.stream):
                self._running.pop(job.stream, None)
            finished, self._finished = self._finished, anyio.Event()
            finished.set()

    def _find(self, job: Job) -> Installed | None:
        for function in self.registry.for_event(job.ref.integration, job.event):
            if function.name == job.function:
                return function
        return None

    async def _attempt_job(self, job: Job) -> None:
        function = self._find(job)
        if function is None:
            gave_up = NewEvent(
                str(uuid7()),
                Fact.FUNCTION_GAVE_UP.value,
                {"function": job.function, "attempt": job.attempt, "error": "the function is no longer installed"},
                causation_id=job.causation_id,
                traceparent=job.traceparent,
            )
            await self.store.finish_job(job, [gave_up])
            return
        connection = await self.store.get_connection(job.ref)
        config = connection.config if connection is not None else {}
        metadata = connection.metadata if connection is not None else {}
        sink = _Immediate(self.store, job.ref, metadata, function.name, job.causation_id, job.traceparent)
        event = EventInfo(job.event, job.payload, job.causation_id, job.attempt)
        result = await self.attempt(function, ConnectionInfo(job.ref, config), event, sink, traceparent=job.traceparent)
        facts = [self.fact(result, job.causation_id, job.traceparent)]
        policy = self._policy(function)
        retry_at = None
        if not result.ok:
            if result.retryable and not policy.gives_up_after(job.attempt):
                delay = policy.delay(job.attempt, self._rng)
                retry_at = self.clock.now() + timedelta(seconds=delay)
                facts[0].data["retry_in_ms"] = int(delay * 1000)
            else:
                facts.append(self.gave_up(function.name, job.attempt, result, job.causation_id, job.traceparent))
        await self.store.finish_job(job, facts, retry_at=retry_at)

    # -- records -----------------------------------------------------------------

    @staticmethod
    def fact(result: AttemptResult, cause: str, traceparent: str = "") -> NewEvent:
        """The ``function-succeeded`` / ``function-failed`` record of an attempt."""
        kind = Fact.FUNCTION_SUCCEEDED if result.ok else Fact.FUNCTION_FAILED
        return NewEvent(str(uuid7()), kind.value, result.fact_data(), causation_id=cause, traceparent=traceparent)

    @staticmethod
    def gave_up(name: str, attempts: int, result: AttemptResult, cause: str, traceparent: str = "") -> NewEvent:
        """The ``function-gave-up`` record after the last attempt."""
        reason = "not retryable" if not result.retryable else f"{attempts} attempts exhausted"
        data = {"function": name, "attempt": attempts, "error": result.error, "reason": reason}
        return NewEvent(str(uuid7()), Fact.FUNCTION_GAVE_UP.value, data, causation_id=cause, traceparent=traceparent)

    @staticmethod
    def cancelled(name: str, cause: str, why: str, traceparent: str = "", attempts: int = 0) -> NewEvent:
        """The ``function-cancelled`` record of a run that will not happen (after ``attempts`` made)."""
        data = {"function": name, "reason": why, "attempt": attempts}
        return NewEvent(str(uuid7()), Fact.FUNCTION_CANCELLED.value, data, causation_id=cause, traceparent=traceparent)

    def schedule(
        self, functions: Sequence[Installed], event: LifecycleEvent, cause: str, payload: JSONObject, traceparent: str
    ) -> list[NewJob]:
        """One job per function, due now (the outbox rows of an asynchronous event)."""
        now = self.clock.now()
        return [NewJob(str(uuid7()), f.name, event, cause, payload, now, traceparent) for f in functions]

    def retry_job(
        self, result: AttemptResult, event: LifecycleEvent, cause: str, payload: JSONObject, traceparent: str
    ) -> NewJob:
        """A job to continue a synchronous attempt that failed or ran out of time, in the background."""
        delay = self._policy(result.function).delay(result.attempt, self._rng)
        run_at = self.clock.now() + timedelta(seconds=delay)
        return NewJob(str(uuid7()), result.function.name, event, cause, payload, run_at, traceparent, result.attempt)


class _Named:
    """A view of a shared :class:`Buffered` sink that stamps the writing function's name."""

    def __init__(self, sink: Buffered, function: str) -> None:
        self._sink = sink
        self._function = function

    def current(self) -> JSONObject:
        return self._sink.current()

    async def write(self, metadata: JSONObject, *, merge: bool) -> None:
        await self._sink.write(metadata, merge=merge)
        self._sink.writes[-1]["function"] = self._function
