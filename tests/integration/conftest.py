"""Fixtures for the integration tests: a real daemon on 127.0.0.1:0 with a real SQLite log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.plugins import Registry
from tests.support.daemon import Daemon, run_daemon


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio, the daemon's event loop."""
    return "asyncio"


@pytest.fixture
def database(tmp_path: Path) -> str:
    """The URL of a fresh SQLite event log in the test's temporary directory."""
    return f"sqlite:///{tmp_path}/events.db"


@pytest.fixture
async def daemon(database: str) -> AsyncIterator[Daemon]:
    """A daemon without event functions serving a fresh log, stopped (and awaited) after the test.

    Without functions validation accepts and deletion completes at once, which
    is the behaviour these tests pin; the plugins installed in the virtualenv
    (the examples under plugins/) would otherwise run for the integrations used here.
    """
    async with run_daemon(database, registry=Registry()) as running:
        yield running


@pytest.fixture
def stub(daemon: Daemon) -> pb_grpc.OrchestratorStub:
    """A grpc.aio client of ``orchestrator.v1.Orchestrator`` connected to the test's daemon."""
    return daemon.stub
