"""The acceptance tests' own tools: the emit that creates their connection, and a fresh virtualenv.

The commands they run are :mod:`tests.support.process`'s, the provider they
call is :class:`tests.support.provider.WebhookProvider`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tests.support.process import Result, arun, run

INSTALL_TIMEOUT = 300.0
"""pip installs from PyPI: minutes on a slow network."""


async def create_acme(address: str, *options: str) -> Result:
    """``orchestrator emit post-connection-creation acme -i salesforce --json`` (instance acme) to ``address``."""
    args = ("post-connection-creation", "acme", "-i", "salesforce", "--connection-config", '{"instance": "acme"}')
    args = (*args, "--json")
    return await arun("emit", *args, *options, "--address", address)


@dataclass(frozen=True)
class FreshVenv:
    """A plain virtualenv with the orchestrator and the salesforce and github plugins pip-installed."""

    path: Path

    @property
    def bin(self) -> Path:
        """Its scripts directory."""
        return self.path / "bin"

    @property
    def orchestrator(self) -> tuple[str, ...]:
        """Its ``orchestrator`` command."""
        return (str(self.bin / "orchestrator"),)

    def environment(self) -> dict[str, str]:
        """A shell of this venv: its bin first on PATH, nothing of the development venv or ``ORCHESTRATOR_*``."""
        drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ORCHESTRATOR_")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.path)
        return env

    @property
    def python(self) -> tuple[str, ...]:
        """Its interpreter, as a command."""
        return (str(self.bin / "python"),)

    def pip(self, *args: str) -> None:
        """Run its pip quietly; fail the test with pip's output if it fails."""
        pip = (*self.python, "-m", "pip", "--disable-pip-version-check", "-q")
        done = run(*args, command=pip, env=self.environment(), timeout=INSTALL_TIMEOUT)
        assert done.code == 0, str(done)

    def has(self, module: str) -> bool:
        """Whether ``module`` is importable in the venv."""
        return run("-c", f"import {module}", command=self.python, env=self.environment(), timeout=60).code == 0
