"""Keep one provider webhook per Salesforce connection, exactly as the seed describes.

After creation a webhook is registered and its id kept in the connection's
metadata; before deletion it is deleted again. Deletion is idempotent: a
webhook that is already gone (404) counts as deleted, because cleanup is
retried and the provider may have removed it first.
"""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator import Context, ProviderError, on_event

DEFAULT_WEBHOOK_URL = "https://api.myapp.com/webhooks/salesforce"


class Metadata(BaseModel):
    """What these functions keep on a Salesforce connection."""

    webhook_id: str | None = None


@on_event(
    "post-connection-creation",
    integration="salesforce",
    description="Register a Salesforce webhook after a connection is created",
    metadata=Metadata,
)
async def register_webhook(ctx: Context) -> None:
    """Register the webhook (once per connection) and remember its id."""
    metadata: Metadata = await ctx.get_metadata()
    if metadata.webhook_id:
        ctx.log("webhook already registered:", metadata.webhook_id)
        return
    response = await ctx.post(
        "/webhooks",
        json={"url": ctx.event.payload.get("webhook_url", DEFAULT_WEBHOOK_URL), "events": ["contact.updated"]},
    )
    webhook_id = str(response.json()["id"])
    await ctx.set_metadata(Metadata(webhook_id=webhook_id))
    ctx.log("registered webhook", webhook_id)


@on_event(
    "pre-connection-deletion",
    integration="salesforce",
    description="Delete the Salesforce webhook before connection deletion",
    metadata=Metadata,
)
async def delete_webhook(ctx: Context) -> None:
    """Delete the webhook; one that is already gone is fine."""
    metadata: Metadata = await ctx.get_metadata()
    if not metadata.webhook_id:
        ctx.log("no webhook to delete")
        return
    try:
        await ctx.delete(f"/webhooks/{metadata.webhook_id}")
    except ProviderError as exc:
        if exc.status != 404:
            raise
        ctx.log("webhook", metadata.webhook_id, "was already gone")
    await ctx.set_metadata(Metadata(webhook_id=None))
