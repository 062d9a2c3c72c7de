"""The plugin API's decorator: :func:`orchestrator.on_event` and the exceptions a function raises."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from orchestrator import Context, NonRetryable, Rejected, RetryPolicy, on_event
from orchestrator.errors import InvalidArgument
from orchestrator.functions import EventFunction
from orchestrator.model import LifecycleEvent


class Metadata(BaseModel):
    """A function's metadata model."""

    webhook_id: str | None = None


async def handler(ctx: Context) -> None:
    """An async event function that does nothing."""


def sync_handler(ctx: Any) -> None:
    """A plain event function that does nothing."""


def test_on_event_builds_an_event_function() -> None:
    """on_event keeps the handler, the parsed event and every override."""
    policy = RetryPolicy(max_attempts=2)

    function = on_event(
        "post-connection-creation",
        integration="salesforce",
        description="Register a webhook",
        metadata=Metadata,
        timeout=5,
        retry=policy,
    )(handler)

    assert isinstance(function, EventFunction)
    assert function.handler is handler
    assert function.event is LifecycleEvent.POST_CONNECTION_CREATION
    assert (function.integration, function.description) == ("salesforce", "Register a webhook")
    assert (function.metadata, function.timeout, function.retry) == (Metadata, 5, policy)
    assert function.qualname == f"{__name__}.handler"


def test_async_functions_run_on_the_loop_and_plain_ones_in_a_thread() -> None:
    """is_async tells coroutine functions from plain ones (which the runner sends to a worker thread)."""
    assert on_event("validate-connection", integration="github")(handler).is_async
    assert not on_event("validate-connection", integration="github")(sync_handler).is_async


def test_on_event_accepts_the_enum() -> None:
    """The event may be given as a LifecycleEvent as well as its string."""
    function = on_event(LifecycleEvent.PRE_CONNECTION_DELETION, integration="acme")(handler)

    assert function.event is LifecycleEvent.PRE_CONNECTION_DELETION


@pytest.mark.parametrize("event", ["post-creation", "", "VALIDATE-CONNECTION", "connection-deleted"])
def test_a_bad_event_name_is_refused(event: str) -> None:
    """An event that is not one of the three lifecycle events is refused, listing the valid ones."""
    with pytest.raises(InvalidArgument, match="is not a lifecycle event") as info:
        on_event(event, integration="acme")

    assert "validate-connection, post-connection-creation, pre-connection-deletion" in str(info.value)


@pytest.mark.parametrize("integration", ["", "Salesforce", "sales force", "-acme", "a" * 64, "acme/x"])
def test_a_bad_integration_name_is_refused(integration: str) -> None:
    """The integration must be a valid name (lower-case letters, digits, '_' and '-')."""
    with pytest.raises(InvalidArgument, match="integration"):
        on_event("validate-connection", integration=integration)


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
def test_a_timeout_of_zero_or_less_is_refused(timeout: float) -> None:
    """A timeout must be more than 0 seconds."""
    with pytest.raises(InvalidArgument, match="timeout must be more than 0"):
        on_event("post-connection-creation", integration="acme", timeout=timeout)


@pytest.mark.parametrize("metadata", [dict, Metadata(), int, "Metadata"])
def test_metadata_must_be_a_pydantic_model_class(metadata: Any) -> None:
    """metadata must be a pydantic BaseModel subclass, not an instance or another type."""
    with pytest.raises(InvalidArgument, match="BaseModel subclass"):
        on_event("post-connection-creation", integration="acme", metadata=metadata)


def test_decorating_something_not_callable_is_refused() -> None:
    """on_event decorates functions only."""
    with pytest.raises(InvalidArgument, match="must decorate a function"):
        on_event("validate-connection", integration="acme")(42)  # type: ignore[arg-type]


def test_rejected_keeps_its_message() -> None:
    """Rejected carries the clean message used as the rejection reason."""
    error = Rejected("the token lacks the repo scope")

    assert error.message == str(error) == "the token lacks the repo scope"
    assert not isinstance(error, NonRetryable)
