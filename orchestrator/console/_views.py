"""What each page shows, computed from the service's answers: plain values the templates only print.

Nothing here does I/O. A timeline is the connection's records folded one by
one with :func:`orchestrator.state.apply` (the function ``replay`` and the
read model use, so there is one implementation of the rules), each record
kept with the state and metadata after it and the metadata diff it caused.
Templates get dataclasses of strings and numbers: no logic in them beyond
``if`` and ``for``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from orchestrator import codec, records, state, tracing
from orchestrator.config import TRACE_ID
from orchestrator.errors import InvalidArgument
from orchestrator.model import (
    RETRYABLE_JOBS,
    Connection,
    ConnectionRef,
    ConnectionState,
    Job,
    JobStatus,
    LifecycleEvent,
    Outcome,
)
from orchestrator.plugins import Installed
from orchestrator.records import Fact, Record

MAX_POSITION = 2**63 - 1
TIMELINE_ROWS = 500
"""Records a timeline page shows at most: the last ones of the window (earlier ones through ``?until=``)."""
FAILURES = frozenset({Fact.FUNCTION_FAILED, Fact.FUNCTION_GAVE_UP, Fact.CONNECTION_REJECTED})
"""Record types the overview lists as failures."""
_LIFECYCLE = frozenset(event.value for event in LifecycleEvent)
_KIND = {
    Fact.CONNECTION_VALIDATED: "ok",
    Fact.CONNECTION_REJECTED: "bad",
    Fact.CONNECTION_DELETED: "end",
    Fact.FUNCTION_SUCCEEDED: "ok",
    Fact.FUNCTION_FAILED: "bad",
    Fact.FUNCTION_GAVE_UP: "bad",
    Fact.FUNCTION_CANCELLED: "muted",
    Fact.FUNCTION_RETRIED: "info",
    Fact.METADATA_UPDATED: "info",
    Fact.CREDENTIALS_UPDATED: "muted",
    Fact.CREDENTIALS_DESTROYED: "muted",
}


def when(moment: datetime) -> str:
    """A time as every page prints it: UTC, to the millisecond."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line of at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


def connection_href(ref: ConnectionRef, **query: str | int) -> str:
    """The timeline's path of ``ref`` (its id escaped whole: it may hold ``/``, ``?`` or ``%``)."""
    path = f"/connections/{ref.environment}/{ref.integration}/{quote(ref.connection_id, safe='')}"
    shown = {key: value for key, value in query.items() if value != ""}
    return path + ("?" + urlencode(shown) if shown else "")


def kind(record_type: str) -> str:
    """The CSS class of a record type: lifecycle, ok, bad, end, info, muted (unknown types: muted)."""
    if record_type in _LIFECYCLE:
        return "lifecycle"
    fact = _FACTS.get(record_type)
    return _KIND[fact] if fact is not None else "muted"


_FACTS: dict[str, Fact] = {fact.value: fact for fact in Fact}


def trace_href(template: str, traceparent: str) -> str:
    """``template`` (``--trace-url``) with the trace id of ``traceparent``; empty without either."""
    traceparent = tracing.valid_traceparent(traceparent) if template else ""
    if not traceparent:
        return ""
    return template.replace(TRACE_ID, traceparent.split("-")[1])


# -- until -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Until:
    """``?until=``: the connection as it was after a position, or after its last record at or before a time."""

    text: str
    position: int | None = None
    time: datetime | None = None

    def admits(self, record: Record) -> bool:
        """Whether ``record`` is inside the window."""
        if self.position is not None:
            return record.position <= self.position
        return self.time is None or record.recorded_at <= self.time


def parse_until(value: str) -> Until | None:
    """``?until=``: a position, or an ISO-8601 time (UTC when it names no zone); None when empty.

    The same forms as ``orchestrator replay --until``; anything else is :class:`InvalidArgument`.
    """
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        if int(value) > MAX_POSITION:
            raise InvalidArgument(f"until {value} is larger than any position (at most {MAX_POSITION})")
        return Until(value, position=int(value))
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        shown = value if len(value) <= 64 else value[:64] + "…"
        raise InvalidArgument(
            f"until {shown!r} is neither a position nor an ISO-8601 time (e.g. 2026-12-02T06:45:52Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return Until(value, time=moment)


# -- one record ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One key of a metadata diff: ``added``, ``removed`` or ``changed``, with the values as compact JSON."""

    key: str
    change: str
    before: str = ""
    after: str = ""


def metadata_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[Change, ...]:
    """What changed from ``before`` to ``after``, key by key, in key order."""
    out: list[Change] = []
    for key in sorted(before.keys() | after.keys()):
        if key not in after:
            out.append(Change(key, "removed", before=codec.dumps(before[key])))
        elif key not in before:
            out.append(Change(key, "added", after=codec.dumps(after[key])))
        elif before[key] != after[key]:
            out.append(Change(key, "changed", codec.dumps(before[key]), codec.dumps(after[key])))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What a ``function-*`` record says of a function's run."""

    function: str
    outcome: str
    """succeeded, failed, gave-up, cancelled or retried."""
    attempt: int = 0
    duration_ms: int | None = None
    plugin: str = ""
    """The plugin distribution and its version that ran the attempt."""
    error_type: str = ""
    error: str = ""
    traceback: str = ""
    retryable: bool | None = None
    retry_in_ms: int | None = None
    reason: str = ""
    by: str = ""
    logs: tuple[str, ...] = ()


def attempt_of(body: records.Body | None) -> Attempt | None:
    """The attempt a record's body describes (None for other records)."""
    if isinstance(body, records.FunctionSucceeded):
        return Attempt(body.function, "succeeded", body.attempt, body.duration_ms, _plugin(body), logs=body.logs)
    if isinstance(body, records.FunctionFailed):
        return Attempt(
            body.function,
            "failed",
            body.attempt,
            body.duration_ms,
            _plugin(body),
            error_type=body.error_type,
            error=body.error,
            traceback=body.traceback,
            retryable=body.retryable,
            retry_in_ms=body.retry_in_ms,
            logs=body.logs,
        )
    if isinstance(body, records.FunctionGaveUp):
        return Attempt(body.function, "gave-up", body.attempt, error=body.error, reason=body.reason)
    if isinstance(body, records.FunctionCancelled):
        return Attempt(body.function, "cancelled", body.attempt, reason=body.reason, by=body.by)
    if isinstance(body, records.FunctionRetried):
        return Attempt(
            body.function,
            "retried",
            body.attempts_before,
            reason=f"queued again after {body.attempts_before} attempt(s), {body.status_before}",
            by=body.by,
        )
    return None


def _plugin(body: records.FunctionSucceeded | records.FunctionFailed) -> str:
    return f"{body.distribution} {body.version}".strip()


def summary(record: Record, body: records.Body | None) -> str:
    """One line about a record: a failure's error, a rejection's reason, a metadata write, ..."""
    if record.idempotency_key:
        return f"idempotency key {record.idempotency_key}"
    if isinstance(body, records.MetadataUpdated):
        return f"{body.function}: {'merge ' if body.merge else ''}{one_line(codec.dumps(body.metadata))}"
    if isinstance(body, records.FunctionFailed):
        retry = f" (retry in {body.retry_in_ms / 1000:g} s)" if body.retry_in_ms is not None else ""
        return f"{body.function} attempt {body.attempt}: {body.error_type}: {one_line(body.error)}{retry}"
    if isinstance(body, records.FunctionGaveUp):
        return f"{body.function} after attempt {body.attempt}: {one_line(f'{body.reason}: {body.error}')}"
    if isinstance(body, records.FunctionCancelled):
        by = f" (by {body.by})" if body.by else ""
        return f"{body.function} after attempt {body.attempt}: {one_line(body.reason)}{by}"
    if isinstance(body, records.FunctionRetried):
        by = f" by {body.by}" if body.by else ""
        return f"{body.function} queued again{by} ({body.status_before} after {body.attempts_before})"
    if isinstance(body, records.FunctionSucceeded):
        return f"{body.function} attempt {body.attempt} ({body.duration_ms} ms)"
    if isinstance(body, records.CredentialsUpdated):
        return f"{body.source}: {', '.join(body.names)} fingerprint {body.fingerprint}"
    if isinstance(body, records.CredentialsDestroyed):
        return f"fingerprint {body.fingerprint}: {one_line(body.reason)}"
    if isinstance(body, records.ConnectionRejected):
        return one_line(body.reason)
    return ""


@dataclass(frozen=True, slots=True)
class Row:
    """One record of a timeline, with the connection as the fold left it after the record."""

    position: int
    version: int
    recorded_at: str
    type: str
    kind: str
    summary: str
    state_after: str
    event_id: str
    causation_id: str
    trace_href: str
    attempt: Attempt | None
    changes: tuple[Change, ...]
    metadata_after: str
    """The whole metadata after the record, as compact JSON."""
    as_of_href: str
    """This page as of the record (``?until=`` its position)."""


@dataclass(slots=True)
class Timeline:
    """One connection's records folded up to ``until``: the rows to show and the connection at the end."""

    ref: ConnectionRef
    until: Until | None = None
    trace_url: str = ""
    connection: Connection | None = None
    rows: deque[Row] = field(default_factory=lambda: deque(maxlen=TIMELINE_ROWS))
    records: int = 0
    last_position: int = 0
    ended: bool = False
    """Set once a record beyond ``until`` was met: the rest are not read."""

    def add(self, record: Record) -> bool:
        """Fold ``record`` in; False (and nothing changes) once it is beyond ``until``."""
        if self.until is not None and not self.until.admits(record):
            self.ended = True
            return False
        before = self.connection
        after = state.apply(before, record)
        body = records.parse(record.type, record.data)
        attempt = attempt_of(body)
        changes = metadata_diff(before.metadata if before is not None else {}, after.metadata)
        if before is not None and after.incarnation != before.incarnation:
            changes = metadata_diff({}, after.metadata)
        self.rows.append(
            Row(
                position=record.position,
                version=record.version,
                recorded_at=when(record.recorded_at),
                type=record.type,
                kind=kind(record.type),
                summary="" if attempt is not None else summary(record, body),  # the attempt says it all
                state_after=after.state.value,
                event_id=record.event_id,
                causation_id=record.causation_id,
                trace_href=trace_href(self.trace_url, record.traceparent),
                attempt=attempt,
                changes=changes,
                metadata_after=codec.dumps(after.metadata),
                as_of_href=connection_href(self.ref, until=record.position),
            )
        )
        self.connection = after
        self.records += 1
        self.last_position = record.position
        return True

    @property
    def hidden(self) -> int:
        """Records of the window not shown (the earliest ones)."""
        return self.records - len(self.rows)

    @property
    def first_shown(self) -> int:
        """The position of the first row shown (0 when there is none)."""
        return self.rows[0].position if self.rows else 0

    @property
    def earlier_href(self) -> str:
        """The page as of the record before the first row shown (empty when every record is shown)."""
        return connection_href(self.ref, until=self.first_shown - 1) if self.hidden else ""


# -- connections, jobs ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionRow:
    """A read-model row as the connections page lists it."""

    environment: str
    integration: str
    connection_id: str
    href: str
    state: str
    version: int
    last_event: str
    updated_at: str
    rejection_reason: str


def connection_row(connection: Connection) -> ConnectionRow:
    """``connection`` as a row of the connections page."""
    ref = connection.ref
    return ConnectionRow(
        ref.environment,
        ref.integration,
        ref.connection_id,
        connection_href(ref),
        connection.state.value,
        connection.version,
        connection.last_event,
        when(connection.updated_at),
        one_line(connection.rejection_reason),
    )


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    """A function's latest outcome, as the timeline's header shows it."""

    name: str
    status: str
    attempts: int
    error: str
    duration_ms: int


def outcome_rows(outcomes: Iterable[Outcome]) -> list[OutcomeRow]:
    """The connection's latest outcomes, one row per function."""
    return [OutcomeRow(o.name, o.status.value, o.attempts, o.error, o.duration_ms) for o in outcomes]


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job as the jobs page (and a timeline) lists it, with the buttons it may have."""

    job_id: str
    stream: str
    href: str
    function: str
    event: str
    status: str
    attempts: str
    next_attempt: str
    last_error: str
    last_error_line: str
    updated_at: str
    can_retry: bool
    can_cancel: bool


def job_row(job: Job) -> JobRow:
    """``job`` as a row; retry for one that gave up or was cancelled, cancel for a queued one."""
    budget = f"/{job.max_attempts}" if job.max_attempts else ""
    return JobRow(
        job_id=job.job_id,
        stream=job.stream,
        href=connection_href(job.ref),
        function=job.function,
        event=job.event.value,
        status=job.status.value,
        attempts=f"{job.attempt}{budget}",
        next_attempt=when(job.run_at) if job.status is JobStatus.QUEUED else "",
        last_error=job.last_error,
        last_error_line=one_line(job.last_error, 160),
        updated_at=when(job.updated_at) if job.updated_at is not None else "",
        can_retry=job.status in RETRYABLE_JOBS,
        can_cancel=job.status is JobStatus.QUEUED,
    )


# -- the live tail, the overview --------------------------------------------------------


_PLAIN = frozenset({*_LIFECYCLE, Fact.CONNECTION_VALIDATED, Fact.CONNECTION_DELETED})
"""Record types whose line needs nothing of their ``data`` (a lifecycle record's is its idempotency key)."""


def stream_href(stream: str) -> str:
    """The timeline's path of a record's stream (as :func:`connection_href`, without checking the names again)."""
    environment, integration, connection_id = stream.split("/", 2)
    return f"/connections/{environment}/{integration}/{quote(connection_id, safe='')}"


def tail_item(record: Record) -> dict[str, Any]:
    """A record as the live tail sends it (JSON) and the events page lists it: no ``data`` beyond a summary.

    Made for every record a live tail sends, on the daemon's loop: the record's ``data`` is parsed
    only for the types whose line says something of it.
    """
    plain = record.type in _PLAIN and not record.idempotency_key
    body = None if plain else records.parse(record.type, record.data)
    return {
        "position": record.position,
        "time": when(record.recorded_at),
        "stream": record.stream,
        "href": stream_href(record.stream),
        "version": record.version,
        "type": record.type,
        "kind": kind(record.type),
        "summary": "" if plain else summary(record, body),
    }


@dataclass(frozen=True, slots=True)
class CountTable:
    """Counts per environment (rows) and per state or status (columns), with the totals."""

    columns: tuple[str, ...]
    rows: list[tuple[str, list[int], int]]
    """(environment, a count per column, the environment's total)."""
    totals: list[int]
    total: int


def count_table(counts: Mapping[tuple[str, str], int], columns: Iterable[str]) -> CountTable:
    """``counts`` of (environment, column) laid out as a table; columns not listed are left out."""
    names = tuple(columns)
    environments = sorted({environment for environment, _ in counts})
    rows = []
    for environment in environments:
        values = [counts.get((environment, column), 0) for column in names]
        rows.append((environment, values, sum(values)))
    totals = [sum(row[1][i] for row in rows) for i in range(len(names))]
    return CountTable(names, rows, totals, sum(totals))


NONE = "-"
"""What a figure with nothing to count shows."""
STATES = tuple(s.value for s in ConnectionState)
JOB_STATUSES = tuple(s.value for s in JobStatus)


# -- functions -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    succeeded: int = 0
    failed: int = 0
    gave_up: int = 0
    durations: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FunctionRow:
    """One function: where it comes from, and how its attempts went over the window."""

    integration: str
    event: str
    name: str
    description: str
    distribution: str
    version: str
    installed: bool
    attempts: int
    succeeded: int
    failed: int
    gave_up: int
    success_rate: str
    mean_ms: str
    p95_ms: str


class FunctionStats:
    """Attempts per (integration, function) over a window of the log, fed record by record."""

    def __init__(self) -> None:
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self.records = 0
        self.first = 0
        self.last = 0

    def add(self, record: Record) -> None:
        """Count ``record`` if it is an attempt's outcome or a give-up."""
        self.records += 1
        self.first = self.first or record.position
        self.last = record.position
        if record.type not in (Fact.FUNCTION_SUCCEEDED, Fact.FUNCTION_FAILED, Fact.FUNCTION_GAVE_UP):
            return
        data = records.OutcomeSummary.parse(record.data)
        integration = record.stream.split("/", 2)[1]
        tally = self._tallies.setdefault((integration, data.function), _Tally())
        if record.type == Fact.FUNCTION_GAVE_UP:
            tally.gave_up += 1
            return
        if record.type == Fact.FUNCTION_SUCCEEDED:
            tally.succeeded += 1
        else:
            tally.failed += 1
        tally.durations.append(data.duration_ms)

    def rows(self, installed: Iterable[Installed]) -> list[FunctionRow]:
        """One row per installed function, then one per function seen in the window but no longer installed."""
        out: list[FunctionRow] = []
        seen: set[tuple[str, str]] = set()
        for item in installed:
            key = (item.function.integration, item.name)
            seen.add(key)
            out.append(
                self._row(
                    key,
                    item.function.event.value,
                    item.function.description,
                    item.distribution,
                    item.version,
                    installed=True,
                )
            )
        out.extend(self._row(key, "", "", "", "", installed=False) for key in sorted(self._tallies.keys() - seen))
        return out

    def _row(
        self, key: tuple[str, str], event: str, description: str, distribution: str, version: str, *, installed: bool
    ) -> FunctionRow:
        tally = self._tallies.get(key, _Tally())
        attempts = tally.succeeded + tally.failed
        durations = sorted(tally.durations)
        rate = f"{100 * tally.succeeded / attempts:.1f}%" if attempts else NONE
        mean = f"{sum(durations) / len(durations):.0f}" if durations else NONE
        p95 = f"{durations[min(len(durations) - 1, math.ceil(0.95 * len(durations)) - 1)]}" if durations else NONE
        return FunctionRow(
            key[0],
            event,
            key[1],
            description,
            distribution,
            version,
            installed,
            attempts,
            tally.succeeded,
            tally.failed,
            tally.gave_up,
            rate,
            mean,
            p95,
        )
