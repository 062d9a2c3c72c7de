"""An in-process event store: the reference backend for tests. Nothing survives the process."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from orchestrator.clock import Clock, SystemClock
from orchestrator.errors import IdempotencyConflict, Unavailable
from orchestrator.model import Connection, ConnectionQuery, ConnectionRef, NewEvent, Record
from orchestrator.store import Appended
from orchestrator.store._append import plan_append


class MemoryEventStore:
    """The :class:`~orchestrator.store.EventStore` contract kept in lists and dicts."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._log: list[Record] = []
        self._streams: dict[str, list[Record]] = {}
        self._connections: dict[str, Connection] = {}
        self._keys: dict[tuple[str, str], Record] = {}
        self._lock = anyio.Lock()
        self._changed = anyio.Event()
        self._closed = False
        self._last_time = self._clock.now()

    async def append(self, ref: ConnectionRef, expected_version: int, events: Sequence[NewEvent]) -> Appended:
        """See :meth:`EventStore.append`."""
        async with self._lock:
            if self._closed:
                raise Unavailable("the event store is closed")
            for event in events:
                if event.idempotency_key and (ref.stream, event.idempotency_key) in self._keys:
                    raise IdempotencyConflict(f"idempotency key {event.idempotency_key!r} is already used")
            self._last_time = max(self._last_time, self._clock.now())
            records, connection = plan_append(
                self._connections.get(ref.stream),
                ref,
                expected_version,
                events,
                first_position=len(self._log) + 1,
                recorded_at=self._last_time,
            )
            self._log.extend(records)
            self._streams.setdefault(ref.stream, []).extend(records)
            self._connections[ref.stream] = connection
            for record in records:
                if record.idempotency_key:
                    self._keys[(ref.stream, record.idempotency_key)] = record
            self._notify()
            return Appended(tuple(records), connection)

    async def get_connection(self, ref: ConnectionRef) -> Connection | None:
        """See :meth:`EventStore.get_connection`."""
        return self._connections.get(ref.stream)

    async def list_connections(self, query: ConnectionQuery) -> list[Connection]:
        """See :meth:`EventStore.list_connections`."""
        rows = (
            c
            for stream, c in sorted(self._connections.items())
            if stream > query.after_stream
            and (not query.environment or c.ref.environment == query.environment)
            and (not query.integration or c.ref.integration == query.integration)
            and (query.state is None or c.state is query.state)
        )
        out: list[Connection] = []
        for connection in rows:
            if len(out) == query.limit:
                break
            out.append(connection)
        return out

    async def find_idempotent(self, ref: ConnectionRef, key: str) -> Record | None:
        """See :meth:`EventStore.find_idempotent`."""
        return self._keys.get((ref.stream, key))

    async def read(
        self, *, from_position: int = 1, ref: ConnectionRef | None = None, limit: int = 1000
    ) -> list[Record]:
        """See :meth:`EventStore.read`."""
        if ref is None:
            start = max(from_position, 1) - 1
            return self._log[start : start + limit]
        stream = self._streams.get(ref.stream, [])
        return [r for r in stream if r.position >= from_position][:limit]

    async def head(self) -> int:
        """See :meth:`EventStore.head`."""
        return len(self._log)

    async def wait_for(self, position: int) -> None:
        """See :meth:`EventStore.wait_for`."""
        while len(self._log) < position:
            if self._closed:
                raise Unavailable("the event store is closed")
            await self._changed.wait()

    def close(self) -> None:
        """Refuse further appends and wake every waiter."""
        self._closed = True
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
