"""What ``orchestrator`` loads before a command runs, and the version it reports."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest
from click.testing import CliRunner

from orchestrator.cli import main

HELP = [("--help",), ("replay", "--help")]
_LINE = re.compile(r"import time:\s+\d+ \|\s+\d+ \| +(\S+)$")


@functools.cache
def imported(*args: str) -> frozenset[str]:
    """Every module ``python -X importtime -m orchestrator ARGS`` imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "orchestrator", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    modules = frozenset(m[1] for m in map(_LINE.match, completed.stderr.splitlines()) if m)
    assert "orchestrator.cli" in modules, completed.stderr  # the parse found the command's imports
    return modules


@pytest.mark.parametrize("args", HELP, ids=" ".join)
@pytest.mark.parametrize("package", ["grpc", "httpx"])
def test_help_loads_no_network_client(args: tuple[str, ...], package: str) -> None:
    """``--help`` (and the offline ``replay``) load neither gRPC nor httpx: the commands that call out import them."""
    loaded = sorted(m for m in imported(*args) if m == package or m.startswith(package + "."))
    assert loaded == []


@pytest.mark.parametrize("args", HELP, ids=" ".join)
def test_help_loads_no_telemetry_sdk(args: tuple[str, ...]) -> None:
    """The OpenTelemetry SDK is for ``serve``; ``--help`` does not load it."""
    loaded = sorted(m for m in imported(*args) if m == "opentelemetry.sdk" or m.startswith("opentelemetry.sdk."))
    assert loaded == []


def test_version_is_the_installed_distributions() -> None:
    """``--version`` reports pyproject.toml's version, as installed; ``orchestrator.__version__`` is the same."""
    import orchestrator

    version = metadata.version("lifecycle-orchestrator")
    result = CliRunner().invoke(main, ["--version"])

    assert (result.exit_code, result.output) == (0, f"orchestrator, version {version}\n")
    assert orchestrator.__version__ == version
