"""Offline replay: rebuild every connection from the log alone with the daemon's own fold.

Used by ``orchestrator replay``; reads through the store interface opened
read-only, so it works while the daemon runs and on any backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

from orchestrator import codec, state
from orchestrator.model import Connection, ConnectionQuery, ConnectionRef
from orchestrator.records import Record
from orchestrator.store import EventStore, scan

PAGE = 5000
_VERIFY_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Until:
    """Where to stop: after a position, or after the last record recorded at or before a time."""

    position: int | None = None
    time: datetime | None = None

    def admits(self, record: Record) -> bool:
        """Whether ``record`` is inside the window."""
        if self.position is not None and record.position > self.position:
            return False
        return self.time is None or record.recorded_at <= self.time


@dataclass(slots=True)
class Replayed:
    """The world as the log says it was at the end of the window."""

    connections: dict[str, Connection] = field(default_factory=dict)
    position: int = 0
    records: int = 0

    def named(self, connection_id: str, *, integration: str = "", environment: str = "") -> list[ConnectionRef]:
        """The connections called ``connection_id`` (of ``integration``, in ``environment``, when given), sorted."""
        return sorted(
            c.ref
            for c in self.connections.values()
            if c.ref.connection_id == connection_id
            and (not integration or c.ref.integration == integration)
            and (not environment or c.ref.environment == environment)
        )


async def records(
    store: EventStore, *, ref: ConnectionRef | None = None, until: Until | None = None
) -> AsyncIterator[Record]:
    """Every record (of one stream, or all) inside ``until``, in log order, page by page."""
    until = until or Until()
    async for record in scan(store, ref=ref, page=PAGE):
        if not until.admits(record):
            return
        yield record


async def timeline(
    store: EventStore, ref: ConnectionRef, *, until: Until | None = None
) -> AsyncIterator[tuple[Record, Connection]]:
    """One connection's records inside ``until``, each with the connection as the fold leaves it after the record."""
    connection: Connection | None = None
    async for record in records(store, ref=ref, until=until):
        connection = state.apply(connection, record)
        yield record, connection


async def replay(
    store: EventStore, *, until: Until | None = None, progress: Callable[[int], None] | None = None
) -> Replayed:
    """Fold the whole log (up to ``until``); ``progress`` is told each record's position."""
    out = Replayed()
    async for record in records(store, until=until):
        out.connections[record.stream] = state.apply(out.connections.get(record.stream), record)
        out.position = record.position
        out.records += 1
        if progress is not None and out.records % 1000 == 0:
            progress(record.position)
    return out


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the read model disagrees with the fold of the log."""

    stream: str
    field: str
    read_model: object
    replayed: object

    def __str__(self) -> str:
        return f"{self.stream}: {self.field}: read model has {self.read_model!r}, the log says {self.replayed!r}"


async def _read_model(store: EventStore) -> dict[str, Connection]:
    rows: dict[str, Connection] = {}
    after = ""
    while True:
        page = await store.list_connections(ConnectionQuery(after_stream=after, limit=1000))
        rows.update((c.ref.stream, c) for c in page)
        if len(page) < 1000:
            return rows
        after = page[-1].ref.stream


def diff(read_model: dict[str, Connection], replayed: dict[str, Connection]) -> list[Difference]:
    """Every field on which the two disagree, stream by stream."""
    out: list[Difference] = []
    for stream in sorted(read_model.keys() | replayed.keys()):
        have, want = read_model.get(stream), replayed.get(stream)
        if have is None or want is None:
            out.append(Difference(stream, "row", "present" if have else "missing", "present" if want else "missing"))
            continue
        a, b = codec.connection_to_json(have), codec.connection_to_json(want)
        out.extend(Difference(stream, key, a[key], b.get(key)) for key in sorted(a) if a[key] != b.get(key))
    return out


async def verify(store: EventStore, progress: Callable[[int], None] | None = None) -> list[Difference]:
    """Compare the read model with the fold of the log; empty when they agree.

    The daemon may append while this runs, so the read model is read first
    and the log folded up to the newest position it reflects; if the log moved
    underneath, the check is repeated before a difference is reported.
    """
    differences: list[Difference] = []
    for _ in range(_VERIFY_ATTEMPTS):
        head = await store.head()
        rows = await _read_model(store)
        seen = max((c.last_position for c in rows.values()), default=0)
        replayed = await replay(store, until=Until(position=seen), progress=progress)
        differences = diff(rows, replayed.connections)
        if not differences or await store.head() == head:
            return differences
    return differences
