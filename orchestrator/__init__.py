"""The lifecycle orchestrator: event functions for connection lifecycle events, on an append-only log.

This module is the public API for plugin authors::

    from orchestrator import Context, on_event

    @on_event("post-connection-creation", integration="salesforce", description="Register a webhook")
    async def register_webhook(ctx: Context) -> None:
        response = await ctx.post("/webhooks", json={"url": "https://example.com/hook"})
        await ctx.set_metadata({"webhook_id": response.json()["id"]})

Everything else is internal. The names are imported on first use, so that
``import orchestrator.state`` (the pure fold, used by ``orchestrator replay``)
does not load the HTTP client, pydantic or OpenTelemetry.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from orchestrator.context import Context, SyncContext
    from orchestrator.errors import OrchestratorError, ProviderError
    from orchestrator.functions import EventFunction, NonRetryable, Rejected, on_event
    from orchestrator.model import ConnectionRef, ConnectionState, LifecycleEvent
    from orchestrator.retry import RetryPolicy

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
    "SyncContext",
    "__version__",
    "on_event",
]

_HOMES = {
    "ConnectionRef": "orchestrator.model",
    "ConnectionState": "orchestrator.model",
    "Context": "orchestrator.context",
    "EventFunction": "orchestrator.functions",
    "LifecycleEvent": "orchestrator.model",
    "NonRetryable": "orchestrator.functions",
    "OrchestratorError": "orchestrator.errors",
    "ProviderError": "orchestrator.errors",
    "Rejected": "orchestrator.functions",
    "RetryPolicy": "orchestrator.retry",
    "SyncContext": "orchestrator.context",
    "on_event": "orchestrator.functions",
    "__version__": "orchestrator._version",
}


def __getattr__(name: str) -> _typing.Any:
    """Import a public name on first use (PEP 562) and keep it."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home), "VERSION" if name == "__version__" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
