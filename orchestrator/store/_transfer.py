"""A log's rows, read and written verbatim in bounded batches: what ``orchestrator migrate`` copies.

Four tables make a log, with the same columns on every SQL backend: the records
(``events``), the read model (``connections``), the jobs of every status
(``jobs``) and the sealed credentials (``credentials``, opaque bytes: no key is
needed to copy them). :data:`TABLES` names their columns in one order for both
backends and the key each is paged on (keyset paging, byte order on both).

- :class:`SQLiteSource` reads an SQLite log while it holds the daemon's lock
  (:class:`~orchestrator.store._sqlite_file.Lock`): no daemon writes the log
  while it is read, and none can start on it until the copy ends.
- :class:`SQLiteImport` and :class:`PostgresImport` (made by
  :meth:`PostgresEventStore.importing <orchestrator.store.postgres.PostgresEventStore.importing>`)
  write the rows into an empty log in **one transaction**: a copy that is
  interrupted leaves the target as it was (empty), and a daemon started on the
  target meanwhile waits for the copy (PostgreSQL: the head's row lock) instead
  of numbering records among the copied ones. Either refuses a target that holds
  any row, having written nothing.
- :func:`digest` hashes a table's rows in key order, for the check that both
  sides hold the same bytes.

Everything on SQLite blocks: callers run it on a worker thread.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from orchestrator.clock import Clock
from orchestrator.errors import LogInUse, StoreError
from orchestrator.store import _sqlite_file
from orchestrator.store._migrations import migrations
from orchestrator.store._postgres_write import wrap
from orchestrator.store._sqlite_rows import JOB_COLUMNS, RECORD_COLUMNS, SEALED_COLUMNS

if TYPE_CHECKING:
    from orchestrator.store._postgres_write import Db

Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Table:
    """One table of a log: its columns, in the order both backends are read and written in, and its key."""

    name: str
    columns: tuple[str, ...]
    key: str
    """The column rows are paged on (unique, first of :attr:`columns`)."""

    @property
    def select(self) -> str:
        """The column list of a ``SELECT``."""
        return ", ".join(self.columns)


def _columns(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(","))


TABLES = (
    Table("events", _columns(RECORD_COLUMNS), "position"),
    Table(
        "connections",
        ("stream", "environment", "integration", "connection_id", "state", "version", "last_position", "body"),
        "stream",
    ),
    Table("jobs", _columns(JOB_COLUMNS), "job_id"),
    Table("credentials", (*_columns(SEALED_COLUMNS), "updated_at"), "stream"),
)
"""The tables a log is made of, records first."""


def _refusal(where: object, counts: dict[str, int]) -> StoreError:
    held = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
    return StoreError(
        f"the target {where} is not empty (it holds {held}): migrate copies into an empty log only, and writes"
        " nothing here. To start over, point --to at a new database, schema or file, or drop this one's tables"
        " (PostgreSQL: DROP SCHEMA ... CASCADE; SQLite: delete the file) if it holds nothing you need"
    )


def empty_or_refuse(where: object, counts: dict[str, int]) -> None:
    """Raise :class:`StoreError` (how to start over) unless every table of ``counts`` is empty."""
    if any(counts.values()):
        raise _refusal(where, counts)


class Digest:
    """A running SHA-256 of a table's rows, in key order: two logs whose digests agree hold the same bytes."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.rows = 0

    def update(self, rows: Sequence[Sequence[Any]]) -> None:
        """Add ``rows`` (in key order)."""
        for row in rows:
            self._hash.update(repr(tuple(row)).encode())
        self.rows += len(rows)

    def hexdigest(self) -> str:
        """The hash so far."""
        return self._hash.hexdigest()


# -- SQLite ---------------------------------------------------------------------------------


class SQLiteSource:
    """An SQLite log read as rows, owned (the daemon's lock) from :meth:`open` to :meth:`close`; blocks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: _sqlite_file.Lock | None = None
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        """Take the log's lock (refused while a daemon owns it) and open it read-only."""
        if not self.path.is_file():
            raise StoreError(f"no event log at {self.path}")
        lock = _sqlite_file.Lock(self.path.resolve(), shown=self.path)
        try:
            lock.acquire()
        except LogInUse as exc:
            raise LogInUse(
                f"the event log {self.path} is in use by pid {exc.holder}: stop that daemon first (migrate copies a log"
                " no daemon writes; it holds the daemon's lock while it copies, so none starts on it meanwhile)",
                path=self.path,
                holder=exc.holder,
            ) from None
        self._lock = lock
        try:
            self._db = sqlite3.connect(
                f"file:{quote(str(self.path))}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            self._check_schema(self._db)
        except BaseException:
            self.close()
            raise

    def _check_schema(self, db: sqlite3.Connection) -> None:
        try:
            applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not an orchestrator event log, or it is damaged ({exc})") from exc
        known = {m.number for m in migrations("sqlite")}
        if applied != known:
            newer = applied - known
            raise StoreError(
                f"{self.path} has schema version {max(applied, default=0)}, but this orchestrator's is {max(known)}: "
                + ("upgrade the orchestrator" if newer else "start this release's daemon on it once to upgrade it")
                + " before migrating"
            )

    @property
    def db(self) -> sqlite3.Connection:
        """The read-only connection (open)."""
        assert self._db is not None, "open() first"
        return self._db

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        return {t.name: int(self.db.execute(f"SELECT COUNT(*) FROM {t.name}").fetchone()[0]) for t in TABLES}

    def head(self) -> tuple[int, int]:
        """The last position and the latest ``recorded_at`` (0, 0 when the log is empty)."""
        position, recorded_at = self.db.execute(
            "SELECT COALESCE(MAX(position), 0), COALESCE(MAX(recorded_at), 0) FROM events"
        ).fetchone()
        return int(position), int(recorded_at)

    def page(self, table: Table, after: Any, limit: int) -> list[Row]:
        """Up to ``limit`` rows of ``table`` after the key ``after`` (None: from the first), in key order."""
        return sqlite_page(self.db, table, after, limit)

    def close(self) -> None:
        """Close the connection, then drop the lock (closing first: the lock's release drops SQLite's locks too)."""
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def sqlite_page(db: sqlite3.Connection, table: Table, after: Any, limit: int) -> list[Row]:
    """Up to ``limit`` rows of ``table`` after the key ``after`` (None: from the first), in key order."""
    where = "" if after is None else f" WHERE {table.key} > ?"
    params: tuple[Any, ...] = (limit,) if after is None else (after, limit)
    sql = f"SELECT {table.select} FROM {table.name}{where} ORDER BY {table.key} LIMIT ?"
    return [tuple(row) for row in db.execute(sql, params).fetchall()]


def sqlite_rows(db: sqlite3.Connection, table: Table, batch: int) -> Iterator[list[Row]]:
    """Every row of ``table``, ``batch`` at a time."""
    after = None
    while rows := sqlite_page(db, table, after, batch):
        yield rows
        after = rows[-1][0]


class SQLiteImport:
    """Rows written into an empty SQLite log (created if missing) in one transaction; blocks.

    Holds the log's lock from :meth:`open` to :meth:`close`: no daemon starts on it meanwhile.
    """

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._lock: _sqlite_file.Lock | None = None
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        """Create the log if missing, own it, refuse it unless empty, and begin the transaction."""
        real = self.path.resolve()
        _sqlite_file.make_directories(real.parent)
        if not real.exists():
            _sqlite_file.create(real, self._clock)
        lock = _sqlite_file.Lock(real, shown=self.path)
        lock.acquire()
        self._lock = lock
        try:
            self._db = sqlite3.connect(
                f"file:{quote(str(real))}?mode=rw", uri=True, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA busy_timeout = 10000")
            try:
                counts = {t.name: int(self._db.execute(f"SELECT COUNT(*) FROM {t.name}").fetchone()[0]) for t in TABLES}
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"the target {self.path} is not an orchestrator event log ({exc})") from exc
            empty_or_refuse(self.path, counts)
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.close()
            raise

    def load(self, table: Table, rows: Sequence[Row]) -> None:
        """Insert ``rows`` (columns of ``table``) in the transaction."""
        assert self._db is not None
        marks = ", ".join("?" for _ in table.columns)
        self._db.executemany(f"INSERT INTO {table.name} ({table.select}) VALUES ({marks})", rows)

    def commit(self) -> None:
        """Commit the copy (durable: the log's ``synchronous`` setting is FULL on a new file)."""
        assert self._db is not None
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Roll back what is not committed, close, and drop the lock."""
        if self._db is not None:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


# -- PostgreSQL -----------------------------------------------------------------------------


class PostgresImport:
    """Rows written into an empty PostgreSQL log in the transaction open on ``con`` (see the module).

    :meth:`start` takes the head's row lock first: every append of a daemon on this log waits
    for the copy to commit, then numbers its records after the copied ones.
    """

    def __init__(self, con: Db, schema: str, where: str) -> None:
        self._con = con
        self._schema = schema
        self._where = where

    async def start(self) -> None:
        """Lock the head and refuse the log unless every table is empty."""
        try:
            await self._con.execute("SELECT position FROM log_head FOR UPDATE")
            counts = {t.name: int(await self._con.fetchval(f"SELECT COUNT(*) FROM {t.name}")) for t in TABLES}
        except Exception as exc:
            raise wrap(exc) from None
        empty_or_refuse(self._where, counts)

    async def load(self, table: Table, rows: Sequence[Row]) -> None:
        """Copy ``rows`` (columns of ``table``) in (``COPY``: one round trip per batch)."""
        try:
            await self._con.copy_records_to_table(
                table.name, records=rows, columns=list(table.columns), schema_name=self._schema
            )
        except Exception as exc:
            raise wrap(exc) from None

    async def finish(self, head: int, recorded_at: int) -> None:
        """Set the head to the source's (the next append continues its positions and times)."""
        try:
            await self._con.execute("UPDATE log_head SET position = $1, recorded_at = $2", head, recorded_at)
        except Exception as exc:
            raise wrap(exc) from None


async def postgres_page(con: Db, table: Table, after: Any, limit: int) -> list[Row]:
    """Up to ``limit`` rows of ``table`` after the key ``after`` (None: from the first), in key order."""
    if after is None:
        rows = await con.fetch(f"SELECT {table.select} FROM {table.name} ORDER BY {table.key} LIMIT $1", limit)
    else:
        rows = await con.fetch(
            f"SELECT {table.select} FROM {table.name} WHERE {table.key} > $1 ORDER BY {table.key} LIMIT $2",
            after,
            limit,
        )
    return [tuple(row) for row in rows]
