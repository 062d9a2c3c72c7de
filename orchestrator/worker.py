"""The job worker: claims due jobs from the outbox and runs them, retrying with backoff, across restarts.

Asynchronous function runs are jobs the store wrote in the same transaction
as their event. :class:`Worker` claims due jobs (a lease with a fencing
token), runs each attempt through the :class:`~orchestrator.dispatch.Dispatcher`
under its timeout, and records ``function-succeeded`` / ``function-failed`` /
``function-gave-up`` with the job's removal or rescheduling in one
transaction. Retries back off exponentially with full jitter on the injected
clock. It wakes on new jobs, finished attempts and the next due time, never
by polling. A deletion (or a rejection of an active connection, or a new
incarnation that finishes its predecessor's cleanup) :meth:`~Worker.hold`\\ s a
connection so that none of its jobs is claimed while it decides what to cancel.
A cleanup job whose incarnation ended since it was scheduled is not run: it
would see the new incarnation's metadata and credentials.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import anyio

from orchestrator import records, state, tracing
from orchestrator.clock import Clock
from orchestrator.context import ConnectionInfo, EventInfo
from orchestrator.credentials import Vault
from orchestrator.dispatch import Dispatcher
from orchestrator.errors import LeaseLost, OrchestratorError
from orchestrator.model import Connection, ConnectionRef, Job, JSONObject, LifecycleEvent
from orchestrator.plugins import Installed, Registry
from orchestrator.records import NewEvent
from orchestrator.runner import AttemptResult
from orchestrator.store import EventStore, scan

log = logging.getLogger(__name__)

NOT_INSTALLED = "the function is no longer installed"
SUPERSEDED = "superseded"
"""The ``reason`` of a ``function-gave-up`` of a cleanup whose incarnation ended before it could run, or that a
new incarnation ran at once (taking it over) and that failed again."""
SUPERSEDED_ERROR = (
    "a new incarnation of the connection began before this cleanup ran: not run, since it would see the new"
    " incarnation's metadata and credentials"
)
SCAN_PAGE = 500
POISON = "{n} attempt(s) began and never ended: the daemon stopped during each (a crash or a kill); not run again"
CLAIM_RETRY = 5.0
"""Seconds before the worker looks for jobs again when the store failed to lease them (a full disk)."""


class _Immediate:
    """Metadata writes of an asynchronous attempt: appended at once."""

    def __init__(
        self, store: EventStore, ref: ConnectionRef, metadata: JSONObject, function: str, cause: str, traceparent: str
    ) -> None:
        self._store = store
        self._ref = ref
        self._metadata = dict(metadata)
        self._function = function
        self._cause = cause
        self._traceparent = traceparent

    def current(self) -> JSONObject:
        return dict(self._metadata)

    async def write(self, metadata: JSONObject, *, merge: bool) -> None:
        event = records.new(
            records.MetadataUpdated(self._function, metadata, merge),
            causation_id=self._cause,
            # The attempt's span (inside the emit's trace), or the emit's own without tracing.
            traceparent=tracing.current_traceparent() or self._traceparent,
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


@dataclass(eq=False, slots=True)
class _Running:
    """A job whose attempt is running, and how to stop it."""

    job: Job
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    recorded: bool = False
    """Its outcome reached the store (also when a stop came too late to prevent that)."""


@dataclass(slots=True)
class Hold:
    """What holding a connection found: creation jobs whose running attempts it had to stop.

    Their claims are still theirs (the lease and fencing token of the claim);
    the holder cancels them in its own append, and no outcome of theirs is
    ever recorded.
    """

    stopped: list[Job] = field(default_factory=list)


class Worker:
    """Claims and runs due jobs until told to stop; unfinished jobs stay in the store for the next start."""

    def __init__(
        self,
        store: EventStore,
        registry: Registry,
        dispatcher: Dispatcher,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        vault: Vault | None = None,
    ) -> None:
        self._store = store
        self._vault = vault or Vault(store)
        self._registry = registry
        self._dispatcher = dispatcher
        self._clock = clock
        self._config = dispatcher.config
        self._rng = rng or random.Random()
        self._held: dict[str, int] = {}
        self._running: dict[str, dict[str, _Running]] = {}
        self._claimed = anyio.Event()  # set when no claim is on its way to the store
        self._claimed.set()
        self._wake = anyio.Event()
        self._finished = anyio.Event()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()

    def wake(self) -> None:
        """Look for due jobs now (after an emit scheduled some)."""
        self._wake.set()

    @asynccontextmanager
    async def hold(self, ref: ConnectionRef) -> AsyncIterator[Hold]:
        """Claim no job of ``ref`` while held: a barrier for a deletion (and a rejection, a new incarnation).

        On entry: a claim already on its way to the store is waited for (it may
        lease a job of ``ref``), then the running attempts of ``ref`` get
        ``running_wait`` seconds to finish and record their outcome; creation
        attempts still running then are stopped, and returned in the
        :class:`Hold` for the holder to cancel. Other attempts (a cleanup of
        an earlier incarnation) are not stopped.

        Creation jobs of ``ref`` claimed elsewhere (another daemon on the same
        PostgreSQL log) are awaited within the same ``running_wait``, woken by
        the store's :meth:`~orchestrator.store.EventStore.jobs_changed`; those
        still claimed then are returned in the :class:`Hold` too: the holder's
        cancellation ends them (fenced by their token), so their attempts'
        outcomes are refused when they come.
        """
        self._held[ref.stream] = self._held.get(ref.stream, 0) + 1
        hold = Hold()
        try:
            await self._claimed.wait()
            running = list(self._running.get(ref.stream, {}).values())
            elsewhere: list[Job] = []
            with anyio.move_on_after(self._config.running_wait) as waited:
                for attempt in running:
                    await attempt.done.wait()
                while True:
                    changed = self._store.jobs_changed()  # before the read: no change is missed
                    elsewhere = await self._claimed_elsewhere(ref)
                    if not elsewhere:
                        break
                    await changed.wait()
            if waited.cancelled_caught:
                elsewhere = await self._claimed_elsewhere(ref)
            stopping = [
                a for a in running if not a.done.is_set() and a.job.event is LifecycleEvent.POST_CONNECTION_CREATION
            ]
            for attempt in stopping:
                attempt.scope.cancel()
            with anyio.CancelScope(shield=True):  # a stopped attempt ends at its next checkpoint
                for attempt in stopping:
                    await attempt.done.wait()
            hold.stopped = [a.job for a in stopping if not a.recorded] + elsewhere
            yield hold
        finally:
            self._held[ref.stream] -= 1
            if not self._held[ref.stream]:
                del self._held[ref.stream]
            self.wake()

    async def _claimed_elsewhere(self, ref: ConnectionRef) -> list[Job]:
        """Creation jobs of ``ref`` claimed and not running here: by another daemon sharing the log."""
        here = self._running.get(ref.stream, {})
        return [
            job
            for job in await self._store.jobs(ref)
            if job.leased and job.event is LifecycleEvent.POST_CONNECTION_CREATION and job.job_id not in here
        ]

    async def settled(self, cause: str, ref: ConnectionRef) -> None:
        """Return once no job caused by ``cause`` remains (``wait=true``)."""
        while True:
            finished, changed = self._finished, self._store.jobs_changed()
            if not any(j.causation_id == cause for j in await self._store.jobs(ref)):
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
        """Claim and run due jobs until :meth:`stop_claiming` (then let running attempts finish) or cancelled."""
        try:
            await self._run()
        finally:
            self._stopped.set()

    async def _run(self) -> None:
        lease = self._config.attempt_timeout + self._config.lease_margin
        async with anyio.create_task_group() as tg:
            while not self._stopping.is_set():
                # Fresh before looking for work, so a wake() from now on is never missed.
                woken = self._wake = anyio.Event()
                changed, finished = self._store.jobs_changed(), self._finished
                free = self._dispatcher.free
                claimed: list[Job] = []
                try:
                    if free > 0:
                        self._claimed = anyio.Event()
                        try:
                            claimed = await self._store.claim_jobs(
                                limit=free, lease=lease, exclude=frozenset(self._held)
                            )
                            for job in claimed:
                                running = self._running.setdefault(job.stream, {})[job.job_id] = _Running(job)
                                tg.start_soon(self._run_job, running)
                        finally:
                            self._claimed.set()
                    next_at = None if claimed else await self._store.next_job_at()
                except OrchestratorError as exc:
                    # The store failed (a full disk): the jobs stay in the outbox. Look again after a
                    # pause, or at the next wake, rather than end the worker and the daemon with it.
                    log.warning("could not look for due jobs (%s); trying again in %.0f s", exc, CLAIM_RETRY)
                    await self._idle(self._clock.now() + timedelta(seconds=CLAIM_RETRY), woken, finished)
                    continue
                if claimed and len(claimed) == free:
                    await finished.wait()  # every slot is busy: wait for one to free up
                    continue
                if claimed:
                    continue  # there may be more due than we saw
                await self._idle(next_at, changed, woken, finished)

    async def _idle(self, next_at: datetime | None, *signals: anyio.Event) -> None:
        """Wait until the next job is due or any of ``signals`` is set."""
        async with anyio.create_task_group() as tg:

            async def timer(next_at: datetime) -> None:
                await self._clock.sleep(max((next_at - self._clock.now()).total_seconds(), 0) + 0.001)
                tg.cancel_scope.cancel()

            async def signal() -> None:
                await _first(*signals)
                tg.cancel_scope.cancel()

            if next_at is not None:
                tg.start_soon(timer, next_at)
            tg.start_soon(signal)

    async def _run_job(self, running: _Running) -> None:
        job = running.job
        try:
            with running.scope:  # cancelled by a deletion's hold: the attempt is dropped, nothing recorded
                await self._attempt_job(job)
                running.recorded = True
        except LeaseLost as exc:
            log.warning("%s", exc)
        except OrchestratorError as exc:
            # The store refused or failed: the job keeps its lease and is retried when it runs out.
            log.error("job %s (%s on %s) could not be recorded: %s", job.job_id, job.function, job.stream, exc)
        except Exception:
            # A bug of ours must not end the worker; the job is retried when its lease runs out.
            log.exception("job %s (%s on %s) failed unexpectedly", job.job_id, job.function, job.stream)
        finally:
            running.done.set()
            self._running.get(job.stream, {}).pop(job.job_id, None)
            if not self._running.get(job.stream):
                self._running.pop(job.stream, None)
            finished, self._finished = self._finished, anyio.Event()
            finished.set()

    async def _of_current_incarnation(self, job: Job, connection: Connection) -> bool:
        """Whether ``job`` runs for ``connection``'s current incarnation (a cleanup may outlive its own).

        Only a cleanup job can: a rejection or a deletion ends the creation jobs of its incarnation. The
        stream is folded (the one fold) to find the incarnation of the job's lifecycle record only when it
        is not the connection's latest one, nor its deletion.
        """
        cause = job.causation_id
        deletion = connection.deletion.event_id if connection.deletion is not None else ""
        if job.event is not LifecycleEvent.PRE_CONNECTION_DELETION:
            return True
        if cause in (connection.lifecycle.event_id, deletion):
            return True
        folded: Connection | None = None
        async for record in scan(self._store, ref=job.ref, page=SCAN_PAGE):
            folded = state.apply(folded, record)
            if record.event_id == cause:
                return folded.incarnation == connection.incarnation
        return True  # its lifecycle record is not in the stream: nothing tells it apart

    def _find(self, job: Job) -> Installed | None:
        for function in self._registry.for_event(job.ref.integration, job.event):
            if function.name == job.function:
                return function
        return None

    def max_attempts(self, job: Job) -> int | None:
        """The attempts ``job``'s function may make (its retry policy's); None when it is no longer installed."""
        function = self._find(job)
        return None if function is None else self._dispatcher.policy(function).max_attempts

    async def take_over(self, jobs: list[Job], *, time_limit: float) -> None:
        """Run each of ``jobs`` (queued, of a connection the caller holds) once now, concurrently, as its next attempt.

        For a new incarnation, whose cleanup must not be left to later: each attempt gets the connection's
        metadata and credentials as they are (the incarnation's that ends), at most ``time_limit`` seconds, and
        its outcome is recorded as the worker records one, with the job's removal. A failure is final: it
        gives up (``superseded``) instead of being retried into the new incarnation.
        """
        async with anyio.create_task_group() as tg:
            for job in jobs:
                # Counted as a claim counts it; its fencing token stays (checked; the hold keeps claims away).
                tg.start_soon(self._take_over_one, dataclasses.replace(job, attempt=job.attempt + 1), time_limit)

    async def _take_over_one(self, job: Job, time_limit: float) -> None:
        try:
            await self._attempt_job(job, time_limit=time_limit, final=SUPERSEDED)
        except OrchestratorError as exc:  # the store refused or failed: the job stays, the guard ends it later
            log.error("job %s (%s on %s) could not be taken over: %s", job.job_id, job.function, job.stream, exc)
        except Exception:  # a bug of ours must not fail the emit: the job stays, the guard ends it later
            log.exception("job %s (%s on %s) failed unexpectedly when taken over", job.job_id, job.function, job.stream)

    async def _attempt_job(self, job: Job, *, time_limit: float | None = None, final: str = "") -> None:
        """One attempt of ``job``, recorded; with ``final``, a failure is not retried: it gives up, for that reason."""
        function = self._find(job)
        if function is None:
            gone = records.FunctionGaveUp(job.function, job.attempt, NOT_INSTALLED)
            await self._store.finish_job(
                job, [records.new(gone, causation_id=job.causation_id, traceparent=job.traceparent)]
            )
            return
        policy = self._dispatcher.policy(function)
        if job.attempt > policy.max_attempts:
            # More attempts began than the policy allows, and none ended in a give-up: the daemon
            # stopped (crashed, was killed) during each. A job that takes the daemon down is parked.
            unfinished = job.attempt - 1
            parked = records.FunctionGaveUp(function.name, unfinished, POISON.format(n=unfinished), "parked")
            await self._store.finish_job(
                job, [records.new(parked, causation_id=job.causation_id, traceparent=job.traceparent)]
            )
            log.error("job %s (%s on %s) parked: %s", job.job_id, job.function, job.stream, parked.error)
            return
        connection = await self._store.get_connection(job.ref)
        if connection is not None and not await self._of_current_incarnation(job, connection):
            # Its metadata and credentials are gone with its incarnation: run now, it would act on the new one's.
            superseded = records.FunctionGaveUp(function.name, job.attempt - 1, SUPERSEDED_ERROR, SUPERSEDED)
            await self._store.finish_job(
                job, [records.new(superseded, causation_id=job.causation_id, traceparent=job.traceparent)]
            )
            log.warning("job %s (%s on %s) not run: %s", job.job_id, job.function, job.stream, SUPERSEDED_ERROR)
            return
        config = connection.config if connection is not None else {}
        metadata = connection.metadata if connection is not None else {}
        sink = _Immediate(self._store, job.ref, metadata, function.name, job.causation_id, job.traceparent)
        event = EventInfo(job.event, job.payload, job.causation_id, job.attempt)
        # Opened from the store for each attempt: after any number of restarts, the connection's own.
        incarnation = connection.incarnation if connection is not None else 0
        secrets = await self._vault.for_job(
            job.ref, incarnation, causation_id=job.causation_id, traceparent=job.traceparent
        )
        result = await self._dispatcher.attempt(
            function,
            ConnectionInfo(job.ref, config),
            event,
            sink,
            time_limit=time_limit,
            traceparent=job.traceparent,
            secrets=secrets,
        )
        retry_at = None
        bodies: list[records.Body] = []
        retried = not result.ok and result.retryable and not policy.gives_up_after(job.attempt)
        if retried and not final:
            delay = policy.delay(job.attempt, self._rng)
            retry_at = self._clock.now() + timedelta(seconds=delay)
            bodies.append(result.outcome(retry_in_ms=int(delay * 1000)))
        else:
            bodies.append(result.outcome())
            if retried:
                bodies.append(records.FunctionGaveUp(function.name, job.attempt, result.error, final))
            elif not result.ok:
                bodies.append(gave_up(result, job.attempt))
        events: list[NewEvent] = [
            records.new(body, causation_id=job.causation_id, traceparent=job.traceparent) for body in bodies
        ]
        await self._store.finish_job(job, events, retry_at=retry_at)


MISCONFIGURED = "misconfigured"
"""The ``reason`` of a ``function-gave-up`` whose attempt the daemon's settings failed (its ``error`` names one)."""


def gave_up(result: AttemptResult, attempts: int) -> records.FunctionGaveUp:
    """The ``function-gave-up`` body after ``result``, the last attempt (number ``attempts``).

    An attempt the daemon's settings failed gives up naming the setting, whatever the function made of it.
    """
    if result.misconfigured:
        return records.FunctionGaveUp(result.function.name, attempts, result.misconfigured, MISCONFIGURED)
    reason = "not retryable" if not result.retryable else f"{attempts} attempts exhausted"
    return records.FunctionGaveUp(result.function.name, attempts, result.error, reason)
