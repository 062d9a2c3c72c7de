"""A fake HubSpot for the plugin's tests: the orchestrator's real Context over an httpx.MockTransport provider."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from orchestrator_hubspot import INTEGRATION

from orchestrator import ConnectionRef, EventFunction
from orchestrator.config import Integration
from orchestrator.context import AttemptLog, Buffered, ConnectionInfo, Context, EventInfo
from orchestrator.provider import Provider

PROPERTIES_URL = "https://api.hubapi.com/crm/v3/properties/contacts"


class FakeHubSpot:
    """A provider answering with ``respond`` and keeping every request; builds contexts that call it."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.respond: Callable[[httpx.Request], httpx.Response] = lambda request: httpx.Response(404)
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self._handle))

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)

    def context(self, function: EventFunction, sink: Buffered, log: AttemptLog) -> Context:
        """A context for ``function`` on connection dev/hubspot/portal-1 writing metadata to ``sink``."""
        # retries=0: a 5xx answer fails at once instead of being retried after a real pause.
        integration = Integration.from_settings("hubspot", {**INTEGRATION, "retries": 0})
        config: dict[str, Any] = {}
        return Context(
            connection=ConnectionInfo(ConnectionRef("dev", "hubspot", "portal-1"), config),
            event=EventInfo(function.event, {}, "01900000-0000-7000-8000-000000000003"),
            provider=Provider(self.client, integration, config, {"access_token": "pat-T"}),
            metadata_model=function.metadata,
            sink=sink,
            log=log,
        )
