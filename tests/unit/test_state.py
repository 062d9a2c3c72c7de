"""The pure fold against every cell of the state table of docs/event-log.md and every fact it documents."""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator import state
from orchestrator.errors import FailedPrecondition, NotFound
from orchestrator.model import Connection, ConnectionState, FunctionStatus, JSONObject, LifecycleEvent, Mark, Outcome
from orchestrator.records import Fact, Record

STREAM = "dev/salesforce/c1"
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)

_S = ConnectionState
_E = LifecycleEvent
VALIDATE = _E.VALIDATE_CONNECTION
CREATE = _E.POST_CONNECTION_CREATION
DELETE = _E.PRE_CONNECTION_DELETION


class History:
    """Records of one stream built in order, with positions, versions and times that follow on."""

    def __init__(self, stream: str = STREAM, first_position: int = 1) -> None:
        self.stream = stream
        self.records: list[Record] = []
        self._next_position = first_position

    def add(self, type_: str, data: JSONObject | None = None, *, causation_id: str = "") -> Record:
        """Append a record of ``type_`` (lifecycle records get empty config and payload by default)."""
        type_ = str(type_)
        version = len(self.records) + 1
        if data is None:
            data = {"config": {}, "payload": {}} if type_ in set(_E) else {}
        record = Record(
            position=self._next_position,
            stream=self.stream,
            version=version,
            event_id=f"{self.stream}#{version}",
            type=type_,
            data=data,
            recorded_at=T0 + timedelta(seconds=version),
            causation_id=causation_id,
        )
        self._next_position += 1
        self.records.append(record)
        return record

    def fact(self, fact: Fact, data: JSONObject | None = None) -> Record:
        """Append a fact caused by the latest lifecycle record."""
        return self.add(fact.value, data, causation_id=self.lifecycle_id)

    @property
    def lifecycle_id(self) -> str:
        """The event id of the latest lifecycle record."""
        return next(r.event_id for r in reversed(self.records) if r.type in set(_E))

    @property
    def connection(self) -> Connection | None:
        """The fold of the records so far."""
        return state.fold(self.records)


def in_state(current: ConnectionState | None) -> History:
    """A history whose fold leaves the connection in ``current`` (None: no stream yet)."""
    history = History()
    if current is _S.PENDING:
        history.add(VALIDATE)
    elif current is _S.ACTIVE:
        history.add(CREATE)
    elif current is _S.REJECTED:
        history.add(VALIDATE)
        history.fact(Fact.CONNECTION_REJECTED, {"reason": "bad credentials"})
    elif current is _S.DELETING:
        history.add(CREATE)
        history.add(DELETE)
    elif current is _S.DELETED:
        history.add(CREATE)
        history.add(DELETE)
        history.fact(Fact.CONNECTION_DELETED)
    folded = history.connection
    assert (folded.state if folded is not None else None) is current
    return history


class Cell(enum.Enum):
    """What the documented state table says about one (state, event) pair."""

    NEW = "a new incarnation"
    SAME = "the same incarnation"
    NOT_FOUND = "NOT_FOUND"
    REFUSED = "FAILED_PRECONDITION"
    REPEAT = "an idempotent reply"


# Transcribed from docs/event-log.md by hand (not imported from state.TABLE) so that a
# change to the implementation's table is caught here.
DESIGN_TABLE: dict[tuple[ConnectionState | None, LifecycleEvent], tuple[Cell, ConnectionState | None]] = {
    (None, VALIDATE): (Cell.NEW, _S.PENDING),
    (None, CREATE): (Cell.NEW, _S.ACTIVE),
    (None, DELETE): (Cell.NOT_FOUND, None),
    (_S.REJECTED, VALIDATE): (Cell.NEW, _S.PENDING),
    (_S.REJECTED, CREATE): (Cell.NEW, _S.ACTIVE),
    (_S.REJECTED, DELETE): (Cell.SAME, _S.DELETING),
    (_S.DELETED, VALIDATE): (Cell.NEW, _S.PENDING),
    (_S.DELETED, CREATE): (Cell.NEW, _S.ACTIVE),
    (_S.DELETED, DELETE): (Cell.REPEAT, None),
    (_S.PENDING, VALIDATE): (Cell.SAME, _S.PENDING),
    (_S.PENDING, CREATE): (Cell.SAME, _S.ACTIVE),
    (_S.PENDING, DELETE): (Cell.SAME, _S.DELETING),
    (_S.ACTIVE, VALIDATE): (Cell.SAME, _S.ACTIVE),
    (_S.ACTIVE, CREATE): (Cell.SAME, _S.ACTIVE),
    (_S.ACTIVE, DELETE): (Cell.SAME, _S.DELETING),
    (_S.DELETING, VALIDATE): (Cell.REFUSED, None),
    (_S.DELETING, CREATE): (Cell.REFUSED, None),
    (_S.DELETING, DELETE): (Cell.REPEAT, None),
}


def cells(*kinds: Cell) -> list[Any]:
    """The table's cells of the given kinds as pytest parameters named like ``deleted-validate-connection``."""
    return [
        pytest.param(current, event, id=f"{current.value if current else 'unknown'}-{event.value}")
        for (current, event), (cell, _) in DESIGN_TABLE.items()
        if cell in kinds
    ]


CELLS = cells(*Cell)
ALLOWED = cells(Cell.NEW, Cell.SAME)
REFUSED = cells(Cell.NOT_FOUND, Cell.REFUSED, Cell.REPEAT)


def test_design_table_covers_every_state_and_event() -> None:
    """The table has one cell per (no stream or state) x lifecycle event, like the implementation's."""
    expected = {(s, e) for s in [None, *_S] for e in _E}
    assert set(DESIGN_TABLE) == expected
    assert set(state.TABLE) == expected


@pytest.mark.parametrize(("current", "event"), CELLS)
def test_admit_follows_the_state_table(current: ConnectionState | None, event: LifecycleEvent) -> None:
    """admit returns the documented verdict and target state, or raises the documented error."""
    connection = in_state(current).connection
    cell, to = DESIGN_TABLE[(current, event)]
    if cell is Cell.NOT_FOUND:
        with pytest.raises(NotFound) as not_found:
            state.admit(connection, event)
        assert type(not_found.value) is NotFound
    elif cell is Cell.REFUSED:
        with pytest.raises(FailedPrecondition) as refused:
            state.admit(connection, event)
        assert type(refused.value) is FailedPrecondition
        assert current is not None
        assert current.value in str(refused.value)
        assert event.value in str(refused.value)
    else:
        rule = state.admit(connection, event)
        verdict = {
            Cell.NEW: state.Verdict.NEW_INCARNATION,
            Cell.SAME: state.Verdict.START,
            Cell.REPEAT: state.Verdict.REPEAT,
        }[cell]
        assert rule.verdict is verdict
        assert rule.to is to


@pytest.mark.parametrize(("current", "event"), ALLOWED)
def test_apply_moves_an_allowed_event_to_the_documented_state(
    current: ConnectionState | None, event: LifecycleEvent
) -> None:
    """An allowed lifecycle record moves to the table's state and becomes the connection's lifecycle mark."""
    history = in_state(current)
    before = history.connection
    record = history.add(event.value, {"config": {"instance_url": "x.example"}, "payload": {}})
    after = state.apply(before, record)
    cell, to = DESIGN_TABLE[(current, event)]
    assert after.state is to
    assert after.version == record.version
    assert after.last_position == record.position
    assert after.last_event == event.value
    assert after.updated_at == record.recorded_at
    assert after.lifecycle == Mark(record.event_id, record.type, record.position, record.version)
    if cell is Cell.NEW:
        assert after.incarnation == (before.incarnation + 1 if before is not None else 1)
        assert after.created_at == record.recorded_at
    else:
        assert before is not None
        assert after.incarnation == before.incarnation
        assert after.created_at == before.created_at


@pytest.mark.parametrize(("current", "event"), REFUSED)
def test_apply_refuses_a_record_the_table_does_not_allow(
    current: ConnectionState | None, event: LifecycleEvent
) -> None:
    """A refused, unknown-connection or repeated lifecycle record in the log raises InvalidTransition."""
    history = in_state(current)
    before = history.connection
    record = history.add(event.value)
    with pytest.raises(state.InvalidTransition, match=f"position {record.position}"):
        state.apply(before, record)


def test_invalid_transition_is_a_failed_precondition() -> None:
    """InvalidTransition maps to FAILED_PRECONDITION because it subclasses FailedPrecondition."""
    assert issubclass(state.InvalidTransition, FailedPrecondition)


def test_deleting_refusal_names_state_and_event() -> None:
    """Refusing a re-validation while deleting names the connection, its state and the event."""
    connection = in_state(_S.DELETING).connection
    with pytest.raises(FailedPrecondition) as refused:
        state.admit(connection, VALIDATE)
    message = str(refused.value)
    assert "validate-connection" in message
    assert "deleting" in message
    assert STREAM in message


@pytest.mark.parametrize("current", [_S.DELETING, _S.DELETED])
def test_repeated_deletion_is_answered_with_the_original_deletion(current: ConnectionState) -> None:
    """A deletion of a deleting/deleted connection is a REPEAT, and the connection keeps the first deletion's mark."""
    history = in_state(current)
    connection = history.connection
    assert connection is not None
    deletion = next(r for r in history.records if r.type == DELETE)
    assert state.admit(connection, DELETE).verdict is state.Verdict.REPEAT
    assert connection.deletion == Mark(deletion.event_id, deletion.type, deletion.position, deletion.version)


@pytest.mark.parametrize(
    ("current", "event"),
    [(s, e) for s in (_S.REJECTED, _S.DELETED) for e in (VALIDATE, CREATE)],
    ids=lambda v: v.value,
)
def test_new_incarnation_starts_afresh(current: ConnectionState, event: LifecycleEvent) -> None:
    """Validating or creating after rejection or deletion forgets metadata, outcomes, reason and deletion."""
    history = History()
    history.add(CREATE if current is _S.DELETED else VALIDATE, {"config": {"old": True}, "payload": {}})
    history.fact(Fact.METADATA_UPDATED, {"metadata": {"webhook_id": "w1"}})
    history.fact(Fact.FUNCTION_FAILED, {"function": "register-webhook", "attempt": 1, "error": "boom"})
    if current is _S.DELETED:
        history.add(DELETE)
        history.fact(Fact.CONNECTION_DELETED)
    else:
        history.fact(Fact.CONNECTION_REJECTED, {"reason": "bad credentials"})
    before = history.connection
    assert before is not None and before.state is current and before.metadata == {"webhook_id": "w1"}
    record = history.add(event.value, {"config": {"new": True}, "payload": {}})

    after = state.apply(before, record)

    assert after.incarnation == before.incarnation + 1
    assert after.metadata == {}
    assert after.config == {"new": True}
    assert after.outcomes == ()
    assert after.rejection_reason == ""
    assert after.deletion is None
    assert after.created_at == record.recorded_at
    # The stream goes on: versions never restart.
    assert after.version == record.version == len(history.records)


def test_reconnect_keeps_the_incarnation_and_metadata() -> None:
    """post-connection-creation on an active connection keeps metadata and config, and clears outcomes."""
    history = History()
    history.add(CREATE, {"config": {"instance_url": "a.example"}, "payload": {}})
    history.fact(Fact.METADATA_UPDATED, {"metadata": {"webhook_id": "w1"}})
    history.fact(Fact.FUNCTION_SUCCEEDED, {"function": "register-webhook", "attempt": 1})
    history.add(CREATE)
    after = history.connection
    assert after is not None
    assert after.state is _S.ACTIVE
    assert after.incarnation == 1
    assert after.metadata == {"webhook_id": "w1"}
    assert after.config == {"instance_url": "a.example"}
    assert after.outcomes == ()


def test_reconnect_with_new_config_replaces_it() -> None:
    """A lifecycle event that brings connection_config replaces the stored config."""
    history = History()
    history.add(CREATE, {"config": {"instance_url": "a.example"}, "payload": {}})
    history.add(VALIDATE, {"config": {"instance_url": "b.example"}, "payload": {}})
    after = history.connection
    assert after is not None
    assert after.config == {"instance_url": "b.example"}


VERDICT_ALLOWED: dict[Fact, dict[ConnectionState, ConnectionState]] = {
    Fact.CONNECTION_VALIDATED: {_S.PENDING: _S.PENDING, _S.ACTIVE: _S.ACTIVE},
    Fact.CONNECTION_REJECTED: {_S.PENDING: _S.REJECTED, _S.ACTIVE: _S.REJECTED},
    Fact.CONNECTION_DELETED: {_S.DELETING: _S.DELETED},
}


@pytest.mark.parametrize("fact", list(VERDICT_ALLOWED), ids=str)
@pytest.mark.parametrize("current", [None, *_S], ids=lambda s: s.value if s else "unknown")
def test_verdict_facts_follow_only_their_states(fact: Fact, current: ConnectionState | None) -> None:
    """Verdicts move pending/active (validated, rejected) and deleting (deleted) and are invalid elsewhere."""
    history = in_state(current)
    before = history.connection
    record = history.add(fact.value, {"reason": "r"} if fact is Fact.CONNECTION_REJECTED else {})
    expected = VERDICT_ALLOWED[fact].get(current) if current is not None else None
    if expected is None:
        with pytest.raises(state.InvalidTransition):
            state.apply(before, record)
        return
    after = state.apply(before, record)
    assert after.state is expected
    assert after.version == record.version
    assert after.last_event == fact.value


def test_rejection_records_the_reason() -> None:
    """connection-rejected moves to rejected and keeps data["reason"] as rejection_reason."""
    history = in_state(_S.PENDING)
    history.fact(Fact.CONNECTION_REJECTED, {"reason": "invalid API key"})
    after = history.connection
    assert after is not None
    assert after.state is _S.REJECTED
    assert after.rejection_reason == "invalid API key"


def test_failed_revalidation_of_an_active_connection_rejects_it() -> None:
    """A rejected re-validation of an active connection moves it to rejected, keeping its incarnation."""
    history = in_state(_S.ACTIVE)
    history.add(VALIDATE)
    history.fact(Fact.CONNECTION_REJECTED, {"reason": "token revoked"})
    after = history.connection
    assert after is not None
    assert (after.state, after.rejection_reason, after.incarnation) == (_S.REJECTED, "token revoked", 1)


def rejected_after_being_active() -> History:
    """An active connection with a webhook in its metadata whose re-validation failed."""
    history = History()
    history.add(CREATE, {"config": {"instance_url": "a.example"}, "payload": {}})
    history.fact(Fact.METADATA_UPDATED, {"metadata": {"webhook_id": "w1"}})
    history.add(VALIDATE)
    history.fact(Fact.CONNECTION_REJECTED, {"reason": "check: token revoked"})
    return history


def test_a_rejected_connection_keeps_its_metadata_and_config_for_its_cleanup() -> None:
    """Rejection keeps the incarnation's metadata (the webhook id its cleanup needs) and config."""
    after = rejected_after_being_active().connection
    assert after is not None
    assert (after.state, after.incarnation) == (_S.REJECTED, 1)
    assert (after.metadata, after.config) == ({"webhook_id": "w1"}, {"instance_url": "a.example"})


@pytest.mark.parametrize("history", [in_state(_S.REJECTED), rejected_after_being_active()], ids=["pending", "active"])
def test_deleting_a_rejected_connection_stays_in_its_incarnation_then_ends_deleted(history: History) -> None:
    """rejected + pre-connection-deletion: deleting in the same incarnation (metadata, config kept, the reason
    cleared, the deletion marked); connection-deleted then ends it; another deletion is a repeat."""
    before = history.connection
    assert before is not None and before.state is _S.REJECTED
    assert state.admit(before, DELETE) == state.Rule(state.Verdict.START, _S.DELETING)
    deletion = history.add(DELETE)
    deleting = history.connection
    assert deleting is not None
    assert (deleting.state, deleting.incarnation, deleting.rejection_reason) == (_S.DELETING, before.incarnation, "")
    assert (deleting.metadata, deleting.config) == (before.metadata, before.config)
    assert deleting.deletion == Mark(deletion.event_id, deletion.type, deletion.position, deletion.version)
    history.fact(Fact.CONNECTION_DELETED)
    deleted = history.connection
    assert deleted is not None
    assert (deleted.state, deleted.incarnation, deleted.metadata) == (_S.DELETED, before.incarnation, before.metadata)
    assert state.admit(deleted, DELETE).verdict is state.Verdict.REPEAT


def test_a_rejection_cleanups_outcomes_show_until_the_deletion() -> None:
    """The cleanup a rejection scheduled runs for the rejecting validation: its outcome shows on the rejected
    connection; the deletion's own outcomes replace them."""
    history = rejected_after_being_active()
    history.fact(Fact.FUNCTION_SUCCEEDED, {"function": "delete-webhook", "attempt": 1})
    rejected = history.connection
    assert rejected is not None
    assert ("delete-webhook", FunctionStatus.SUCCEEDED) in {(o.name, o.status) for o in rejected.outcomes}
    history.add(DELETE)
    deleting = history.connection
    assert deleting is not None and deleting.outcomes == ()


def test_metadata_update_replaces_the_metadata() -> None:
    """metadata-updated sets the metadata to data["metadata"] as a whole, leaving the state alone."""
    history = in_state(_S.ACTIVE)
    history.fact(Fact.METADATA_UPDATED, {"metadata": {"webhook_id": "w1", "cursor": 3}})
    history.fact(Fact.METADATA_UPDATED, {"metadata": {"webhook_id": "w2"}})
    after = history.connection
    assert after is not None
    assert after.metadata == {"webhook_id": "w2"}
    assert after.state is _S.ACTIVE
    assert after.version == 3


OUTCOME_STATUS = {
    Fact.FUNCTION_SUCCEEDED: FunctionStatus.SUCCEEDED,
    Fact.FUNCTION_FAILED: FunctionStatus.FAILED,
    Fact.FUNCTION_GAVE_UP: FunctionStatus.GAVE_UP,
    Fact.FUNCTION_CANCELLED: FunctionStatus.CANCELLED,
}


@pytest.mark.parametrize(("fact", "status"), list(OUTCOME_STATUS.items()), ids=str)
def test_function_fact_becomes_an_outcome(fact: Fact, status: FunctionStatus) -> None:
    """A function-* fact caused by the current lifecycle record shows as that function's outcome."""
    history = in_state(_S.ACTIVE)
    data: dict[str, Any] = {"function": "register-webhook", "attempt": 3, "error": "HTTP 500", "duration_ms": 42}
    history.fact(fact, data)
    after = history.connection
    assert after is not None
    assert after.outcomes == (Outcome("register-webhook", status, attempts=3, error="HTTP 500", duration_ms=42),)
    assert after.state is _S.ACTIVE
    assert after.version == 2


def test_latest_outcome_of_a_function_wins() -> None:
    """A later outcome of the same function replaces the earlier one; other functions keep theirs."""
    history = in_state(_S.ACTIVE)
    history.fact(Fact.FUNCTION_FAILED, {"function": "a", "attempt": 1, "error": "timeout", "duration_ms": 60000})
    history.fact(Fact.FUNCTION_SUCCEEDED, {"function": "b", "attempt": 1, "duration_ms": 5})
    history.fact(Fact.FUNCTION_SUCCEEDED, {"function": "a", "attempt": 2, "duration_ms": 7})
    after = history.connection
    assert after is not None
    assert {o.name: o for o in after.outcomes} == {
        "a": Outcome("a", FunctionStatus.SUCCEEDED, attempts=2, duration_ms=7),
        "b": Outcome("b", FunctionStatus.SUCCEEDED, attempts=1, duration_ms=5),
    }


def test_a_retried_function_is_scheduled_again_with_no_attempt_made() -> None:
    """function-retried (RetryJob) puts the function back to scheduled: the attempts and error of its last run go."""
    history = in_state(_S.DELETED)
    history.fact(Fact.FUNCTION_GAVE_UP, {"function": "cleanup", "attempt": 5, "error": "HTTP 503"})
    retried = {"function": "cleanup", "job_id": "j", "attempts_before": 5, "status_before": "gave-up", "by": "token:1"}
    history.fact(Fact.FUNCTION_RETRIED, retried)
    after = history.connection
    assert after is not None
    assert after.outcomes == (Outcome("cleanup", FunctionStatus.SCHEDULED),)
    assert (after.state, after.last_event) == (_S.DELETED, "function-retried")


def test_outcome_of_an_earlier_lifecycle_event_is_not_shown() -> None:
    """An outcome whose causation_id is not the current lifecycle record stays in the log only."""
    history = in_state(_S.ACTIVE)
    first = history.records[0].event_id
    history.add(CREATE)
    history.add(Fact.FUNCTION_SUCCEEDED.value, {"function": "a", "attempt": 1}, causation_id=first)
    after = history.connection
    assert after is not None
    assert after.outcomes == ()
    assert after.version == 3
    assert after.last_event == Fact.FUNCTION_SUCCEEDED.value


def test_fact_without_a_connection_is_invalid() -> None:
    """A fact that opens a stream (no lifecycle record before it) raises InvalidTransition."""
    record = History().add(Fact.METADATA_UPDATED.value, {"metadata": {}})
    with pytest.raises(state.InvalidTransition):
        state.apply(None, record)


def test_unknown_record_type_is_skipped_but_counted() -> None:
    """A record type from a newer release changes nothing but version, position and times."""
    history = in_state(_S.ACTIVE)
    before = history.connection
    assert before is not None
    record = history.add("connection-renamed", {"to": "c2"})
    after = state.apply(before, record)
    assert after.state is before.state
    assert after.metadata == before.metadata
    assert (after.version, after.last_position, after.last_event) == (2, record.position, "connection-renamed")
    assert after.updated_at == record.recorded_at


def test_fold_all_keeps_streams_apart() -> None:
    """fold_all folds interleaved streams each on its own, keyed by stream."""
    a = History("dev/salesforce/a")
    b = History("prod/hubspot/b", first_position=100)
    records = [a.add(VALIDATE), b.add(CREATE), a.fact(Fact.CONNECTION_REJECTED, {"reason": "no"}), b.add(DELETE)]
    folded = state.fold_all(sorted(records, key=lambda r: r.position))
    assert {s: c.state for s, c in folded.items()} == {
        "dev/salesforce/a": _S.REJECTED,
        "prod/hubspot/b": _S.DELETING,
    }
    assert folded["prod/hubspot/b"].ref.integration == "hubspot"
    assert folded["dev/salesforce/a"].version == 2


def test_fold_of_nothing_is_none() -> None:
    """Folding no records leaves no connection."""
    assert state.fold([]) is None
    assert state.fold_all([]) == {}
