"""What the daemon and its worker processes say to each other: length-prefixed JSON, never pickle.

A frame is 4 bytes of length (big-endian) and that many bytes of UTF-8 JSON: an
object whose ``t`` names the message. The daemon treats what a worker process
sends as hostile: a frame over :data:`MAX_FRAME` bytes, or a message that is
not exactly what it should be, is :class:`Garbage` (the attempt fails and the
process is replaced). What the daemon sends is trusted by the worker.

::

    daemon -> worker                              worker -> daemon
    attempt {n, function, connection, event,      ready   {functions, broken}   once, after importing the plugins
             metadata, integration, env}          call    {n, id, op, args}     a context operation (OPERATIONS)
    reply   {id, value} or {id, error}            cancel  {n, id}               the function stopped waiting for it
                                                  log     {n, line}
                                                  ended   {n, returned, awaitable, raised, dropped}

``n`` is the attempt's number (counted per worker): a message of an earlier
attempt's (a thread a function left behind, still using its context) is dropped.

A worker process's context forwards what it cannot do itself through a few
operations (:data:`OPERATIONS`), each served by the daemon with the attempt's
own context: a later addition to the context that needs the daemon adds one.
"""

from __future__ import annotations

import base64
import builtins
import json
import struct
from typing import Any

import httpx

from orchestrator import errors
from orchestrator.context import Context
from orchestrator.errors import Misconfigured, ProviderError, ResourceExhausted
from orchestrator.model import JSONObject
from orchestrator.plugins import Installed
from orchestrator.provider import CredentialsUnavailable
from orchestrator.runner import Ended, Raised

HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
"""The largest message either side sends: a provider call's body or answer included (base64 makes bytes 4/3)."""
MAX_NAME = 200
"""The longest type name a worker process may report (an exception's)."""

REQUEST = "request"
"""``ctx.get/post/put/patch/delete``: the provider proxy's ``request(method, endpoint, ...)``, run by the daemon."""
WRITE = "write"
"""``ctx.set_metadata/update_metadata``: the daemon's context writes (validated and bounded again there)."""
CREDENTIALS = "credentials"
"""A read of ``ctx.credentials``: the attempt's credentials as they are now, the only time any enter a worker."""
OPERATIONS = (REQUEST, WRITE, CREDENTIALS)
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_PLAIN_ERRORS = frozenset(
    {"OrchestratorError", "InvalidArgument", "NotFound", "FailedPrecondition", "ResourceExhausted", "Unavailable"}
)
"""Errors of :mod:`orchestrator.errors` that a worker process rebuilds from their message alone."""


class Garbage(Exception):
    """A worker process sent something it should not have: what, in a few words."""


def frame(message: JSONObject) -> bytes:
    """``message`` as a frame; :class:`ResourceExhausted` when larger than :data:`MAX_FRAME`."""
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_FRAME:
        raise ResourceExhausted(f"a message of {len(body)} bytes to or from a worker process; the limit is {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def size(header: bytes) -> int:
    """The length a frame's header announces; :class:`Garbage` when over :data:`MAX_FRAME`."""
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise Garbage(f"a frame of {length} bytes (the limit is {MAX_FRAME})")
    return int(length)


def parse(body: bytes) -> JSONObject:
    """A frame's body as a message (an object with a string ``t``); :class:`Garbage` otherwise."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, or nested too deep to parse
        raise Garbage(f"a frame that is not JSON ({type(exc).__name__})") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise Garbage("a frame that is not a message")
    return message


# -- checking what a worker process sends ----------------------------------------


def field(message: JSONObject, key: str, kind: type | tuple[type, ...]) -> Any:
    """``message[key]`` when it is of ``kind`` (a bool is no int here); :class:`Garbage` otherwise."""
    value = message.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise Garbage(f"{message.get('t')!r}.{key} is {type(value).__name__}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def name(message: JSONObject, key: str) -> str:
    """A type name: a string of 1 to :data:`MAX_NAME` characters."""
    value: str = field(message, key, str)
    if not 0 < len(value) <= MAX_NAME:
        raise Garbage(f"{message.get('t')!r}.{key} is {len(value)} characters long")
    return value


def request_args(args: JSONObject) -> dict[str, Any]:
    """A ``request`` call's arguments, as :meth:`Provider.request` takes them."""
    method = field(args, "method", str)
    if method not in METHODS:
        raise Garbage(f"request method {method[:20]!r}")
    headers = field(args, "headers", (dict, type(None)))
    if headers is not None and not all(isinstance(v, str) for v in headers.values()):
        raise Garbage("request headers that are not strings")
    data = args.get("data")
    if "data_b64" in args:
        data = _bytes(field(args, "data_b64", str))
    return {
        "method": method,
        "endpoint": field(args, "endpoint", str),
        "params": field(args, "params", (dict, type(None))),
        "json": args.get("json"),
        "data": data,
        "headers": headers,
    }


def write_args(args: JSONObject) -> tuple[JSONObject, bool]:
    """A ``write`` call's metadata and whether it merges."""
    return field(args, "metadata", dict), field(args, "merge", bool)


def _bytes(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise Garbage("bytes that are not base64") from None


def ended_from(message: JSONObject) -> tuple[Ended, int]:
    """An ``ended`` message as the runner's :class:`Ended`, and how many log lines the worker dropped."""
    returned = message.get("returned")
    if returned is not None:
        returned = name(message, "returned")
    raised = None
    if message.get("raised") is not None:
        what: JSONObject = field(message, "raised", dict)
        raised = Raised(
            name(what, "type"),
            field(what, "message", str),
            field(what, "retryable", bool),
            field(what, "rejected", bool),
            field(what, "traceback", str),
        )
    dropped: int = field(message, "dropped", int)
    return Ended(returned, field(message, "awaitable", bool), raised), max(dropped, 0)


# -- what the daemon sends, and the worker's side of it ----------------------------


def attempt(number: int, function: Installed, ctx: Context, metadata: JSONObject) -> JSONObject:
    """The ``attempt`` message: which function, for which connection and event, with which metadata; and the
    plain data of ``ctx`` (the integration's settings, the environment's variables).

    ``number`` counts the worker's attempts: every message it sends for this one carries it as ``n``.
    """
    connection, event = ctx.connection, ctx.event
    ref = connection.ref
    return {
        "t": "attempt",
        "n": number,
        "function": {
            "name": function.name,
            "integration": function.function.integration,
            "distribution": function.distribution,
            "version": function.version,
            "entry_point": function.entry_point,
        },
        "connection": {
            "environment": ref.environment,
            "integration": ref.integration,
            "connection_id": ref.connection_id,
            "config": connection.config,
        },
        "event": {
            "type": event.type.value,
            "payload": event.payload,
            "event_id": event.event_id,
            "attempt": event.attempt,
        },
        "metadata": metadata,
        "integration": ctx.integration.to_json(),
        "env": dict(ctx.env),
    }


def ended(result: Ended, dropped: int) -> JSONObject:
    """The ``ended`` message of a worker process."""
    raised = result.raised
    return {
        "t": "ended",
        "returned": result.returned[:MAX_NAME] if result.returned is not None else None,
        "awaitable": result.awaitable,
        "raised": None
        if raised is None
        else {
            "type": raised.type[:MAX_NAME],
            "message": raised.message,
            "retryable": raised.retryable,
            "rejected": raised.rejected,
            "traceback": raised.traceback,
        },
        "dropped": dropped,
    }


def response(answer: httpx.Response) -> JSONObject:
    """A provider's answer, as the daemon sends it back (the body decoded, so without its content-encoding)."""
    headers = [
        [key.decode("latin-1"), value.decode("latin-1")]
        for key, value in answer.headers.raw
        if key.lower() not in (b"content-encoding", b"content-length", b"transfer-encoding")
    ]
    return {
        "status": answer.status_code,
        "headers": headers,
        "content": base64.b64encode(answer.content).decode(),
        "method": answer.request.method,
        "url": str(answer.request.url),
    }


def response_from(value: JSONObject) -> httpx.Response:
    """A provider's answer in a worker process, as the function would have it in the daemon."""
    request = httpx.Request(value["method"], value["url"])
    return httpx.Response(
        value["status"], headers=value["headers"], content=base64.b64decode(value["content"]), request=request
    )


def error(exc: Exception) -> JSONObject:
    """An exception the daemon's context raised, for the worker's function to see raised."""
    out: JSONObject = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, ProviderError):
        out.update(status=exc.status, body=exc.body)
    if isinstance(exc, Misconfigured):
        out.update(setting=exc.setting)
    return out


def error_from(value: JSONObject) -> Exception:
    """The exception a worker's function sees: the same class where it can be rebuilt, else one of the same name."""
    kind, message = value["type"], value["message"]
    if kind == "ProviderError":
        return ProviderError(message, status=value.get("status", 0), body=value.get("body", ""))
    if kind == "CredentialsUnavailable":  # not retried, as in the daemon
        return CredentialsUnavailable(message)
    if kind == "Misconfigured":  # not retried either (the daemon marks the attempt from its own proxy)
        return Misconfigured(message, setting=str(value.get("setting", "")))
    if kind in _PLAIN_ERRORS:
        plain: type[Exception] = getattr(errors, kind)
        return plain(message)
    known = getattr(builtins, kind, None)
    if isinstance(known, type) and issubclass(known, Exception):
        try:
            return known(message)
        except TypeError:  # it takes other arguments (UnicodeDecodeError): one of the same name instead
            pass
    alike: type[Exception] = type(kind, (Exception,), {"__module__": __name__})
    return alike(message)
