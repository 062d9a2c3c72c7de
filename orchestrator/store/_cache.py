"""The read-model cache: the last committed row of the connections a daemon touched, owned by its event loop.

A store that writes keeps one :class:`RowCache`. Only the event loop's thread
reads or changes it, so it needs no lock:

- After every commit, and before any write of that commit is acknowledged,
  the store puts the rows the commit wrote (:meth:`RowCache.committed`): a
  reader that has heard of a write finds its row here. A write that fails
  changes nothing here, so a failed append never leaves a row that the log
  does not hold.
- A read that misses fills it from the database (:meth:`RowCache.put`), but
  only when nothing can have committed between the read and the put: the
  store reads synchronously on the loop, never across an ``await``. A
  connection the database does not hold is cached too, as known to be absent
  (None): the one daemon that writes the log would have put the row of any
  commit that created it.
- Before a commit, the writer's thread is given copies of the cached rows it
  needs (:meth:`RowCache.known`): the dictionary itself never crosses threads.

Bounded by :attr:`RowCache.capacity` rows, least recently used out: memory does
not grow with the number of connections.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final, Literal

from orchestrator.model import Connection


class _Unknown(enum.Enum):
    UNKNOWN = "unknown"


UNKNOWN: Final = _Unknown.UNKNOWN
"""What :meth:`RowCache.get` returns for a stream it knows nothing of (None means: no such connection)."""
Cached = Connection | None | Literal[_Unknown.UNKNOWN]

ROW_CACHE = 8192
"""Read-model rows a store keeps in memory unless told otherwise (a few MiB)."""


class RowCache:
    """The last committed read-model rows, by stream, least recently used evicted beyond ``capacity``."""

    __slots__ = ("_rows", "capacity", "hits", "misses")

    def __init__(self, capacity: int = ROW_CACHE) -> None:
        if capacity < 1:
            raise ValueError(f"a row cache holds at least one row, not {capacity}")
        self.capacity = capacity
        self._rows: OrderedDict[str, Connection | None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, stream: str) -> Cached:
        """The committed row of ``stream``, None if it has none, :data:`UNKNOWN` if not cached (a miss)."""
        rows = self._rows
        if stream not in rows:
            self.misses += 1
            return UNKNOWN
        self.hits += 1
        rows.move_to_end(stream)
        return rows[stream]

    def put(self, stream: str, row: Connection | None) -> None:
        """Cache what the database holds for ``stream`` (see the module's rules on when that is safe)."""
        self._store(stream, row)
        self._evict()

    def committed(self, rows: Iterable[Connection]) -> None:
        """A commit wrote ``rows``: they are the truth from now on."""
        for row in rows:
            self._store(row.ref.stream, row)
        self._evict()

    def known(self, streams: Iterable[str]) -> dict[str, Connection]:
        """The cached rows of ``streams`` that exist (a new dictionary, for the writer's thread)."""
        rows = self._rows
        return {stream: row for stream in streams if (row := rows.get(stream)) is not None}

    def _store(self, stream: str, row: Connection | None) -> None:
        self._rows[stream] = row
        self._rows.move_to_end(stream)

    def _evict(self) -> None:
        rows = self._rows
        while len(rows) > self.capacity:
            rows.popitem(last=False)
