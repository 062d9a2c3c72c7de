"""Fixtures for the integration tests: a real daemon on 127.0.0.1:0 with a real SQLite log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator import daemon as daemon_module
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.plugins import Registry

from ._daemon import Daemon, run_daemon


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio, the daemon's event loop."""
    return "asyncio"


@pytest.fixture(autouse=True)
def no_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve without event functions, whatever plugins the environment has installed.

    These tests pin the daemon's own behaviour (validation accepts, deletion
    completes at once); plugins installed in the same virtualenv (the example
    plugins under plugins/, a plugin half-way through ``pip install``) would
    otherwise run for the integrations the tests use, or stop the daemon from starting.
    """
    monkeypatch.setattr(daemon_module, "load_plugins", lambda *, skip_broken: Registry())
    monkeypatch.setattr(daemon_module, "discover_integrations", lambda: ({}, []))


@pytest.fixture
def database(tmp_path: Path) -> str:
    """The URL of a fresh SQLite event log in the test's temporary directory."""
    return f"sqlite:///{tmp_path}/events.db"


@pytest.fixture
async def daemon(database: str) -> AsyncIterator[Daemon]:
    """A daemon serving a fresh log, stopped (and awaited) after the test."""
    async with run_daemon(database) as running:
        yield running


@pytest.fixture
def stub(daemon: Daemon) -> pb_grpc.OrchestratorStub:
    """A grpc.aio client of ``orchestrator.v1.Orchestrator`` connected to the test's daemon."""
    return daemon.stub
