"""Property tests: random emits and appends keep the log gap-free and the read model equal to its fold."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import codec, state
from orchestrator.clock import SystemClock
from orchestrator.errors import FailedPrecondition, IdempotencyConflict, NotFound
from orchestrator.ids import uuid7
from orchestrator.model import ConnectionQuery, ConnectionRef, ConnectionState, EmitRequest, EmitResult, LifecycleEvent
from orchestrator.plugins import Registry
from orchestrator.records import Fact, NewEvent, Record
from orchestrator.service import Service, assemble
from orchestrator.store import EventStore, open_store
from orchestrator.store.memory import MemoryEventStore

REFS = [
    ConnectionRef("dev", "salesforce", "c1"),
    ConnectionRef("dev", "salesforce", "c2"),
    ConnectionRef("prod", "hubspot", "tenant/42"),
]
LIMIT_ALL = 100_000

_S = ConnectionState
_E = LifecycleEvent
Step = tuple[ConnectionRef, LifecycleEvent, str]

steps = st.lists(
    st.tuples(st.sampled_from(REFS), st.sampled_from(list(_E)), st.sampled_from(["", "", "k1", "k2"])),
    max_size=30,
)


class Refused(Exception):
    """The oracle's stand-in for an error it expects (carries the expected type)."""

    def __init__(self, kind: type[Exception]) -> None:
        super().__init__(kind.__name__)
        self.kind = kind


REPEAT = "repeat"


def expected_after(current: ConnectionState | None, event: LifecycleEvent) -> ConnectionState | str:
    """The documented state table as the service applies it today (validation accepts, deletion completes at once).

    Returns the state the emit leaves, REPEAT for an idempotent deletion reply, or raises Refused.
    """
    if event is _E.VALIDATE_CONNECTION:
        if current is _S.DELETING:
            raise Refused(FailedPrecondition)
        return _S.ACTIVE if current is _S.ACTIVE else _S.PENDING
    if event is _E.POST_CONNECTION_CREATION:
        if current is _S.DELETING:
            raise Refused(FailedPrecondition)
        return _S.ACTIVE
    if current is None:
        raise Refused(NotFound)
    if current is _S.REJECTED:
        raise Refused(FailedPrecondition)
    if current in (_S.DELETED, _S.DELETING):
        return REPEAT
    return _S.DELETED


async def check_log(store: EventStore) -> list[Record]:
    """Assert the log invariants and that the read model equals the fold of the whole log."""
    records = await store.read(from_position=1, limit=LIMIT_ALL)
    assert [r.position for r in records] == list(range(1, len(records) + 1))
    assert await store.head() == len(records)
    by_stream: dict[str, list[int]] = {}
    for record in records:
        by_stream.setdefault(record.stream, []).append(record.version)
    for stream, versions in by_stream.items():
        assert versions == list(range(1, len(versions) + 1)), stream
    folded = {s: codec.connection_to_json(c) for s, c in state.fold_all(records).items()}
    listed = await store.list_connections(ConnectionQuery(limit=LIMIT_ALL))
    assert [c.ref.stream for c in listed] == sorted(folded)
    assert {c.ref.stream: codec.connection_to_json(c) for c in listed} == folded
    return records


async def drive_service(store: EventStore, plan: list[Step]) -> None:
    """Emit ``plan`` through the service (no functions installed), checking each reply and write against the oracle."""
    async with httpx.AsyncClient() as http:
        await _drive(assemble(store, Registry.of([]), SystemClock(), http=http).service, store, plan)


async def _drive(service: Service, store: EventStore, plan: list[Step]) -> None:
    states: dict[str, ConnectionState] = {}
    deletions: dict[str, int] = {}
    answered: dict[tuple[str, str], tuple[LifecycleEvent, EmitResult]] = {}
    for ref, event, key in plan:
        head = await store.head()
        request = EmitRequest(ref=ref, event=event, idempotency_key=key)
        earlier = answered.get((ref.stream, key)) if key else None
        if earlier is not None:
            if earlier[0] is event:
                assert await service.emit(request) == dataclasses.replace(earlier[1], deduplicated=True)
            else:
                with pytest.raises(IdempotencyConflict):
                    await service.emit(request)
            assert await store.head() == head
            continue
        try:
            expected = expected_after(states.get(ref.stream), event)
        except Refused as refused:
            with pytest.raises(refused.kind) as raised:
                await service.emit(request)
            assert type(raised.value) is refused.kind
            assert await store.head() == head, "a refused emit wrote to the log"
            continue
        result = await service.emit(request)
        if expected == REPEAT:
            assert await store.head() == head, "a repeated deletion wrote to the log"
            assert result.position == deletions[ref.stream]
            assert result.state is states[ref.stream]
            continue
        assert isinstance(expected, ConnectionState)
        assert result.state is expected
        assert result.position == head + 1
        assert not result.deduplicated
        written = 1 if event is _E.POST_CONNECTION_CREATION else 2  # lifecycle record (+ its verdict)
        assert await store.head() == head + written
        states[ref.stream] = expected
        if event is _E.PRE_CONNECTION_DELETION:
            deletions[ref.stream] = result.position
        if key:
            answered[(ref.stream, key)] = (event, result)
    await check_log(store)
    for ref in REFS:
        row = await store.get_connection(ref)
        assert (row.state if row is not None else None) is states.get(ref.stream)


def run_in_memory(body: Callable[[EventStore], Awaitable[None]]) -> None:
    """Run ``body`` on a fresh memory store in its own event loop (one per hypothesis example)."""

    async def main() -> None:
        store = MemoryEventStore()
        try:
            await body(store)
        finally:
            store.close()

    anyio.run(main)


def run_in_sqlite(body: Callable[[EventStore], Awaitable[None]]) -> None:
    """Run ``body`` on a fresh SQLite file in its own event loop (one per hypothesis example)."""
    # A fresh file per example: hypothesis runs many examples inside one test, so tmp_path cannot serve.
    with tempfile.TemporaryDirectory() as folder:

        async def main() -> None:
            async with open_store(f"sqlite://{Path(folder) / 'events.db'}") as store:
                await body(store)

        anyio.run(main)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps)
def test_service_over_memory_keeps_log_and_read_model_in_step(plan: list[Step]) -> None:
    """Random emits on the memory store: replies follow the table, refusals write nothing, fold == read model."""
    run_in_memory(lambda store: drive_service(store, plan))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps)
def test_service_over_sqlite_keeps_log_and_read_model_in_step(plan: list[Step]) -> None:
    """Random emits on the SQLite store: replies follow the table, refusals write nothing, fold == read model."""
    run_in_sqlite(lambda store: drive_service(store, plan))


# -- raw appends: every record type, including the facts the service does not write yet ----------------

RECORD_TYPES = sorted({e.value for e in _E} | {f.value for f in Fact})


@st.composite
def raw_records(draw: st.DrawFn) -> tuple[ConnectionRef, str, bool, dict[str, Any]]:
    """One record to append: its stream, type, whether it names the current lifecycle record as cause, data."""
    ref = draw(st.sampled_from(REFS))
    type_ = draw(st.sampled_from(RECORD_TYPES))
    caused = draw(st.booleans())
    data: dict[str, Any]
    if type_ == Fact.METADATA_UPDATED:
        data = {"metadata": draw(st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 9), max_size=2))}
    elif type_ == Fact.CONNECTION_REJECTED:
        data = {"reason": draw(st.sampled_from(["bad key", "expired"]))}
    elif type_.startswith("function-"):
        data = {
            "function": draw(st.sampled_from(["f", "g"])),
            "attempt": draw(st.integers(1, 5)),
            "error": draw(st.sampled_from(["", "boom"])),
            "duration_ms": draw(st.integers(0, 1000)),
        }
    elif type_ in set(_E):
        data = {"config": draw(st.sampled_from([{}, {"instance_url": "x.example"}])), "payload": {}}
    else:
        data = {}
    return ref, type_, caused, data


async def drive_appends(store: EventStore, plan: list[tuple[ConnectionRef, str, bool, dict[str, Any]]]) -> None:
    """Append each record alone; the store must accept exactly what the fold accepts, and write nothing else."""
    for ref, type_, caused, data in plan:
        current = await store.get_connection(ref)
        event = NewEvent(
            event_id=str(uuid7()),
            type=type_,
            data=data,
            causation_id=current.lifecycle.event_id if caused and current is not None else "",
        )
        head = await store.head()
        version = current.version if current is not None else 0
        # What the fold says about this record decides whether the store must take it.
        probe = Record(
            position=head + 1,
            stream=ref.stream,
            version=version + 1,
            event_id=event.event_id,
            type=type_,
            data=data,
            recorded_at=codec.from_micros(0),
            causation_id=event.causation_id,
        )
        try:
            expected = state.apply(current, probe)
        except state.InvalidTransition:
            with pytest.raises(state.InvalidTransition):
                await store.append(ref, version, [event])
            assert await store.head() == head
            continue
        appended = await store.append(ref, version, [event])
        assert appended.connection.state is expected.state
        assert appended.connection.outcomes == expected.outcomes
        assert appended.connection.metadata == expected.metadata
        assert await store.head() == head + 1
    await check_log(store)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(raw_records(), max_size=40))
def test_memory_store_appends_exactly_what_the_fold_admits(
    plan: list[tuple[ConnectionRef, str, bool, dict[str, Any]]],
) -> None:
    """Random records of every type on the memory store: refused ones write nothing, fold == read model."""
    run_in_memory(lambda store: drive_appends(store, plan))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(raw_records(), max_size=40))
def test_sqlite_store_appends_exactly_what_the_fold_admits(
    plan: list[tuple[ConnectionRef, str, bool, dict[str, Any]]],
) -> None:
    """Random records of every type on the SQLite store: refused ones write nothing, fold == read model."""
    run_in_sqlite(lambda store: drive_appends(store, plan))
