"""The log's schema: every record type, one typed body per type, with its constructor and its parser.

The event log outlives every release, so the envelope of a record
(:class:`NewEvent` to append, :class:`Record` once committed) and the layout
of each type's ``data`` are written and read here and nowhere else. A body
is a frozen dataclass; :func:`new` turns one into a :class:`NewEvent`
to append, and :func:`parse` turns a committed record's ``data`` back into
its body. Parsers are lenient about what older releases wrote (a missing
key takes its default) and :func:`parse` answers None for a type this
release does not know, so an older replay still reads a newer log.

    record type                 body
    validate-connection         Lifecycle            config, payload
    post-connection-creation    Lifecycle
    pre-connection-deletion     Lifecycle
    connection-validated        ConnectionValidated
    connection-rejected         ConnectionRejected   reason, function
    connection-deleted          ConnectionDeleted
    function-succeeded          FunctionSucceeded    function, attempt, duration_ms, plugin, logs
    function-failed             FunctionFailed       ... error_type, error, retryable, retry_in_ms
    function-gave-up            FunctionGaveUp       function, attempt, error, reason
    function-cancelled          FunctionCancelled    function, reason, attempt, by
    function-retried            FunctionRetried      function, job_id, attempts_before, status_before, by
    metadata-updated            MetadataUpdated      function, metadata, merge
    credentials-updated         CredentialsUpdated   fingerprint, key_id, names, source
    credentials-destroyed       CredentialsDestroyed fingerprint, key_id, reason

Credentials themselves are never part of a record: ``credentials-updated``
says that they changed (their names and a keyed fingerprint); the secrets go
sealed into a table of their own (:mod:`orchestrator.sealing`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

from orchestrator.ids import uuid7
from orchestrator.model import ConnectionRef, JSONObject, LifecycleEvent

SCHEMA_VERSION = 1
"""The version of the ``data`` layouts written by this release (stored on every record)."""


# -- the envelope ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A record to append; the store assigns position, version and time."""

    event_id: str
    type: str
    data: JSONObject
    causation_id: str = ""
    traceparent: str = ""
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class Record:
    """One committed record of the event log."""

    position: int
    stream: str
    version: int
    event_id: str
    type: str
    data: JSONObject
    recorded_at: datetime
    causation_id: str = ""
    traceparent: str = ""
    idempotency_key: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def ref(self) -> ConnectionRef:
        """The connection this record belongs to."""
        return ConnectionRef.from_stream(self.stream)


class Fact(enum.StrEnum):
    """Record types the orchestrator appends after a lifecycle event."""

    CONNECTION_VALIDATED = "connection-validated"
    CONNECTION_REJECTED = "connection-rejected"
    CONNECTION_DELETED = "connection-deleted"
    FUNCTION_SUCCEEDED = "function-succeeded"
    FUNCTION_FAILED = "function-failed"
    FUNCTION_GAVE_UP = "function-gave-up"
    FUNCTION_CANCELLED = "function-cancelled"
    FUNCTION_RETRIED = "function-retried"
    METADATA_UPDATED = "metadata-updated"
    CREDENTIALS_UPDATED = "credentials-updated"
    CREDENTIALS_DESTROYED = "credentials-destroyed"


RECORD_TYPES: frozenset[str] = frozenset(e.value for e in LifecycleEvent) | frozenset(f.value for f in Fact)
"""Every record type this release writes."""


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return "" if value is None else str(value)


def _int(data: Mapping[str, Any], key: str) -> int:
    return int(data.get(key) or 0)


def _object(data: Mapping[str, Any], key: str) -> JSONObject:
    value = data.get(key)
    return dict(value) if isinstance(value, dict) else {}


def _lines(data: Mapping[str, Any]) -> tuple[str, ...]:
    value = data.get("logs")
    return tuple(str(line) for line in value) if isinstance(value, list) else ()


# -- lifecycle requests ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """A lifecycle event as requested: the connection's config and the payload for the functions."""

    event: LifecycleEvent
    config: JSONObject
    payload: JSONObject

    @property
    def type(self) -> str:
        """The record type (the event's name)."""
        return self.event.value

    def to_data(self) -> JSONObject:
        """The record's ``data``."""
        return {"config": self.config, "payload": self.payload}

    @staticmethod
    def parse_config(data: Mapping[str, Any]) -> JSONObject:
        """Only the ``config`` of a lifecycle record's ``data`` (what the fold needs)."""
        return _object(data, "config")


def _lifecycle(event: LifecycleEvent) -> Callable[[Mapping[str, Any]], Lifecycle]:
    def parse(data: Mapping[str, Any]) -> Lifecycle:
        return Lifecycle(event, _object(data, "config"), _object(data, "payload"))

    return parse


# -- verdicts ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionValidated:
    """Every validate function passed: the connection may be used."""

    type = Fact.CONNECTION_VALIDATED.value

    def to_data(self) -> JSONObject:
        """The record's ``data`` (empty)."""
        return {}

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> ConnectionValidated:
        """The body of a committed record's ``data``."""
        return cls()


@dataclass(frozen=True, slots=True)
class ConnectionRejected:
    """A validate function failed or ran out of time: ``reason`` is what the caller is told."""

    reason: str
    function: str

    type = Fact.CONNECTION_REJECTED.value

    def to_data(self) -> JSONObject:
        """The record's ``data``."""
        return {"reason": self.reason, "function": self.function}

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> ConnectionRejected:
        """The body of a committed record's ``data``."""
        return cls(_str(data, "reason"), _str(data, "function"))


@dataclass(frozen=True, slots=True)
class ConnectionDeleted:
    """The deletion is done (cleanups that failed go on in the background)."""

    type = Fact.CONNECTION_DELETED.value

    def to_data(self) -> JSONObject:
        """The record's ``data`` (empty)."""
        return {}

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> ConnectionDeleted:
        """The body of a committed record's ``data``."""
        return cls()


# -- function outcomes ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Attempt:
    """What every attempt's record names: the function, the attempt number, its time and its plugin."""

    function: str
    attempt: int
    duration_ms: int
    distribution: str
    version: str

    def _data(self, logs: tuple[str, ...], dryrun: bool, **extra: Any) -> JSONObject:
        data: JSONObject = {
            "function": self.function,
            "attempt": self.attempt,
            "duration_ms": self.duration_ms,
            "distribution": self.distribution,
            "version": self.version,
            **extra,
        }
        if logs:
            data["logs"] = list(logs)
        if dryrun:
            data["dryrun"] = True
        return data


def _attempt_fields(data: Mapping[str, Any]) -> tuple[str, int, int, str, str]:
    return (
        _str(data, "function"),
        _int(data, "attempt"),
        _int(data, "duration_ms"),
        _str(data, "distribution"),
        _str(data, "version"),
    )


@dataclass(frozen=True, slots=True)
class FunctionSucceeded(_Attempt):
    """One attempt of a function succeeded."""

    logs: tuple[str, ...] = ()
    dryrun: bool = False
    """Recorded by ``orchestrator dryrun --commit``, not by the daemon."""

    type = Fact.FUNCTION_SUCCEEDED.value

    def to_data(self) -> JSONObject:
        """The record's ``data`` (``logs`` and ``dryrun`` only when there are some)."""
        return self._data(self.logs, self.dryrun)

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> FunctionSucceeded:
        """The body of a committed record's ``data``."""
        return cls(*_attempt_fields(data), _lines(data), bool(data.get("dryrun")))


@dataclass(frozen=True, slots=True)
class FunctionFailed(_Attempt):
    """One attempt of a function failed; ``retry_in_ms`` is set when another attempt is scheduled."""

    error_type: str
    error: str
    retryable: bool
    logs: tuple[str, ...] = ()
    retry_in_ms: int | None = None
    dryrun: bool = False
    traceback: str = ""
    """The function's own frames where it raised (redacted, bounded); empty for a timeout."""

    type = Fact.FUNCTION_FAILED.value

    def to_data(self) -> JSONObject:
        """The record's ``data`` (``retry_in_ms`` only when another attempt is scheduled, ``traceback`` when known)."""
        extra: JSONObject = {} if self.retry_in_ms is None else {"retry_in_ms": self.retry_in_ms}
        if self.traceback:
            extra["traceback"] = self.traceback
        return self._data(
            self.logs, self.dryrun, error_type=self.error_type, error=self.error, retryable=self.retryable, **extra
        )

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> FunctionFailed:
        """The body of a committed record's ``data``."""
        retry_in = data.get("retry_in_ms")
        return cls(
            *_attempt_fields(data),
            _str(data, "error_type"),
            _str(data, "error"),
            bool(data.get("retryable")),
            _lines(data),
            int(retry_in) if retry_in is not None else None,
            bool(data.get("dryrun")),
            _str(data, "traceback"),
        )


@dataclass(frozen=True, slots=True)
class FunctionGaveUp:
    """No more attempts: the last one was not retryable, the attempts ran out, or the function is gone."""

    function: str
    attempt: int
    error: str
    reason: str = ""

    type = Fact.FUNCTION_GAVE_UP.value

    def to_data(self) -> JSONObject:
        """The record's ``data`` (``reason`` only when there is one)."""
        data: JSONObject = {"function": self.function, "attempt": self.attempt, "error": self.error}
        if self.reason:
            data["reason"] = self.reason
        return data

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> FunctionGaveUp:
        """The body of a committed record's ``data``."""
        return cls(_str(data, "function"), _int(data, "attempt"), _str(data, "error"), _str(data, "reason"))


@dataclass(frozen=True, slots=True)
class FunctionCancelled:
    """A run that will not happen (after ``attempt`` attempts), and why; ``by`` names the caller of ``CancelJob``."""

    function: str
    reason: str
    attempt: int = 0
    by: str = ""

    type = Fact.FUNCTION_CANCELLED.value

    def to_data(self) -> JSONObject:
        """The record's ``data`` (``by`` only when a caller asked for it)."""
        data: JSONObject = {"function": self.function, "reason": self.reason, "attempt": self.attempt}
        if self.by:
            data["by"] = self.by
        return data

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> FunctionCancelled:
        """The body of a committed record's ``data``."""
        return cls(_str(data, "function"), _str(data, "reason"), _int(data, "attempt"), _str(data, "by"))


@dataclass(frozen=True, slots=True)
class FunctionRetried:
    """A job that had given up or was cancelled is queued again (``RetryJob``), with a fresh attempt budget.

    ``attempts_before`` is how many attempts it had made, ``status_before`` what it was (``gave-up`` or
    ``cancelled``), ``by`` who asked (a token's fingerprint, or ``anonymous`` without a token file).
    Its cause is the job's lifecycle record, like the job's other records: the fold shows the function
    as scheduled again (it reads no ``attempt`` here: the new run has made none).
    """

    function: str
    job_id: str
    attempts_before: int
    status_before: str
    by: str = ""

    type = Fact.FUNCTION_RETRIED.value

    def to_data(self) -> JSONObject:
        """The record's ``data`` (``by`` only when known)."""
        data: JSONObject = {
            "function": self.function,
            "job_id": self.job_id,
            "attempts_before": self.attempts_before,
            "status_before": self.status_before,
        }
        if self.by:
            data["by"] = self.by
        return data

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> FunctionRetried:
        """The body of a committed record's ``data``."""
        return cls(
            _str(data, "function"),
            _str(data, "job_id"),
            _int(data, "attempts_before"),
            _str(data, "status_before"),
            _str(data, "by"),
        )


@dataclass(frozen=True, slots=True)
class OutcomeSummary:
    """What the fold reads of any ``function-*`` record, whichever of the five it is."""

    function: str
    attempt: int
    error: str
    duration_ms: int

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> OutcomeSummary:
        """The summary of a ``function-*`` record's ``data`` (absent fields are empty)."""
        return cls(*cls.fields(data))

    @staticmethod
    def fields(data: Mapping[str, Any]) -> tuple[str, int, str, int]:
        """What :meth:`parse` reads, as a tuple: (function, attempt, error, duration_ms).

        The fold reads it of most records of a log; written out (no helper calls, no
        summary built) because replay spends a good part of its time here.
        """
        get = data.get
        function, attempt, error, duration_ms = get("function"), get("attempt"), get("error"), get("duration_ms")
        return (
            "" if function is None else str(function),
            int(attempt or 0),
            "" if error is None else str(error),
            int(duration_ms or 0),
        )


# -- metadata ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetadataUpdated:
    """A function wrote the connection's metadata: replaced it, or merged keys into it (``merge``)."""

    function: str
    metadata: JSONObject
    merge: bool
    dryrun: bool = False

    type = Fact.METADATA_UPDATED.value

    def to_data(self) -> JSONObject:
        """The record's ``data``."""
        data: JSONObject = {"function": self.function, "metadata": self.metadata, "merge": self.merge}
        if self.dryrun:
            data["dryrun"] = True
        return data

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> MetadataUpdated:
        """The body of a committed record's ``data``."""
        metadata, merge = cls.change(data)
        return cls(_str(data, "function"), metadata, merge, bool(data.get("dryrun")))

    @staticmethod
    def change(data: Mapping[str, Any]) -> tuple[JSONObject, bool]:
        """What the fold reads of it: (metadata, merge), as :meth:`parse` reads them."""
        return _object(data, "metadata"), bool(data.get("merge"))


# -- credentials -------------------------------------------------------------------


def _names(data: Mapping[str, Any]) -> tuple[str, ...]:
    value = data.get("names")
    return tuple(str(name) for name in value) if isinstance(value, list) else ()


@dataclass(frozen=True, slots=True)
class CredentialsUpdated:
    """New credentials were sealed for the connection: never the secrets, only what tells them apart.

    ``fingerprint`` is a keyed hash (HMAC-SHA256, 16 hex digits) of the credentials under a key
    derived from the sealing key ``key_id``: two fingerprints of the same ``key_id`` are equal
    exactly when the credentials are. ``names`` are the credentials' names, sorted; ``source``
    says who brought them: ``emit``, ``update`` (UpdateCredentials) or ``resolver`` (after a 401).
    """

    fingerprint: str
    key_id: str
    names: tuple[str, ...] = ()
    source: str = ""

    type = Fact.CREDENTIALS_UPDATED.value

    def to_data(self) -> JSONObject:
        """The record's ``data``."""
        return {
            "fingerprint": self.fingerprint,
            "key_id": self.key_id,
            "names": list(self.names),
            "source": self.source,
        }

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> CredentialsUpdated:
        """The body of a committed record's ``data``."""
        return cls(_str(data, "fingerprint"), _str(data, "key_id"), _names(data), _str(data, "source"))


@dataclass(frozen=True, slots=True)
class CredentialsDestroyed:
    """The connection's sealed credentials were deleted (crypto-shredding); ``fingerprint`` says which."""

    fingerprint: str
    key_id: str
    reason: str = ""

    type = Fact.CREDENTIALS_DESTROYED.value

    def to_data(self) -> JSONObject:
        """The record's ``data``."""
        return {"fingerprint": self.fingerprint, "key_id": self.key_id, "reason": self.reason}

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> CredentialsDestroyed:
        """The body of a committed record's ``data``."""
        return cls(_str(data, "fingerprint"), _str(data, "key_id"), _str(data, "reason"))


# -- one constructor, one parser -------------------------------------------------------

Body: TypeAlias = (
    Lifecycle
    | ConnectionValidated
    | ConnectionRejected
    | ConnectionDeleted
    | FunctionSucceeded
    | FunctionFailed
    | FunctionGaveUp
    | FunctionCancelled
    | FunctionRetried
    | MetadataUpdated
    | CredentialsUpdated
    | CredentialsDestroyed
)
"""The body of any record type this release knows."""

PARSERS: dict[str, Callable[[Mapping[str, Any]], Body]] = {
    **{event.value: _lifecycle(event) for event in LifecycleEvent},
    Fact.CONNECTION_VALIDATED: ConnectionValidated.parse,
    Fact.CONNECTION_REJECTED: ConnectionRejected.parse,
    Fact.CONNECTION_DELETED: ConnectionDeleted.parse,
    Fact.FUNCTION_SUCCEEDED: FunctionSucceeded.parse,
    Fact.FUNCTION_FAILED: FunctionFailed.parse,
    Fact.FUNCTION_GAVE_UP: FunctionGaveUp.parse,
    Fact.FUNCTION_CANCELLED: FunctionCancelled.parse,
    Fact.FUNCTION_RETRIED: FunctionRetried.parse,
    Fact.METADATA_UPDATED: MetadataUpdated.parse,
    Fact.CREDENTIALS_UPDATED: CredentialsUpdated.parse,
    Fact.CREDENTIALS_DESTROYED: CredentialsDestroyed.parse,
}
"""The parser of each record type (keyed by the type's string)."""


def new(
    body: Body,
    *,
    event_id: str = "",
    causation_id: str = "",
    traceparent: str = "",
    idempotency_key: str = "",
) -> NewEvent:
    """The record to append for ``body`` (a new UUIDv7 ``event_id`` unless one is given)."""
    return NewEvent(
        event_id=event_id or str(uuid7()),
        type=body.type,
        data=body.to_data(),
        causation_id=causation_id,
        traceparent=traceparent,
        idempotency_key=idempotency_key,
    )


def parse(record_type: str, data: Mapping[str, Any]) -> Body | None:
    """The body of a record of ``record_type``; None for a type this release does not know."""
    parser = PARSERS.get(record_type)
    return parser(data) if parser is not None else None
