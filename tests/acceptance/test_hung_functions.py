"""A plain ``def`` that never returns cannot keep the daemon alive: SIGTERM ends it within the
grace period, whether the function is still within its timeout or was abandoned past it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support import plugins
from tests.support.process import Cli, Daemon, environment

HUNG = """
import threading

from orchestrator import on_event


@on_event("post-connection-creation", integration="hung", timeout={timeout})
def hang(ctx):
    print("hang: started", flush=True)
    threading.Event().wait()  # never returns, and no thread can be stopped
"""


@pytest.mark.parametrize("timeout", [1, 600], ids=["abandoned-past-its-timeout", "within-its-timeout"])
def test_sigterm_ends_a_daemon_whose_sync_function_hangs(tmp_path: Path, timeout: int) -> None:
    """Before the fix the interpreter waited for the hung thread at exit: the daemon never exited."""
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "hung_plugin.py").write_text(HUNG.format(timeout=timeout))
    site = plugins.install(tmp_path / "site", "hung-plugin", {"hang": "hung_plugin:hang"})
    path = plugins.pythonpath(tmp_path / "plugin", site)
    daemon = Daemon(tmp_path / "events.db", "--grace-period", "1", env=environment(PYTHONPATH=path))
    try:
        Cli(daemon, tmp_path).ok("emit", "post-connection-creation", "c1", "-i", "hung")
        daemon.stdout.wait_for("hang: started", 30)
        if timeout == 1:
            daemon.stderr.wait_for("function hang attempt 1 on dev/hung/c1: failed \\(Timeout", 30)
    finally:
        code = daemon.signal(signal.SIGTERM)
    assert code == 0, str(daemon)
    assert "exiting with 1 function thread(s) still running past their timeout" in daemon.stderr.text, str(daemon)
