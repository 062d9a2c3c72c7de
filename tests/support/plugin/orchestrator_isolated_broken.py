"""A plugin module that ends the interpreter when a worker process imports it; the daemon imports it fine."""

from __future__ import annotations

import os
import sys

from orchestrator import Context, on_event

if getattr(sys.modules["__main__"].__spec__, "name", "") == "orchestrator.isolation.child":
    os._exit(3)


@on_event("post-connection-creation", integration="isolated")
async def never_runs(ctx: Context) -> None:
    """Never runs: no worker process survives importing this module."""
