"""The tail: the most recently committed records, kept in memory and shared by every follower of the log.

Every backend fills its :class:`Tail` at commit time, with the records it has
just committed, in position order, before the appends are acknowledged; the
tail then wakes every waiter once. A reader whose position is within the tail
(a follower that is caught up) is answered from memory, with no query; one
whose position is older than the tail's first record gets None and reads the
log itself (:meth:`~orchestrator.store.EventStore.read`) until it is back
within the tail.

The tail is bounded by :data:`TAIL_RECORDS` records and :data:`TAIL_BYTES`
bytes (each record weighed by :func:`weight`); the oldest records are evicted
first, so it always holds a contiguous run of positions ending at the head.

Each commit wakes its waiters once, one after the other: the first waiter
woken wakes the next as soon as it runs, and so on (a relay). The waiters of
one commit are thus never all runnable at once: with hundreds of followers,
whatever else the event loop has to do (the next emit) waits behind one or
two of them, not behind all of them. A waiter for one stream is woken only
by a commit with a record of that stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import anyio

from orchestrator.errors import Unavailable
from orchestrator.limits import MAX_PAGE_BYTES
from orchestrator.model import ConnectionRef
from orchestrator.records import Record

TAIL_RECORDS = 4096
"""Records the tail holds at most: at 100 emits/s of two records each, the last 20 seconds."""
TAIL_BYTES = 8 * 1024 * 1024
"""Bytes the tail holds at most, by :func:`weight` (JSON size); a record in memory weighs a few times that."""
RECORD_OVERHEAD = 256
"""What :func:`weight` adds to a record's text for the record itself (object, envelope, timestamps)."""


@dataclass(frozen=True, slots=True)
class TailBounds:
    """How much the tail holds at most: the oldest records go first beyond either bound."""

    records: int = TAIL_RECORDS
    bytes: int = TAIL_BYTES


DEFAULT_TAIL = TailBounds()
"""The tail a store keeps unless told otherwise."""


@dataclass(frozen=True, slots=True)
class TailPage:
    """Records read from the tail: what :meth:`~orchestrator.store.EventStore.read` would return, and where to go on."""

    records: list[Record]
    next_position: int
    """Where the next read starts: every record before it that the read asked for is in ``records``."""
    more: bool
    """The page stopped at its limit (of records or bytes) before the head: read again at once."""


def weight(record: Record, data_json: str) -> int:
    """What ``record`` counts for in the tail's byte bound: its text (``data`` as ``data_json``) plus an overhead."""
    return (
        len(data_json)
        + len(record.stream)
        + len(record.event_id)
        + len(record.type)
        + len(record.causation_id)
        + len(record.traceparent)
        + len(record.idempotency_key)
        + RECORD_OVERHEAD
    )


class Tail:
    """The last committed records, from :attr:`first` to :attr:`head`, and the signal of each commit."""

    def __init__(self, head: int = 0, bounds: TailBounds = DEFAULT_TAIL) -> None:
        if bounds.records < 1 or bounds.bytes < 1:
            raise ValueError(f"a tail holds at least one record and one byte, not {bounds}")
        self._bounds = bounds
        self._head = head
        self._records: list[Record] = []
        self._weights: list[int] = []
        self._bytes = 0
        self._waiting: deque[anyio.Event] = deque()
        """Waiters for the next commit, in the order they came."""
        self._streams: dict[str, deque[anyio.Event]] = {}
        """Waiters for the next commit of one stream, by stream."""
        self._touched: set[str] = set()
        """The streams of the records added since the last :meth:`wake`."""
        self._relay: deque[anyio.Event] = deque()
        """Waiters the last commit wakes, each woken by the one before it."""
        self._closed = False

    @property
    def head(self) -> int:
        """The position of the last committed record (0 when the log is empty)."""
        return self._head

    @property
    def first(self) -> int:
        """The position of the oldest record held (``head + 1`` when it holds none)."""
        return self._head + 1 - len(self._records)

    @property
    def bytes(self) -> int:
        """What the records held weigh (see :func:`weight`)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._records)

    def add(self, records: Sequence[Record], weights: Sequence[int]) -> bool:
        """Records just committed, in position order from ``head + 1``: keep them and evict the oldest.

        ``weights`` are the records' :func:`weight`, in the same order. Called once per
        commit, before the commit's appends are acknowledged, and followed by :meth:`wake`
        (whether there were records to add is returned).
        """
        if not records:
            return False
        if records[0].position != self._head + 1 or len(weights) != len(records):
            raise AssertionError(f"the tail at {self._head} was given positions from {records[0].position}")
        self._records.extend(records)
        self._weights.extend(weights)
        self._touched.update(record.stream for record in records)
        self._bytes += sum(weights)
        self._head = records[-1].position
        evict = max(0, len(self._records) - self._bounds.records)
        dropped = sum(self._weights[:evict])
        while self._bytes - dropped > self._bounds.bytes and evict < len(self._records):
            dropped += self._weights[evict]
            evict += 1
        if evict:
            self._bytes -= dropped
            del self._records[:evict]
            del self._weights[:evict]
        return True

    def read(
        self, *, from_position: int, ref: ConnectionRef | None = None, limit: int, max_bytes: int = MAX_PAGE_BYTES
    ) -> TailPage | None:
        """Up to ``limit`` records (and ``max_bytes``, at least one) from ``from_position``, of one stream or all.

        None when ``from_position`` is older than the tail's first record: those records are in the log only.
        """
        first = self.first
        from_position = max(from_position, 1)
        if from_position < first:
            return None
        start = from_position - first
        records: list[Record] = []
        budget = max_bytes
        stream = ref.stream if ref is not None else None
        held = self._records
        for index in range(start, len(held)):
            record = held[index]
            if stream is not None and record.stream != stream:
                continue
            if len(records) >= limit or (records and self._weights[index] > budget):
                return TailPage(records, records[-1].position + 1 if records else from_position, more=True)
            records.append(record)
            budget -= self._weights[index]
        return TailPage(records, max(from_position, self._head + 1), more=False)

    @property
    def waiters(self) -> int:
        """Waiters not woken yet."""
        return len(self._waiting) + sum(len(q) for q in self._streams.values()) + len(self._relay)

    def _arrived(self, position: int, ref: ConnectionRef | None) -> bool:
        """Whether a record at ``position`` or later (of ``ref``'s stream, when given) is committed."""
        if self._head < position:
            return False
        first = self.first
        if ref is None or position < first:
            return True  # a record is committed; or the tail cannot tell, but the log can
        held = self._records
        return any(held[index].stream == ref.stream for index in range(position - first, len(held)))

    async def wait_for(self, position: int, ref: ConnectionRef | None = None) -> None:
        """Return once a record at ``position`` or later is committed (of ``ref``'s stream, when given).

        Raises :class:`Unavailable` once the tail is closed.
        """
        while not self._arrived(position, ref):
            if self._closed:
                raise Unavailable("the event store is closed")
            woken = anyio.Event()
            queue = self._waiting if ref is None else self._streams.setdefault(ref.stream, deque())
            queue.append(woken)
            try:
                await woken.wait()
            finally:
                if woken.is_set():
                    self._pass()  # even when cancelled once woken: the relay goes on
                else:  # cancelled while waiting: leave the queues
                    self._leave(woken, queue, ref)

    def _leave(self, woken: anyio.Event, queue: deque[anyio.Event], ref: ConnectionRef | None) -> None:
        if woken in self._relay:
            self._relay.remove(woken)
            return
        queue.remove(woken)
        if ref is not None and not queue:
            del self._streams[ref.stream]

    def wake(self) -> None:
        """Wake, once and in turn, the waiters of every stream and those of the streams just added to."""
        self._relay.extend(self._waiting)
        self._waiting.clear()
        for stream in self._touched:
            self._relay.extend(self._streams.pop(stream, ()))
        self._touched.clear()
        self._pass()

    def close(self) -> None:
        """The store is closed: wake every waiter at once (they get :class:`Unavailable`)."""
        self._closed = True
        self._relay.extend(self._waiting)
        self._waiting.clear()
        for queue in self._streams.values():
            self._relay.extend(queue)
        self._streams.clear()
        while self._relay:
            self._relay.popleft().set()

    def _pass(self) -> None:
        """Wake the next waiter of the relay, if any."""
        if self._relay:
            self._relay.popleft().set()
