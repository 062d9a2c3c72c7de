"""The public surface of ``orchestrator`` is deliberate: changing it must change this test."""

from __future__ import annotations

import inspect

import orchestrator


def test_exported_members() -> None:
    """``__all__`` is sorted, complete and names only what plugin authors use."""
    assert orchestrator.__all__ == sorted(orchestrator.__all__)
    assert orchestrator.__all__ == [
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
    for name in orchestrator.__all__:
        assert getattr(orchestrator, name) is not None
    public = {
        name
        for name, value in vars(orchestrator).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert public <= set(orchestrator.__all__)
