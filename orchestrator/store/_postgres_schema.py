"""The PostgreSQL log's database: its URL, its names, and its schema, checked and migrated at start.

A log lives in the schema its connections create tables in (``current_schema()``: ``public``
unless the URL names another, e.g. ``?search_path=orchestrator``). Every daemon of one log
derives the same names from that schema: the keys of its advisory locks and the channels of
its notifications, so two logs in two schemas of one database never lock or wake each other.

Migrations are the numbered files of ``store/sql/postgres/``, applied in order, each in its own
transaction, and recorded in ``schema_migrations``, all under a session-level advisory lock:
daemons that start at once apply each migration once, the others wait for the lock and then
find them applied. A database with a migration this release does not know is refused.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from orchestrator import codec
from orchestrator.clock import Clock
from orchestrator.errors import StoreError
from orchestrator.store._migrations import check_known, migrations

if TYPE_CHECKING:
    from orchestrator.store._postgres_write import Db

log = logging.getLogger(__name__)

BACKEND = "postgres"
"""The folder of the migrations, ``store/sql/postgres/``."""
MIGRATION_TIMEOUT = 3600.0
"""Seconds a migration (or the wait for another daemon's) may take: far beyond a statement's usual bound."""
CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
    " applied_at BIGINT NOT NULL)"
)


def lock_key(schema: str, name: str) -> int:
    """A 64-bit advisory lock key for ``name`` (a stream, or ``migrations``) in ``schema``, the same in any process."""
    digest = hashlib.blake2b(f"{schema}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def channel(schema: str, kind: str) -> str:
    """The notification channel of ``kind`` (``log`` or ``jobs``) for the log in ``schema``."""
    return f"orchestrator_{kind}_{hashlib.blake2b(schema.encode(), digest_size=4).hexdigest()}"


async def current_schema(con: Db, where: str) -> str:
    """The schema the log's tables are in: the first of the connection's ``search_path`` that exists."""
    schema: str | None = await con.fetchval("SELECT current_schema()")
    if schema is None:
        raise StoreError(
            f"{where} has no schema to keep the event log in: no schema of the search_path exists;"
            " create it (CREATE SCHEMA ...), or correct ?search_path= in --database"
        )
    return schema


async def migrate(con: Db, schema: str, where: str, clock: Clock, *, init: bool) -> None:
    """Apply every migration the log in ``schema`` lacks, under the migrations' advisory lock.

    A schema holding other tables and no log is refused unless ``init`` (the log's tables are then
    made beside them). ``migrations(BACKEND)`` must have been read already (off the event loop).
    """
    key = lock_key(schema, "migrations")
    await con.execute("SELECT pg_advisory_lock($1)", key, timeout=MIGRATION_TIMEOUT)
    try:
        await _check_is_a_log(con, schema, where, init=init)
        await con.execute(CREATE_TABLE)
        rows = await con.fetch("SELECT version FROM schema_migrations")
        applied = check_known(BACKEND, {row[0] for row in rows}, where)
        for migration in migrations(BACKEND):
            if migration.number in applied:
                continue
            log.info("applying migration %s to %s", migration.name, where)
            async with con.transaction():
                await con.execute(migration.sql, timeout=MIGRATION_TIMEOUT)
                await con.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                    migration.number,
                    migration.name,
                    codec.to_micros(clock.now()),
                )
    finally:
        await con.execute("SELECT pg_advisory_unlock($1)", key)


async def check_schema(con: Db, schema: str, where: str) -> None:
    """Refuse (read-only opens) a schema with no log, or with a migration this release does not know."""
    if not await _has_table(con, schema, "schema_migrations"):
        raise StoreError(f"no event log in {where} (schema {schema}): start the daemon on it once to create one")
    check_known(BACKEND, {row[0] for row in await con.fetch("SELECT version FROM schema_migrations")}, where)


async def _has_table(con: Db, schema: str, table: str) -> bool:
    found: bool = await con.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2)", schema, table
    )
    return found


async def _check_is_a_log(con: Db, schema: str, where: str, *, init: bool) -> None:
    names = sorted(row[0] for row in await con.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema))
    if "schema_migrations" in names or not names or init:
        return
    listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise StoreError(
        f"{where} (schema {schema}) holds other tables ({listed}) and no event log: point --database at a database"
        " of its own (or a schema of its own, with ?search_path=), or run `orchestrator serve --init` once to"
        " create the log's tables beside them"
    )
