"""The part of an append every backend shares: checks, numbering and the read-model fold."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime

from orchestrator import records as bodies
from orchestrator import state
from orchestrator.errors import InvalidArgument, LeaseLost, VersionConflict
from orchestrator.model import (
    RETRYABLE_JOBS,
    Connection,
    ConnectionRef,
    ConnectionState,
    Job,
    JobQuery,
    JobStatus,
    SealedCredentials,
)
from orchestrator.records import Fact, NewEvent, Record

ENDED = frozenset({ConnectionState.DELETED, ConnectionState.REJECTED})
FINISHABLE = frozenset({JobStatus.RUNNING, JobStatus.QUEUED})
"""The statuses a job's outcome may be recorded in, under its token: claimed, or taken over while queued."""
"""States in which nothing of the connection runs any more, once its jobs are done."""


def plan_append(
    current: Connection | None,
    ref: ConnectionRef,
    expected_version: int | None,
    events: Sequence[NewEvent],
    *,
    first_position: int,
    recorded_at: datetime,
) -> tuple[list[Record], Connection]:
    """Number ``events`` and fold them onto ``current``; raise if the append must be refused.

    ``expected_version`` None appends whatever the version (the fold still
    checks every record). Pure: the backend writes the records and the returned connection in one
    transaction, or nothing.
    """
    if not events:
        raise InvalidArgument("an append needs at least one record")
    version = current.version if current is not None else 0
    if expected_version is not None and version != expected_version:
        raise VersionConflict(ref.stream, expected_version, version)
    records = [
        Record(
            position=first_position + i,
            stream=ref.stream,
            version=version + 1 + i,
            event_id=event.event_id,
            type=event.type,
            data=event.data,
            recorded_at=recorded_at,
            causation_id=event.causation_id,
            traceparent=event.traceparent,
            idempotency_key=event.idempotency_key,
        )
        for i, event in enumerate(events)
    ]
    connection = state.fold(records, current)
    assert connection is not None
    return records, connection


def check_seal(ref: ConnectionRef, events: Sequence[NewEvent], seal: SealedCredentials | None) -> None:
    """A seal comes with the ``credentials-updated`` record that announces it, for its own connection."""
    if seal is None:
        return
    if seal.stream != ref.stream:
        raise InvalidArgument(f"sealed credentials of {seal.stream} cannot be stored for {ref}")
    if not any(e.type == Fact.CREDENTIALS_UPDATED for e in events):
        raise InvalidArgument("sealed credentials are stored with the credentials-updated record that announces them")


def sealed_version(seal: SealedCredentials, appended: Sequence[Record]) -> SealedCredentials:
    """``seal`` with the version of its ``credentials-updated`` record among ``appended``."""
    version = next(r.version for r in appended if r.type == Fact.CREDENTIALS_UPDATED)
    return SealedCredentials(
        seal.stream, seal.incarnation, seal.key_id, seal.nonce, seal.ciphertext, seal.fingerprint, version
    )


def shredding(
    connection: Connection | None, sealed: SealedCredentials | None, jobs_left: bool, after: Record | None
) -> NewEvent | None:
    """The ``credentials-destroyed`` record to append when the shredding rule applies, else None.

    The rule: the connection is deleted or rejected, no job of it is queued or running, and a
    sealed row is stored. ``after`` is the last record of the write: the shredding's cause is the
    request it answers (its causation, or the record itself when it is a request).
    """
    if connection is None or sealed is None or jobs_left or connection.state not in ENDED:
        return None
    reason = f"the connection is {connection.state.value} and none of its jobs remains"
    body = bodies.CredentialsDestroyed(sealed.fingerprint, sealed.key_id, reason)
    if after is None:
        return bodies.new(body)
    return bodies.new(body, causation_id=after.causation_id or after.event_id, traceparent=after.traceparent)


_FINAL: dict[str, JobStatus] = {
    Fact.FUNCTION_SUCCEEDED: JobStatus.SUCCEEDED,
    Fact.FUNCTION_FAILED: JobStatus.GAVE_UP,
    Fact.FUNCTION_GAVE_UP: JobStatus.GAVE_UP,
    Fact.FUNCTION_CANCELLED: JobStatus.CANCELLED,
}


def finished(events: Sequence[NewEvent], *, requeued: bool, last_error: str) -> tuple[JobStatus, str]:
    """The status and last error of a job after an attempt whose outcome ``events`` are recorded.

    ``requeued``: another attempt is scheduled (queued again). Otherwise the last outcome record
    says how it ended (none: succeeded). The last error is that of the last failed or given-up
    record, ``last_error`` (the job's before) when there is none, and empty once it succeeded.
    """
    status = JobStatus.SUCCEEDED
    for event in events:
        if event.type in (Fact.FUNCTION_FAILED, Fact.FUNCTION_GAVE_UP):
            last_error = bodies.OutcomeSummary.parse(event.data).error or last_error
        status = _FINAL.get(event.type, status)
    if requeued:
        return JobStatus.QUEUED, last_error
    return status, "" if status is JobStatus.SUCCEEDED else last_error


def claimed(job: Job, now: datetime) -> Job:
    """``job`` as a claim at ``now`` leaves it: one more attempt, the next fencing token, running."""
    return dataclasses.replace(
        job,
        attempt=job.attempt + 1,
        lease_token=job.lease_token + 1,
        leased=True,
        status=JobStatus.RUNNING,
        updated_at=now,
    )


def check_retry(current: Job | None, job: Job) -> None:
    """Fencing for :meth:`~orchestrator.store.EventStore.retry_job`: ``job`` is still as it was read, and finished."""
    if current is None or current.lease_token != job.lease_token or current.status is not job.status:
        raise LeaseLost(f"job {job.job_id} ({job.function} on {job.stream}) changed meanwhile; nothing was written")
    if current.status not in RETRYABLE_JOBS:
        raise LeaseLost(f"job {job.job_id} ({job.function} on {job.stream}) is {current.status}; nothing was written")


def matches(job: Job, query: JobQuery) -> bool:
    """Whether ``job`` is one ``query`` lists (its filters and its keyset position)."""
    return (
        (job.stream, job.job_id) > query.after
        and (not query.stream or job.stream == query.stream)
        and (not query.environment or job.stream.startswith(query.environment + "/"))
        and (not query.statuses or job.status in query.statuses)
    )
