"""Schema migrations: numbered ``.sql`` files under ``store/sql/<backend>/``, applied in order at start.

Each is applied in a transaction of its own and recorded in
``schema_migrations``. A database with a migration this release does not
know is refused (no accidental downgrade). The file discovery and that check
are shared by every SQL backend; each backend runs the scripts its own way.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from orchestrator import codec
from orchestrator.clock import Clock
from orchestrator.errors import StoreError

log = logging.getLogger(__name__)

CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
    " applied_at INTEGER NOT NULL)"
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    number: int
    name: str
    sql: str


@functools.cache
def migrations(backend: str) -> tuple[Migration, ...]:
    """Every migration shipped for ``backend``, in order (read once: call it off the event loop)."""
    folder = resources.files("orchestrator.store") / "sql" / backend
    found = [
        Migration(int(entry.name.split("_", 1)[0]), entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return tuple(sorted(found, key=lambda m: m.number))


def check_known(backend: str, applied: set[int], where: Path | str) -> set[int]:
    """``applied``, unless it holds a migration this release does not know (:class:`StoreError`)."""
    known = {m.number for m in migrations(backend)}
    if applied - known:
        raise StoreError(
            f"{where} has schema version {max(applied)}, newer than this orchestrator knows"
            f" ({max(known)}): upgrade the orchestrator"
        )
    return applied


def migrate_sqlite(db: sqlite3.Connection, path: Path, clock: Clock) -> None:
    """Apply every SQLite migration ``db`` lacks, each in its own transaction."""
    db.execute(CREATE_TABLE)
    applied = check_known("sqlite", {row[0] for row in db.execute("SELECT version FROM schema_migrations")}, path)
    for migration in migrations("sqlite"):
        if migration.number in applied:
            continue
        log.info("applying migration %s to %s", migration.name, path)
        stamp = codec.to_micros(clock.now())
        db.executescript(
            f"BEGIN IMMEDIATE;\n{migration.sql}\n"
            "INSERT INTO schema_migrations (version, name, applied_at)"
            f" VALUES ({migration.number}, '{migration.name}', {stamp});\n"
            "COMMIT;"
        )
