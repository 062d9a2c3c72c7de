"""The HubSpot property snapshot (a sync def) run by the orchestrator's runner in a worker thread."""

from __future__ import annotations

import dataclasses
import threading

import httpx
import pytest
from fake_hubspot import PROPERTIES_URL, FakeHubSpot
from orchestrator_hubspot.properties import snapshot_properties

from orchestrator import LifecycleEvent, RetryPolicy
from orchestrator.context import Buffered, SyncContext
from orchestrator.plugins import Installed, discover
from orchestrator.retry import DEFAULT_RETRY
from orchestrator.runner import AttemptResult, run_attempt

pytestmark = pytest.mark.anyio

PROPERTIES = {
    "results": [
        {"name": "zeta_score", "hubspotDefined": False},
        {"name": "email", "hubspotDefined": True},
        {"name": "alpha_tier"},
        {"name": "firstname", "hubspotDefined": True},
    ]
}


@pytest.fixture
def installed() -> Installed:
    """snapshot-properties as entry-point discovery finds it."""
    [found] = [f for f in discover().functions if f.name == "snapshot-properties"]
    return found


async def run(hubspot: FakeHubSpot, installed: Installed, sink: Buffered) -> AttemptResult:
    """One attempt through the runner, as the daemon makes it."""
    return await run_attempt(
        installed, lambda log: hubspot.context(installed.function, sink, log), attempt=1, time_limit=30
    )


def test_entry_point_is_a_sync_function(installed: Installed) -> None:
    """The distribution declares snapshot-properties, a plain def, for post-connection-creation of hubspot."""
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


async def test_stores_the_custom_property_names(hubspot: FakeHubSpot, installed: Installed) -> None:
    """Only the portal's own properties are kept, sorted, merged into the existing metadata."""
    hubspot.respond = lambda request: httpx.Response(200, json=PROPERTIES)
    sink = Buffered({"portal": 1}, "snapshot-properties")
    result = await run(hubspot, installed, sink)
    assert result.ok, result
    [request] = hubspot.requests
    assert (request.method, str(request.url)) == ("GET", PROPERTIES_URL)
    assert request.headers["authorization"] == "Bearer pat-T"
    custom = ["alpha_tier", "zeta_score"]
    assert sink.writes == [
        {"function": "snapshot-properties", "metadata": {"custom_properties": custom}, "merge": True}
    ]
    assert sink.current() == {"portal": 1, "custom_properties": custom}
    assert result.logs == ["info: 2 custom contact properties"]


async def test_runs_in_a_worker_thread_with_a_sync_context(hubspot: FakeHubSpot, installed: Installed) -> None:
    """The runner hands the def a SyncContext on a thread other than the event loop's."""
    seen: list[tuple[type, threading.Thread]] = []

    def spy(ctx: SyncContext) -> None:
        seen.append((type(ctx), threading.current_thread()))
        snapshot_properties.handler(ctx)

    spied = dataclasses.replace(installed, function=dataclasses.replace(installed.function, handler=spy))
    hubspot.respond = lambda request: httpx.Response(200, json={"results": []})
    sink = Buffered({}, "snapshot-properties")
    result = await run(hubspot, spied, sink)
    assert result.ok, result
    [(kind, thread)] = seen
    assert kind is SyncContext
    assert thread is not threading.current_thread()
    assert sink.current() == {"custom_properties": []}


async def test_a_provider_refusal_is_a_failed_attempt(hubspot: FakeHubSpot, installed: Installed) -> None:
    """A 403 ends the attempt as a non-retryable ProviderError, with no metadata written."""
    hubspot.respond = lambda request: httpx.Response(403, json={"message": "missing scope crm.schemas.contacts.read"})
    sink = Buffered({}, "snapshot-properties")
    result = await run(hubspot, installed, sink)
    assert (result.ok, result.error_type, result.retryable) == (False, "ProviderError", False)
    assert "403" in result.error
    assert sink.writes == []


async def test_a_server_error_is_retryable(hubspot: FakeHubSpot, installed: Installed) -> None:
    """A 503 ends the attempt as a retryable failure, so the job's own policy takes over."""
    hubspot.respond = lambda request: httpx.Response(503, text="busy")
    result = await run(hubspot, installed, Buffered({}, "snapshot-properties"))
    assert (result.ok, result.error_type, result.retryable) == (False, "ProviderError", True)
