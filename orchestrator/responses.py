"""Provider exchanges saved by ``orchestrator dryrun --save-responses DIR``, which ``orchestrator.testing`` replays.

A dry run of function NAME writes ``DIR/NAME.json`` (replacing one it wrote
before)::

    {
      "format": "orchestrator-responses/1",
      "function": "delete-webhook",
      "integration": "salesforce",
      "base_url": "https://acme.my.salesforce.com/services/data/v60.0",
      "exchanges": [
        {
          "method": "DELETE",
          "path": "/webhooks/wh1",
          "query": "",
          "request_body": "",
          "status": 204,
          "headers": [["content-type", "application/json"]],
          "body": ""
        }
      ]
    }

One exchange per HTTP request the proxy sent, in order (a retried 503 and
its retry are two). ``path`` is relative to the integration's base URL, as
the function wrote it (``/webhooks/wh1``), so that a replay matches it
whatever the base URL is then; a call to another origin keeps its whole URL.
``query`` and ``request_body`` are there to read; a replay matches on
``method`` and ``path`` only. The response's ``headers`` leave out those of
its transfer (``content-encoding``, ``content-length``, ``transfer-encoding``):
``body`` is the decoded body as text, or ``body_base64`` instead when it is
not UTF-8. The request's headers are not kept (they carry the credentials),
and every credential of the run is replaced by ``[redacted]`` wherever else it
appears, in any encoding :func:`orchestrator.provider.redact` knows.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from orchestrator.errors import InvalidArgument
from orchestrator.provider import Known, redact

FORMAT = "orchestrator-responses/1"
_TRANSFER = frozenset({"content-encoding", "content-length", "transfer-encoding"})


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request the proxy sent and the provider's answer, as saved."""

    method: str
    path: str
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    query: str = ""
    request_body: str = ""

    def response(self, request: httpx.Request) -> httpx.Response:
        """The saved answer, as the provider's answer to ``request``."""
        return httpx.Response(self.status, headers=list(self.headers), content=self.body, request=request)

    def to_json(self) -> dict[str, Any]:
        """As the file holds it."""
        out: dict[str, Any] = {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "request_body": self.request_body,
            "status": self.status,
            "headers": [list(pair) for pair in self.headers],
        }
        try:
            out["body"] = self.body.decode()
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(self.body).decode()
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> Exchange:
        """From the file; :class:`InvalidArgument` naming ``where`` when it is not an exchange."""
        try:
            body = base64.b64decode(data["body_base64"], validate=True) if "body_base64" in data else data["body"]
            exchange = cls(
                str(data["method"]).upper(),
                str(data["path"]),
                int(data["status"]),
                tuple((str(name), str(value)) for name, value in data.get("headers", [])),
                body.encode() if isinstance(body, str) else body,
                str(data.get("query", "")),
                str(data.get("request_body", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"{where} is not a saved exchange ({type(exc).__name__}: {exc})") from None
        return exchange


def relative(url: httpx.URL, base_url: str) -> str:
    """``url``'s path relative to ``base_url`` (``/webhooks/wh1``), or the whole URL (no query) for another origin."""
    base = httpx.URL(base_url) if base_url else None
    if base is not None and (url.scheme, url.netloc) == (base.scheme, base.netloc):
        prefix = base.path.rstrip("/")
        if url.path == prefix or url.path.startswith(prefix + "/"):
            return url.path[len(prefix) :] or "/"
    return str(url.copy_with(query=None))


def record(response: httpx.Response, base_url: str, credentials: Known) -> Exchange:
    """``response`` (read) and its request as saved: relative to ``base_url``, every credential redacted."""
    request = response.request
    content = request.content.decode("utf-8", "replace")
    headers = tuple(
        (name.decode("latin-1"), redact(value.decode("latin-1"), credentials))
        for name, value in response.headers.raw
        if name.decode("latin-1").lower() not in _TRANSFER
    )
    body = response.content
    try:
        body = redact(body.decode(), credentials).encode()
    except UnicodeDecodeError:
        pass  # not text: kept as it is (base64 in the file)
    return Exchange(
        request.method,
        redact(relative(request.url, base_url), credentials),
        response.status_code,
        headers,
        body,
        redact(request.url.query.decode(), credentials),
        redact(content, credentials),
    )


def save(path: Path, *, function: str, integration: str, base_url: str, exchanges: Sequence[Exchange]) -> Path:
    """Write ``exchanges`` to ``path`` (its folder made if missing); ``path``."""
    document = {
        "format": FORMAT,
        "function": function,
        "integration": integration,
        "base_url": base_url,
        "exchanges": [exchange.to_json() for exchange in exchanges],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise InvalidArgument(f"cannot save the responses to {path}: {exc.strerror or exc}") from None
    return path


def file_for(directory: Path, function: str) -> Path:
    """Where the responses of ``function`` are saved in ``directory``."""
    return directory / f"{function}.json"


def load(path: Path, function: str = "") -> list[Exchange]:
    """The exchanges saved in ``path``: a file, or a folder holding ``<function>.json``.

    :class:`InvalidArgument` with one line when there is none, or it is not such a file.
    """
    if path.is_dir():
        if not function:
            raise InvalidArgument(f"{path} is a folder: name the function whose saved responses to replay")
        path = file_for(path, function)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        hint = f" (`orchestrator dryrun {function} ... --save-responses {path.parent}` saves them)" if function else ""
        raise InvalidArgument(f"no saved responses at {path}{hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{path} is not a file of saved responses: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InvalidArgument(f'{path} is not a file of saved responses (no "format": "{FORMAT}")')
    exchanges = document.get("exchanges")
    if not isinstance(exchanges, list):
        raise InvalidArgument(f'{path}: "exchanges" is not a list')
    return [Exchange.from_json(item, f"{path}: exchange {i + 1}") for i, item in enumerate(exchanges)]
