"""The pure core stays cheap to import: no HTTP client, gRPC or OpenTelemetry SDK behind the fold."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("httpx", "grpc", "opentelemetry.sdk", "pydantic", "anyio", "aiosqlite")


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statement``."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize("module", ["orchestrator.state", "orchestrator.records", "orchestrator"])
def test_the_fold_loads_no_io_library(module: str) -> None:
    """Importing the fold (or the package itself) loads none of the heavy I/O libraries."""
    loaded = loaded_after(f"import {module}")
    assert module in loaded
    assert not {m for m in loaded if m.split(".")[0] in HEAVY or m.startswith(HEAVY)}


def test_the_plugin_api_still_resolves_on_first_use() -> None:
    """``orchestrator.Context`` is imported lazily, on first access, and is the real class."""
    loaded = loaded_after("import orchestrator\nassert orchestrator.Context.__module__ == 'orchestrator.context'")
    assert "orchestrator.context" in loaded
