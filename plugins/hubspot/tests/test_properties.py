"""The HubSpot property snapshot (a plain def), run as the daemon runs it (orchestrator.testing)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import httpx
from orchestrator_hubspot.properties import snapshot_properties

from orchestrator import LifecycleEvent, RetryPolicy, SyncContext
from orchestrator.plugins import discover
from orchestrator.retry import DEFAULT_RETRY
from orchestrator.testing import Result, Runner, run

PROPERTIES = {
    "results": [
        {"name": "zeta_score", "hubspotDefined": False},
        {"name": "email", "hubspotDefined": True},
        {"name": "alpha_tier"},
        {"name": "firstname", "hubspotDefined": True},
    ]
}
NO_RETRIES = {"retries": 0}
"""A 5xx answer fails at once instead of being retried by the proxy after a real pause."""


def snapshot(answer: Any, *, metadata: dict[str, Any] | None = None, runner: Any = run) -> Result:
    """snapshot-properties with GET /crm/v3/properties/contacts answered ``answer``."""
    return runner(
        snapshot_properties,
        provider={"GET /crm/v3/properties/contacts": answer},
        metadata=metadata,
        credentials={"access_token": "pat-T"},
        integration=NO_RETRIES,
    )


def test_entry_point_is_a_sync_function() -> None:
    """The distribution declares snapshot-properties, a plain def, for post-connection-creation of hubspot."""
    [installed] = [f for f in discover().functions if f.name == "snapshot-properties"]
    assert installed.function is snapshot_properties
    assert (installed.distribution, installed.version) == ("orchestrator-hubspot", "1.0.0")
    assert (installed.function.integration, installed.function.event) == (
        "hubspot",
        LifecycleEvent.POST_CONNECTION_CREATION,
    )
    assert not installed.function.is_async


def test_has_its_own_retry_policy_and_timeout() -> None:
    """At most 3 attempts, from 2 s growing x3 up to 30 s, each attempt 30 s: not the defaults."""
    assert snapshot_properties.retry == RetryPolicy(
        max_attempts=3, initial_interval=2.0, backoff=3.0, max_interval=30.0
    )
    assert snapshot_properties.retry != DEFAULT_RETRY
    assert snapshot_properties.timeout == 30
    assert [snapshot_properties.retry.ceiling(n) for n in (1, 2, 3)] == [2.0, 6.0, 18.0]
    assert not snapshot_properties.retry.gives_up_after(2)
    assert snapshot_properties.retry.gives_up_after(3)


def test_stores_the_custom_property_names(run_function: Runner) -> None:
    """Only the portal's own properties are kept, sorted, merged into the existing metadata."""
    result = snapshot(PROPERTIES, metadata={"portal": 1}, runner=run_function)
    assert result.ok, result
    [request] = result.requests
    assert (request.method, request.url) == ("GET", "https://api.hubapi.com/crm/v3/properties/contacts")
    assert request.headers["authorization"] == "Bearer pat-T"
    custom = ["alpha_tier", "zeta_score"]
    assert result.writes == [
        {"function": "snapshot-properties", "metadata": {"custom_properties": custom}, "merge": True}
    ]
    assert result.metadata == {"portal": 1, "custom_properties": custom}
    assert result.logs == ["info: 2 custom contact properties"]


def test_runs_in_a_worker_thread_with_a_sync_context() -> None:
    """The runner hands the def a SyncContext on a thread of its own, as the daemon does."""
    seen: list[tuple[type, threading.Thread]] = []

    def spy(ctx: SyncContext) -> None:
        seen.append((type(ctx), threading.current_thread()))
        snapshot_properties.handler(ctx)

    result = run(
        dataclasses.replace(snapshot_properties, handler=spy),
        provider={"GET /crm/v3/properties/contacts": {"results": []}},
    )
    assert result.ok, result
    [(kind, thread)] = seen
    assert kind is SyncContext
    assert thread is not threading.current_thread()
    assert result.metadata == {"custom_properties": []}


def test_a_provider_refusal_is_a_failed_attempt() -> None:
    """A 403 ends the attempt as a non-retryable ProviderError, with no metadata written."""
    result = snapshot((403, {"message": "missing scope crm.schemas.contacts.read"}))
    assert (result.ok, result.error_type, result.retryable) == (False, "ProviderError", False)
    assert "403" in result.error
    assert result.writes == []


def test_a_server_error_is_retryable() -> None:
    """A 503 ends the attempt as a retryable failure, so the job's own policy takes over."""
    result = snapshot(httpx.Response(503, text="busy"))
    assert (result.ok, result.error_type, result.retryable) == (False, "ProviderError", True)
