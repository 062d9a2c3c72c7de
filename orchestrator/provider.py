"""The provider proxy: HTTP calls to a connection's provider with its credentials injected.

One shared :class:`httpx.AsyncClient` serves every function. The base URL
and auth scheme come from the integration's settings; ``{placeholders}`` in
the base URL are filled from the connection's config. 429 and 5xx answers and
transport errors are retried (honouring ``Retry-After``, bounded); any other
error answer raises :class:`~orchestrator.errors.ProviderError`. Credentials
never appear in an error message. Pauses between retries are taken on the
injected :class:`~orchestrator.clock.Clock`.
"""

from __future__ import annotations

import base64
import email.utils
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
from opentelemetry import trace

from orchestrator import tracing
from orchestrator.clock import Clock, SystemClock
from orchestrator.config import Integration
from orchestrator.errors import ProviderError
from orchestrator.model import JSONObject

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 30.0
"""A provider asking for a longer pause makes the call fail (the job's own retry takes over)."""
BODY_EXCERPT = 300
tracer = trace.get_tracer(__name__)


def _auth(integration: Integration, credentials: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str], Any]:
    """(headers, query params, httpx auth) for the integration's scheme."""
    scheme, _, arg = integration.auth.partition(":")

    def need(key: str) -> str:
        if key not in credentials:
            raise ProviderError(
                f"integration {integration.name} uses auth {integration.auth!r} but the connection has no"
                f" credential {key!r} (credentials come with the emit, and are kept in memory only: emit again"
                " with them after a restart)"
            )
        return credentials[key]

    if scheme == "bearer":
        return {"Authorization": f"Bearer {need('access_token')}"}, {}, None
    if scheme == "basic":
        return {}, {}, httpx.BasicAuth(need("username"), need("password"))
    if scheme == "header":
        return {arg: need("api_key")}, {}, None
    if scheme == "query":
        return {}, {arg: need("api_key")}, None
    return {}, {}, None


def _retry_after(response: httpx.Response, now: datetime) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - now).total_seconds())


def _origin(url: str) -> tuple[str, str]:
    parts = httpx.URL(url)
    return parts.scheme, parts.netloc.decode()


def _secret_forms(credentials: Mapping[str, str]) -> list[str]:
    """Every form in which a credential can leave: as is, URL-encoded, and as a basic-auth token."""
    forms = set(credentials.values())
    forms |= {quote(value, safe="") for value in credentials.values()}
    forms |= {quote_plus(value) for value in credentials.values()}
    if "username" in credentials or "password" in credentials:
        pair = f"{credentials.get('username', '')}:{credentials.get('password', '')}".encode()
        forms.add(base64.b64encode(pair).decode())
    # Shorter values would blank out ordinary words; longest first so that no part survives.
    return sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)


def redact(text: str, credentials: Mapping[str, str]) -> str:
    """``text`` with every credential replaced, in any form, in case a provider echoes one back."""
    for value in _secret_forms(credentials):
        text = text.replace(value, "[redacted]")
    return text


class Provider:
    """Calls to one connection's provider, as seen by one function attempt."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        integration: Integration,
        config: JSONObject,
        credentials: Mapping[str, str],
        *,
        calls: list[str] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._client = client
        self._clock = clock or SystemClock()
        self._integration = integration
        self._config = config
        self._credentials = credentials
        self.calls: list[str] = calls if calls is not None else []
        """One line per HTTP exchange (method, URL without secrets, status), for dryrun and logs."""

    async def request(
        self,
        method: str,
        endpoint: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request, retrying 429/5xx and transport errors; raise :class:`ProviderError` otherwise."""
        integration = self._integration
        base = integration.url_for(self._config)
        absolute = endpoint.startswith(("http://", "https://"))
        url = endpoint if absolute else base.rstrip("/") + "/" + endpoint.lstrip("/")
        if absolute and _origin(url) != _origin(base):
            # A URL from elsewhere (say, from a provider's response) gets no credentials.
            auth_headers: dict[str, str] = {}
            auth_params: dict[str, str] = {}
            auth = None
        else:
            auth_headers, auth_params, auth = _auth(integration, self._credentials)
        merged_headers = {**(headers or {}), **auth_headers}
        merged_params = {**(params or {}), **auth_params}
        shown = f"{method} {url}"
        with tracer.start_as_current_span(
            f"HTTP {method}",
            kind=trace.SpanKind.CLIENT,
            attributes={"http.request.method": method, "url.full": url, "orchestrator.integration": integration.name},
        ) as span:
            tracing.inject(merged_headers)  # the provider joins the trace
            try:
                response = await self._send(method, url, shown, merged_params, merged_headers, auth, json, data)
            except ProviderError as exc:
                if exc.status:
                    span.set_attribute("http.response.status_code", exc.status)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)[:300]))
                raise
            span.set_attribute("http.response.status_code", response.status_code)
            return response

    async def _send(
        self,
        method: str,
        url: str,
        shown: str,
        params: dict[str, Any],
        headers: dict[str, str],
        auth: Any,
        json: Any,
        data: Any,
    ) -> httpx.Response:
        integration = self._integration
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._client.request(
                    method,
                    url,
                    params=params or None,
                    json=json,
                    data=data,
                    headers=headers,
                    auth=auth,
                    timeout=integration.timeout,
                )
            except httpx.TransportError as exc:
                self.calls.append(f"{shown} -> {type(exc).__name__}")
                if attempt > integration.retries:
                    detail = redact(str(exc), self._credentials)
                    # Not chained: httpx's own message may hold the URL's query-string credentials,
                    # and a chained cause would show it, unredacted, in any traceback a plugin logs.
                    raise ProviderError(f"{shown} failed: {type(exc).__name__}: {detail}") from None
                await self._clock.sleep(min(MAX_RETRY_AFTER, 0.2 * 2 ** (attempt - 1)))
                continue
            self.calls.append(f"{shown} -> {response.status_code}")
            if response.status_code in _RETRY_STATUS and attempt <= integration.retries:
                pause = _retry_after(response, self._clock.now())
                if pause is None:
                    pause = 0.2 * 2 ** (attempt - 1)
                if pause <= MAX_RETRY_AFTER:
                    await self._clock.sleep(pause)
                    continue
            if response.status_code >= 400:
                body = redact(response.text[:BODY_EXCERPT], self._credentials)
                raise ProviderError(
                    f"{shown} answered {response.status_code} {response.reason_phrase}: {body}",
                    status=response.status_code,
                    body=body,
                )
            return response
