"""Trace-context helpers on the OpenTelemetry API alone (no SDK): what the engine's modules use.

The SDK (providers, exporters) is installed by :mod:`orchestrator.telemetry`
for the daemon only; without it these helpers work against the API's no-op
implementation. No secret is ever a span attribute: callers set names, ids
and outcomes.
"""

from __future__ import annotations

import re

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT_LENGTH = 55
"""The length of a version-00 ``traceparent``, and the most of any traceparent that is kept."""
_TRACEPARENT = re.compile(r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<parent>[0-9a-f]{16})-[0-9a-f]{2}")


def valid_traceparent(value: str) -> str:
    """``value`` when it is a W3C ``traceparent`` to continue and store; otherwise ``""``, as if absent.

    Version 00 is exactly ``00-<trace id>-<parent id>-<flags>`` (55 characters): a
    32-hex trace id and a 16-hex parent id, lowercase and not all zeros, and 2 hex
    flags. Version ff is invalid. A later version is read as its first 55
    characters when they have that form and are followed by nothing or by ``-``
    (the spec's forward compatibility); what follows them is dropped, so that
    what is kept is never longer than 55 characters.
    """
    value = value.strip(" \t")
    head = value[:TRACEPARENT_LENGTH]
    match = _TRACEPARENT.fullmatch(head)
    if match is None or match["version"] == "ff":
        return ""
    if set(match["trace"]) == {"0"} or set(match["parent"]) == {"0"}:
        return ""
    rest = value[TRACEPARENT_LENGTH:]
    if rest and (match["version"] == "00" or not rest.startswith("-")):
        return ""
    return head


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span (empty when there is none)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def context_from(traceparent: str) -> otel_context.Context:
    """A context whose parent is the span ``traceparent`` names (the root context when empty or invalid)."""
    traceparent = valid_traceparent(traceparent)
    return _PROPAGATOR.extract({"traceparent": traceparent} if traceparent else {})


def inject(headers: dict[str, str]) -> None:
    """Add the current ``traceparent`` (and ``tracestate``) to outgoing ``headers``."""
    _PROPAGATOR.inject(headers)


def span_error(span: trace.Span, exc: BaseException, *, record: bool = True) -> None:
    """Mark ``span`` failed with ``exc``'s type and message (never its arguments' secrets: callers redact)."""
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
    if record:
        span.record_exception(exc)
