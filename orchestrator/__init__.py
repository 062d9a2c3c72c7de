"""The lifecycle orchestrator: event functions for connection lifecycle events, on an append-only log.

This module is the public API for plugin authors::

    from orchestrator import Context, on_event

    @on_event("post-connection-creation", integration="salesforce", description="Register a webhook")
    async def register_webhook(ctx: Context) -> None:
        response = await ctx.post("/webhooks", json={"url": "https://example.com/hook"})
        await ctx.set_metadata({"webhook_id": response.json()["id"]})

Everything else is internal.
"""

from __future__ import annotations

from orchestrator.context import Context
from orchestrator.errors import OrchestratorError
from orchestrator.functions import EventFunction, NonRetryable, Rejected, on_event
from orchestrator.model import ConnectionRef, ConnectionState, LifecycleEvent
from orchestrator.provider import ProviderError
from orchestrator.retry import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "ConnectionRef",
    "ConnectionState",
    "Context",
    "EventFunction",
    "LifecycleEvent",
    "NonRetryable",
    "OrchestratorError",
    "ProviderError",
    "Rejected",
    "RetryPolicy",
    "__version__",
    "on_event",
]
