"""Event functions installed for a daemon subprocess without pip: a ``*.dist-info`` on its ``PYTHONPATH``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def install(site: Path, distribution: str, functions: Mapping[str, str], *modules: Path) -> str:
    """Write ``site/<distribution>-1.0.dist-info`` naming ``functions`` (entry point name -> ``module:attribute``)
    in group ``orchestrator.functions``; the ``PYTHONPATH`` (``modules``' folders, ``site``, the current one)
    under which a daemon discovers them as the plugin ``distribution`` 1.0."""
    info = site / f"{distribution.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    lines = [f"{name} = {target}" for name, target in functions.items()]
    (info / "entry_points.txt").write_text("[orchestrator.functions]\n" + "\n".join(lines) + "\n")
    return os.pathsep.join(filter(None, [*map(str, modules), str(site), os.environ.get("PYTHONPATH", "")]))
