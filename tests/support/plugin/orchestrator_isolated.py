"""The process isolation tests' plugin: functions that do what no function should, and ones that use every context call.

Found through entry points (:func:`tests.support.plugins.install` with
``tests.support.plugins.ISOLATED``), by the daemon and its worker processes alike. Each
function that blocks or hangs first calls the provider's ``/started``, so that
a test waits for that request instead of for time to pass. A function logs
the pid of the process it ran in, for the tests to tell processes apart.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from orchestrator import Context, on_event

INTEGRATION = "isolated"


@on_event("post-connection-creation", integration=INTEGRATION, timeout=2)
async def holds_the_loop(ctx: Context) -> None:
    """Blocks its event loop for 30 s: Python cannot pre-empt it; only a worker process can be killed."""
    ctx.log("pid", os.getpid())
    await ctx.get("/started")
    ctx.log("holding the loop")
    time.sleep(30)  # noqa: ASYNC251 - the hostile behaviour under test


@on_event("post-connection-creation", integration=INTEGRATION, timeout=1)
def hangs(ctx: Any) -> None:
    """A plain def that never returns: a thread cannot be stopped; a worker process can."""
    ctx.log("pid", os.getpid())
    ctx.get("/started")
    threading.Event().wait()


@on_event("post-connection-creation", integration=INTEGRATION)
def sleeps(ctx: Any) -> None:
    """Takes a minute (the default attempt timeout): busy when the daemon is told to stop."""
    ctx.get("/started")
    time.sleep(60)


@on_event("post-connection-creation", integration=INTEGRATION)
async def exits_once(ctx: Context) -> None:
    """Ends its process with ``os._exit(1)`` at its first attempt; succeeds at the next."""
    ctx.log("pid", os.getpid())
    if ctx.event.attempt == 1:
        sys.stdout.flush()
        os._exit(1)


@on_event("post-connection-creation", integration=INTEGRATION)
async def registers(ctx: Context) -> None:
    """Registers a webhook at the provider, keeps its id in the metadata, and logs it."""
    response = await ctx.post("/webhooks", json={"connection": ctx.connection.connection_id})
    await ctx.set_metadata({"webhook_id": response.json()["id"]})
    ctx.log("registered", response.json()["id"], "pid", os.getpid(), "metadata", await ctx.get_metadata())


@on_event("post-connection-creation", integration=INTEGRATION)
def registers_sync(ctx: Any) -> None:
    """:func:`registers` as a plain def (its context calls block its thread)."""
    response = ctx.post("/webhooks", json={"connection": ctx.connection.connection_id})
    ctx.update_metadata({"sync_webhook_id": response.json()["id"]})
    ctx.log("registered", response.json()["id"], "pid", os.getpid())
