"""Rows of the SQLite tables and the values they hold: records, jobs and read-model rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from orchestrator import codec
from orchestrator.model import Connection, Job, JobStatus, LifecycleEvent, NewJob, SealedCredentials
from orchestrator.records import Record

RECORD_COLUMNS = (
    "position, stream, version, event_id, type, data, recorded_at, "
    "causation_id, traceparent, idempotency_key, schema_version"
)
SEALED_COLUMNS = "stream, incarnation, key_id, nonce, ciphertext, fingerprint, version"
JOB_COLUMNS = (
    "job_id, stream, function, event, causation_id, payload, traceparent, run_at, attempt, lease_until, lease_token,"
    " status, last_error, created_at, updated_at, incarnation"
)
LIVE = "status IN ('queued', 'running')"
"""The condition of a job still to run, written as the partial index ``jobs_due`` is (so that it is used)."""


def record_from_row(row: Sequence[Any]) -> Record:
    """A record of the ``events`` table."""
    return Record(
        position=row[0],
        stream=row[1],
        version=row[2],
        event_id=row[3],
        type=row[4],
        data=json.loads(row[5]),
        recorded_at=codec.from_micros(row[6]),
        causation_id=row[7],
        traceparent=row[8],
        idempotency_key=row[9],
        schema_version=row[10],
    )


def record_to_row(record: Record) -> tuple[Any, ...]:
    """The ``events`` row of a record (raises TypeError or ValueError for data JSON cannot hold)."""
    return (
        record.position,
        record.stream,
        record.version,
        record.event_id,
        record.type,
        codec.dumps(record.data),
        codec.to_micros(record.recorded_at),
        record.causation_id,
        record.traceparent,
        record.idempotency_key,
        record.schema_version,
    )


def job_from_row(row: Sequence[Any]) -> Job:
    """A job of the ``jobs`` table (columns :data:`JOB_COLUMNS`)."""
    return Job(
        job_id=row[0],
        stream=row[1],
        function=row[2],
        event=LifecycleEvent(row[3]),
        causation_id=row[4],
        payload=json.loads(row[5]),
        traceparent=row[6],
        run_at=codec.from_micros(row[7]),
        attempt=row[8],
        leased=row[9] is not None,
        lease_token=row[10],
        status=JobStatus(row[11]),
        last_error=row[12],
        created_at=codec.from_micros(row[13]),
        updated_at=codec.from_micros(row[14]),
        incarnation=row[15],
    )


def job_to_row(job: NewJob, stream: str, created_micros: int) -> tuple[Any, ...]:
    """The ``jobs`` row of a new job, queued: the columns of :data:`JOB_COLUMNS` but the last, ``incarnation``,
    which the writer adds once the append that schedules it is folded (raises TypeError or ValueError for a
    payload JSON cannot hold)."""
    return (
        job.job_id,
        stream,
        job.function,
        job.event.value,
        job.causation_id,
        codec.dumps(job.payload),
        job.traceparent,
        codec.to_micros(job.run_at),
        job.attempt,
        None,
        0,
        JobStatus.QUEUED.value,
        "",
        created_micros,
        created_micros,
    )


def connection_from_body(body: str) -> Connection:
    """A read-model row's connection, from its JSON ``body``."""
    return codec.connection_from_json(json.loads(body))


def connection_to_row(connection: Connection) -> tuple[Any, ...]:
    """The ``connections`` row of a read-model connection."""
    ref = connection.ref
    return (
        ref.stream,
        ref.environment,
        ref.integration,
        ref.connection_id,
        connection.state.value,
        connection.version,
        connection.last_position,
        codec.dumps(codec.connection_to_json(connection)),
    )


def sealed_from_row(row: Sequence[Any]) -> SealedCredentials:
    """A row of the ``credentials`` table (columns :data:`SEALED_COLUMNS`)."""
    return SealedCredentials(row[0], row[1], row[2], bytes(row[3]), bytes(row[4]), row[5], row[6])


def sealed_to_row(sealed: SealedCredentials, updated_micros: int) -> tuple[Any, ...]:
    """The ``credentials`` row of sealed credentials (columns :data:`SEALED_COLUMNS`, then ``updated_at``)."""
    return (
        sealed.stream,
        sealed.incarnation,
        sealed.key_id,
        sealed.nonce,
        sealed.ciphertext,
        sealed.fingerprint,
        sealed.version,
        updated_micros,
    )
