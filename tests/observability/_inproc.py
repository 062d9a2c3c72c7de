"""An in-process daemon with test event functions, and what the tests read back from it.

The daemon is :func:`tests.integration._daemon.run_daemon` (real gRPC on
127.0.0.1:0, a real SQLite log) serving functions of integration ``acme``,
whose provider is a :class:`~tests.support.provider.ProviderServer`. Spans go
to the session's in-memory exporter (``conftest.py``).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator import RetryPolicy, on_event
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.config import DispatchConfig, Integration
from orchestrator.plugins import Installed, Registry
from tests.integration._daemon import Daemon, run_daemon

RPC_EMIT = "orchestrator.v1.Orchestrator/EmitLifecycleEvent"
FAST_RETRY = RetryPolicy(max_attempts=3, initial_interval=0.01, backoff=2, max_interval=0.02)
WAIT = 20.0
"""Seconds a test waits for something the daemon does promptly."""


def function(
    name: str, event: str, handler: Callable[..., Any], integration: str = "acme", **options: Any
) -> Installed:
    """``handler`` as an installed event function from plugin test-plugin 1.0."""
    return Installed(name, on_event(event, integration=integration, **options)(handler), "test-plugin", "1.0", name)


@asynccontextmanager
async def serving(
    tmp_path: Path, *functions: Installed, integrations: dict[str, Integration] | None = None
) -> AsyncIterator[Daemon]:
    """A daemon running ``functions``, with fast retries and short deadlines."""
    async with run_daemon(
        f"sqlite://{tmp_path}/events.db",
        registry=Registry.of(functions),
        integrations=integrations or {},
        dispatch=DispatchConfig(validate_deadline=5.0, deletion_deadline=5.0, retry=FAST_RETRY),
    ) as daemon:
        yield daemon


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, span id) of a sampled caller span, fresh for each test."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def ref(connection_id: str, integration: str = "acme") -> pb.ConnectionRef:
    """A connection in environment dev."""
    return pb.ConnectionRef(environment="dev", integration=integration, connection_id=connection_id)


async def emit(
    stub: pb_grpc.OrchestratorStub,
    event: int,
    connection_id: str,
    *,
    traceparent: str = "",
    integration: str = "acme",
    **fields: Any,
) -> pb.EmitLifecycleEventResponse:
    """EmitLifecycleEvent, with the caller's ``traceparent`` in the call's metadata when given."""
    request = pb.EmitLifecycleEventRequest(connection=ref(connection_id, integration), event=event, **fields)
    metadata = (("traceparent", traceparent),) if traceparent else None
    return await stub.EmitLifecycleEvent(request, metadata=metadata, timeout=WAIT)


async def records(stub: pb_grpc.OrchestratorStub) -> list[pb.EventRecord]:
    """The whole log."""
    return [r async for r in stub.ReadEvents(pb.ReadEventsRequest(), timeout=WAIT)]


async def follow_until(
    stub: pb_grpc.OrchestratorStub, predicate: Callable[[pb.EventRecord], bool]
) -> list[pb.EventRecord]:
    """Follow the log from the start until a record matches ``predicate``; the records read, the match last."""
    seen: list[pb.EventRecord] = []
    call = stub.ReadEvents(pb.ReadEventsRequest(follow=True))
    try:
        with anyio.fail_after(WAIT):
            async for record in call:
                seen.append(record)
                if predicate(record):
                    return seen
    finally:
        call.cancel()
    raise AssertionError(f"the log ended after {[r.type for r in seen]}")


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
