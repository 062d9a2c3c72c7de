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

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.errors import OrchestratorError
    from orchestrator.functions import EventFunction, NonRetryable, Rejected, on_event
    from orchestrator.model import ConnectionRef, ConnectionState, LifecycleEvent
    from orchestrator.provider import ProviderError
    from orchestrator.retry import RetryPolicy

__version__: str

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

# Each name is imported on first use (PEP 562), so ``import orchestrator.<module>``
# (the CLI, say) does not pay for the plugin API's imports (httpx, OpenTelemetry).
_MODULES = {
    "ConnectionRef": "orchestrator.model",
    "ConnectionState": "orchestrator.model",
    "Context": "orchestrator.context",
    "EventFunction": "orchestrator.functions",
    "LifecycleEvent": "orchestrator.model",
    "NonRetryable": "orchestrator.functions",
    "OrchestratorError": "orchestrator.errors",
    "ProviderError": "orchestrator.provider",
    "Rejected": "orchestrator.functions",
    "RetryPolicy": "orchestrator.retry",
    "__version__": "orchestrator._version",
    "on_event": "orchestrator.functions",
}


def __getattr__(name: str) -> object:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), "VERSION" if name == "__version__" else name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
