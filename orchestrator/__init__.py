"""The lifecycle orchestrator: event functions for connection lifecycle events, on an append-only log.

This module is the public API for plugin authors; everything else is internal.
"""

from __future__ import annotations

from orchestrator.errors import OrchestratorError
from orchestrator.model import ConnectionRef, ConnectionState, LifecycleEvent

__version__ = "0.1.0"

__all__ = [
    "ConnectionRef",
    "ConnectionState",
    "LifecycleEvent",
    "OrchestratorError",
    "__version__",
]
