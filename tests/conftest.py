"""Fixtures shared by every test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from blockbuster import blockbuster_ctx

from tests.support.postgres import Schemas, session_database


@pytest.fixture
def anyio_backend() -> str:
    """Run ``@pytest.mark.anyio`` tests on asyncio, the loop the daemon runs on."""
    return "asyncio"


# Tests whose code must never block the event loop: the stores and the in-process daemon.
# (Elsewhere tests block on purpose, with subprocesses and files, or run no loop at all.)
NON_BLOCKING = (
    "tests/contract/",
    "tests/integration/test_server.py",
    "tests/integration/test_functions_grpc.py",
    "tests/integration/test_wire_input.py",
    "tests/integration/test_access.py",
    "tests/integration/test_console.py",
    "tests/integration/test_isolation.py",
    "tests/reliability/test_fuzz_grpc.py",
    "tests/observability/test_trace_in_process.py",
    "tests/reliability/test_storage_faults.py",
)
ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--long``: the long mode of the reliability tests (tests/reliability; see docs/reliability.md).

    It is registered here, at the tests' root, because pytest reads options before it
    collects a subfolder's conftest: ``pytest --long`` from the repository's root would
    not know an option registered in tests/reliability/conftest.py.
    """
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the long mode of the reliability tests (tests/reliability): more cycles, more cases",
    )


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A PostgreSQL database of this session's own (its URL), dropped at its end; see tests/support/postgres.py.

    The tests that use it skip, saying why, where no PostgreSQL answers (and fail under ``CI=true``).
    """
    with session_database() as url:
        yield url


@pytest.fixture
async def postgres_schemas(postgres_database: str) -> AsyncIterator[Schemas]:
    """Makes logs in new schemas of the session's database (``await schemas.new()``), dropped after the test."""
    schemas = Schemas(postgres_database)
    try:
        yield schemas
    finally:
        await schemas.drop()


@pytest.fixture(autouse=True)
def no_blocking_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test of NON_BLOCKING whose code makes a blocking call on the event loop (blockbuster)."""
    if not request.node.path.relative_to(ROOT).as_posix().startswith(NON_BLOCKING):
        yield
        return
    with blockbuster_ctx() as blockbuster:
        # grpc.aio joins its poller thread when the last server or channel goes away, from a
        # finalizer at whatever moment the GC chooses; its Cython frames are invisible here, so
        # thread joins are allowed (every other blocking call is still caught).
        for name in ("threading.Lock.acquire", "threading.Lock.acquire_lock"):
            blockbuster.functions[name].can_block_in("threading.py", {"_wait_for_tstate_lock"})
        # The one SQLite call the daemon makes on its loop by design: a read-model row by primary
        # key, with busy_timeout 0 (it never waits for a lock; see SQLiteEventStore._look_up).
        for name in ("sqlite3.Connection.execute", "sqlite3.Cursor.fetchall"):
            blockbuster.functions[name].can_block_in("orchestrator/store/sqlite.py", {"_look_up"})
        # asyncpg reads ~/.pgpass and ~/.postgresql/ (stat and open of small local files) as it makes a
        # connection, on the loop: at connect time only (the pool's connections, the listener's reconnects).
        for name in blockbuster.functions:
            blockbuster.functions[name].can_block_in("asyncpg/connect_utils.py", {"_parse_connect_dsn_and_args"})
        yield
