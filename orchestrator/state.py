"""The state machine as a pure fold: ``apply(connection, record) -> connection``.

This module is the only implementation of the transition rules. The daemon
uses :func:`admit` to decide, before writing anything, whether a lifecycle
event is allowed; the stores use :func:`apply` to keep the read model in the
same transaction as the append; ``orchestrator replay`` and the tests use
:func:`apply` to rebuild every connection from the log alone. Nothing here
does I/O or reads a clock: time comes from the records, and their ``data`` is
read through :mod:`orchestrator.records`. It imports only the model, the
records and the errors (an import-linter contract keeps it so).

The rules are written once, in :func:`step`, on a mutable :class:`Draft` (one
per stream): :func:`apply` is :func:`step` on a draft of the connection,
frozen again; replay folds whole pages of rows into drafts with
:func:`fold_rows` (the same :func:`step`) and freezes each draft once, at the
end. A draft's times are whatever the caller gives (``datetime`` for
:func:`apply`, integer microseconds for replay): the rules only copy them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeAlias, TypeVar

from orchestrator import records
from orchestrator.errors import FailedPrecondition, InvalidTransition, NotFound
from orchestrator.model import (
    Connection,
    ConnectionRef,
    ConnectionState,
    FunctionStatus,
    JSONObject,
    LifecycleEvent,
    Mark,
    Outcome,
)
from orchestrator.records import Fact, Record

_S = ConnectionState
_E = LifecycleEvent
T = TypeVar("T")
V = TypeVar("V")


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

READS_DATA: frozenset[str] = frozenset(
    {*_LIFECYCLE, Fact.CONNECTION_REJECTED.value, Fact.METADATA_UPDATED.value, *(f.value for f in _OUTCOME_STATUS)}
)
"""The record types whose ``data`` :func:`step` reads; it reads no ``data`` of any other (a reader may skip it)."""
READS_EVENT_ID: frozenset[str] = frozenset(_LIFECYCLE)
"""The record types whose ``event_id`` :func:`step` reads."""
READS_CAUSATION: frozenset[str] = frozenset(f.value for f in _OUTCOME_STATUS)
"""The record types whose ``causation_id`` :func:`step` reads."""
assert not READS_EVENT_ID & READS_CAUSATION  # fold_rows() takes either in one column


def _constructor(cls: type[V]) -> Callable[..., V]:
    """A constructor of the frozen, slotted dataclass ``cls`` taking every field positionally, that sets each
    slot directly: the generated ``__init__`` goes through ``object.__setattr__`` once per field (the price of
    ``frozen``), which made it most of the cost of a :class:`Mark` or an :class:`Outcome` on replay."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    assert getattr(cls, "__slots__", None) == tuple(names), cls
    scope: dict[str, Any] = {"new": object.__new__, "cls": cls}
    scope.update({f"set_{n}": getattr(cls, n).__set__ for n in names})
    body = "".join(f"    set_{n}(self, {n})\n" for n in names)
    exec(f"def make({', '.join(names)}):\n    self = new(cls)\n{body}    return self\n", scope)
    make: Callable[..., V] = scope["make"]
    return make


_mark = _constructor(Mark)
_outcome = _constructor(Outcome)
_connection = _constructor(Connection)


def admit(connection: Connection | None, event: LifecycleEvent, ref: object = None) -> Rule:
    """Decide whether ``event`` may be appended to ``connection``; raise if it is refused.

    Returns the rule (START, NEW_INCARNATION or REPEAT). Raises
    :class:`NotFound` for a deletion of an unknown connection and
    :class:`FailedPrecondition` naming the state and event otherwise;
    ``ref`` names the connection in the message when there is none yet.
    """
    if connection is None:
        return _admit(None, event, ref)
    return _admit(connection.state, event, connection.ref)


def _admit(state: ConnectionState | None, event: LifecycleEvent, ref: object) -> Rule:
    rule = TABLE[(state, event)]
    if rule.verdict is Verdict.NOT_FOUND:
        raise NotFound(f"connection {ref or ''} not found: {event} needs an existing connection".replace("  ", " "))
    if rule.verdict is Verdict.REFUSE:
        assert state is not None
        raise FailedPrecondition(f"{event} is not allowed while connection {ref} is {state}" + _hint(state))
    return rule


def _hint(state: ConnectionState) -> str:
    if state is _S.DELETING:
        return " (wait for the deletion to finish)"
    return ""


class Draft(Generic[T]):
    """A connection as the fold is building it: the fields of :class:`Connection`, mutable.

    One per stream. :func:`step` changes it in place (or starts a new one for a
    new incarnation); :meth:`freeze` makes the :class:`Connection`. ``T`` is the
    type of its times (the records' ``recorded_at``, copied as they are).
    """

    __slots__ = (
        "config",
        "created_at",
        "deletion",
        "incarnation",
        "last_event",
        "last_position",
        "lifecycle",
        "metadata",
        "outcomes",
        "pending",
        "ref",
        "rejection_reason",
        "state",
        "stream",
        "updated_at",
        "version",
    )

    def __init__(
        self,
        stream: str,
        state: ConnectionState,
        version: int,
        created_at: T,
        updated_at: T,
        last_event: str,
        last_position: int,
        lifecycle: Mark,
        incarnation: int = 1,
        metadata: JSONObject | None = None,
        config: JSONObject | None = None,
        rejection_reason: str = "",
        deletion: Mark | None = None,
        outcomes: tuple[Outcome, ...] = (),
        ref: ConnectionRef | None = None,
    ) -> None:
        self.stream = stream
        self.state = state
        self.version = version
        self.created_at = created_at
        self.updated_at = updated_at
        self.last_event = last_event
        self.last_position = last_position
        self.lifecycle = lifecycle
        self.incarnation = incarnation
        self.metadata: JSONObject = {} if metadata is None else metadata
        self.config: JSONObject = {} if config is None else config
        self.rejection_reason = rejection_reason
        self.deletion = deletion
        self.outcomes = outcomes
        """The outcomes, but for those still :attr:`pending`."""
        self.pending: list[tuple[FunctionStatus, Any, Callable[[Any], Mapping[str, Any]]]] | None = None
        """Function outcomes of the current lifecycle record not yet read: (status, data, load), in log order.

        Their ``data`` is read when the draft is frozen or packed (:meth:`settle`), not as they are
        folded: a later lifecycle record drops them unread, which on replay is most of them.
        """
        self.ref = ref
        """The connection's ref when known; None: made from :attr:`stream` by :meth:`freeze`."""

    def settle(self) -> None:
        """Merge the :attr:`pending` outcomes into :attr:`outcomes`, in order."""
        pending = self.pending
        if pending is None:
            return
        outcomes, fields = self.outcomes, records.OutcomeSummary.fields
        for status, data, load in pending:
            function, attempt, error, duration_ms = fields(load(data))
            outcomes = merge_outcome(outcomes, _outcome(function, status, attempt, error, duration_ms))
        self.outcomes, self.pending = outcomes, None

    @classmethod
    def of(cls, connection: Connection) -> Draft[datetime]:
        """A draft of ``connection``, to :func:`step` on."""
        c = connection
        return Draft(
            c.ref.stream,
            c.state,
            c.version,
            c.created_at,
            c.updated_at,
            c.last_event,
            c.last_position,
            c.lifecycle,
            c.incarnation,
            c.metadata,
            c.config,
            c.rejection_reason,
            c.deletion,
            c.outcomes,
            c.ref,
        )

    def freeze(
        self, when: Callable[[T], datetime], ref: Callable[[str], ConnectionRef] = ConnectionRef.from_stream
    ) -> Connection:
        """The :class:`Connection` this draft stands for; ``when`` turns its times into datetimes, ``ref`` its
        stream into a ref (when it has none)."""
        self.settle()
        return _connection(
            self.ref if self.ref is not None else ref(self.stream),
            self.state,
            self.version,
            when(self.created_at),
            when(self.updated_at),
            self.last_event,
            self.last_position,
            self.lifecycle,
            self.incarnation,
            self.metadata,
            self.config,
            self.rejection_reason,
            self.deletion,
            self.outcomes,
        )

    def pack(self) -> tuple[Any, ...]:
        """The draft as plain values (str, int, dict, tuple, None), which pickle fast, for :meth:`unpack` in another
        process (its ref is left out: made again from the stream)."""
        self.settle()
        lifecycle, deletion = self.lifecycle, self.deletion
        return (
            self.stream,
            self.state.value,
            self.version,
            self.created_at,
            self.updated_at,
            self.last_event,
            self.last_position,
            (lifecycle.event_id, lifecycle.type, lifecycle.position, lifecycle.version),
            self.incarnation,
            self.metadata,
            self.config,
            self.rejection_reason,
            # Mostly the lifecycle's own mark: sent once, and shared again on the other side.
            None if deletion is None else True if deletion is lifecycle else _unmark(deletion),
            tuple((o.name, o.status.value, o.attempts, o.error, o.duration_ms) for o in self.outcomes),
        )

    @staticmethod
    def unpack(values: tuple[Any, ...]) -> Draft[Any]:
        """The draft :meth:`pack` made ``values`` of."""
        (stream, state, version, created, updated, last_event, last_position, lifecycle, incarnation, metadata,
         config, reason, deletion, outcomes) = values  # fmt: skip
        mark = _mark(*lifecycle)
        return Draft(
            stream,
            _STATES[state],
            version,
            created,
            updated,
            last_event,
            last_position,
            mark,
            incarnation,
            metadata,
            config,
            reason,
            None if deletion is None else mark if deletion is True else _mark(*deletion),
            tuple(_outcome(name, _STATUSES[status], *rest) for name, status, *rest in outcomes),
        )


Step: TypeAlias = Callable[
    [Any, str, str, int, int, str, str, Any, Any, Callable[[Any], Mapping[str, Any]]], Draft[Any]
]
"""A rule for one record type: (draft, stream, type, position, version, event_id, causation_id, recorded_at,
data, load) -> the draft after the record."""


def _unmark(mark: Mark) -> tuple[str, str, int, int]:
    return (mark.event_id, mark.type, mark.position, mark.version)


_STATES: dict[str, ConnectionState] = {s.value: s for s in ConnectionState}
_STATUSES: dict[str, FunctionStatus] = {s.value: s for s in FunctionStatus}


def _same(value: Any) -> Any:
    return value


def step(
    draft: Draft[T] | None,
    stream: str,
    type_: str,
    position: int,
    version: int,
    event_id: str,
    causation_id: str,
    recorded_at: T,
    data: Any,
    load: Callable[[Any], Mapping[str, Any]] = _same,
) -> Draft[T]:
    """Fold one record into ``draft`` (None: no connection yet); returns the draft after it.

    The draft is changed in place, except that a new incarnation starts a new one.
    ``data`` is read (through ``load``) only for the types of :data:`READS_DATA`, and
    for a ``function-*`` record only when it is about the current lifecycle record, and
    then only once the draft settles (:meth:`Draft.settle`);
    ``event_id`` and ``causation_id`` only for the types of :data:`READS_EVENT_ID` and
    :data:`READS_CAUSATION`. Raises :class:`InvalidTransition` for a record the rules
    refuse, and then leaves ``draft`` as it was.
    """
    after: Draft[T] = _STEPS.get(type_, _UNKNOWN)(
        draft, stream, type_, position, version, event_id, causation_id, recorded_at, data, load
    )
    return after


# The rules, one function per kind of record, each made for its type: step() and fold_rows() call
# the one of a record's type, so that replay pays one call per record. Each checks everything
# before it changes the draft.


def _no_connection(type_: str, position: int) -> InvalidTransition:
    return InvalidTransition(f"{type_} at position {position} has no connection before it")


def _unknown(
    draft: Draft[T] | None,
    stream: str,
    type_: str,
    position: int,
    version: int,
    event_id: str,
    causation_id: str,
    recorded_at: T,
    data: Any,
    load: Callable[[Any], Mapping[str, Any]],
) -> Draft[T]:
    # Unknown types from a newer release are kept in the log and skipped
    # by the fold, so an older replay still works on a newer log.
    if draft is None:
        raise _no_connection(type_, position)
    draft.version = version
    draft.updated_at = recorded_at
    draft.last_event = type_
    draft.last_position = position
    return draft


def _lifecycle_rule(event: LifecycleEvent) -> Step:
    """The rule of a lifecycle record: the state table's row of ``event``."""
    name = event.value
    deletion = event is _E.PRE_CONNECTION_DELETION
    rules: dict[ConnectionState | None, Rule] = {state: TABLE[(state, event)] for state in (None, *ConnectionState)}

    def lifecycle(
        draft: Draft[T] | None,
        stream: str,
        type_: str,
        position: int,
        version: int,
        event_id: str,
        causation_id: str,
        recorded_at: T,
        data: Any,
        load: Callable[[Any], Mapping[str, Any]],
    ) -> Draft[T]:
        rule = rules[draft.state if draft is not None else None]
        to = rule.to
        if to is None:
            if rule.verdict is Verdict.REPEAT:
                raise InvalidTransition(f"position {position}: a repeated {event} is answered, never appended")
            try:  # refused: with the message admit() gives
                _admit(draft.state if draft is not None else None, event, draft.stream if draft is not None else None)
            except (NotFound, FailedPrecondition) as exc:
                raise InvalidTransition(f"position {position}: {exc}") from exc
        assert to is not None
        config = records.Lifecycle.parse_config(load(data))
        mark = _mark(event_id, name, position, version)
        if draft is None or rule.verdict is Verdict.NEW_INCARNATION:
            incarnation = draft.incarnation + 1 if draft is not None else 1
            return Draft(stream, to, version, recorded_at, recorded_at, name, position, mark, incarnation, None, config)
        draft.state = to
        draft.version = version
        draft.updated_at = recorded_at
        draft.last_event = name
        draft.last_position = position
        draft.lifecycle = mark
        # A reconnect may bring new settings; an event without any keeps the old ones.
        if config:
            draft.config = config
        if deletion:
            draft.deletion = mark
        draft.outcomes, draft.pending = (), None
        # Only a deletion leaves rejected within its incarnation: the connection is no longer rejected.
        draft.rejection_reason = ""
        return draft

    return lifecycle


def _verdict_rule(fact: Fact) -> Step:
    """The rule of a verdict (connection-validated, -rejected, -deleted): allowed only after the states it follows."""
    name = fact.value
    after = _VERDICT_FROM[fact]

    def verdict(
        draft: Draft[T] | None,
        stream: str,
        type_: str,
        position: int,
        version: int,
        event_id: str,
        causation_id: str,
        recorded_at: T,
        data: Any,
        load: Callable[[Any], Mapping[str, Any]],
    ) -> Draft[T]:
        if draft is None:
            raise _no_connection(name, position)
        if draft.state not in after:
            raise InvalidTransition(
                f"{name} at position {position} cannot follow state {draft.state} of {draft.stream}"
            )
        if fact is Fact.CONNECTION_VALIDATED:
            draft.rejection_reason = ""
        elif fact is Fact.CONNECTION_REJECTED:
            draft.rejection_reason = records.ConnectionRejected.parse(load(data)).reason
            draft.state = _S.REJECTED
        else:
            draft.state = _S.DELETED
        draft.version = version
        draft.updated_at = recorded_at
        draft.last_event = name
        draft.last_position = position
        return draft

    return verdict


def _outcome_rule(fact: Fact) -> Step:
    """The rule of a function outcome: it updates the view only when it is about the current lifecycle record."""
    name = fact.value
    status = _OUTCOME_STATUS[fact]

    def outcome(
        draft: Draft[T] | None,
        stream: str,
        type_: str,
        position: int,
        version: int,
        event_id: str,
        causation_id: str,
        recorded_at: T,
        data: Any,
        load: Callable[[Any], Mapping[str, Any]],
    ) -> Draft[T]:
        if draft is None:
            raise _no_connection(name, position)
        # Outcomes of an older lifecycle event stay in the log but not in the view.
        if causation_id == draft.lifecycle.event_id:
            pending = draft.pending
            if pending is None:
                draft.pending = [(status, data, load)]
            else:
                pending.append((status, data, load))
        draft.version = version
        draft.updated_at = recorded_at
        draft.last_event = name
        draft.last_position = position
        return draft

    return outcome


def _metadata(
    draft: Draft[T] | None,
    stream: str,
    type_: str,
    position: int,
    version: int,
    event_id: str,
    causation_id: str,
    recorded_at: T,
    data: Any,
    load: Callable[[Any], Mapping[str, Any]],
) -> Draft[T]:
    """The rule of metadata-updated: the metadata replaced, or keys merged into it."""
    if draft is None:
        raise _no_connection(Fact.METADATA_UPDATED.value, position)
    metadata, merge = records.MetadataUpdated.change(load(data))
    # A merge is applied here, in log order, so concurrent writers never lose each other's keys.
    draft.metadata = {**draft.metadata, **metadata} if merge else metadata
    draft.version = version
    draft.updated_at = recorded_at
    draft.last_event = Fact.METADATA_UPDATED.value
    draft.last_position = position
    return draft


def _credentials_rule(fact: Fact) -> Step:
    """The rule of the credentials facts: allowed in any state, they change nothing but what every record moves
    (the secrets are not in the log, and the read model does not follow their fingerprint)."""
    name = fact.value

    def credentials(
        draft: Draft[T] | None,
        stream: str,
        type_: str,
        position: int,
        version: int,
        event_id: str,
        causation_id: str,
        recorded_at: T,
        data: Any,
        load: Callable[[Any], Mapping[str, Any]],
    ) -> Draft[T]:
        if draft is None:
            raise _no_connection(name, position)
        draft.version = version
        draft.updated_at = recorded_at
        draft.last_event = name
        draft.last_position = position
        return draft

    return credentials


_STEPS: dict[str, Step] = {
    **{event.value: _lifecycle_rule(event) for event in LifecycleEvent},
    **{fact.value: _verdict_rule(fact) for fact in _VERDICT_FROM},
    **{fact.value: _outcome_rule(fact) for fact in _OUTCOME_STATUS},
    Fact.METADATA_UPDATED.value: _metadata,
    **{fact.value: _credentials_rule(fact) for fact in _CREDENTIALS},
}
"""The rule of each record type this release knows (any other: :func:`_unknown`)."""
_UNKNOWN: Step = _unknown
assert set(_STEPS) == records.RECORD_TYPES, "a record type without a rule"


def _datetime(moment: datetime) -> datetime:
    return moment


def apply(connection: Connection | None, record: Record) -> Connection:
    """Return the connection as it is after ``record``. Pure; raises :class:`InvalidTransition`."""
    draft = step(
        Draft.of(connection) if connection is not None else None,
        record.stream,
        record.type,
        record.position,
        record.version,
        record.event_id,
        record.causation_id,
        record.recorded_at,
        record.data,
    )
    return draft.freeze(_datetime)


def fold_rows(
    drafts: dict[str, Draft[T]],
    rows: Iterable[tuple[str, str, int, int, str, T, Any]],
    load: Callable[[Any], Mapping[str, Any]],
) -> None:
    """:func:`step` each row into ``drafts`` (by stream), in log order: the batch form of the fold, for replay.

    A row is (stream, type, position, version, ident, recorded_at, data), where ``ident`` is the
    record's ``event_id`` for the types of :data:`READS_EVENT_ID`, its ``causation_id`` for those of
    :data:`READS_CAUSATION` (the only ones that read either, so one column serves both), and
    anything for the others. ``data`` goes through ``load`` when it is read.
    """
    get, rule = drafts.get, _STEPS.get
    for stream, type_, position, version, ident, recorded_at, data in rows:
        draft = get(stream)
        after = rule(type_, _UNKNOWN)(draft, stream, type_, position, version, ident, ident, recorded_at, data, load)
        if after is not draft:
            drafts[stream] = after


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
    name = outcome.name
    for earlier in outcomes:
        if earlier.name == name:
            return (*(o for o in outcomes if o.name != name), outcome)
    return (*outcomes, outcome)


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
