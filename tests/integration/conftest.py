"""Fixtures for the integration tests: a real daemon on 127.0.0.1:0 with a real SQLite log.

The daemon runs in-process (``orchestrator.daemon.serve``) inside a task group
of the test's event loop; the tests talk to it with grpc.aio clients over TCP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import grpc
import pytest

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.config import ServeConfig
from orchestrator.daemon import serve

STARTUP_TIMEOUT = 30


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio (the daemon's loop)."""
    return "asyncio"


@dataclass(frozen=True)
class Daemon:
    """A running daemon and a client channel to it."""

    port: int
    database: str
    channel: grpc.aio.Channel
    stub: pb_grpc.OrchestratorStub
    stop: anyio.Event
    """Set it to make the daemon drain and stop (the fixture sets it at teardown anyway)."""


@asynccontextmanager
async def run_daemon(database: str) -> AsyncIterator[Daemon]:
    """Serve ``database`` on an ephemeral loopback port until the block ends."""
    ready = anyio.Event()
    stop = anyio.Event()
    ports: list[int] = []

    def on_ready(port: int) -> None:
        ports.append(port)
        ready.set()

    config = ServeConfig(listen="127.0.0.1:0", database=database, grace_period=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(serve, config, on_ready=on_ready, stop=stop))
        with anyio.fail_after(STARTUP_TIMEOUT):
            await ready.wait()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                yield Daemon(ports[0], database, channel, pb_grpc.OrchestratorStub(channel), stop)
        finally:
            stop.set()


@pytest.fixture
def database(tmp_path: Path) -> str:
    """The URL of a fresh SQLite event log in the test's temporary directory."""
    return f"sqlite:///{tmp_path}/events.db"


@pytest.fixture
async def daemon(database: str) -> AsyncIterator[Daemon]:
    """A daemon serving a fresh log, stopped after the test."""
    async with run_daemon(database) as running:
        yield running


@pytest.fixture
def stub(daemon: Daemon) -> pb_grpc.OrchestratorStub:
    """A grpc.aio client of ``orchestrator.v1.Orchestrator`` on the test's daemon."""
    return daemon.stub
