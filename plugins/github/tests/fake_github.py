"""A fake GitHub for the plugin's tests: the orchestrator's real Context over an httpx.MockTransport provider."""

from __future__ import annotations

from typing import Any

import httpx
from orchestrator_github import INTEGRATION

from orchestrator import ConnectionRef, EventFunction
from orchestrator.config import Integration
from orchestrator.context import AttemptLog, Buffered, ConnectionInfo, Context, EventInfo
from orchestrator.provider import Provider


class FakeGitHub:
    """``GET /user`` answering with the token's ``X-OAuth-Scopes``; builds contexts that call it."""

    def __init__(self) -> None:
        self.scopes = ""
        """The ``X-OAuth-Scopes`` header of the answer."""
        self.requests: list[httpx.Request] = []
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self._handle))

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path != "/user":
            return httpx.Response(404, json={"message": "Not Found"})
        return httpx.Response(200, json={"login": "octocat"}, headers={"X-OAuth-Scopes": self.scopes})

    def context(self, function: EventFunction, log: AttemptLog, *, config: dict[str, Any] | None = None) -> Context:
        """A context for ``function`` on connection dev/github/octo with ``config`` as its connection config."""
        integration = Integration.from_settings("github", INTEGRATION)
        provider = Provider(self.client, integration, config or {}, {"access_token": "gho_T"})
        return Context(
            connection=ConnectionInfo(ConnectionRef("dev", "github", "octo"), config or {}),
            event=EventInfo(function.event, {}, "01900000-0000-7000-8000-000000000002"),
            provider=provider,
            metadata_model=function.metadata,
            sink=Buffered({}, "check-token-scopes"),
            log=log,
        )
