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
  store reads synchronously on the loop, or checks that no commit happened
  while it awaited the read (:attr:`RowCache.commits`).
- Before a commit, the writer's thread is given copies of the cached rows it
  needs (:meth:`RowCache.known`): the dictionary itself never crosses threads.

Bounded by :attr:`RowCache.capacity` rows, least recently used out: memory does
not grow with the number of connections.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from orchestrator.model import Connection

ROW_CACHE = 8192
"""Read-model rows a store keeps in memory unless told otherwise (a few MiB)."""


class RowCache:
    """The last committed read-model rows, by stream, least recently used evicted beyond ``capacity``."""

    __slots__ = ("_rows", "capacity", "commits", "hits", "misses")

    def __init__(self, capacity: int = ROW_CACHE) -> None:
        if capacity < 1:
            raise ValueError(f"a row cache holds at least one row, not {capacity}")
        self.capacity = capacity
        self._rows: OrderedDict[str, Connection] = OrderedDict()
        self.commits = 0
        """Commits applied so far: a read that awaited may fill the cache only if this has not moved."""
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, stream: str) -> Connection | None:
        """The committed row of ``stream`` if cached (counted as a hit or a miss)."""
        row = self._rows.get(stream)
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        self._rows.move_to_end(stream)
        return row

    def put(self, row: Connection) -> None:
        """Cache ``row``, read from the database (see the module's rules on when that is safe)."""
        self._store(row)
        self._evict()

    def committed(self, rows: Iterable[Connection]) -> None:
        """A commit wrote ``rows``: they are the truth from now on."""
        self.commits += 1
        for row in rows:
            self._store(row)
        self._evict()

    def known(self, streams: Iterable[str]) -> dict[str, Connection]:
        """The cached rows of ``streams`` (a new dictionary, for the writer's thread)."""
        rows = self._rows
        return {stream: rows[stream] for stream in streams if stream in rows}

    def _store(self, row: Connection) -> None:
        stream = row.ref.stream
        self._rows[stream] = row
        self._rows.move_to_end(stream)

    def _evict(self) -> None:
        rows = self._rows
        while len(rows) > self.capacity:
            rows.popitem(last=False)
