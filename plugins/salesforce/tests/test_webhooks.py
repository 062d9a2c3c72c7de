"""The Salesforce webhook functions, run as the daemon runs them (orchestrator.testing) against canned answers."""

from __future__ import annotations

from typing import Any

from orchestrator_salesforce.webhooks import DEFAULT_WEBHOOK_URL, delete_webhook, register_webhook

from orchestrator import EventFunction, LifecycleEvent
from orchestrator.plugins import discover
from orchestrator.testing import Result, Runner, run

CONFIG = {"instance_url": "acme.my.salesforce.com"}
BASE_URL = "https://acme.my.salesforce.com/services/data/v60.0"


def salesforce(function: EventFunction, provider: Any = None, *, runner: Any = run, **options: Any) -> Result:
    """``function`` on connection acme (its instance, the token T; no proxy retries), against ``provider``."""
    return runner(
        function,
        provider=provider or {},
        connection_config=CONFIG,
        credentials={"access_token": "T"},
        integration={"retries": 0},
        **options,
    )


def test_entry_points_name_both_functions() -> None:
    """The installed distribution declares register-webhook and delete-webhook for their events."""
    found = {f.name: f for f in discover().functions if f.distribution == "orchestrator-salesforce"}
    assert sorted(found) == ["delete-webhook", "register-webhook"]
    assert found["register-webhook"].function is register_webhook
    assert found["register-webhook"].function.event is LifecycleEvent.POST_CONNECTION_CREATION
    assert found["delete-webhook"].function is delete_webhook
    assert found["delete-webhook"].function.event is LifecycleEvent.PRE_CONNECTION_DELETION
    assert {f.version for f in found.values()} == {"1.0.0"}


def test_register_posts_webhook_and_stores_its_id(run_function: Runner) -> None:
    """Registering POSTs the webhook with the bearer token and keeps the provider's id in metadata."""
    result = salesforce(register_webhook, {"POST /webhooks": (201, {"id": 42})}, runner=run_function)
    assert result.ok, result
    [request] = result.requests
    assert (request.method, request.url) == ("POST", f"{BASE_URL}/webhooks")
    assert request.headers["authorization"] == "Bearer T"
    assert request.json() == {"url": DEFAULT_WEBHOOK_URL, "events": ["contact.updated"]}
    assert result.writes == [{"function": "register-webhook", "metadata": {"webhook_id": "42"}, "merge": False}]
    assert result.metadata == {"webhook_id": "42"}
    assert result.logs == ["info: registered webhook 42"]


def test_register_uses_the_payload_webhook_url() -> None:
    """A ``webhook_url`` in the event payload replaces the default callback URL."""
    result = salesforce(
        register_webhook, {"POST /webhooks": (201, {"id": "wh1"})}, payload={"webhook_url": "https://example.test/hook"}
    )
    assert result.requests[0].json()["url"] == "https://example.test/hook"


def test_register_is_a_no_op_when_already_registered() -> None:
    """A connection whose metadata already has a webhook id gets no second webhook (a retried job is safe)."""
    result = salesforce(register_webhook, metadata={"webhook_id": "wh0"})
    assert result.ok, result
    assert (result.requests, result.writes) == ([], [])
    assert result.logs == ["info: webhook already registered: wh0"]


def test_register_fails_without_writing_when_the_provider_refuses() -> None:
    """A provider error fails the attempt, not retried, and leaves the metadata untouched."""
    result = salesforce(register_webhook, {"POST /webhooks": (403, {"error": "insufficient access"})})
    assert (result.ok, result.error_type, result.retryable) == (False, "ProviderError", False)
    assert "answered 403 Forbidden" in result.error
    assert result.writes == []


def test_delete_removes_the_webhook_and_clears_its_id() -> None:
    """Deleting sends DELETE for the stored id and sets webhook_id to None."""
    result = salesforce(delete_webhook, {"DELETE /webhooks/wh1": 204}, metadata={"webhook_id": "wh1"})
    assert result.ok, result
    [request] = result.requests
    assert (request.method, request.url) == ("DELETE", f"{BASE_URL}/webhooks/wh1")
    assert request.headers["authorization"] == "Bearer T"
    assert result.metadata == {"webhook_id": None}
    assert result.logs == []


def test_delete_is_idempotent_when_the_webhook_is_already_gone() -> None:
    """A 404 counts as deleted: no error, the id is cleared and the log says so."""
    result = salesforce(
        delete_webhook, {"DELETE /webhooks/*": (404, {"error": "not found"})}, metadata={"webhook_id": "wh1"}
    )
    assert result.ok, result
    assert len(result.requests) == 1
    assert result.writes == [{"function": "delete-webhook", "metadata": {"webhook_id": None}, "merge": False}]
    assert result.logs == ["info: webhook wh1 was already gone"]


def test_delete_fails_retryably_on_a_server_error() -> None:
    """A 500 is not treated as gone: the attempt fails retryably (so the job retries) and the id is kept."""
    result = salesforce(
        delete_webhook, {"DELETE /webhooks/wh1": (500, "internal error")}, metadata={"webhook_id": "wh1"}
    )
    assert (result.ok, result.error_type, result.retryable) == (False, "ProviderError", True)
    assert "internal error" in result.error
    assert result.writes == []
    assert result.metadata == {"webhook_id": "wh1"}


def test_delete_without_a_webhook_calls_nothing() -> None:
    """A connection that never registered a webhook needs no provider call."""
    result = salesforce(delete_webhook)
    assert result.ok, result
    assert (result.requests, result.writes) == ([], [])
    assert result.logs == ["info: no webhook to delete"]
