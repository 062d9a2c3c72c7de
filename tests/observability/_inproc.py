"""What the tests read back from an in-process daemon's telemetry: its spans, waited for as they are exported.

The daemon is :func:`tests.support.daemon.serving` (real gRPC on 127.0.0.1:0,
a real SQLite log) serving functions of integration ``acme``, whose provider
is a :class:`~tests.support.provider.ProviderServer`. Spans go to the
session's in-memory exporter (``conftest.py``).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence

import anyio
import anyio.to_thread
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.grpc import WAIT


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, span id) of a sampled caller span, fresh for each test."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


class Spans(InMemorySpanExporter):
    """An in-memory span exporter that wakes :meth:`wait_until` whenever spans are exported."""

    def __init__(self) -> None:
        super().__init__()
        self._exported = threading.Condition()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        with self._exported:
            self._exported.notify_all()
        return result

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Block until ``condition()`` holds after an export (or already does); False after ``timeout`` seconds."""
        with self._exported:
            return self._exported.wait_for(condition, timeout)


def spans_of(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    """The finished spans of trace ``trace_id`` (hex), in the order they ended."""
    wanted = int(trace_id, 16)
    return [s for s in exporter.get_finished_spans() if s.context is not None and s.context.trace_id == wanted]


async def wait_for_spans(
    exporter: Spans, trace_id: str, done: Callable[[list[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    """The spans of ``trace_id`` once ``done`` says they are all there.

    Spans are exported as they end, which can be a moment after the client saw the
    answer (the server span ends as the response goes out): this waits for exports.
    """
    with anyio.fail_after(WAIT + 5):
        arrived = await anyio.to_thread.run_sync(
            exporter.wait_until, lambda: done(spans_of(exporter, trace_id)), WAIT, abandon_on_cancel=True
        )
    found = spans_of(exporter, trace_id)
    assert arrived, f"the spans of trace {trace_id} are incomplete: {[s.name for s in found]}"
    return found


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    """The spans called ``name``."""
    return [s for s in spans if s.name == name]


def span_id(span: ReadableSpan) -> int:
    """A span's own id."""
    assert span.context is not None
    return span.context.span_id


def parent_id(span: ReadableSpan) -> int | None:
    """The id of a span's parent (None for a root)."""
    return span.parent.span_id if span.parent is not None else None
