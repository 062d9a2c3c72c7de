"""What a function's ``ctx`` shows of its integration and environment, and how it calls and writes.

Each attempt goes through the daemon's :class:`~orchestrator.dispatch.Dispatcher` over an
``httpx.MockTransport`` provider: ``ctx.integration`` (per-environment settings over the
defaults), ``ctx.env`` (``[environments.<env>.variables]``), a body on GET and DELETE,
``update_metadata`` validating the merged metadata, and a plain ``def`` seeing the same.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from orchestrator import Context, SyncContext, on_event
from orchestrator.clock import SystemClock
from orchestrator.config import DispatchConfig, Integration, integrations_from_toml, variables_from_toml
from orchestrator.context import Buffered, ConnectionInfo, EventInfo
from orchestrator.dispatch import Dispatcher
from orchestrator.errors import InvalidArgument
from orchestrator.model import ConnectionRef, LifecycleEvent
from orchestrator.plugins import Installed
from orchestrator.provider import Secrets
from orchestrator.runner import AttemptResult

pytestmark = pytest.mark.anyio

SALESFORCE = integrations_from_toml(
    {
        "salesforce": {
            "base_url": "https://login.salesforce.com/{instance}",
            "auth": "bearer",
            "settings": {"api_version": "v60.0", "sandbox": False},
            "environments": {
                "prod": {"base_url": "https://prod.salesforce.test/{instance}", "settings": {"sandbox": True}},
            },
        }
    }
)
VARIABLES = variables_from_toml({"prod": {"variables": {"SLACK_APP_ID": "A0PROD"}}, "dev": {"variables": {}}})
SEEN: list[Any] = []
"""What the functions below saw of their context (cleared by each test)."""
REQUESTS: list[httpx.Request] = []


class Webhook(BaseModel):
    """A model with required fields: a partial update must validate the merged metadata."""

    webhook_id: str
    retries: int


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A client whose provider answers 200 ``{}`` to anything, keeping each request."""
    SEEN.clear()
    REQUESTS.clear()

    def handle(request: httpx.Request) -> httpx.Response:
        REQUESTS.append(request)
        return httpx.Response(200, json={})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
        yield client


async def attempt(
    http: httpx.AsyncClient, handler: Any, *, environment: str = "prod", metadata: dict[str, Any] | None = None
) -> tuple[AttemptResult, Buffered]:
    """One attempt of ``handler`` (post-creation of salesforce) on ``environment``/salesforce/acme."""
    function = on_event("post-connection-creation", integration="salesforce", metadata=Webhook)(handler)
    dispatcher = Dispatcher(
        SystemClock(), http=http, integrations=SALESFORCE, config=DispatchConfig(variables=VARIABLES)
    )
    sink = Buffered(metadata or {}, "f")
    result = await dispatcher.attempt(
        Installed("f", function, "tests", "0", "tests:f"),
        ConnectionInfo(ConnectionRef(environment, "salesforce", "acme"), {"instance": "acme"}),
        EventInfo(LifecycleEvent.POST_CONNECTION_CREATION, {}, "event-1"),
        sink,
        secrets=Secrets({"access_token": "T0KEN"}),
    )
    return result, sink


async def shows(ctx: Context) -> None:
    """Keeps what it sees of its integration and environment, and calls the provider."""
    SEEN.append((ctx.integration, dict(ctx.env)))
    await ctx.get("/sobjects")


def shows_plain(ctx: SyncContext) -> None:
    """:func:`shows` as a plain def."""
    SEEN.append((ctx.integration, dict(ctx.env)))
    ctx.get("/sobjects")


@pytest.mark.parametrize("handler", [shows, shows_plain])
async def test_an_environment_sees_its_own_integration_settings_and_variables(
    http: httpx.AsyncClient, handler: Any
) -> None:
    """In prod, ctx.integration has prod's base URL and settings merged over the defaults, ctx.env prod's
    variables; the proxy calls prod's URL. A plain def's SyncContext shows the same."""
    result, _ = await attempt(http, handler)
    assert result.ok, result
    [(integration, env)] = SEEN
    assert (integration.name, integration.base_url, integration.auth) == (
        "salesforce",
        "https://prod.salesforce.test/{instance}",
        "bearer",
    )
    assert dict(integration.settings) == {"api_version": "v60.0", "sandbox": True}
    assert env == {"SLACK_APP_ID": "A0PROD"}
    assert [str(r.url) for r in REQUESTS] == ["https://prod.salesforce.test/acme/sobjects"]


async def test_an_environment_without_overrides_sees_the_defaults(http: httpx.AsyncClient) -> None:
    """staging has no overrides and no variables: the integration's defaults and an empty ctx.env."""
    result, _ = await attempt(http, shows, environment="staging")
    assert result.ok, result
    [(integration, env)] = SEEN
    assert integration.base_url == "https://login.salesforce.com/{instance}"
    assert dict(integration.settings) == {"api_version": "v60.0", "sandbox": False}
    assert env == {}
    assert [str(r.url) for r in REQUESTS] == ["https://login.salesforce.com/acme/sobjects"]


async def test_the_environment_and_the_settings_are_read_only(http: httpx.AsyncClient) -> None:
    """A function cannot change ctx.env or ctx.integration.settings (other attempts share them)."""

    async def changes(ctx: Context) -> None:
        ctx.env["SLACK_APP_ID"] = "mine"  # type: ignore[index]

    async def changes_settings(ctx: Context) -> None:
        ctx.integration.settings["sandbox"] = False  # type: ignore[index]

    for handler in (changes, changes_settings):
        result, _ = await attempt(http, handler)
        assert (result.ok, result.error_type) == (False, "TypeError")


async def test_get_and_delete_send_a_body(http: httpx.AsyncClient) -> None:
    """ctx.get and ctx.delete take json= and data= as the other methods do."""

    async def bodies(ctx: Context) -> None:
        await ctx.get("/query", json={"q": "SELECT Id FROM Account"})
        await ctx.delete("/webhooks", data={"id": "wh1"})

    result, _ = await attempt(http, bodies)
    assert result.ok, result
    get, delete = REQUESTS
    assert (get.method, json.loads(get.content)) == ("GET", {"q": "SELECT Id FROM Account"})
    assert (delete.method, delete.content) == ("DELETE", b"id=wh1")


async def test_a_partial_update_of_a_model_with_required_fields_records_the_validated_values(
    http: httpx.AsyncClient,
) -> None:
    """update_metadata({"retries": "3"}) on stored {webhook_id, retries}: the merged metadata is valid, and the
    value recorded is the model's (the int 3, not the string)."""

    async def bumps(ctx: Context) -> None:
        await ctx.update_metadata({"retries": "3"})

    result, sink = await attempt(http, bumps, metadata={"webhook_id": "wh1", "retries": 0})
    assert result.ok, result
    assert sink.writes == [{"function": "f", "metadata": {"retries": 3}, "merge": True}]
    assert sink.current() == {"webhook_id": "wh1", "retries": 3}


async def test_a_partial_update_that_leaves_a_required_field_missing_is_refused(http: httpx.AsyncClient) -> None:
    """Nothing stored yet: {"retries": 1} alone does not make a valid Webhook, and nothing is written."""

    async def bumps(ctx: Context) -> None:
        await ctx.update_metadata({"retries": 1})

    result, sink = await attempt(http, bumps)
    assert (result.ok, result.error_type, result.retryable) == (False, "InvalidArgument", False)
    assert result.error.startswith("metadata does not match Webhook: 1 validation error for Webhook\nwebhook_id")
    assert sink.writes == []


@pytest.mark.parametrize(
    ("table", "says"),
    [
        (
            {"x": {"environments": {"prod": {"token": "t"}}}},
            "integrations.x.environments.prod: unknown setting(s) token",
        ),
        ({"x": {"environments": {"prod": {"auth": "oauth"}}}}, "integrations.x.environments.prod: integrations.x.auth"),
        ({"x": {"environments": "prod"}}, "integrations.x.environments must be a table"),
        ({"x": {"settings": "v60"}}, "integrations.x.settings must be a table"),
        ({"x": {"base_url": "https://x.test", "colour": "red"}}, "integrations.x: unknown setting(s) colour"),
    ],
)
def test_bad_integration_settings_are_refused_naming_them(table: dict[str, Any], says: str) -> None:
    """Each mistake in [integrations.*] is one InvalidArgument naming the table and the setting."""
    with pytest.raises(InvalidArgument) as caught:
        integrations_from_toml(table)
    assert str(caught.value).startswith(says), str(caught.value)


def test_a_setting_that_is_not_plain_data_is_refused() -> None:
    """A TOML date cannot be shown to a function in a worker process: refused, naming it."""
    import datetime

    with pytest.raises(InvalidArgument, match=r"integrations.x.settings.since: .* \(not date\)"):
        Integration("x", settings={"since": datetime.date(2024, 1, 1)})


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ({"prod": {"variables": {"RETRIES": 3}}}, "environments.prod.variables.RETRIES = 3 is not a string: quote it"),
        ({"prod": {"variables": {"a-b": "1"}}}, "environments.prod.variables: 'a-b' is not a variable name"),
        ({"prod": {"secrets": {}}}, "environments.prod: unknown setting(s) secrets (only variables)"),
        ({"prod": "x"}, "environments.prod must be a table"),
        ({"prod": {"variables": ["A"]}}, "environments.prod.variables must be a table"),
    ],
)
def test_bad_environment_variables_are_refused_naming_them(table: dict[str, Any], says: str) -> None:
    """Each mistake in [environments.*] is one InvalidArgument naming where it is."""
    with pytest.raises(InvalidArgument) as caught:
        variables_from_toml(table)
    assert str(caught.value).startswith(says), str(caught.value)
