"""Telemetry that is off costs nothing: no span is started, no instrument is called, no traceparent is formatted.

The session's SDK tracer provider (``conftest.py``) is installed, so spans would be
recorded: :func:`orchestrator.tracing.pinned` turns traces and metrics off around an
in-process daemon, as ``orchestrator serve`` does when every exporter is ``none``. The
same calls with telemetry on are the control: they do start spans and call instruments.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from orchestrator import Context, dispatch, service, tracing
from tests.support.daemon import function, serving
from tests.support.grpc import ACTIVE, CREATE, PENDING, VALIDATE, emit, get, records

from .conftest import Telemetry

pytestmark = pytest.mark.anyio


class Started(SpanProcessor):
    """Counts the spans started on the session's tracer provider."""

    def __init__(self) -> None:
        self.count = 0

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        self.count += 1

    def on_end(self, span: ReadableSpan) -> None:
        """Nothing to do when a span ends."""

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered."""
        return True


class Calls:
    """Stands in for an instrument or the propagator: counts every call, whatever the method."""

    def __init__(self) -> None:
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            self.count += 1

        return call


@pytest.fixture(scope="module")
def started(telemetry: Telemetry) -> Started:
    """A span counter on the session's SDK tracer provider (added once for the module)."""
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    processor = Started()
    provider.add_span_processor(processor)
    return processor


@pytest.fixture
def instruments(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    """The engine's per-call instruments and the trace propagator, replaced by one call counter."""
    calls = Calls()
    for module, name in ((service, "EMITS"), (service, "APPEND_MS"), (dispatch, "ATTEMPTS"), (dispatch, "ATTEMPT_MS")):
        monkeypatch.setattr(module, name, calls)
    monkeypatch.setattr(tracing, "_PROPAGATOR", calls)
    yield calls


def check(ctx: Any) -> None:
    """A plain def validate function (it runs in a thread): it passes."""
    ctx.log("checked")


async def register(ctx: Context) -> None:
    """An async creation function (it runs as a job): it succeeds."""
    ctx.log("registered")


async def lifecycle(tmp_path: Path, traceparent: str) -> list[str]:
    """Validate, create (waiting for its job), read the connection and the log; the traceparent of each record."""
    functions = (
        function("check", "validate-connection", check),
        function("register", "post-connection-creation", register),
    )
    async with serving(tmp_path, *functions) as daemon:
        validated = await emit(daemon.stub, VALIDATE, "c-1", traceparent=traceparent)
        created = await emit(daemon.stub, CREATE, "c-1", traceparent=traceparent, wait=True)
        connection = await get(daemon.stub, "c-1")
        log = await records(daemon.stub)
    assert (validated.state, created.state, connection.state) == (PENDING, ACTIVE, ACTIVE)
    assert [r.type for r in log] == [
        "validate-connection",
        "function-succeeded",
        "connection-validated",
        "post-connection-creation",
        "function-succeeded",
    ]
    return [r.traceparent for r in log]


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_with_telemetry_off_no_span_is_started_and_no_instrument_called(
    tmp_path: Path, started: Started, instruments: Calls
) -> None:
    """Exporters none: the calls work, no span starts, no instrument or propagator is called; records keep the
    caller's own traceparent."""
    before = started.count
    with tracing.pinned(traces=False, metrics_=False):
        stored = await lifecycle(tmp_path, TRACEPARENT)
    assert started.count == before
    assert instruments.count == 0
    assert stored == [TRACEPARENT] * len(stored)


async def test_with_telemetry_on_the_same_calls_start_spans_and_call_instruments(
    tmp_path: Path, started: Started, instruments: Calls
) -> None:
    """The control: with traces and metrics on, the same calls start spans and count (records join the RPC span's
    trace, which continues the caller's)."""
    before = started.count
    with tracing.pinned(traces=True, metrics_=True):
        stored = await lifecycle(tmp_path, TRACEPARENT)
    assert started.count > before
    assert instruments.count > 0
    assert {value.split("-")[1] for value in stored} == {TRACEPARENT.split("-")[1]}
