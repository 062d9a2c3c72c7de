"""The lease tests' plugin: a creation function whose first attempt the test holds as long as it wants.

Found through entry points (:func:`tests.support.plugins.install` with
``tests.support.plugins.LEASE``). Each attempt calls the provider, naming the
connection, the attempt and the pid of the daemon it runs in: the first attempt
``/slow/...``, which the test holds open (a provider gate) to make the attempt
slow; later attempts ``/quick/...``. The test learns from those requests which
daemon runs which attempt, instead of waiting for time to pass.
"""

from __future__ import annotations

import os

from orchestrator import Context, on_event

INTEGRATION = "lease"


@on_event("post-connection-creation", integration=INTEGRATION)
async def registers_slowly(ctx: Context) -> None:
    """Slow at its first attempt (as long as the test holds ``/slow/*``), quick at the next ones."""
    speed = "slow" if ctx.event.attempt == 1 else "quick"
    await ctx.get(f"/{speed}/{ctx.connection.connection_id}/{ctx.event.attempt}/{os.getpid()}")
