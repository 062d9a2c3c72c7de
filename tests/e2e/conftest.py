"""Fixtures for the end-to-end tests: real ``orchestrator`` subprocesses on 127.0.0.1 and real SQLite logs."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.grpc import Api
from tests.support.process import Cli, Daemon, drained


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon shared by the CLI tests; at the end SIGTERM must drain it to exit code 0 without a traceback."""
    with drained(tmp_path_factory.mktemp("daemon") / "events.db") as running:
        yield running
    assert "Traceback" not in running.stderr.text, str(running)


@pytest.fixture(scope="session")
def api(daemon: Daemon) -> Iterator[Api]:
    """The shared daemon's gRPC API, to arrange state for the command under test."""
    client = Api(daemon.address)
    yield client
    client.close()


@pytest.fixture
def cli(daemon: Daemon, tmp_path: Path) -> Cli:
    """The CLI talking to the shared daemon, run from the test's own temporary directory."""
    return Cli(daemon, tmp_path)


@pytest.fixture
def name() -> str:
    """A fresh name for this test's connections and integration, so tests sharing the daemon never meet."""
    return f"e2e-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., Daemon]]:
    """Start daemons on log files (``url=``: another spelling of the file); any still running at the end is killed."""
    started: list[Daemon] = []

    def start(database: Path, url: str | None = None) -> Daemon:
        started.append(Daemon(database, url=url))
        return started[-1]

    yield start
    for running in started:
        running.signal(signal.SIGKILL)
