"""The state machine as a pure fold: ``apply(connection, record) -> connection``.

This module is the only implementation of the transition rules. The daemon
uses :func:`admit` to decide, before writing anything, whether a lifecycle
event is allowed; the stores use :func:`apply` to keep the read model in the
same transaction as the append; ``orchestrator replay`` and the tests use
:func:`apply` to rebuild every connection from the log alone. Nothing here
does I/O or reads a clock: time comes from the records, and their ``data`` is
read through :mod:`orchestrator.records`. It imports only the model, the
records and the errors (an import-linter contract keeps it so).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from orchestrator import records
from orchestrator.errors import FailedPrecondition, InvalidTransition, NotFound
from orchestrator.model import Connection, ConnectionState, FunctionStatus, LifecycleEvent, Mark, Outcome
from orchestrator.records import Fact, Record

_S = ConnectionState
_E = LifecycleEvent


class Verdict(enum.Enum):
    """What :func:`admit` says about a lifecycle event in a given state."""

    START = "start"
    """Append it; the connection continues in its current incarnation."""
    NEW_INCARNATION = "new-incarnation"
    """Append it; the connection starts afresh (new metadata, new config)."""
    REPEAT = "repeat"
    """Append nothing; answer with the earlier record (an idempotent repeat)."""
    NOT_FOUND = "not-found"
    """Refuse: the connection does not exist."""
    REFUSE = "refuse"
    """Refuse: the event is not allowed from this state."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One cell of the state table."""

    verdict: Verdict
    to: ConnectionState | None = None


# The state table (docs/event-log.md draws it). ``None`` stands for a connection with no
# stream yet. A rule's ``to`` is the state the lifecycle record moves to; the
# verdict facts (connection-validated/-rejected/-deleted) move it further.
TABLE: dict[tuple[ConnectionState | None, LifecycleEvent], Rule] = {
    (None, _E.VALIDATE_CONNECTION): Rule(Verdict.NEW_INCARNATION, _S.PENDING),
    (None, _E.POST_CONNECTION_CREATION): Rule(Verdict.NEW_INCARNATION, _S.ACTIVE),
    (None, _E.PRE_CONNECTION_DELETION): Rule(Verdict.NOT_FOUND),
    (_S.REJECTED, _E.VALIDATE_CONNECTION): Rule(Verdict.NEW_INCARNATION, _S.PENDING),
    (_S.REJECTED, _E.POST_CONNECTION_CREATION): Rule(Verdict.NEW_INCARNATION, _S.ACTIVE),
    # The rejection of an active connection scheduled its cleanup; a deletion finishes what is left of it.
    (_S.REJECTED, _E.PRE_CONNECTION_DELETION): Rule(Verdict.START, _S.DELETING),
    (_S.DELETED, _E.VALIDATE_CONNECTION): Rule(Verdict.NEW_INCARNATION, _S.PENDING),
    (_S.DELETED, _E.POST_CONNECTION_CREATION): Rule(Verdict.NEW_INCARNATION, _S.ACTIVE),
    (_S.DELETED, _E.PRE_CONNECTION_DELETION): Rule(Verdict.REPEAT),
    (_S.PENDING, _E.VALIDATE_CONNECTION): Rule(Verdict.START, _S.PENDING),
    (_S.PENDING, _E.POST_CONNECTION_CREATION): Rule(Verdict.START, _S.ACTIVE),
    (_S.PENDING, _E.PRE_CONNECTION_DELETION): Rule(Verdict.START, _S.DELETING),
    (_S.ACTIVE, _E.VALIDATE_CONNECTION): Rule(Verdict.START, _S.ACTIVE),
    (_S.ACTIVE, _E.POST_CONNECTION_CREATION): Rule(Verdict.START, _S.ACTIVE),
    (_S.ACTIVE, _E.PRE_CONNECTION_DELETION): Rule(Verdict.START, _S.DELETING),
    (_S.DELETING, _E.VALIDATE_CONNECTION): Rule(Verdict.REFUSE),
    (_S.DELETING, _E.POST_CONNECTION_CREATION): Rule(Verdict.REFUSE),
    (_S.DELETING, _E.PRE_CONNECTION_DELETION): Rule(Verdict.REPEAT),
}

# Facts and the states they may follow; anything else is a corrupt log.
_VERDICT_FROM: dict[Fact, frozenset[ConnectionState]] = {
    Fact.CONNECTION_VALIDATED: frozenset({_S.PENDING, _S.ACTIVE}),
    Fact.CONNECTION_REJECTED: frozenset({_S.PENDING, _S.ACTIVE}),
    Fact.CONNECTION_DELETED: frozenset({_S.DELETING}),
}

_OUTCOME_STATUS: dict[Fact, FunctionStatus] = {
    Fact.FUNCTION_SUCCEEDED: FunctionStatus.SUCCEEDED,
    Fact.FUNCTION_FAILED: FunctionStatus.FAILED,
    Fact.FUNCTION_GAVE_UP: FunctionStatus.GAVE_UP,
    Fact.FUNCTION_CANCELLED: FunctionStatus.CANCELLED,
    # A job queued again (RetryJob): the function is scheduled, with no attempt of its new run made yet.
    Fact.FUNCTION_RETRIED: FunctionStatus.SCHEDULED,
}


_CREDENTIALS = frozenset({Fact.CREDENTIALS_UPDATED, Fact.CREDENTIALS_DESTROYED})
"""Facts about the sealed credentials: allowed in any state, they change nothing but the version."""

_LIFECYCLE: dict[str, LifecycleEvent] = {e.value: e for e in LifecycleEvent}
_FACTS: dict[str, Fact] = {f.value: f for f in Fact}


def admit(connection: Connection | None, event: LifecycleEvent, ref: object = None) -> Rule:
    """Decide whether ``event`` may be appended to ``connection``; raise if it is refused.

    Returns the rule (START, NEW_INCARNATION or REPEAT). Raises
    :class:`NotFound` for a deletion of an unknown connection and
    :class:`FailedPrecondition` naming the state and event otherwise;
    ``ref`` names the connection in the message when there is none yet.
    """
    state = connection.state if connection is not None else None
    rule = TABLE[(state, event)]
    if rule.verdict is Verdict.NOT_FOUND:
        raise NotFound(f"connection {ref or ''} not found: {event} needs an existing connection".replace("  ", " "))
    if rule.verdict is Verdict.REFUSE:
        assert connection is not None
        raise FailedPrecondition(
            f"{event} is not allowed while connection {connection.ref} is {connection.state}" + _hint(connection.state)
        )
    return rule


def _hint(state: ConnectionState) -> str:
    if state is _S.DELETING:
        return " (wait for the deletion to finish)"
    return ""


def apply(connection: Connection | None, record: Record) -> Connection:
    """Return the connection as it is after ``record``. Pure; raises :class:`InvalidTransition`."""
    event = _LIFECYCLE.get(record.type)
    if event is not None:
        return _apply_lifecycle(connection, record, event)
    if connection is None:
        raise InvalidTransition(f"{record.type} at position {record.position} has no connection before it")
    fact = _FACTS.get(record.type)
    if fact is None:
        # Unknown types from a newer release are kept in the log and skipped
        # by the fold, so an older replay still works on a newer log.
        return _advance(connection, record)
    if fact in _VERDICT_FROM:
        if connection.state not in _VERDICT_FROM[fact]:
            raise InvalidTransition(
                f"{fact} at position {record.position} cannot follow state {connection.state} of {connection.ref}"
            )
        if fact is Fact.CONNECTION_VALIDATED:
            return _advance(connection, record, rejection_reason="")
        if fact is Fact.CONNECTION_REJECTED:
            reason = records.ConnectionRejected.parse(record.data).reason
            return _advance(connection, record, state=_S.REJECTED, rejection_reason=reason)
        return _advance(connection, record, state=_S.DELETED)
    if fact in _CREDENTIALS:
        # The secrets are not in the log, and the read model does not follow their fingerprint.
        return _advance(connection, record)
    if fact is Fact.METADATA_UPDATED:
        update = records.MetadataUpdated.parse(record.data)
        metadata = update.metadata
        if update.merge:
            # A merge is applied here, in log order, so concurrent writers never lose each other's keys.
            metadata = {**connection.metadata, **metadata}
        return _advance(connection, record, metadata=metadata)
    return _apply_outcome(connection, record, _OUTCOME_STATUS[fact])


def _advance(connection: Connection, record: Record, **changes: Any) -> Connection:
    """``connection`` moved to ``record``, with ``changes``.

    Written out field by field because it runs once per record on replay,
    where :func:`dataclasses.replace` was most of the cost.
    """
    get = changes.get
    c = connection
    return Connection(
        ref=c.ref,
        state=get("state", c.state),
        version=record.version,
        created_at=c.created_at,
        updated_at=record.recorded_at,
        last_event=record.type,
        last_position=record.position,
        lifecycle=get("lifecycle", c.lifecycle),
        incarnation=c.incarnation,
        metadata=get("metadata", c.metadata),
        config=get("config", c.config),
        rejection_reason=get("rejection_reason", c.rejection_reason),
        deletion=get("deletion", c.deletion),
        outcomes=get("outcomes", c.outcomes),
    )


def _apply_lifecycle(connection: Connection | None, record: Record, event: LifecycleEvent) -> Connection:
    try:
        rule = admit(connection, event)
    except (NotFound, FailedPrecondition) as exc:
        raise InvalidTransition(f"position {record.position}: {exc}") from exc
    if rule.verdict is Verdict.REPEAT:
        raise InvalidTransition(f"position {record.position}: a repeated {event} is answered, never appended")
    assert rule.to is not None
    mark = Mark(record.event_id, record.type, record.position, record.version)
    config = records.Lifecycle.parse_config(record.data)
    if connection is None or rule.verdict is Verdict.NEW_INCARNATION:
        return Connection(
            ref=record.ref,
            state=rule.to,
            version=record.version,
            created_at=record.recorded_at,
            updated_at=record.recorded_at,
            last_event=record.type,
            last_position=record.position,
            lifecycle=mark,
            incarnation=connection.incarnation + 1 if connection is not None else 1,
            config=config,
        )
    return _advance(
        connection,
        record,
        state=rule.to,
        lifecycle=mark,
        # A reconnect may bring new settings; an event without any keeps the old ones.
        config=config or connection.config,
        deletion=mark if event is _E.PRE_CONNECTION_DELETION else connection.deletion,
        outcomes=(),
        # Only a deletion leaves rejected within its incarnation: the connection is no longer rejected.
        rejection_reason="",
    )


def outcome_of(record: Record) -> Outcome | None:
    """The function outcome a ``function-*`` record states (None for other records)."""
    fact = _FACTS.get(record.type)
    status = _OUTCOME_STATUS.get(fact) if fact is not None else None
    if status is None:
        return None
    summary = records.OutcomeSummary.parse(record.data)
    return Outcome(summary.function, status, summary.attempt, summary.error, summary.duration_ms)


def merge_outcome(outcomes: tuple[Outcome, ...], outcome: Outcome) -> tuple[Outcome, ...]:
    """``outcomes`` with ``outcome`` replacing the earlier one of the same function."""
    return (*(o for o in outcomes if o.name != outcome.name), outcome)


def _apply_outcome(connection: Connection, record: Record, status: FunctionStatus) -> Connection:
    # Outcomes of an older lifecycle event stay in the log but not in the view.
    outcome = outcome_of(record)
    if record.causation_id != connection.lifecycle.event_id or outcome is None:
        return _advance(connection, record)
    return _advance(connection, record, outcomes=merge_outcome(connection.outcomes, outcome))


def incarnation_outcomes(stream: Iterable[Record]) -> tuple[Outcome, ...]:
    """The latest outcome of every function run for the current incarnation of one connection, from its
    stream's records in order: those of earlier lifecycle events included (a creation's failure stays in
    view once the connection is deleted), those of earlier incarnations not."""
    connection: Connection | None = None
    causes: set[str] = set()
    outcomes: tuple[Outcome, ...] = ()
    for record in stream:
        incarnation = connection.incarnation if connection is not None else 0
        connection = apply(connection, record)
        if connection.incarnation != incarnation:
            causes, outcomes = set(), ()
        if record.type in _LIFECYCLE:
            causes.add(record.event_id)
        outcome = outcome_of(record)
        if outcome is not None and record.causation_id in causes:
            outcomes = merge_outcome(outcomes, outcome)
    return outcomes


def fold(records: Iterable[Record], connection: Connection | None = None) -> Connection | None:
    """Apply ``records`` of one stream in order."""
    for record in records:
        connection = apply(connection, record)
    return connection


def fold_all(records: Iterable[Record]) -> dict[str, Connection]:
    """Apply records of any streams in log order; returns every connection by stream."""
    connections: dict[str, Connection] = {}
    for record in records:
        connections[record.stream] = apply(connections.get(record.stream), record)
    return connections
