"""The provider proxy: HTTP calls to a connection's provider with its credentials injected.

One shared :class:`httpx.AsyncClient` serves every function. The base URL
and auth scheme come from the integration's settings; ``{placeholders}`` in
the base URL are filled from the connection's config. 429 and 5xx answers and
transport errors are retried (honouring ``Retry-After``, bounded); any other
error answer raises :class:`~orchestrator.errors.ProviderError`. A 401 asks
the attempt's :class:`Secrets` for fresher credentials once (the credentials
resolver, when one is installed) and, given some, sends the call once more. A
credential the auth scheme needs and the connection lacks raises
:class:`CredentialsUnavailable` (not retried: it does not come back by itself);
a relative endpoint of an integration with no ``base_url`` (or one that is not
an ``http(s)://`` URL) raises :class:`~orchestrator.errors.Misconfigured`. The
proxy notes either in :attr:`Provider.misconfiguration`, where the dispatcher
(in the daemon, whatever the isolation) finds it: a plugin cannot forge it. Credentials
never appear in an error message: :func:`redact` replaces them in every form a
provider may echo them back in (URL-encoded, JSON-escaped, HTML-escaped,
base64, and these combined), and is what the dispatcher runs over a function's
error and log lines too. Pauses between retries are taken on the injected
:class:`~orchestrator.clock.Clock`.
"""

from __future__ import annotations

import base64
import email.utils
import html
import json
import re
import shlex
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import partial
from typing import Any
from urllib.parse import quote, quote_plus

import anyio
import httpx
from opentelemetry import trace

from orchestrator import tracing
from orchestrator.clock import Clock, SystemClock
from orchestrator.config import Integration
from orchestrator.errors import Misconfigured, ProviderError
from orchestrator.functions import NonRetryable
from orchestrator.model import JSONObject

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER = 30.0
"""A provider asking for a longer pause makes the call fail (the job's own retry takes over)."""
BODY_EXCERPT = 300
tracer = trace.get_tracer(__name__)


class CredentialsUnavailable(NonRetryable):
    """The connection has no usable credentials for what the attempt needs; retrying will not bring them."""


Refresh = Callable[[], Awaitable[Mapping[str, str] | None]]
"""Asks for fresh credentials (the resolver): the new ones, or None when there are none."""


class Secrets:
    """The credentials one attempt may use (or why it has none), and the way to fresher ones.

    ``unavailable`` says why stored credentials could not be opened (their key is not
    configured, say): the error is raised only when the attempt needs them. A synchronous run
    shares one among its functions: the resolver is asked once, whoever hits the 401 first.
    """

    def __init__(
        self, values: Mapping[str, str] | None = None, *, unavailable: str = "", refresh: Refresh | None = None
    ) -> None:
        self._values: Mapping[str, str] = dict(values or {})
        self._unavailable = unavailable
        self._refresh = refresh
        self._asked = False
        self._lock = anyio.Lock()
        self.seen: list[Mapping[str, str]] = [self._values] if self._values else []
        """Every set of credentials this attempt had (for redaction)."""

    @property
    def latest(self) -> Mapping[str, str]:
        """The latest credentials known (empty when none could be opened), for redaction: never raises."""
        return self._values

    def current(self) -> Mapping[str, str]:
        """The credentials to use now; :class:`CredentialsUnavailable` when they could not be opened."""
        if self._unavailable:
            raise CredentialsUnavailable(self._unavailable)
        return self._values

    async def refresh(self, stale: Mapping[str, str]) -> bool:
        """Whether there are fresher credentials than ``stale``: fetched meanwhile, or asked for now (once)."""
        async with self._lock:
            if self._values is not stale and not self._unavailable:
                return True
            if self._refresh is None or self._asked:
                return False
            self._asked = True
            fresh = await self._refresh()
            if not fresh:
                return False
            self._values, self._unavailable = dict(fresh), ""
            self.seen.append(self._values)
            return True


class ReadOnlyCredentials(Mapping[str, str]):
    """``ctx.credentials``: the connection's credentials for SDKs that need the raw token.

    Read-only, and its ``repr`` shows the names only. Every read asks ``current`` (the
    attempt's :meth:`Secrets.current`, or in a worker process a call to the daemon), so it
    sees fresh credentials after a 401; when they cannot be opened, it raises
    :class:`CredentialsUnavailable`.
    """

    def __init__(self, current: Callable[[], Mapping[str, str]]) -> None:
        self._current = current

    def __getitem__(self, name: str) -> str:
        return self._current()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def __repr__(self) -> str:
        try:
            names = sorted(self._current())
        except CredentialsUnavailable:
            return "Credentials(unavailable)"
        return "Credentials(" + ", ".join(f"{name}={REDACTED}" for name in names) + ")"

    __str__ = __repr__


def _auth(
    integration: Integration, credentials: Mapping[str, str], connection: str = ""
) -> tuple[dict[str, str], dict[str, str], Any]:
    """(headers, query params, httpx auth) for the integration's scheme."""
    scheme, _, arg = integration.auth.partition(":")

    def need(key: str) -> str:
        if key not in credentials:
            parts = connection.split("/", 2)
            if len(parts) == 3:
                who = f"connection {connection}"
                command = f"orchestrator credentials set {shlex.quote(parts[2])} -i {parts[1]} -e {parts[0]}"
            else:
                who = "the connection"
                command = f"orchestrator credentials set CONNECTION_ID -i {integration.name}"
            raise CredentialsUnavailable(
                f"{who} has no credential {key!r}, which integration {integration.name}'s auth"
                f" {integration.auth!r} needs: supply it with UpdateCredentials (`{command} --credential {key}=...`)"
                " or with the connection's next emit"
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


MIN_SECRET_LENGTH = 4
"""Credential values shorter than this are not redacted, in any form: replacing every ``"on"`` or
``"1"`` in a message would blank ordinary words and numbers, and a credential that short
protects nothing anyway."""
REDACTED = "[redacted]"
_WIDEST = 72
r"""The most characters of a text that one character of a decoding of it comes from: a character
outside the BMP URL-encoded (``%F0%9F%98%80``, 12), with each of these escaped in a JSON
string (``\u0025``, 6 each)."""
_JSON_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HTML_ENTITIES = {"quot": '"', "amp": "&", "lt": "<", "gt": ">", "apos": "'"}
_PERCENT_BYTE = re.compile(r"%[0-9A-F]{2}")
_UNICODE_ESCAPE = re.compile(r"\\u[0-9a-f]{4}")


def _b64(data: bytes, urlsafe: bool) -> str:
    return (base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)).decode()


def _base64_forms(data: bytes) -> set[str]:
    """``data`` base64-encoded on its own, and the characters that encode it inside any longer blob.

    Inside a blob the encoding of ``data`` depends on its offset modulo 3: at each offset, the
    characters that only ``data``'s bits determine (the first ones mix in the bytes before it,
    the last one those after it) are a form of their own.
    """
    forms: set[str] = set()
    for urlsafe in (False, True):
        whole = _b64(data, urlsafe)
        forms |= {whole, whole.rstrip("=")}
        for offset in (0, 1, 2):
            encoded = _b64(bytes(offset) + data, urlsafe).rstrip("=")
            first = (0, 2, 3)[offset]  # characters that mix in the bytes before it
            last = len(encoded) - (1 if (offset + len(data)) % 3 else 0)  # the last mixes in those after it
            forms.add(encoded[first:last])
    return forms


def _lower_hex(text: str) -> str:
    return _PERCENT_BYTE.sub(lambda match: match.group().lower(), text)


def _text_forms(value: str) -> set[str]:
    r"""``value`` as the usual encoders write it, each a form of its own.

    The decodings of :func:`_views` find these too, wherever the text is well-formed; searching
    them as they are also finds them next to text that would mislead a decoding (a stray ``%4``
    or ``\`` just before), and once more encoded (URL-encoded twice, say).
    """
    url = {quote(value, safe=""), quote(value), quote_plus(value), quote_plus(value, safe="/")}
    ascii_json = json.dumps(value)[1:-1]
    escaped = {ascii_json, json.dumps(value, ensure_ascii=False)[1:-1]}
    escaped |= {form.replace("/", "\\/") for form in escaped}
    escaped.add(_UNICODE_ESCAPE.sub(lambda match: match.group().upper().replace("\\U", "\\u"), ascii_json))
    url |= {quote(form, safe="") for form in escaped} | {quote_plus(form) for form in escaped}
    url |= {_lower_hex(form) for form in url}
    return {value, *url, *escaped, html.escape(value), html.escape(value, quote=False)}


Known = Mapping[str, str] | Sequence[Mapping[str, str]]
"""Credentials to redact: one set, or every set an attempt had (:attr:`Secrets.seen`)."""


def _secret_forms(credentials: Known) -> list[str]:
    """The strings :func:`redact` looks for, in the text and in each decoding of it, longest first.

    Each credential value: as is, as the usual encoders write it (:func:`_text_forms`),
    base64-encoded (alone or inside a longer blob); and each set's basic-auth pair base64-encoded.
    """
    sets = [credentials] if isinstance(credentials, Mapping) else credentials
    values = {value for one in sets for value in one.values() if len(value) >= MIN_SECRET_LENGTH}
    forms: set[str] = set()
    for value in values:
        encoded = _base64_forms(value.encode())
        # Base64 in a URL ("+", "/" and "=" escaped): searched as is too, as text forms are.
        escaped = {quote(form, safe="") for form in encoded}
        forms |= _text_forms(value) | encoded | escaped | {_lower_hex(form) for form in escaped}
    for one in sets:
        if len(one.get("password", "")) >= MIN_SECRET_LENGTH:
            forms |= _base64_forms(f"{one.get('username', '')}:{one['password']}".encode())
    return sorted((f for f in forms if len(f) >= MIN_SECRET_LENGTH), key=len, reverse=True)


Piece = tuple[int, int, int, bool]
"""A stretch of a decoded text: (where it starts there, the span of the text it came from, copied
as is or decoded from an escape)."""
Decoded = tuple[str, list[Piece]]


class _View:
    """A decoding of a text, each of its characters mapped back to the span of the text it came from."""

    def __init__(self, text: str, pieces: list[Piece] | None = None, parent: _View | None = None) -> None:
        self.text = text
        self._pieces = pieces
        self._starts = [piece[0] for piece in pieces or ()]
        self._parent = parent

    def then(self, decode: Callable[[str], Decoded]) -> _View:
        """This view decoded once more, still mapped to the original text."""
        text, pieces = decode(self.text)
        return _View(text, pieces, self)

    def _local(self, index: int) -> tuple[int, int]:
        """The span of the parent's text that character ``index`` came from."""
        if self._pieces is None:
            return index, index + 1
        decoded, start, end, copied = self._pieces[bisect_right(self._starts, index) - 1]
        return (start + index - decoded, start + index - decoded + 1) if copied else (start, end)

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The span of the original text that characters ``start`` to ``end`` (exclusive) came from."""
        first, last = self._local(start)[0], self._local(end - 1)[1]
        if self._parent is None:
            return first, last
        return self._parent.span(first, last)

    def find(self, form: str) -> list[tuple[int, int]]:
        """The spans of the original text whose decoding is ``form``, overlapping ones included."""
        spans = []
        at = self.text.find(form)
        while at != -1:
            spans.append(self.span(at, at + len(form)))
            at = self.text.find(form, at + 1)
        return spans


def _decoded(
    text: str,
    escape: re.Pattern[str],
    decode: Callable[[re.Match[str]], list[tuple[str, int, int]]],
    copy: Callable[[str], str] = str,
) -> Decoded:
    """``text`` with each match of ``escape`` replaced by the characters ``decode`` makes of it (with their spans).

    What lies between the matches is copied through ``copy``, which must keep its length.
    """
    parts: list[str] = []
    pieces: list[Piece] = []
    length = at = 0
    for match in escape.finditer(text):
        if match.start() > at:
            parts.append(copy(text[at : match.start()]))
            pieces.append((length, at, match.start(), True))
            length += match.start() - at
        for char, start, end in decode(match):
            parts.append(char)
            pieces.append((length, start, end, False))
            length += 1
        at = match.end()
    if at < len(text):
        parts.append(copy(text[at:]))
        pieces.append((length, at, len(text), True))
    return "".join(parts), pieces


_PERCENT = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_JSON_ESCAPE = re.compile(
    r'\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|["\\/bfnrt])'
)  # a surrogate pair first: one character
_HTML_REFERENCE = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|quot|amp|lt|gt|apos);")


def _utf8_length(lead: int) -> int:
    """The length of the UTF-8 sequence ``lead`` starts; 0 when no sequence starts with it."""
    for size, low, high in ((1, 0x00, 0x7F), (2, 0xC2, 0xDF), (3, 0xE0, 0xEF), (4, 0xF0, 0xF4)):
        if low <= lead <= high:
            return size
    return 0


def _percent_run(match: re.Match[str]) -> list[tuple[str, int, int]]:
    """A run of ``%XX`` as UTF-8; a byte that is not valid UTF-8 becomes a lone surrogate, in no credential."""
    run = bytes.fromhex(match.group().replace("%", ""))
    chars = []
    i = 0
    while i < len(run):
        size = _utf8_length(run[i])
        try:
            char = run[i : i + size].decode() if size else ""
        except UnicodeDecodeError:
            char = ""
        if len(char) != 1:
            char, size = chr(0xDC00 + run[i]), 1
        start = match.start() + 3 * i
        chars.append((char, start, start + 3 * size))
        i += size
    return chars


def _percent_decoded(text: str, *, plus: bool) -> Decoded:
    """``%XX`` sequences (either case, UTF-8) decoded; with ``plus``, ``+`` as a space too."""
    return _decoded(text, _PERCENT, _percent_run, _plus_as_space if plus else str)


def _plus_as_space(text: str) -> str:
    return text.replace("+", " ")


def _json_escape(match: re.Match[str]) -> list[tuple[str, int, int]]:
    escape = match.group()
    if escape[1] != "u":
        char = _JSON_ESCAPES[escape[1]]
    elif len(escape) == 12:  # a surrogate pair
        char = chr(0x10000 + ((int(escape[2:6], 16) - 0xD800) << 10) + (int(escape[8:12], 16) - 0xDC00))
    else:
        char = chr(int(escape[2:6], 16))
    return [(char, match.start(), match.end())]


def _json_unescaped(text: str) -> Decoded:
    r"""JSON string escapes decoded: ``\"``, ``\\``, ``\/``, ``\n`` and such, ``\uXXXX`` (surrogate pairs joined)."""
    return _decoded(text, _JSON_ESCAPE, _json_escape)


def _html_reference(match: re.Match[str]) -> list[tuple[str, int, int]]:
    name, start = match.group()[1:-1], match.start()
    code = int(name[2:], 16) if name[:2] in ("#x", "#X") else int(name[1:]) if name[0] == "#" else -1
    if name in _HTML_ENTITIES:
        return [(_HTML_ENTITIES[name], start, match.end())]
    if 0 <= code <= 0x10FFFF:
        return [(chr(code), start, match.end())]
    return [(char, start + i, start + i + 1) for i, char in enumerate(match.group())]


def _html_unescaped(text: str) -> Decoded:
    """HTML character references decoded: ``&#34;``, ``&#x22;`` and ``&quot; &amp; &lt; &gt; &apos;``."""
    return _decoded(text, _HTML_REFERENCE, _html_reference)


def _views(text: str) -> list[_View]:
    """The text and each decoding a provider's echo may have put a credential through."""
    raw = _View(text)
    views = [raw]
    percent = "%" in text or "+" in text
    if percent:
        views += [raw.then(partial(_percent_decoded, plus=plus)) for plus in (False, True)]
    if "\\" in text:
        views.append(raw.then(_json_unescaped))
        if percent:  # URL-encoded inside a JSON string
            views += [views[-1].then(partial(_percent_decoded, plus=plus)) for plus in (False, True)]
    if percent:  # JSON-escaped, then URL-encoded
        views += [view.then(_json_unescaped) for view in views[1:3] if "\\" in view.text]
    if "&" in text:
        views.append(raw.then(_html_unescaped))
    return views


def _spans(text: str, forms: list[str]) -> list[tuple[int, int]]:
    """The merged spans of ``text`` holding a form, in any decoding."""
    found = sorted(span for view in _views(text) for form in forms for span in view.find(form))
    merged: list[tuple[int, int]] = []
    for start, end in found:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _replaced(text: str, spans: list[tuple[int, int]]) -> str:
    parts: list[str] = []
    at = 0
    for start, end in spans:
        parts += [text[at:start], REDACTED]
        at = end
    parts.append(text[at:])
    return "".join(parts)


def redact(text: str, credentials: Known) -> str:
    r"""``text`` with every credential replaced by ``[redacted]``, in whatever form a provider may echo it.

    Covered: the value as is; URL-encoded by any encoder (``%XX`` in either case, UTF-8, ``+``
    for a space, some characters left as they are); JSON-escaped (``\"``, ``\\``, ``\/``,
    ``\uXXXX`` in either case, with or without ``ensure_ascii``); HTML character references;
    URL-encoded inside a JSON string, and JSON-escaped inside a URL-encoded one; base64 (standard
    or URL-safe, padded or not) of the value alone or inside a longer blob, such as the
    basic-auth pair. The text outside the credentials is kept as it is. Values shorter than
    :data:`MIN_SECRET_LENGTH` are not redacted.
    """
    forms = _secret_forms(credentials)
    if not forms or not text:
        return text
    return _replaced(text, _spans(text, forms))


def redact_excerpt(text: str, credentials: Known, limit: int) -> str:
    """The first ``limit`` characters of ``text`` redacted: cut after redacting, so that no credential is halved.

    Only as much of ``text`` as it takes is decoded (a body may be large): a window whose last
    characters, where the window's end could halve a credential, fall past ``limit`` once redacted.
    """
    forms = _secret_forms(credentials)
    if not forms:
        return text[:limit]
    margin = _WIDEST * len(forms[0])
    window = limit + margin
    while True:
        part = text[:window]
        spans = _spans(part, forms)
        if len(part) == len(text):
            return _replaced(part, spans)[:limit]
        final = len(part) - margin  # a credential the window's end cuts starts after this
        head = _replaced(part[:final], [(start, min(end, final)) for start, end in spans if start < final])
        if len(head) >= limit:
            return head[:limit]
        window *= 2


class Provider:
    """Calls to one connection's provider, as seen by one function attempt."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        integration: Integration,
        config: JSONObject,
        credentials: Mapping[str, str] | Secrets,
        *,
        calls: list[str] | None = None,
        clock: Clock | None = None,
        connection: str = "",
    ) -> None:
        self._client = client
        self._clock = clock or SystemClock()
        self._integration = integration
        self._config = config
        self.secrets = credentials if isinstance(credentials, Secrets) else Secrets(credentials)
        self.credentials = ReadOnlyCredentials(self._current)
        """The credentials as ``ctx.credentials`` shows them."""
        self._connection = connection
        self.calls: list[str] = calls if calls is not None else []
        """One line per HTTP exchange (method, URL without secrets, status), for dryrun and logs."""
        self.misconfiguration = ""
        """Why this proxy refused a call for what the daemon lacks (a ``base_url``, a credential the auth
        scheme needs, credentials it cannot open); empty when it never did. The first reason is kept."""

    def _noted(self, exc: Misconfigured | CredentialsUnavailable) -> None:
        if not self.misconfiguration:
            self.misconfiguration = str(exc)

    def _current(self) -> Mapping[str, str]:
        try:
            return self.secrets.current()
        except CredentialsUnavailable as exc:
            self._noted(exc)
            raise

    def _base(self) -> str:
        """The integration's base URL for this connection; :class:`Misconfigured` when there is no usable one."""
        integration = self._integration
        base = integration.url_for(self._config)
        if base.lower().startswith(("http://", "https://")):
            return base
        name = integration.name
        setting = f"integrations.{name}.base_url"
        if not integration.base_url:
            raise Misconfigured(
                f"integration {name} has no base_url, which a call to a relative endpoint needs: set"
                f" [integrations.{name}] base_url in the daemon's config",
                setting=setting,
            )
        filled = f" ({base[:200]!r} with the connection's config)" if base != integration.base_url else ""
        raise Misconfigured(
            f"integration {name}'s base_url {integration.base_url[:200]!r}{filled} is not an http:// or https://"
            f" URL: fix [integrations.{name}] base_url in the daemon's config",
            setting=setting,
        )

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
        """Send one request, retrying 429/5xx and transport errors; raise :class:`ProviderError` otherwise.

        A 401 to a call that carried credentials asks for fresher ones once; given some, the call
        is sent once more with them.
        """
        try:
            return await self._request_once_refreshed(method, endpoint, params, json, data, headers)
        except (Misconfigured, CredentialsUnavailable) as exc:
            self._noted(exc)
            raise

    async def _request_once_refreshed(
        self,
        method: str,
        endpoint: str,
        params: Mapping[str, Any] | None,
        json: Any,
        data: Any,
        headers: Mapping[str, str] | None,
    ) -> httpx.Response:
        integration = self._integration
        absolute = endpoint.startswith(("http://", "https://"))
        base = integration.url_for(self._config) if absolute else self._base()
        url = endpoint if absolute else base.rstrip("/") + "/" + endpoint.lstrip("/")
        # A URL from elsewhere (say, from a provider's response) gets no credentials.
        authed = integration.auth != "none" and not (absolute and _origin(url) != _origin(base))
        sent: Mapping[str, str] = self.secrets.current() if authed else {}
        try:
            return await self._request(method, url, sent, authed, params, json, data, headers)
        except ProviderError as exc:
            if exc.status != 401 or not authed or not await self.secrets.refresh(sent):
                raise
        return await self._request(method, url, self.secrets.current(), authed, params, json, data, headers)

    async def _request(
        self,
        method: str,
        url: str,
        credentials: Mapping[str, str],
        authed: bool,
        params: Mapping[str, Any] | None,
        json: Any,
        data: Any,
        headers: Mapping[str, str] | None,
    ) -> httpx.Response:
        integration = self._integration
        auth_headers: dict[str, str] = {}
        auth_params: dict[str, str] = {}
        auth = None
        if authed:
            auth_headers, auth_params, auth = _auth(integration, credentials, self._connection)
        merged_headers = {**(headers or {}), **auth_headers}
        merged_params = {**(params or {}), **auth_params}
        shown = f"{method} {url}"
        if not tracing.traces_on():  # no span to make, and no traceparent for the provider
            return await self._send(method, url, shown, credentials, merged_params, merged_headers, auth, json, data)
        with tracer.start_as_current_span(
            f"HTTP {method}",
            kind=trace.SpanKind.CLIENT,
            attributes={"http.request.method": method, "url.full": url, "orchestrator.integration": integration.name},
        ) as span:
            tracing.inject(merged_headers)  # the provider joins the trace
            try:
                response = await self._send(
                    method, url, shown, credentials, merged_params, merged_headers, auth, json, data
                )
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
        credentials: Mapping[str, str],
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
                    detail = redact(str(exc), credentials or self.secrets.latest)
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
                body = redact_excerpt(response.text, credentials or self.secrets.latest, BODY_EXCERPT)
                raise ProviderError(
                    f"{shown} answered {response.status_code} {response.reason_phrase}: {body}",
                    status=response.status_code,
                    body=body,
                )
            return response
