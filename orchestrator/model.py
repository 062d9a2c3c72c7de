"""Value types shared by every layer: connection refs, events, records, connections.

Everything here is immutable and free of I/O. Validation of the values a
caller sends lives here too, so that every entry point (gRPC, CLI, tests)
refuses the same inputs with the same message.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias

from orchestrator.errors import InvalidArgument

JSONObject: TypeAlias = dict[str, Any]
"""A JSON object as decoded by :mod:`json` (the shape of a record's ``data``)."""

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_CONNECTION_ID = 255
MAX_IDEMPOTENCY_KEY = 255


class LifecycleEvent(enum.StrEnum):
    """A lifecycle event, spelled as people type it."""

    VALIDATE_CONNECTION = "validate-connection"
    POST_CONNECTION_CREATION = "post-connection-creation"
    PRE_CONNECTION_DELETION = "pre-connection-deletion"


class ConnectionState(enum.StrEnum):
    """A connection's state, derived by folding its stream."""

    PENDING = "pending"
    ACTIVE = "active"
    REJECTED = "rejected"
    DELETING = "deleting"
    DELETED = "deleted"


def _printable(value: str) -> bool:
    return value.isprintable()


def check_name(field_name: str, value: str) -> str:
    """Return ``value`` if it is a valid environment or integration name."""
    if not _NAME.fullmatch(value):
        raise InvalidArgument(
            f"{field_name} {value!r} is invalid: use 1 to 63 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def check_connection_id(value: str, field_name: str = "connection.connection_id") -> str:
    """Return ``value`` if it is a valid connection id (1-255 printable characters)."""
    if not value:
        raise InvalidArgument(f"{field_name} is required")
    if len(value) > MAX_CONNECTION_ID:
        raise InvalidArgument(f"{field_name} is {len(value)} characters long; the maximum is {MAX_CONNECTION_ID}")
    if not _printable(value):
        raise InvalidArgument(f"{field_name} contains a control or non-printable character")
    return value


@dataclass(frozen=True, order=True, slots=True)
class ConnectionRef:
    """One customer's authorised account at one provider."""

    environment: str
    integration: str
    connection_id: str

    @classmethod
    def parse(cls, environment: str, integration: str, connection_id: str) -> ConnectionRef:
        """Build a ref, raising :class:`InvalidArgument` naming the first bad field."""
        return cls(
            check_name("connection.environment", environment),
            check_name("connection.integration", integration),
            check_connection_id(connection_id),
        )

    @classmethod
    def from_stream(cls, stream: str) -> ConnectionRef:
        """Parse ``environment/integration/connection_id`` (the id may contain ``/``)."""
        parts = stream.split("/", 2)
        if len(parts) != 3:
            raise InvalidArgument(f"stream {stream!r} is not of the form environment/integration/connection_id")
        return cls.parse(*parts)

    @property
    def stream(self) -> str:
        """The log's stream name for this connection."""
        return f"{self.environment}/{self.integration}/{self.connection_id}"

    def __str__(self) -> str:
        return self.stream


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a lifecycle record sits in the log (what a reply to it names)."""

    event_id: str
    type: str
    position: int
    version: int


class FunctionStatus(enum.StrEnum):
    """The status of one event function run."""

    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    GAVE_UP = "gave-up"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The latest known outcome of one function for one lifecycle event."""

    name: str
    status: FunctionStatus
    attempts: int = 0
    error: str = ""
    duration_ms: int = 0


@dataclass(frozen=True, slots=True)
class Connection:
    """A connection as the fold of its stream leaves it (the read model's row)."""

    ref: ConnectionRef
    state: ConnectionState
    version: int
    created_at: datetime
    updated_at: datetime
    last_event: str
    last_position: int
    lifecycle: Mark
    """The latest lifecycle record (the request the connection is answering)."""
    incarnation: int = 1
    """Bumped each time the connection is created anew after rejection or deletion."""
    metadata: JSONObject = field(default_factory=dict)
    config: JSONObject = field(default_factory=dict)
    rejection_reason: str = ""
    deletion: Mark | None = None
    """The deletion request of this incarnation, which repeats are answered with."""
    outcomes: tuple[Outcome, ...] = ()


@dataclass(frozen=True, slots=True)
class NewJob:
    """An asynchronous function run to schedule in the same transaction as its event (the outbox)."""

    job_id: str
    function: str
    event: LifecycleEvent
    causation_id: str
    """The lifecycle record the function runs for."""
    payload: JSONObject
    run_at: datetime
    traceparent: str = ""
    attempt: int = 0
    """Attempts already made (a cleanup continued in the background starts after its first)."""


class JobStatus(enum.StrEnum):
    """Where a job (one function run of the outbox) stands."""

    QUEUED = "queued"
    """Waiting for its due time (``run_at``): new, or between attempts."""
    RUNNING = "running"
    """Claimed: an attempt is running under a lease."""
    SUCCEEDED = "succeeded"
    GAVE_UP = "gave-up"
    """No attempt left (exhausted, not retryable, parked, or the function is gone); ``RetryJob`` queues it again."""
    CANCELLED = "cancelled"
    """It will not run (its connection was deleted, or ``CancelJob``); ``RetryJob`` queues it again."""


LIVE_JOBS = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
"""Statuses of a job that is still to run: what "a job left" means to the shredding rule."""
RETRYABLE_JOBS = frozenset({JobStatus.GAVE_UP, JobStatus.CANCELLED})
"""Statuses a job may be retried from."""


def check_job_id(value: str, field_name: str = "job_id") -> str:
    """Return ``value`` if it is a job id as the daemon makes them (a UUID in its canonical form)."""
    if not value:
        raise InvalidArgument(f"{field_name} is required")
    try:
        canonical = str(uuid.UUID(value)) == value
    except ValueError:
        canonical = False
    if not canonical:
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise InvalidArgument(f"{field_name} {shown!r} is not a job id (a UUID such as ListJobs shows)")
    return value


@dataclass(frozen=True, slots=True)
class Job:
    """A function run of the outbox, as the store keeps it: queued or running, or finished (kept for listing and
    retrying)."""

    job_id: str
    stream: str
    function: str
    event: LifecycleEvent
    causation_id: str
    payload: JSONObject
    run_at: datetime
    """When it is due (for a queued job: its next attempt)."""
    attempt: int
    """Attempts started so far (including the one a claim starts), since it was created or last retried."""
    lease_token: int
    """Bumped by every claim: an outcome from an older claim is refused (fencing)."""
    leased: bool
    traceparent: str = ""
    status: JobStatus = JobStatus.QUEUED
    last_error: str = ""
    """The error of its last failed attempt (empty once one succeeds)."""
    incarnation: int = 0
    """The incarnation of its connection it was scheduled in."""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    max_attempts: int = 0
    """The attempts its function's retry policy allows (set by the service; 0: not known to the store, or the
    function is no longer installed)."""

    @property
    def ref(self) -> ConnectionRef:
        """The connection this job runs for."""
        return ConnectionRef.from_stream(self.stream)


@dataclass(frozen=True, slots=True)
class JobQuery:
    """A filtered, keyset-paged listing of jobs, ordered by (stream, job id)."""

    stream: str = ""
    """Only this connection's jobs."""
    environment: str = ""
    """Only the jobs of this environment's connections."""
    statuses: frozenset[JobStatus] = frozenset()
    """Only jobs in these statuses (empty: any)."""
    after: tuple[str, str] = ("", "")
    """The (stream, job id) of the last job of the previous page."""
    limit: int = 100


@dataclass(frozen=True, slots=True)
class EmitRequest:
    """A validated request to append one lifecycle event."""

    ref: ConnectionRef
    event: LifecycleEvent
    config: JSONObject = field(default_factory=dict)
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)
    payload: JSONObject = field(default_factory=dict)
    idempotency_key: str = ""
    expected_version: int | None = None
    wait: bool = False
    traceparent: str = ""


@dataclass(frozen=True, slots=True)
class EmitResult:
    """What an emit answers (the gRPC response, before encoding)."""

    event_id: str
    position: int
    version: int
    state: ConnectionState
    outcomes: tuple[Outcome, ...] = ()
    rejection_reason: str = ""
    deduplicated: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionQuery:
    """A filtered, keyset-paged listing of the read model."""

    environment: str = ""
    integration: str = ""
    state: ConnectionState | None = None
    after_stream: str = ""
    limit: int = 100


@dataclass(frozen=True, slots=True)
class SealedCredentials:
    """A connection's credentials as the store keeps them: sealed, never in the clear (:mod:`orchestrator.sealing`).

    ``ciphertext`` is AES-256-GCM under the key ``key_id``, with ``nonce``; its associated data
    binds it to ``stream`` and ``incarnation``, so a row moved to another connection, or kept
    into a later incarnation, does not open.
    """

    stream: str
    incarnation: int
    key_id: str
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)
    fingerprint: str
    """The keyed fingerprint of the credentials, as their ``credentials-updated`` record states it."""
    version: int = 0
    """The stream version of the ``credentials-updated`` record that brought them (the store sets it)."""

    @property
    def ref(self) -> ConnectionRef:
        """The connection they belong to."""
        return ConnectionRef.from_stream(self.stream)
