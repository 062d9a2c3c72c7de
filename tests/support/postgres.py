"""A PostgreSQL server for the tests: a database of their own per session, a schema of its own per log.

The server is ``ORCHESTRATOR_TEST_POSTGRES`` (default: the local one that ``scripts/test``
starts, ``postgresql://postgres@127.0.0.1:5432/test``). A session creates the database
``orch_test_<random>`` from it and drops it at its end; each log is a schema of that
database (``?search_path=...`` in its URL), so that every test starts from an empty log.
Where no server answers, the tests that need one skip, saying why; under ``CI=true`` they
fail instead (CI must not pass by skipping them).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

SERVER_ENV = "ORCHESTRATOR_TEST_POSTGRES"
SERVER = "postgresql://postgres@127.0.0.1:5432/test"


def server_url() -> str:
    """The URL of the server's maintenance database, from which test databases are made."""
    return os.environ.get(SERVER_ENV, SERVER)


def with_database(url: str, database: str) -> str:
    """``url`` naming ``database`` instead."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}", query=""))


def with_schema(url: str, schema: str) -> str:
    """``url`` whose connections keep their tables in ``schema``."""
    return f"{url}?search_path={schema}"


def unavailable(reason: str) -> None:
    """Skip the test for want of PostgreSQL, or fail it under ``CI=true``."""
    message = (
        f"PostgreSQL is not reachable at {server_url()} ({reason}): start it (scripts/test does) or set {SERVER_ENV}"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; under CI=true the PostgreSQL tests must run", pytrace=False)
    pytest.skip(message)


async def _admin(url: str, statement: str) -> None:
    con = await asyncpg.connect(url, timeout=5)
    try:
        await con.execute(statement)
    finally:
        await con.close()


@contextmanager
def session_database() -> Iterator[str]:
    """A new database for the session (its URL), dropped at the end; skips (or fails, under CI) without a server."""
    name = f"orch_test_{secrets.token_hex(4)}"
    server = server_url()
    try:
        asyncio.run(_admin(server, f"CREATE DATABASE {name}"))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        unavailable(str(exc) or type(exc).__name__)
    try:
        yield with_database(server, name)
    finally:
        asyncio.run(_admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


class Schemas:
    """Fresh schemas in the session's database, each a log of its own, dropped when the test ends."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._made: list[str] = []

    async def new(self) -> str:
        """The URL of a log in a new, empty schema."""
        name = f"log_{secrets.token_hex(4)}"
        await _admin(self.database, f"CREATE SCHEMA {name}")
        self._made.append(name)
        return with_schema(self.database, name)

    async def drop(self) -> None:
        """Drop every schema made (what a test's stores left in them with it)."""
        for name in self._made:
            await _admin(self.database, f"DROP SCHEMA IF EXISTS {name} CASCADE")
        self._made.clear()


async def terminate(database: str, pid: int) -> bool:
    """End the server process ``pid`` (a connection of a store), as a restart or a failover would."""
    con = await asyncpg.connect(database, timeout=5)
    try:
        ended: bool = await con.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await con.close()
    return ended
