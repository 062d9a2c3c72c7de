"""The release, read from the installed distribution's metadata (pyproject.toml is its one source)."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "lifecycle-orchestrator"

try:
    VERSION = metadata.version(DISTRIBUTION)
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"
