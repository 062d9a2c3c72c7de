"""The provider proxy against a real local HTTP server: auth, base URLs, retries and errors."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest

from orchestrator.config import Integration
from orchestrator.errors import FailedPrecondition, InvalidArgument, Misconfigured, ProviderError
from orchestrator.functions import NonRetryable
from orchestrator.provider import BODY_EXCERPT, CredentialsUnavailable, Provider, ReadOnlyCredentials, Secrets
from tests.support.provider import ProviderServer, Reply, Request

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-Cr3d3nt1al-v4lue"
TLS = ssl.create_default_context()
"""Built once: loading the CA bundle for every test's client would dominate the run time."""


@pytest.fixture
def server() -> Iterator[ProviderServer]:
    """A local HTTP provider on 127.0.0.1:0."""
    with ProviderServer() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The shared client, closed before the server stops."""
    async with httpx.AsyncClient(verify=TLS) as client:
        yield client


def provider(
    http: httpx.AsyncClient,
    base_url: str,
    auth: str = "none",
    credentials: Mapping[str, str] | None = None,
    config: dict[str, Any] | None = None,
    **settings: Any,
) -> Provider:
    """A provider for integration acme."""
    integration = Integration("acme", base_url=base_url, auth=auth, **settings)
    return Provider(http, integration, config or {}, credentials or {})


# -- auth ------------------------------------------------------------------------


async def test_bearer_sends_the_access_token(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """auth = bearer sends Authorization: Bearer <access_token>."""
    server.route("GET", "/me", Reply(200, {"login": "acme"}))

    response = await provider(http, server.url, "bearer", {"access_token": SECRET}).request("GET", "/me")

    assert response.json() == {"login": "acme"}
    (request,) = server.requests_to("GET", "/me")
    assert request.headers["authorization"] == f"Bearer {SECRET}"


async def test_basic_sends_username_and_password(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """auth = basic sends Authorization: Basic base64(username:password)."""
    server.route("GET", "/me", Reply(200))

    await provider(http, server.url, "basic", {"username": "ann", "password": SECRET}).request("GET", "/me")

    (request,) = server.requests
    assert request.headers["authorization"] == "Basic " + base64.b64encode(f"ann:{SECRET}".encode()).decode()


async def test_header_auth_sends_the_api_key_in_the_named_header(
    server: ProviderServer, http: httpx.AsyncClient
) -> None:
    """auth = header:X-Api-Key sends the api_key in X-Api-Key and no Authorization header."""
    server.route("GET", "/me", Reply(200))

    await provider(http, server.url, "header:X-Api-Key", {"api_key": SECRET}).request(
        "GET", "/me", headers={"X-Trace": "1"}
    )

    (request,) = server.requests
    assert request.headers["x-api-key"] == SECRET
    assert request.headers["x-trace"] == "1"
    assert "authorization" not in request.headers


async def test_query_auth_sends_the_api_key_as_a_parameter(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """auth = query:api_key adds api_key to the query, next to the function's own parameters."""
    server.route("GET", "/contacts", Reply(200, []))

    await provider(http, server.url, "query:api_key", {"api_key": SECRET}).request(
        "GET", "/contacts", params={"limit": 10}
    )

    (request,) = server.requests
    assert request.query == {"api_key": [SECRET], "limit": ["10"]}
    assert "authorization" not in request.headers


async def test_no_auth_sends_no_credentials(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """auth = none sends nothing, even when the connection has credentials."""
    server.route("GET", "/status", Reply(200))

    await provider(http, server.url, "none", {"access_token": SECRET, "api_key": SECRET}).request("GET", "/status")

    (request,) = server.requests
    assert SECRET not in repr(request)


async def test_a_missing_credential_is_a_clear_error(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """A connection without the credential its scheme needs fails before any call, not retried, saying how to fix it."""
    with pytest.raises(CredentialsUnavailable, match="has no credential 'access_token'") as missing:
        await provider(http, server.url, "bearer", {"api_key": SECRET}).request("GET", "/me")
    assert isinstance(missing.value, NonRetryable)
    assert "auth 'bearer'" in str(missing.value) and "UpdateCredentials" in str(missing.value)

    assert server.requests == []


async def test_the_proxy_notes_a_missing_credential_as_a_misconfiguration(
    server: ProviderServer, http: httpx.AsyncClient
) -> None:
    """The refusal is noted on the proxy (where the dispatcher reads it), whatever the function makes of it."""
    proxy = provider(http, server.url, "bearer", {"api_key": SECRET})
    assert proxy.misconfiguration == ""
    with pytest.raises(CredentialsUnavailable):
        await proxy.request("GET", "/me")
    assert "has no credential 'access_token'" in proxy.misconfiguration


async def test_unopenable_credentials_read_through_ctx_credentials_are_noted(http: httpx.AsyncClient) -> None:
    """Reading ctx.credentials that cannot be opened notes the reason too: the daemon's key ring is at fault."""
    proxy = Provider(http, Integration("acme"), {}, Secrets(unavailable="sealed under key id 1234abcd"))
    with pytest.raises(CredentialsUnavailable):
        dict(proxy.credentials)
    assert proxy.misconfiguration == "sealed under key id 1234abcd"


@pytest.mark.parametrize("auth", ["oauth", "header", "query:", "header:", "basic:x"])
def test_an_unknown_auth_scheme_is_refused(auth: str) -> None:
    """An integration's auth must be one of the documented schemes."""
    with pytest.raises(InvalidArgument, match="use one of none, bearer, basic"):
        Integration("acme", auth=auth)


# -- base URL ------------------------------------------------------------------


async def test_base_url_placeholders_are_filled_from_the_connection_config(
    server: ProviderServer, http: httpx.AsyncClient
) -> None:
    """{placeholders} in base_url come from the connection's config; the endpoint is joined with one slash."""
    server.route("POST", "/tenants/t-42/webhooks", Reply(201, {"id": "wh_1"}))
    base_url = "http://{host}:{port}/tenants/{tenant}/"
    config = {"host": "127.0.0.1", "port": server.port, "tenant": "t-42", "unused": True}

    response = await provider(http, base_url, config=config).request("POST", "/webhooks", json={"url": "https://x"})

    assert (response.status_code, response.json()) == (201, {"id": "wh_1"})
    (request,) = server.requests
    assert (request.method, request.path, request.json()) == ("POST", "/tenants/t-42/webhooks", {"url": "https://x"})


async def test_a_missing_placeholder_is_a_clear_error(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """A base_url placeholder missing from connection_config fails, naming it, before any call."""
    base_url = server.url + "/{tenant}/{region}"

    with pytest.raises(ProviderError, match="needs connection_config 'tenant', 'region'"):
        await provider(http, base_url, config={"other": 1}).request("GET", "/me")

    assert server.requests == []


@pytest.mark.parametrize(
    ("base_url", "config", "says"),
    [
        ("", {}, "integration acme has no base_url"),
        ("api.acme.test/v1", {}, "integration acme's base_url 'api.acme.test/v1' is not an http:// or https:// URL"),
        ("htps://api.acme.test", {}, "base_url 'htps://api.acme.test' is not an http:// or https:// URL"),
        ("{instance_url}/v1", {"instance_url": "acme.test"}, "('acme.test/v1' with the connection's config)"),
    ],
    ids=["missing", "no-scheme", "misspelled-scheme", "placeholder-without-scheme"],
)
async def test_a_relative_call_without_a_usable_base_url_is_a_misconfiguration(
    http: httpx.AsyncClient, base_url: str, config: dict[str, Any], says: str
) -> None:
    """No base_url (or one that is not http(s)): Misconfigured naming the setting, noted, and nothing is sent."""
    proxy = provider(http, base_url, config=config)

    with pytest.raises(Misconfigured) as refused:
        await proxy.request("GET", "/me")

    message = str(refused.value)
    assert says in message
    assert "set [integrations.acme] base_url" in message or "fix [integrations.acme] base_url" in message
    assert "\n" not in message
    assert refused.value.setting == "integrations.acme.base_url"
    assert isinstance(refused.value, FailedPrecondition)
    assert proxy.misconfiguration == message
    assert proxy.calls == []


async def test_an_absolute_url_needs_no_base_url(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """A call to an absolute URL is made without a base_url (and gets no credentials: not the provider's origin)."""
    server.route("GET", "/status", Reply(200, {"ok": True}))
    proxy = provider(http, "", "bearer", {"access_token": SECRET})

    response = await proxy.request("GET", server.url + "/status")

    assert response.json() == {"ok": True}
    assert proxy.misconfiguration == ""
    (request,) = server.requests
    assert "authorization" not in request.headers


# -- retries -------------------------------------------------------------------


async def test_429_with_retry_after_zero_is_retried(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """A 429 answer with Retry-After: 0 is retried at once and the second answer returned."""
    server.route("GET", "/me", Reply(429, "slow down", headers={"Retry-After": "0"}), Reply(200, {"ok": True}))
    calls: list[str] = []
    proxy = Provider(http, Integration("acme", base_url=server.url), {}, {}, calls=calls)

    response = await proxy.request("GET", "/me")

    assert response.json() == {"ok": True}
    assert len(server.requests_to("GET", "/me")) == 2
    assert calls == [f"GET {server.url}/me -> 429", f"GET {server.url}/me -> 200"]


async def test_503_twice_then_200_is_retried(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """5xx answers are retried with a backoff (no Retry-After) until one succeeds within the retries."""
    server.route("GET", "/me", Reply(503), Reply(503), Reply(200, {"ok": True}))

    response = await provider(http, server.url).request("GET", "/me")

    assert response.status_code == 200
    assert len(server.requests) == 3


async def test_retries_are_bounded(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """A provider that keeps failing gets 1 + retries calls, then the error is raised."""
    server.route("GET", "/me", Reply(502, "bad gateway", headers={"Retry-After": "0"}))

    with pytest.raises(ProviderError) as info:
        await provider(http, server.url, retries=2).request("GET", "/me")

    assert info.value.status == 502
    assert len(server.requests) == 3


async def test_a_long_retry_after_fails_at_once(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """A Retry-After beyond the proxy's patience is not slept through: the call fails and the job retries later."""
    server.route("GET", "/me", Reply(429, "quota", headers={"Retry-After": "3600"}))

    with pytest.raises(ProviderError) as info:
        await provider(http, server.url).request("GET", "/me")

    assert info.value.status == 429
    assert len(server.requests) == 1


async def test_retry_after_as_a_past_date_retries_at_once(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """Retry-After given as an HTTP date in the past means retry now."""
    server.route(
        "GET", "/me", Reply(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), Reply(200, {"ok": 1})
    )

    response = await provider(http, server.url).request("GET", "/me")

    assert response.json() == {"ok": 1}
    assert len(server.requests) == 2


async def test_client_errors_are_not_retried(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """A 404 is answered once and raised as ProviderError with the status and a body excerpt."""
    server.route("DELETE", "/webhooks/wh_1", Reply(404, {"error": "webhook wh_1 not found"}))

    with pytest.raises(ProviderError) as info:
        await provider(http, server.url).request("DELETE", "/webhooks/wh_1")

    assert info.value.status == 404
    assert info.value.body == '{"error": "webhook wh_1 not found"}'
    message = str(info.value)
    assert message.startswith(f"DELETE {server.url}/webhooks/wh_1 answered 404 Not Found: ")
    assert "webhook wh_1 not found" in message
    assert len(server.requests) == 1


async def test_the_body_excerpt_is_short(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """A huge error body is cut to a short excerpt in the error."""
    server.route("GET", "/me", Reply(400, "e" * 100_000))

    with pytest.raises(ProviderError) as info:
        await provider(http, server.url).request("GET", "/me")

    assert info.value.body == "e" * BODY_EXCERPT
    assert len(str(info.value)) < BODY_EXCERPT + 200


async def test_an_unreachable_provider_is_a_provider_error(http: httpx.AsyncClient) -> None:
    """A connection refused is retried, then raised as ProviderError with status 0."""
    with ProviderServer() as gone:
        url = gone.url  # the port is closed once the server stops
    calls: list[str] = []
    proxy = Provider(http, Integration("acme", base_url=url, retries=1), {}, {}, calls=calls)

    with pytest.raises(ProviderError, match="failed: ConnectError") as info:
        await proxy.request("GET", "/me")

    assert info.value.status == 0
    assert calls == [f"GET {url}/me -> ConnectError"] * 2


async def test_a_slow_provider_times_out(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """The integration's timeout bounds each call; a timeout is a ProviderError."""
    server.route("GET", "/slow", Reply(200, delay=5))

    with pytest.raises(ProviderError, match="ReadTimeout"):
        await provider(http, server.url, timeout=0.1, retries=0).request("GET", "/slow")


# -- secrets -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "credentials"),
    [
        ("bearer", {"access_token": SECRET}),
        ("basic", {"username": "ann", "password": SECRET}),
        ("header:X-Api-Key", {"api_key": SECRET}),
        ("query:api_key", {"api_key": SECRET}),
    ],
)
async def test_the_credential_never_appears_in_a_provider_error(
    server: ProviderServer, http: httpx.AsyncClient, auth: str, credentials: dict[str, str]
) -> None:
    """Error messages and the call log name the method and URL, never the credential, whatever the scheme."""
    server.route("GET", "/me", Reply(401, {"error": "invalid credentials"}))
    calls: list[str] = []
    proxy = Provider(http, Integration("acme", base_url=server.url, auth=auth), {}, credentials, calls=calls)

    with pytest.raises(ProviderError) as info:
        await proxy.request("GET", "/me", params={"page": 2})

    assert info.value.status == 401
    assert SECRET not in str(info.value)
    assert SECRET not in info.value.body
    assert not any(SECRET in call for call in calls)
    assert len(server.requests) == 1  # it was sent (the auth tests check how), just never shown


async def test_the_credential_never_appears_in_a_transport_error(http: httpx.AsyncClient) -> None:
    """A failed connection with query auth does not leak the key through the URL in the message."""
    with ProviderServer() as gone:
        url = gone.url
    proxy = Provider(http, Integration("acme", base_url=url, auth="query:key", retries=0), {}, {"api_key": SECRET})

    with pytest.raises(ProviderError) as info:
        await proxy.request("GET", "/me")

    assert SECRET not in str(info.value)


async def test_a_credential_echoed_by_the_provider_is_redacted(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """A provider whose error body echoes the key back does not get the key into the error message."""
    server.route("GET", "/me", Reply(401, f"invalid api key {SECRET}"))
    proxy = provider(http, server.url, "header:X-Api-Key", {"api_key": SECRET})

    with pytest.raises(ProviderError) as info:
        await proxy.request("GET", "/me")

    assert info.value.status == 401
    assert SECRET not in str(info.value)
    assert SECRET not in info.value.body
    assert "invalid api key" in str(info.value), "the rest of the answer is kept"


NASTY_TOKEN = 'tok"en\\with/quotes+and %41 &amp;'
"""A credential (ASCII, to fit in a header) that JSON, URLs and HTML all escape differently."""


@pytest.mark.parametrize("auth", ["bearer", "header:X-Api-Key", "query:key"], ids=["bearer", "header", "query"])
async def test_a_credential_echoed_json_escaped_is_redacted(
    server: ProviderServer, http: httpx.AsyncClient, auth: str
) -> None:
    """A JSON error body echoing what was sent (a token with quotes and backslashes, escaped) leaks no form of it."""

    def echo(request: Request) -> Reply:
        headers = request.headers
        sent = {"authorization": headers.get("authorization", ""), "api_key": headers.get("x-api-key", "")}
        return Reply(401, {"error": "denied", "you_sent": sent, "query": request.query})

    server.route("GET", "/me", echo)
    credentials = {"access_token": NASTY_TOKEN, "api_key": NASTY_TOKEN}

    with pytest.raises(ProviderError) as info:
        await provider(http, server.url, auth, credentials).request("GET", "/me")

    assert "[redacted]" in info.value.body
    shown = str(info.value)
    for form in (NASTY_TOKEN, json.dumps(NASTY_TOKEN)[1:-1], quote(NASTY_TOKEN, safe=""), quote_plus(NASTY_TOKEN)):
        assert form not in shown, form
    assert '"error": "denied"' in shown, "the rest of the answer is kept"


async def test_a_credential_across_the_excerpts_end_is_not_halved(
    server: ProviderServer, http: httpx.AsyncClient
) -> None:
    """A credential the excerpt's cut would halve is redacted before the cut, so no part of it is shown."""
    body = "e" * (BODY_EXCERPT - 5) + SECRET + "e" * 1000
    server.route("GET", "/me", Reply(400, body))

    with pytest.raises(ProviderError) as info:
        await provider(http, server.url, "bearer", {"access_token": SECRET}).request("GET", "/me")

    assert info.value.body == "e" * (BODY_EXCERPT - 5) + "[redacted]"[:5]
    assert SECRET[:5] not in str(info.value)


# -- a 401, the resolver and ctx.credentials ----------------------------------------


def refreshing(fresh: Mapping[str, str] | None, asked: list[int]) -> Secrets:
    """Secrets holding the stale token whose refresh answers ``fresh`` (counting the asks in ``asked``)."""

    async def refresh() -> Mapping[str, str] | None:
        asked.append(1)
        return fresh

    return Secrets({"access_token": "stale-token"}, refresh=refresh)


async def test_a_401_asks_for_fresh_credentials_once_and_retries_once_with_them(
    server: ProviderServer, http: httpx.AsyncClient
) -> None:
    """401 with the stale token: the resolver is asked once, the call is sent again with the fresh one."""
    server.route("GET", "/me", Reply(401, {"error": "expired"}), Reply(200, {"login": "acme"}))
    asked: list[int] = []
    secrets = refreshing({"access_token": SECRET}, asked)
    proxy = Provider(http, Integration("acme", base_url=server.url, auth="bearer"), {}, secrets)
    response = await proxy.request("GET", "/me")
    assert response.status_code == 200
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer stale-token", f"Bearer {SECRET}"]
    assert asked == [1]
    assert secrets.seen == [{"access_token": "stale-token"}, {"access_token": SECRET}]
    assert proxy.credentials["access_token"] == SECRET


async def test_a_second_401_or_no_fresh_credentials_is_the_providers_error(
    server: ProviderServer, http: httpx.AsyncClient
) -> None:
    """Fresh credentials refused too: one retry only. No fresh credentials: the first 401 stands, one call."""
    server.route("GET", "/me", Reply(401, {"error": "expired"}))
    asked: list[int] = []
    integration = Integration("acme", base_url=server.url, auth="bearer")
    proxy = Provider(http, integration, {}, refreshing({"access_token": SECRET}, asked))
    with pytest.raises(ProviderError, match="answered 401") as refused:
        await proxy.request("GET", "/me")
    assert len(server.requests) == 2 and asked == [1]
    assert SECRET not in str(refused.value)
    with pytest.raises(ProviderError, match="answered 401"):
        await proxy.request("GET", "/me")  # the same attempt: the resolver is not asked again
    assert len(server.requests) == 3 and asked == [1]
    server.clear_requests()
    nothing = Provider(http, integration, {}, refreshing(None, asked))
    with pytest.raises(ProviderError, match="answered 401"):
        await nothing.request("GET", "/me")
    assert len(server.requests) == 1 and asked == [1, 1]


async def test_a_401_without_credentials_sent_asks_nobody(server: ProviderServer, http: httpx.AsyncClient) -> None:
    """auth none: a 401 is the provider's answer to the function, no refresh is attempted."""
    server.route("GET", "/me", Reply(401, {"error": "login first"}))
    asked: list[int] = []
    proxy = Provider(http, Integration("acme", base_url=server.url), {}, refreshing({"access_token": SECRET}, asked))
    with pytest.raises(ProviderError, match="answered 401"):
        await proxy.request("GET", "/me")
    assert asked == [] and len(server.requests) == 1


async def test_credentials_that_cannot_be_opened_fail_only_when_needed(
    server: ProviderServer, http: httpx.AsyncClient
) -> None:
    """A call without auth works; one that needs the credentials raises the reason (not retried); no call is made."""
    server.route("GET", "/status", Reply(200, {"ok": True}))
    secrets = Secrets(unavailable="sealed under key id 1234abcd, which is not configured")
    open_proxy = Provider(http, Integration("acme", base_url=server.url), {}, secrets)
    assert (await open_proxy.request("GET", "/status")).status_code == 200
    proxy = Provider(http, Integration("acme", base_url=server.url, auth="bearer"), {}, secrets)
    with pytest.raises(CredentialsUnavailable, match="key id 1234abcd"):
        await proxy.request("GET", "/status")
    with pytest.raises(CredentialsUnavailable, match="key id 1234abcd"):
        proxy.credentials["access_token"]
    assert repr(proxy.credentials) == "Credentials(unavailable)"
    assert len(server.requests) == 1


def test_ctx_credentials_are_read_only_and_their_repr_shows_names_only() -> None:
    """ctx.credentials: a mapping for SDKs; repr and str name the keys and hide the values; no item assignment."""
    view = ReadOnlyCredentials(Secrets({"access_token": SECRET, "api_key": "k3y-value"}).current)
    assert dict(view) == {"access_token": SECRET, "api_key": "k3y-value"}
    assert repr(view) == str(view) == "Credentials(access_token=[redacted], api_key=[redacted])"
    assert SECRET not in f"{view!r} {view} {[view]}"
    with pytest.raises(TypeError):
        view["access_token"] = "x"  # type: ignore[index]
