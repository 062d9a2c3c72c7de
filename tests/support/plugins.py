"""Plugins installed for a test without pip: a ``*.dist-info`` naming their entry points, found through a path.

    path = install(tmp_path / "site", "orchestrator-crashloop", {"check-instance": "orchestrator_crashloop:check"})
    env = environment(PYTHONPATH=pythonpath(PLUGIN_DIR, tmp_path / "site"))   # a daemon (or its workers) finds them

:func:`discovered` loads the same entry points in the test's own process, as
the daemon's discovery does (the plugin's modules must be importable here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from orchestrator.plugins import GROUP, Registry, discover

PLUGIN = Path(__file__).resolve().parent / "plugin"
"""The folder of the test plugins: ``orchestrator_isolated``, the process isolation tests' (integration ``isolated``),
and ``orchestrator_lease``, the lease tests' (integration ``lease``)."""
ISOLATED = {
    "holds-the-loop": "orchestrator_isolated:holds_the_loop",
    "hangs": "orchestrator_isolated:hangs",
    "sleeps": "orchestrator_isolated:sleeps",
    "exits-once": "orchestrator_isolated:exits_once",
    "registers": "orchestrator_isolated:registers",
    "registers-sync": "orchestrator_isolated:registers_sync",
    "uses-an-sdk": "orchestrator_isolated:uses_an_sdk",
    "uses-an-sdk-sync": "orchestrator_isolated:uses_an_sdk_sync",
    "checks": "orchestrator_isolated:checks",
    "claims-misconfigured": "orchestrator_isolated:claims_misconfigured",
    "shows-its-context": "orchestrator_isolated:shows_its_context",
    "shows-its-context-sync": "orchestrator_isolated:shows_its_context_sync",
}
"""Its functions' entry points."""
LEASE = {"registers-slowly": "orchestrator_lease:registers_slowly"}
"""The lease tests' plugin (integration ``lease``): a creation function the test makes slow at its first attempt."""
BROKEN_IN_WORKERS = {"dies-in-workers": "orchestrator_isolated_broken:never_runs"}
"""A plugin whose module ends the interpreter of a worker process that imports it (the daemon imports it fine)."""


def install(directory: Path, distribution: str, functions: Mapping[str, str], *, version: str = "1.0") -> Path:
    """Write ``directory/<distribution>-<version>.dist-info`` declaring ``functions`` (name -> ``module:attribute``)."""
    info = directory / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    lines = [f"{name} = {target}" for name, target in functions.items()]
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n" + "\n".join(lines) + "\n")
    return directory


def pythonpath(*directories: Path) -> str:
    """A ``PYTHONPATH`` of ``directories`` ahead of this process's own."""
    return os.pathsep.join(filter(None, [*map(str, directories), os.environ.get("PYTHONPATH", "")]))


def discovered(directory: Path) -> Registry:
    """The event functions of the distributions under ``directory``, discovered as the daemon discovers plugins."""
    entry_points = [
        entry_point
        for distribution in metadata.distributions(path=[str(directory)])
        for entry_point in distribution.entry_points.select(group=GROUP)
    ]
    return discover(entry_points)
