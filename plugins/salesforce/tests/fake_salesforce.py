"""A fake Salesforce for the plugin's tests: the orchestrator's real Context over an httpx.MockTransport provider."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from orchestrator_salesforce import INTEGRATION

from orchestrator import ConnectionRef, EventFunction
from orchestrator.config import Integration
from orchestrator.context import AttemptLog, Buffered, ConnectionInfo, Context, EventInfo
from orchestrator.provider import Provider

CONFIG = {"instance_url": "acme.my.salesforce.com"}
BASE_URL = "https://acme.my.salesforce.com/services/data/v60.0"


class FakeSalesforce:
    """A provider answering with ``respond`` and keeping every request; builds contexts that call it."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.respond: Callable[[httpx.Request], httpx.Response] = lambda request: httpx.Response(404)
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self._handle))
        self.sink = Buffered({})
        self.log = AttemptLog()

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)

    def context(
        self, function: EventFunction, *, metadata: dict[str, Any] | None = None, payload: dict[str, Any] | None = None
    ) -> Context:
        """A context for ``function`` on connection dev/salesforce/acme, its metadata in :attr:`sink`."""
        # retries=0: a 5xx answer fails at once instead of being retried after a real pause.
        integration = Integration.from_settings("salesforce", {**INTEGRATION, "retries": 0})
        provider = Provider(self.client, integration, CONFIG, {"access_token": "T"})
        # The entry-point name, under which the daemon records the function's writes.
        self.sink = Buffered(metadata or {}, function.handler.__name__.replace("_", "-"))
        return Context(
            connection=ConnectionInfo(ConnectionRef("dev", "salesforce", "acme"), CONFIG),
            event=EventInfo(function.event, payload or {}, "01900000-0000-7000-8000-000000000001"),
            provider=provider,
            metadata_model=function.metadata,
            sink=self.sink,
            log=self.log,
        )
