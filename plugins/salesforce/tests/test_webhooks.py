"""The Salesforce webhook functions against a mocked provider, through the orchestrator's real Context."""

from __future__ import annotations

import json

import httpx
import pytest
from fake_salesforce import BASE_URL, FakeSalesforce
from orchestrator_salesforce.webhooks import DEFAULT_WEBHOOK_URL, delete_webhook, register_webhook

from orchestrator import LifecycleEvent, ProviderError
from orchestrator.plugins import discover

pytestmark = pytest.mark.anyio


def test_entry_points_name_both_functions() -> None:
    """The installed distribution declares register-webhook and delete-webhook for their events."""
    found = {f.name: f for f in discover().functions if f.distribution == "orchestrator-salesforce"}
    assert sorted(found) == ["delete-webhook", "register-webhook"]
    assert found["register-webhook"].function is register_webhook
    assert found["register-webhook"].function.event is LifecycleEvent.POST_CONNECTION_CREATION
    assert found["delete-webhook"].function is delete_webhook
    assert found["delete-webhook"].function.event is LifecycleEvent.PRE_CONNECTION_DELETION
    assert {f.version for f in found.values()} == {"1.0.0"}


async def test_register_posts_webhook_and_stores_its_id(salesforce: FakeSalesforce) -> None:
    """Registering POSTs the webhook with the bearer token and keeps the provider's id in metadata."""
    salesforce.respond = lambda request: httpx.Response(201, json={"id": 42})
    await register_webhook.handler(salesforce.context(register_webhook))
    [request] = salesforce.requests
    assert (request.method, str(request.url)) == ("POST", f"{BASE_URL}/webhooks")
    assert request.headers["authorization"] == "Bearer T"
    assert json.loads(request.content) == {"url": DEFAULT_WEBHOOK_URL, "events": ["contact.updated"]}
    assert salesforce.sink.writes == [
        {"function": "register-webhook", "metadata": {"webhook_id": "42"}, "merge": False}
    ]
    assert salesforce.sink.current() == {"webhook_id": "42"}
    assert salesforce.log.export() == ["info: registered webhook 42"]


async def test_register_uses_the_payload_webhook_url(salesforce: FakeSalesforce) -> None:
    """A ``webhook_url`` in the event payload replaces the default callback URL."""
    salesforce.respond = lambda request: httpx.Response(201, json={"id": "wh1"})
    context = salesforce.context(register_webhook, payload={"webhook_url": "https://example.test/hook"})
    await register_webhook.handler(context)
    assert json.loads(salesforce.requests[0].content)["url"] == "https://example.test/hook"


async def test_register_is_a_no_op_when_already_registered(salesforce: FakeSalesforce) -> None:
    """A connection whose metadata already has a webhook id gets no second webhook (a retried job is safe)."""
    await register_webhook.handler(salesforce.context(register_webhook, metadata={"webhook_id": "wh0"}))
    assert salesforce.requests == []
    assert salesforce.sink.writes == []
    assert salesforce.log.export() == ["info: webhook already registered: wh0"]


async def test_register_fails_without_writing_when_the_provider_refuses(salesforce: FakeSalesforce) -> None:
    """A provider error surfaces as ProviderError and leaves the metadata untouched."""
    salesforce.respond = lambda request: httpx.Response(403, json={"error": "insufficient access"})
    with pytest.raises(ProviderError) as caught:
        await register_webhook.handler(salesforce.context(register_webhook))
    assert caught.value.status == 403
    assert salesforce.sink.writes == []


async def test_delete_removes_the_webhook_and_clears_its_id(salesforce: FakeSalesforce) -> None:
    """Deleting sends DELETE for the stored id and sets webhook_id to None."""
    salesforce.respond = lambda request: httpx.Response(204)
    await delete_webhook.handler(salesforce.context(delete_webhook, metadata={"webhook_id": "wh1"}))
    [request] = salesforce.requests
    assert (request.method, str(request.url)) == ("DELETE", f"{BASE_URL}/webhooks/wh1")
    assert request.headers["authorization"] == "Bearer T"
    assert salesforce.sink.current() == {"webhook_id": None}
    assert salesforce.log.export() == []


async def test_delete_is_idempotent_when_the_webhook_is_already_gone(salesforce: FakeSalesforce) -> None:
    """A 404 counts as deleted: no error, the id is cleared and the log says so."""
    salesforce.respond = lambda request: httpx.Response(404, json={"error": "not found"})
    await delete_webhook.handler(salesforce.context(delete_webhook, metadata={"webhook_id": "wh1"}))
    assert len(salesforce.requests) == 1
    assert salesforce.sink.writes == [{"function": "delete-webhook", "metadata": {"webhook_id": None}, "merge": False}]
    assert salesforce.log.export() == ["info: webhook wh1 was already gone"]


async def test_delete_reraises_a_server_error(salesforce: FakeSalesforce) -> None:
    """A 500 is not treated as gone: ProviderError propagates (so the job retries) and the id is kept."""
    salesforce.respond = lambda request: httpx.Response(500, text="internal error")
    with pytest.raises(ProviderError) as caught:
        await delete_webhook.handler(salesforce.context(delete_webhook, metadata={"webhook_id": "wh1"}))
    assert caught.value.status == 500
    assert "internal error" in str(caught.value)
    assert salesforce.sink.writes == []
    assert salesforce.sink.current() == {"webhook_id": "wh1"}


async def test_delete_without_a_webhook_calls_nothing(salesforce: FakeSalesforce) -> None:
    """A connection that never registered a webhook needs no provider call."""
    await delete_webhook.handler(salesforce.context(delete_webhook))
    assert salesforce.requests == []
    assert salesforce.sink.writes == []
    assert salesforce.log.export() == ["info: no webhook to delete"]
