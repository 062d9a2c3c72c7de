"""The crash loop's event functions (integration ``crashloop``), loaded by a daemon subprocess through entry points.

The test puts this folder and a ``*.dist-info`` it writes (naming these
functions in ``entry_points.txt``) on the daemon's ``PYTHONPATH``: no pip, no
build. Every provider call names the lifecycle record it runs for, so the test
can match what the provider saw to the log.

    check-instance    validate-connection        rejects when the payload asks to (or the config has no instance)
    register-webhook  post-connection-creation   POST /webhooks once per incarnation, its id kept in metadata
    delete-webhook    pre-connection-deletion    DELETE /webhooks/{id} (``none`` when there is none): always calls
"""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator import Context, ProviderError, Rejected, on_event

INTEGRATION = "crashloop"
NO_WEBHOOK = "none"


class Metadata(BaseModel):
    """The webhook registered for the connection, and the creation record whose job registered it."""

    webhook_id: str | None = None
    creation: str | None = None


@on_event("validate-connection", integration=INTEGRATION, description="Reject when the payload says so")
async def check_instance(ctx: Context) -> None:
    """Pass, unless the config names no instance or the payload asks for a rejection."""
    if not ctx.connection.config.get("instance"):
        raise Rejected("the connection config names no instance")
    if ctx.event.payload.get("reject"):
        raise Rejected("the test asked for a rejection")


@on_event(
    "post-connection-creation",
    integration=INTEGRATION,
    description="Register a webhook (once per incarnation)",
    metadata=Metadata,
)
async def register_webhook(ctx: Context) -> None:
    """Register the webhook unless the metadata has one; the POST names the creation record and the attempt."""
    metadata: Metadata = await ctx.get_metadata()
    if metadata.webhook_id:
        ctx.log("webhook already registered:", metadata.webhook_id)
        return
    response = await ctx.post("/webhooks", json={"creation": ctx.event.event_id, "attempt": ctx.event.attempt})
    webhook_id = str(response.json()["id"])
    await ctx.set_metadata(Metadata(webhook_id=webhook_id, creation=ctx.event.event_id))


@on_event(
    "pre-connection-deletion",
    integration=INTEGRATION,
    description="Delete the webhook; always calls the provider, naming the deletion record",
    metadata=Metadata,
)
async def delete_webhook(ctx: Context) -> None:
    """DELETE the webhook (or ``none``): the provider sees when cleanup began; 404 counts as deleted."""
    metadata: Metadata = await ctx.get_metadata()
    try:
        await ctx.delete(f"/webhooks/{metadata.webhook_id or NO_WEBHOOK}", params={"deletion": ctx.event.event_id})
    except ProviderError as exc:
        if exc.status != 404:
            raise
    if metadata.webhook_id:
        await ctx.set_metadata(Metadata())
