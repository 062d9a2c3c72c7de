"""The version of the installed distribution; ``pyproject.toml`` is its one source."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("lifecycle-orchestrator")
except metadata.PackageNotFoundError:  # pragma: no cover - a source tree on sys.path, not installed
    VERSION = "0+unknown"
