"""Trace-context helpers on the OpenTelemetry API alone (no SDK): what the engine's modules use.

The SDK (providers, exporters) is installed by :mod:`orchestrator.telemetry`
for the daemon only; without it these helpers work against the API's no-op
implementation. No secret is ever a span attribute: callers set names, ids
and outcomes.
"""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span (empty when there is none)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def context_from(traceparent: str) -> otel_context.Context:
    """A context whose parent is the span ``traceparent`` names (the root context when empty)."""
    return _PROPAGATOR.extract({"traceparent": traceparent} if traceparent else {})


def inject(headers: dict[str, str]) -> None:
    """Add the current ``traceparent`` (and ``tracestate``) to outgoing ``headers``."""
    _PROPAGATOR.inject(headers)


def span_error(span: trace.Span, exc: BaseException, *, record: bool = True) -> None:
    """Mark ``span`` failed with ``exc``'s type and message (never its arguments' secrets: callers redact)."""
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
    if record:
        span.record_exception(exc)
