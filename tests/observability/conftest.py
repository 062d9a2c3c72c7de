"""Fixtures for the observability tests: in-memory OpenTelemetry for in-process daemons, captured JSON logs.

OpenTelemetry's global tracer and meter providers can be set once per
process, so one :class:`TracerProvider` with an in-memory exporter (and one
:class:`MeterProvider` with an in-memory reader) is installed for the whole
session, before any in-process daemon starts; if another test module already
installed an SDK provider, the exporter is added to it instead. The module
tracers and meters of ``orchestrator`` are API proxies, so they report to
whatever is installed here. Subprocess daemons are configured by ``OTEL_*``
variables instead (see ``_otlp.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from orchestrator import logs
from orchestrator.logs import JSONFormatter

from ._inproc import Spans


@dataclass(frozen=True)
class Telemetry:
    """The session's in-memory exporter, and metric reader (None when another module owns the meter provider)."""

    exporter: Spans
    reader: InMemoryMetricReader | None


def _install() -> Telemetry:
    resource = Resource.create({"service.name": "orchestrator", "service.version": "test"})
    exporter = Spans()
    tracer_provider = trace.get_tracer_provider()
    if not isinstance(tracer_provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider(resource=resource))
        tracer_provider = trace.get_tracer_provider()
    if not isinstance(tracer_provider, TracerProvider):
        pytest.skip(f"the global tracer provider is a {type(tracer_provider).__name__}, not the SDK's")
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))

    reader: InMemoryMetricReader | None = None
    if not isinstance(metrics.get_meter_provider(), MeterProvider):
        candidate = InMemoryMetricReader()
        provider = MeterProvider(resource=resource, metric_readers=[candidate])
        metrics.set_meter_provider(provider)
        if metrics.get_meter_provider() is provider:
            reader = candidate
    return Telemetry(exporter, reader)


@pytest.fixture(scope="session")
def telemetry() -> Telemetry:
    """The session's in-memory OpenTelemetry (installed on first use)."""
    return _install()


@pytest.fixture
def exporter(telemetry: Telemetry) -> Spans:
    """The in-memory span exporter, emptied for this test."""
    telemetry.exporter.clear()
    return telemetry.exporter


@pytest.fixture
def metric_reader(telemetry: Telemetry) -> InMemoryMetricReader:
    """The in-memory metric reader (the test is skipped if another module installed the meter provider)."""
    if telemetry.reader is None:
        pytest.skip("another test module installed the global meter provider first")
    return telemetry.reader


class _Lines(logging.Handler):
    """Keeps every record formatted as the daemon's JSON log line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JSONFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def _captured(level: str) -> Iterator[list[str]]:
    handler = _Lines()
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in ("", "httpx", "httpcore")}
    root.addHandler(handler)
    logs.set_levels(level)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        for name, logged in saved.items():
            logging.getLogger(name).setLevel(logged)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every log line an in-process daemon writes during the test at ``--log-level info`` (the default), as JSON."""
    with _captured("info") as lines:
        yield lines


@pytest.fixture
def debug_log_lines() -> Iterator[list[str]]:
    """Every log line an in-process daemon writes during the test at ``--log-level debug``, as JSON."""
    with _captured("debug") as lines:
        yield lines
