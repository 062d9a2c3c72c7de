"""The release, read from the installed distribution's metadata (``pyproject.toml`` is its one source)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "lifecycle-orchestrator"

try:
    VERSION = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # pragma: no cover - a source tree on sys.path, not installed
    VERSION = "0+unknown"
