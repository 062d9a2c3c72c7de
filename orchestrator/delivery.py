"""The three delivery contracts, each turning an admitted emit into a plan of records and jobs.

    event                      functions run                         the plan appends
    validate-connection        now, concurrently, one deadline;      the request, each outcome, metadata
                               the first failure stops the others    writes, then the verdict; rejecting an
                                                                     active connection: creation jobs
                                                                     cancelled, one cleanup job per function
    post-connection-creation   later, as durable jobs (the outbox)   the request and one job per function
    pre-connection-deletion    pending creation jobs cancelled,      the request, cancellations, each cleanup
                               running ones awaited (bounded), then  outcome (a failed one continues as a
                               cleanup functions under one deadline  background job), metadata writes,
                               (of a rejected connection: what of    then connection-deleted
                               its cleanup is not done)

:class:`Delivery` decides; :class:`~orchestrator.service.Service` appends the
plan in one atomic append, so a crash never leaves half of a contract in the
log. Records are built through :mod:`orchestrator.records` only. A deletion
holds the connection's jobs (:meth:`Worker.hold`) from the start; a validation
only once it rejects an active connection, or once it (or a creation) starts
a new incarnation while the previous one's cleanup is queued, which it runs
first (:meth:`Worker.take_over`). A validation whose function the daemon's
settings failed (:attr:`AttemptResult.misconfigured`) is refused: nothing of it
is appended.

Credentials an emit brings are what its synchronous functions use (else the
connection's sealed ones); when anything of the connection runs later (it is
pending or active, or a cleanup continues in the background) they are sealed
into the plan's append with a ``credentials-updated`` record right after the
lifecycle record. A rejection, or a deletion with nothing left to run, seals
nothing: the store shreds what was sealed before, once no job is left (the
cleanup a rejection schedules runs with the credentials the connection had).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from orchestrator import records
from orchestrator.context import ConnectionInfo, EventInfo
from orchestrator.credentials import Vault
from orchestrator.dispatch import Dispatcher, SyncRun
from orchestrator.errors import Misconfigured
from orchestrator.ids import uuid7
from orchestrator.model import (
    Connection,
    ConnectionState,
    EmitRequest,
    FunctionStatus,
    Job,
    JSONObject,
    LifecycleEvent,
    NewJob,
    SealedCredentials,
)
from orchestrator.plugins import Installed, Registry
from orchestrator.provider import Secrets
from orchestrator.records import NewEvent
from orchestrator.runner import TIMEOUT, AttemptResult
from orchestrator.store import EventStore
from orchestrator.worker import Hold, Worker, gave_up

VALIDATION_CANCELLED = "another validation failed"
DELETION_CANCELLED = "the connection is being deleted"
REJECTION_CANCELLED = "the connection was rejected"
TAKEN_OVER = "the deletion runs it now"


_ENDED = frozenset({ConnectionState.REJECTED, ConnectionState.DELETED})


def _rejected(plan: Plan) -> bool:
    """Whether the plan rejects the connection (its verdict is ``connection-rejected``)."""
    return any(e.type == records.Fact.CONNECTION_REJECTED for e in plan.events)


def _creations_to_end(jobs: list[Job], hold: Hold) -> list[Job]:
    """The creation jobs a deletion or a rejection cancels: those not started, and those the hold stopped."""
    unstarted = [j for j in jobs if not j.leased and j.event is LifecycleEvent.POST_CONNECTION_CREATION]
    return unstarted + hold.stopped


def _cancelled(jobs: list[Job], reason: str, traceparent: str) -> list[NewEvent]:
    """A ``function-cancelled`` record for each of ``jobs`` (caused by its own lifecycle record), for ``reason``."""
    return [
        records.new(
            records.FunctionCancelled(j.function, reason, j.attempt),
            causation_id=j.causation_id,
            traceparent=traceparent,
        )
        for j in jobs
    ]


class Barrier:
    """The worker's hold on a connection's jobs, taken the first time the plan asks (:meth:`held`).

    :meth:`Delivery.exclusive` releases it once the plan is appended.
    """

    def __init__(self, take: Callable[[], Awaitable[Hold]]) -> None:
        self._take = take
        self._hold: Hold | None = None

    async def held(self) -> Hold:
        """Hold the connection's jobs (once: later calls return the same hold)."""
        if self._hold is None:
            self._hold = await self._take()
        return self._hold


@dataclass(slots=True)
class Plan:
    """What one emit appends, in order, in one transaction."""

    lifecycle: NewEvent
    events: list[NewEvent] = field(default_factory=list)
    """Every record, the lifecycle record first."""
    jobs: list[NewJob] = field(default_factory=list)
    cancel_jobs: list[Job] = field(default_factory=list)
    seal: SealedCredentials | None = None
    """Credentials to seal in the same append (announced by its ``credentials-updated`` record)."""
    expected_version: int | None = None
    """The stream's version the append expects: the request's, moved past what the plan recorded before it
    (the earlier incarnation's cleanup a new incarnation took over)."""


class Delivery:
    """Plans each lifecycle event's delivery contract over the functions installed for it."""

    def __init__(
        self,
        store: EventStore,
        registry: Registry,
        dispatcher: Dispatcher,
        worker: Worker,
        *,
        vault: Vault | None = None,
        rng: random.Random | None = None,
        new_id: Callable[[], str] = lambda: str(uuid7()),
    ) -> None:
        self._store = store
        self._registry = registry
        self._dispatcher = dispatcher
        self._worker = worker
        self.vault = vault or Vault(store)
        self._rng = rng or random.Random()
        self._new_id = new_id
        self._config = dispatcher.config

    def _functions(self, request: EmitRequest) -> tuple[Installed, ...]:
        """The functions installed for the request's integration and event."""
        return self._registry.for_event(request.ref.integration, request.event)

    @asynccontextmanager
    async def exclusive(self, request: EmitRequest) -> AsyncIterator[Barrier]:
        """Hold what the plan depends on until it is appended: a deletion is a barrier for its creation jobs.

        A deletion holds the connection's jobs from the start; a validation does only once it rejects an
        active connection (:meth:`Barrier.held`), so that a passing re-validation never waits for them.
        """
        async with AsyncExitStack() as stack:
            barrier = Barrier(lambda: stack.enter_async_context(self._worker.hold(request.ref)))
            if request.event is LifecycleEvent.PRE_CONNECTION_DELETION:
                await barrier.held()
            yield barrier

    async def plan(self, request: EmitRequest, current: Connection | None, *, fresh: bool, hold: Barrier) -> Plan:
        """Run what runs synchronously and return the records and jobs to append.

        ``current`` is the connection before the event; ``fresh`` says the
        event starts a new incarnation (no earlier config or metadata);
        ``hold`` is what :meth:`exclusive` gave, held until the plan is appended.
        """
        lifecycle = records.new(
            records.Lifecycle(request.event, request.config, request.payload),
            event_id=self._new_id(),
            traceparent=request.traceparent,
            idempotency_key=request.idempotency_key,
        )
        plan = Plan(lifecycle, [lifecycle], expected_version=request.expected_version)
        if request.event is LifecycleEvent.PRE_CONNECTION_DELETION and current is not None:
            # The creation attempts the hold awaited may have written metadata (a webhook's id)
            # since the caller read the connection: the cleanup must see it.
            current = await self._store.get_connection(request.ref) or current
        old = None if fresh else current
        info = ConnectionInfo(request.ref, request.config if old is None or request.config else old.config)
        metadata = {} if old is None else old.metadata
        # The incarnation the event runs in: the credentials are bound to it.
        incarnation = old.incarnation if old is not None else (current.incarnation + 1 if current is not None else 1)
        refresh, refreshed = self.vault.refresher(request.ref, request.credentials)
        ended = current if fresh and current is not None and current.state in _ENDED else None
        if request.event is LifecycleEvent.POST_CONNECTION_CREATION:
            await self._finish_earlier_cleanup(request, plan, ended, hold)
            self._create(request, plan)
        else:
            if request.credentials:
                secrets = Secrets(request.credentials, refresh=refresh)
            else:
                secrets = await self.vault.open(request.ref, incarnation, refresh=refresh)
            if request.event is LifecycleEvent.VALIDATE_CONNECTION:
                await self._validate(request, plan, info, metadata, secrets)
                await self._finish_earlier_cleanup(request, plan, ended, hold)  # not before a refusal: it writes
                if old is not None and old.state is ConnectionState.ACTIVE and _rejected(plan):
                    await self._clean_up_after_rejection(request, plan, await hold.held())
            else:
                await self._delete(request, plan, info, metadata, await hold.held(), secrets, old)
        await self._seal(request, plan, incarnation, refreshed())
        return plan

    async def _seal(
        self, request: EmitRequest, plan: Plan, incarnation: int, refreshed: Mapping[str, str] | None
    ) -> None:
        """Seal the credentials the emit brought (or the resolver gave its functions) when anything runs later."""
        credentials = refreshed or request.credentials
        if not credentials:
            return
        if _rejected(plan) or (request.event is LifecycleEvent.PRE_CONNECTION_DELETION and not plan.jobs):
            # A rejection keeps nothing it brought: its cleanup, if any, runs with the credentials the connection
            # had (the store keeps their row while a job is left, and shreds it after the last).
            return
        sealing = await self.vault.sealing(
            request.ref, incarnation, credentials, source="resolver" if refreshed else "emit"
        )
        if sealing is not None:
            plan.events.insert(1, self._fact(sealing.body, plan))
            plan.seal = sealing.sealed

    def scheduled(self, plan: Plan) -> None:
        """The plan is durable: wake the worker for its jobs."""
        if plan.jobs:
            self._worker.wake()

    async def settled(self, plan: Plan, request: EmitRequest) -> None:
        """Return once every job the plan scheduled has finished (``wait=true``)."""
        await self._worker.settled(plan.lifecycle.event_id, request.ref)

    # -- the three contracts ---------------------------------------------------------

    def _fact(self, body: records.Body, plan: Plan) -> NewEvent:
        return records.new(
            body,
            event_id=self._new_id(),
            causation_id=plan.lifecycle.event_id,
            traceparent=plan.lifecycle.traceparent,
        )

    def _metadata(self, run: SyncRun, plan: Plan) -> list[NewEvent]:
        return [self._fact(update, plan) for update in run.metadata_updates]

    async def _validate(
        self, request: EmitRequest, plan: Plan, info: ConnectionInfo, metadata: JSONObject, secrets: Secrets
    ) -> None:
        """Run every validate function concurrently; the first failure or the deadline rejects."""
        functions = self._functions(request)
        if not functions:
            plan.events.append(self._fact(records.ConnectionValidated(), plan))
            return
        run = await self._dispatcher.run_sync(
            functions,
            info,
            EventInfo(request.event, request.payload, plan.lifecycle.event_id),
            metadata,
            deadline=self._config.validate_deadline,
            stop_on_failure=True,
            secrets=secrets,
        )
        misconfigured = sorted((r for r in run.results if r.misconfigured), key=lambda r: r.function.name)
        if misconfigured:
            # The daemon's settings are at fault, not the connection: refuse the emit, write nothing.
            first = misconfigured[0]
            raise Misconfigured(
                f"{request.event} of {request.ref} was refused and nothing was recorded: the daemon is misconfigured"
                f" (function {first.function.name}): {first.misconfigured}"
            )
        cause, trace = plan.lifecycle.event_id, plan.lifecycle.traceparent
        plan.events += [records.new(r.outcome(), causation_id=cause, traceparent=trace) for r in run.results]
        plan.events += [
            records.new(records.FunctionCancelled(f.name, VALIDATION_CANCELLED), causation_id=cause, traceparent=trace)
            for f in run.cancelled
        ]
        plan.events += self._metadata(run, plan)
        if not run.failures:
            plan.events.append(self._fact(records.ConnectionValidated(), plan))
            return
        failure = run.failures[0]
        # Functions that ran out of time together are all named, in order.
        reason = "; ".join(
            f"{f.function.name}: {f.error}"
            for f in sorted(run.failures, key=lambda f: f.function.name)
            if f is failure or (failure.error_type == TIMEOUT and f.error_type == TIMEOUT)
        )
        plan.events.append(self._fact(records.ConnectionRejected(reason, failure.function.name), plan))

    async def _finish_earlier_cleanup(
        self, request: EmitRequest, plan: Plan, ended: Connection | None, hold: Barrier
    ) -> None:
        """Before a new incarnation of ``ended`` (rejected or deleted) begins, run the cleanup it left queued.

        Left for later, a cleanup would run with the new incarnation's metadata and credentials. Under the
        worker's hold (claims in flight and running attempts awaited, bounded), each cleanup job still queued
        is taken over (:meth:`Worker.take_over`): it runs once now, under the deletion deadline, with the
        earlier incarnation's metadata and credentials, and its outcome is recorded before the new lifecycle
        record (a failure gives up: ``superseded``). One still running after the wait is left to finish; the
        worker gives up, unrun, any retry of it. The plan's expected version moves past those records.
        """
        if ended is None:
            return
        cleanup = LifecycleEvent.PRE_CONNECTION_DELETION
        if not any(j.event is cleanup for j in await self._store.jobs(request.ref)):
            return
        await hold.held()
        queued = [j for j in await self._store.jobs(request.ref) if j.event is cleanup and not j.leased]
        if not queued:
            return
        await self._worker.take_over(queued, time_limit=self._config.deletion_deadline)
        if plan.expected_version is not None:
            after = await self._store.get_connection(request.ref)
            plan.expected_version = after.version if after is not None else plan.expected_version

    async def _clean_up_after_rejection(self, request: EmitRequest, plan: Plan, hold: Hold) -> None:
        """An active connection is rejected: its creation jobs end, and its cleanup is scheduled, in the same append.

        As a deletion does, under the worker's hold on the connection (taken once the verdict was known):
        creation jobs not started are cancelled, running attempts were awaited (bounded) and those still
        running stopped (``hold``), so no creation succeeds after the rejection; then one background job per
        cleanup function, due now, for the rejecting validation (its event id is their ``ctx.event.event_id``).
        The records go before the verdict, which stays the last of the append.
        """
        verdict = plan.events.pop()
        cause, trace = plan.lifecycle.event_id, plan.lifecycle.traceparent
        pending = _creations_to_end(await self._store.jobs(request.ref), hold)
        plan.events += _cancelled(pending, REJECTION_CANCELLED, trace)
        plan.cancel_jobs += pending
        now = self._dispatcher.clock.now()
        deletion = LifecycleEvent.PRE_CONNECTION_DELETION
        plan.jobs += [
            NewJob(str(uuid7()), f.name, deletion, cause, {}, now, trace)
            for f in self._registry.for_event(request.ref.integration, deletion)
        ]
        plan.events.append(verdict)

    def _create(self, request: EmitRequest, plan: Plan) -> None:
        """Schedule one durable job per creation function, in the event's transaction."""
        now = self._dispatcher.clock.now()
        cause, trace = plan.lifecycle.event_id, plan.lifecycle.traceparent
        plan.jobs = [
            NewJob(str(uuid7()), f.name, request.event, cause, request.payload, now, trace)
            for f in self._functions(request)
        ]

    async def _delete(
        self,
        request: EmitRequest,
        plan: Plan,
        info: ConnectionInfo,
        metadata: JSONObject,
        hold: Hold,
        secrets: Secrets,
        current: Connection | None,
    ) -> None:
        """Cancel creation jobs (pending, and those the hold stopped), run the cleanup functions, delete.

        Of a rejected connection, only the cleanup its rejection scheduled and that is not done yet runs
        (:meth:`_left_by_rejection`).
        """
        cause, trace = plan.lifecycle.event_id, plan.lifecycle.traceparent
        jobs = await self._store.jobs(request.ref)
        pending = _creations_to_end(jobs, hold)
        plan.events += _cancelled(pending, DELETION_CANCELLED, trace)
        functions = self._functions(request)
        if current is not None and current.state is ConnectionState.REJECTED:
            functions, taken = self._left_by_rejection(functions, jobs, current)
            plan.events += _cancelled(taken, TAKEN_OVER, trace)
            pending += taken
        plan.cancel_jobs = pending
        run = await self._dispatcher.run_sync(
            functions,
            info,
            EventInfo(request.event, request.payload, cause),
            metadata,
            deadline=self._config.deletion_deadline,
            stop_on_failure=False,
            secrets=secrets,
        )
        for result in run.results:
            policy = self._dispatcher.policy(result.function)
            if result.ok or not result.retryable or policy.gives_up_after(result.attempt):
                plan.events.append(records.new(result.outcome(), causation_id=cause, traceparent=trace))
                if not result.ok:
                    body = gave_up(result, result.attempt)
                    plan.events.append(records.new(body, causation_id=cause, traceparent=trace))
                continue
            # Deletion is never blocked: the cleanup goes on in the background, and its record says when.
            delay = policy.delay(result.attempt, self._rng)
            outcome = result.outcome(retry_in_ms=int(delay * 1000))
            plan.events.append(records.new(outcome, causation_id=cause, traceparent=trace))
            plan.jobs.append(self._retry_job(result, request, plan, delay))
        plan.events += self._metadata(run, plan)
        plan.events.append(self._fact(records.ConnectionDeleted(), plan))

    @staticmethod
    def _left_by_rejection(
        functions: tuple[Installed, ...], jobs: list[Job], rejected: Connection
    ) -> tuple[tuple[Installed, ...], list[Job]]:
        """The cleanup functions a deletion of ``rejected`` runs, and the rejection's jobs it takes over.

        The rejection of an active connection scheduled one job per cleanup function, for the rejecting
        validation (the connection's latest lifecycle event, whose outcomes it shows). Per function: a job
        still queued (due, or waiting for its retry) is taken over: cancelled, and run now; a job running
        (it outlived the hold's wait) is left to finish in the background, never run twice at once; with no
        job left, a run that succeeded is done, and one that gave up (or was cancelled) runs again. A
        function with neither (the connection was rejected while pending: nothing was set up) does not run.
        """
        cleanup = [j for j in jobs if j.event is LifecycleEvent.PRE_CONNECTION_DELETION]
        taken = [j for j in cleanup if not j.leased]
        running = {j.function for j in cleanup if j.leased}
        queued = {j.function for j in taken}
        outcomes = {o.name: o.status for o in rejected.outcomes}
        left = tuple(
            f
            for f in functions
            if f.name not in running
            and (f.name in queued or outcomes.get(f.name, FunctionStatus.SUCCEEDED) is not FunctionStatus.SUCCEEDED)
        )
        return left, taken

    def _retry_job(self, result: AttemptResult, request: EmitRequest, plan: Plan, delay: float) -> NewJob:
        """A job to continue a synchronous attempt that failed or ran out of time, ``delay`` seconds from now."""
        run_at = self._dispatcher.clock.now() + timedelta(seconds=delay)
        return NewJob(
            str(uuid7()),
            result.function.name,
            request.event,
            plan.lifecycle.event_id,
            request.payload,
            run_at,
            plan.lifecycle.traceparent,
            result.attempt,
        )
