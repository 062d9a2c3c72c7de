"""Process isolation with the real daemon: stopping it, or killing it, while its worker processes are busy.

``orchestrator serve`` runs as a user runs it (uvloop, the CLI's settings),
with the isolation tests' plugin (tests/support/plugin) found through an entry
point on the daemon's ``PYTHONPATH``; ``sleeps`` calls the provider's
``/started`` and then takes a minute, so two creations leave two workers busy.
The setting comes from the flag in one test and from the environment in the
other (the config file's key is read in docs/configuration.md's table, by the
same code). A worker is found as a child of the daemon's pid in ``/proc``.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread
import pytest

from tests.support import grpc as rpc
from tests.support.plugins import ISOLATED, PLUGIN, install, pythonpath
from tests.support.process import children, ends, environment, serve
from tests.support.provider import ProviderServer, Reply

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

INTEGRATION = "isolated"
EXIT_WAIT = 10.0
"""Seconds a worker may take to notice that its daemon is gone (it takes milliseconds; ``sleeps`` takes 60 s)."""


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    """The integration's provider, answering ``/started``."""
    with ProviderServer() as server:
        server.route("GET", "/started", Reply(200, {}))
        yield server


def daemon_setup(tmp_path: Path, provider: ProviderServer, **settings: str) -> tuple[Path, dict[str, str]]:
    """The daemon's config file (the integration at ``provider``) and environment (the plugin; ``settings``)."""
    site = install(tmp_path / "site", "orchestrator-isolated", {"sleeps": ISOLATED["sleeps"]})
    config = tmp_path / "orchestrator.toml"
    config.write_text(f'[integrations.{INTEGRATION}]\nbase_url = "{provider.url}"\nauth = "none"\n')
    return config, environment(PYTHONPATH=pythonpath(PLUGIN, site), **settings)


async def busy_workers(address: str, daemon_pid: int, provider: ProviderServer) -> list[int]:
    """Two creations whose ``sleeps`` have both started: the daemon's two worker processes, busy."""
    for connection in ("c1", "c2"):
        await rpc.emit(address, rpc.CREATE, connection, INTEGRATION)
    await provider.wait_for(2, "GET", "/started")
    workers = await anyio.to_thread.run_sync(children, daemon_pid)
    assert len(workers) == 2, workers
    return workers


async def test_sigterm_with_busy_workers_drains_and_leaves_no_process(tmp_path: Path, provider: ProviderServer) -> None:
    """SIGTERM: the busy workers get the grace period, then are stopped and reaped; the daemon exits 0."""
    config, env = daemon_setup(tmp_path, provider)
    options = ("--config", str(config), "--isolation", "process", "--processes", "2", "--grace-period", "1")
    async with serve(tmp_path / "events.db", *options, env=env) as daemon:
        assert "event functions run in 2 worker process(es)" in daemon.text
        workers = await busy_workers(daemon.address, daemon.process.process.pid, provider)
        code = await daemon.stop()
    assert code == 0, str(daemon)
    left = [w for w in workers if not await anyio.to_thread.run_sync(ends, w, 0)]
    assert left == [], f"worker processes {left} outlived the daemon"


async def test_sigkill_of_the_daemon_ends_its_busy_workers(tmp_path: Path, provider: ProviderServer) -> None:
    """SIGKILL: nobody stops the workers, yet each ends (its pipe closes; on Linux the kernel kills it too)."""
    config, env = daemon_setup(tmp_path, provider, ORCHESTRATOR_ISOLATION="process", ORCHESTRATOR_PROCESSES="2")
    async with serve(tmp_path / "events.db", "--config", str(config), env=env) as daemon:
        assert "event functions run in 2 worker process(es)" in daemon.text
        workers = await busy_workers(daemon.address, daemon.process.process.pid, provider)
        assert await daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    for worker in workers:
        assert await anyio.to_thread.run_sync(ends, worker, EXIT_WAIT), f"worker {worker} outlived its daemon"
