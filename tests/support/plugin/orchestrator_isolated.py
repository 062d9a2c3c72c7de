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

import httpx
from pydantic import BaseModel

from orchestrator import Context, on_event
from orchestrator.errors import Misconfigured

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


@on_event("post-connection-creation", integration=INTEGRATION)
async def uses_an_sdk(ctx: Context) -> None:
    """Calls the provider through the proxy, then hands the raw token to an "SDK" of its own (``/sdk``)."""
    await ctx.get("/me")  # a 401 here is the daemon's to refresh: ctx.credentials then reads the fresh token
    token = ctx.credentials["access_token"]
    async with httpx.AsyncClient() as sdk:
        await sdk.get(ctx.connection.config["sdk_url"], headers={"authorization": f"Bearer {token}"})
    ctx.log("pid", os.getpid(), "sees", repr(ctx.credentials), "token", token)


@on_event("post-connection-creation", integration=INTEGRATION)
def uses_an_sdk_sync(ctx: Any) -> None:
    """:func:`uses_an_sdk`'s read as a plain def (ctx.credentials read on its thread), first thing."""
    names = sorted(ctx.credentials)
    ctx.log("pid", os.getpid(), "names", names, "token", dict(ctx.credentials)["access_token"])
    ctx.get("/me")


@on_event("validate-connection", integration=INTEGRATION)
async def checks(ctx: Context) -> None:
    """Asks the provider who the credentials belong to (``GET /me``), letting whatever the proxy raises through."""
    await ctx.get("/me")


@on_event("post-connection-creation", integration=INTEGRATION)
async def claims_misconfigured(ctx: Context) -> None:
    """Raises Misconfigured of its own, with no call refused: a plugin's claim, not the daemon's finding."""
    raise Misconfigured(
        "integration isolated has no base_url (says the plugin)", setting="integrations.isolated.base_url"
    )


class Webhook(BaseModel):
    """Metadata with required fields, for a partial update."""

    webhook_id: str
    retries: int


@on_event("post-connection-creation", integration=INTEGRATION, metadata=Webhook)
async def shows_its_context(ctx: Context) -> None:
    """Logs its integration's settings and its environment's variables; sends bodies with GET and DELETE;
    updates one field of a model with required fields."""
    ctx.log("integration", ctx.integration.name, ctx.integration.base_url, dict(ctx.integration.settings))
    ctx.log("env", dict(ctx.env))
    await ctx.get("/query", json={"q": "all"})
    await ctx.delete("/webhooks", data={"id": "wh1"})
    await ctx.update_metadata({"retries": "3"})
    ctx.log("metadata", (await ctx.get_metadata()).model_dump())


@on_event("post-connection-creation", integration=INTEGRATION, metadata=Webhook)
def shows_its_context_sync(ctx: Any) -> None:
    """:func:`shows_its_context` as a plain def."""
    ctx.log("integration", ctx.integration.name, ctx.integration.base_url, dict(ctx.integration.settings))
    ctx.log("env", dict(ctx.env))
    ctx.get("/query", json={"q": "all"})
    ctx.delete("/webhooks", data={"id": "wh1"})
    ctx.update_metadata({"retries": "3"})
    ctx.log("metadata", ctx.get_metadata().model_dump())
