"""One connection's timeline: its records inside the window, each with the state the fold leaves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator import replay
from orchestrator.model import ConnectionRef, ConnectionState, LifecycleEvent
from orchestrator.records import Fact, NewEvent
from orchestrator.store.memory import MemoryEventStore

pytestmark = pytest.mark.anyio

ACME = ConnectionRef("dev", "salesforce", "acme")
ACME_PROD = ConnectionRef("prod", "salesforce", "acme")
ACME_HUBSPOT = ConnectionRef("dev", "hubspot", "acme")
GLOBEX = ConnectionRef("dev", "salesforce", "globex")


class Clock:
    """A clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.moment = datetime(2025, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        self.moment += timedelta(seconds=1)
        return self.moment

    async def sleep(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)


def lifecycle(event: LifecycleEvent, n: int) -> NewEvent:
    """A lifecycle record as the service writes it."""
    return NewEvent(f"{event.value}-{n}", event.value, {"config": {}, "payload": {}})


def fact(kind: Fact, n: int, cause: NewEvent, data: dict[str, object] | None = None) -> NewEvent:
    """A fact caused by the lifecycle record ``cause``."""
    return NewEvent(f"{kind.value}-{n}", kind.value, dict(data or {}), causation_id=cause.event_id)


async def life(store: MemoryEventStore, ref: ConnectionRef, n: int) -> None:
    """Validate, create and delete ``ref``, a record or two at a time as the service appends them."""
    validate = lifecycle(LifecycleEvent.VALIDATE_CONNECTION, n)
    await store.append(ref, 0, [validate, fact(Fact.CONNECTION_VALIDATED, n, validate)])
    created = lifecycle(LifecycleEvent.POST_CONNECTION_CREATION, n)
    await store.append(ref, 2, [created])
    await store.append(ref, 3, [fact(Fact.METADATA_UPDATED, n, created, {"function": "f", "metadata": {"k": n}})])
    delete = lifecycle(LifecycleEvent.PRE_CONNECTION_DELETION, n)
    await store.append(ref, None, [delete, fact(Fact.CONNECTION_DELETED, n, delete)])


@pytest.fixture
async def store() -> MemoryEventStore:
    """ACME's and GLOBEX's lives, interleaved in the log: ACME at odd positions, GLOBEX at even ones."""
    store = MemoryEventStore(clock=Clock())
    await life(store, ACME, 1)
    await life(store, GLOBEX, 2)
    return store


async def timeline(
    store: MemoryEventStore, ref: ConnectionRef, until: replay.Until | None = None
) -> list[tuple[Any, ...]]:
    """(position, version, type, state after, version after, metadata after) of each step."""
    return [
        (record.position, record.version, record.type, after.state, after.version, dict(after.metadata))
        async for record, after in replay.timeline(store, ref, until=until)
    ]


async def test_each_record_of_the_stream_comes_with_the_connection_after_it(store: MemoryEventStore) -> None:
    """Only the connection's own records, in log order, each with the fold's state after it."""
    assert await timeline(store, ACME) == [
        (1, 1, "validate-connection", ConnectionState.PENDING, 1, {}),
        (2, 2, "connection-validated", ConnectionState.PENDING, 2, {}),
        (3, 3, "post-connection-creation", ConnectionState.ACTIVE, 3, {}),
        (4, 4, "metadata-updated", ConnectionState.ACTIVE, 4, {"k": 1}),
        (5, 5, "pre-connection-deletion", ConnectionState.DELETING, 5, {"k": 1}),
        (6, 6, "connection-deleted", ConnectionState.DELETED, 6, {"k": 1}),
    ]
    assert [t[0] for t in await timeline(store, GLOBEX)] == [7, 8, 9, 10, 11, 12]


async def test_the_last_connection_is_the_replayed_one(store: MemoryEventStore) -> None:
    """The timeline's last state is what the whole fold (and the read model) says."""
    replayed = await replay.replay(store)
    for ref in (ACME, GLOBEX):
        steps = [after async for _, after in replay.timeline(store, ref)]
        assert steps[-1] == replayed.connections[ref.stream] == await store.get_connection(ref)


async def test_until_a_position_or_a_time_ends_the_timeline(store: MemoryEventStore) -> None:
    """Records after the window are left out; a window before the stream's first record leaves nothing."""
    by_position = await timeline(store, ACME, replay.Until(position=3))
    assert [(t[0], t[3]) for t in by_position] == [
        (1, ConnectionState.PENDING),
        (2, ConnectionState.PENDING),
        (3, ConnectionState.ACTIVE),
    ]
    records = [record async for record in replay.records(store)]
    by_time = await timeline(store, GLOBEX, replay.Until(time=records[8].recorded_at))
    assert [t[0] for t in by_time] == [7, 8, 9]
    assert await timeline(store, GLOBEX, replay.Until(position=6)) == []


async def test_a_connection_without_records_has_an_empty_timeline() -> None:
    """Nothing is yielded for a stream the log does not have."""
    assert await timeline(MemoryEventStore(), ACME) == []


async def test_replayed_connections_are_found_by_id_narrowed_by_integration_and_environment() -> None:
    """named() lists every connection of that id, sorted, filtered by whichever of -i and -e is given."""
    store = MemoryEventStore()
    for n, ref in enumerate((GLOBEX, ACME_PROD, ACME_HUBSPOT, ACME)):
        validate = lifecycle(LifecycleEvent.VALIDATE_CONNECTION, n)
        await store.append(ref, 0, [validate])
    replayed = await replay.replay(store)

    assert replayed.named("acme") == [ACME_HUBSPOT, ACME, ACME_PROD]
    assert replayed.named("acme", integration="salesforce") == [ACME, ACME_PROD]
    assert replayed.named("acme", environment="dev") == [ACME_HUBSPOT, ACME]
    assert replayed.named("acme", integration="salesforce", environment="prod") == [ACME_PROD]
    assert replayed.named("initech") == []
