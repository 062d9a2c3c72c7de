"""The stand-in providers of :mod:`orchestrator.testing`: canned answers, saved exchanges replayed, and a recorder."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from orchestrator.errors import InvalidArgument
from orchestrator.responses import Exchange, relative


class UnexpectedRequest(Exception):
    """The stand-in provider has no answer for a request the function made."""


@dataclass(frozen=True, slots=True)
class Request:
    """A request the function made, as the provider received it, and the status it was answered."""

    method: str
    url: str
    path: str
    """Relative to the integration's base URL (``/webhooks/wh1``), as the function wrote it; the whole URL
    (without its query) for another origin."""
    query: str
    headers: httpx.Headers
    content: bytes
    status: int | None
    """The answer's status; None when none came (the stand-in had no answer)."""

    @property
    def text(self) -> str:
        """The body as text."""
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.content)

    def param(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        value: str | None = httpx.URL(self.url).params.get(name)
        return value

    def __str__(self) -> str:
        answered = f" -> {self.status}" if self.status is not None else " -> (no answer)"
        return f"{self.method} {self.path}{'?' + self.query if self.query else ''}{answered}"


def _answer(value: Any, request: httpx.Request, where: str) -> httpx.Response:
    """A canned answer (see :mod:`orchestrator.testing`) as the response to ``request``."""
    if callable(value) and not isinstance(value, httpx.Response):
        return _answer(value(request), request, where)
    if isinstance(value, httpx.Response):
        return httpx.Response(value.status_code, headers=value.headers, content=value.content, request=request)
    if isinstance(value, bool):  # a bool is an int: refused rather than taken for status 0 or 1
        raise InvalidArgument(f"{where}: {value!r} is not an answer")
    if value is None:
        return httpx.Response(204, request=request)
    if isinstance(value, int):
        return httpx.Response(value, request=request)
    if isinstance(value, str):
        return httpx.Response(200, text=value, request=request)
    if isinstance(value, dict):
        return httpx.Response(200, json=value, request=request)
    if isinstance(value, tuple) and len(value) in (2, 3) and isinstance(value[0], int):
        status, body, *headers = value
        extra = dict(headers[0]) if headers else {}
        if isinstance(body, dict | list):
            return httpx.Response(status, json=body, headers=extra, request=request)
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers=extra, request=request)
        if isinstance(body, bytes) or body is None:
            return httpx.Response(status, content=body or b"", headers=extra, request=request)
        raise InvalidArgument(f"{where}: a body of {type(body).__name__} (a dict, list, str, bytes or None)")
    raise InvalidArgument(
        f"{where}: {type(value).__name__} is not an answer (an int, dict, str, None, (status, body[, headers]),"
        " httpx.Response, a function of the request, or a list of these)"
    )


class Canned(httpx.AsyncBaseTransport):
    """Answers ``"METHOD /path"`` keys (``*`` wildcards) with their canned answers; a list is answered in turn."""

    def __init__(self, answers: Mapping[str, Any], base_url: str) -> None:
        self._routes: list[tuple[str, str, str, list[Any]]] = []
        for key, value in answers.items():
            method, _, pattern = key.strip().partition(" ")
            if not pattern.strip():
                raise InvalidArgument(f"canned response {key!r}: the key is METHOD /path, like 'GET /user'")
            script = list(value) if isinstance(value, list) else [value]
            if not script:
                raise InvalidArgument(f"canned response {key!r}: an empty list of answers")
            self._routes.append((key, method.upper(), pattern.strip(), script))
        self._base_url = base_url

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = relative(request.url, self._base_url)
        for key, method, pattern, script in self._routes:
            if method == request.method and fnmatch.fnmatchcase(path, pattern):
                value = script.pop(0) if len(script) > 1 else script[0]
                return _answer(value, request, f"canned response {key!r}")
        keys = ", ".join(repr(route[0]) for route in self._routes) or "none"
        raise UnexpectedRequest(f"no canned response for {request.method} {path} (canned: {keys})")


class Replay(httpx.AsyncBaseTransport):
    """Answers each request with the first saved exchange of its method and path not used yet."""

    def __init__(self, exchanges: list[Exchange], base_url: str, source: str) -> None:
        self._left = list(exchanges)
        self._base_url = base_url
        self._source = source

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = relative(request.url, self._base_url)
        for i, exchange in enumerate(self._left):
            if (exchange.method, exchange.path) == (request.method, path):
                del self._left[i]
                return exchange.response(request)
        left = ", ".join(f"{e.method} {e.path}" for e in self._left) or "none"
        raise UnexpectedRequest(
            f"{request.method} {path} is not among the responses saved in {self._source} (left: {left})"
        )


class Nothing(httpx.AsyncBaseTransport):
    """No provider was given: any request is unexpected."""

    def __init__(self, base_url: str) -> None:
        self._base_url = base_url

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = relative(request.url, self._base_url)
        raise UnexpectedRequest(
            f"{request.method} {path}: no provider was given (pass provider= canned responses, an httpx.MockTransport"
            " or a folder of saved responses)"
        )


class Recording(httpx.AsyncBaseTransport):
    """A stand-in's requests and answers, kept as :class:`Request` s."""

    def __init__(self, inner: httpx.AsyncBaseTransport, base_url: str, on: Callable[[Request], None]) -> None:
        self._inner = inner
        self._base_url = base_url
        self._on = on

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        content = await request.aread()
        status = None
        try:
            response = await self._inner.handle_async_request(request)
            status = response.status_code
            return response
        finally:
            url = request.url
            path = relative(url, self._base_url)
            query = url.query.decode()
            self._on(Request(request.method, str(url), path, query, request.headers, content, status))

    async def aclose(self) -> None:
        await self._inner.aclose()
