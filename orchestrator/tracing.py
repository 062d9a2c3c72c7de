"""Trace-context helpers on the OpenTelemetry API alone (no SDK): what the engine's modules use.

The SDK (providers, exporters) is installed by :mod:`orchestrator.telemetry`
for the daemon only; without it these helpers work against the API's no-op
implementation. No secret is ever a span attribute: callers set names, ids
and outcomes.

Telemetry that is off costs nothing: with no SDK tracer provider installed
(every exporter ``none``), :func:`traces_on` is false and the engine makes no
span, builds no span attributes and formats no ``traceparent``; with no SDK
meter provider, :func:`metrics_on` is false and no instrument is called. The
daemon decides both once at start (:func:`pinned`); elsewhere (tests, the
plugin kit) they follow the global providers as they are installed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
TRACEPARENT_LENGTH = 55
"""The length of a version-00 ``traceparent``, and the most of any traceparent that is kept."""
_TRACEPARENT = re.compile(r"(?P<version>[0-9a-f]{2})-(?P<trace>[0-9a-f]{32})-(?P<parent>[0-9a-f]{16})-[0-9a-f]{2}")


_pinned: tuple[bool, bool] | None = None
"""(traces on, metrics on) while a daemon runs (see :func:`pinned`); None: looked up at each call."""


def _recorded(provider: object) -> bool:
    """Whether ``provider`` records: the API's own providers (its proxies and no-ops) record nothing."""
    return not type(provider).__module__.startswith(("opentelemetry.trace", "opentelemetry.metrics"))


def traces_on() -> bool:
    """Whether spans are recorded (an SDK tracer provider is installed): when not, make none."""
    if _pinned is not None:
        return _pinned[0]
    return _recorded(trace.get_tracer_provider())


def metrics_on() -> bool:
    """Whether instruments are read (an SDK meter provider is installed): when not, call none."""
    if _pinned is not None:
        return _pinned[1]
    return _recorded(metrics.get_meter_provider())


@contextmanager
def pinned(*, traces: bool | None = None, metrics_: bool | None = None) -> Iterator[None]:
    """Decide once, for the block, whether traces and metrics are on: as given, else as the providers say now.

    The daemon holds this for its life once :mod:`orchestrator.telemetry` has installed its providers
    (which can be installed once per process), so that each check is a variable read. Within a block
    that already decided, the outer decision stands (a test can turn telemetry off around a daemon).
    """
    global _pinned
    saved = _pinned
    if saved is None:
        traced = _recorded(trace.get_tracer_provider()) if traces is None else traces
        metered = _recorded(metrics.get_meter_provider()) if metrics_ is None else metrics_
        _pinned = (traced, metered)
    try:
        yield
    finally:
        _pinned = saved


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
    """The W3C ``traceparent`` of the current span (empty when there is none, or when traces are off)."""
    if not traces_on():
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def context_from(traceparent: str) -> otel_context.Context:
    """A context whose parent is the span ``traceparent`` names (the root context when empty or invalid)."""
    traceparent = valid_traceparent(traceparent)
    return _PROPAGATOR.extract({"traceparent": traceparent} if traceparent else {})


def inject(headers: dict[str, str]) -> None:
    """Add the current ``traceparent`` (and ``tracestate``) to outgoing ``headers`` (nothing when traces are off)."""
    if not traces_on():
        return
    _PROPAGATOR.inject(headers)


def span_error(span: trace.Span, exc: BaseException, *, record: bool = True) -> None:
    """Mark ``span`` failed with ``exc``'s type and message (never its arguments' secrets: callers redact)."""
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
    if record:
        span.record_exception(exc)
