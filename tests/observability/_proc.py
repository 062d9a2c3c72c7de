"""Subprocess daemons with telemetry: ``orchestrator serve`` exporting to a test receiver, its Prometheus endpoint.

The daemons themselves are :mod:`tests.support.process`'s (``serve``,
``start``, ``arun``): they log JSON lines to stderr, which the tests read line
by line. The functions they run are the example plugins installed in the
development venv (salesforce's ``register-webhook``/``delete-webhook``,
github's ``check-token-scopes``), pointed at a local provider by a TOML config.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import anyio
import grpc
import httpx

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.support.process import Running

PROMETHEUS = re.compile(r"serving Prometheus metrics on (http://127\.0\.0\.1:\d+/metrics)")
RPC_EMIT = "orchestrator.v1.Orchestrator/EmitLifecycleEvent"
CALL_TIMEOUT = 20.0

CREATE = pb.LIFECYCLE_EVENT_POST_CONNECTION_CREATION
VALIDATE = pb.LIFECYCLE_EVENT_VALIDATE_CONNECTION
DELETE = pb.LIFECYCLE_EVENT_PRE_CONNECTION_DELETION


def metrics_url(daemon: Running) -> str:
    """The Prometheus endpoint the daemon logged (before its ``serving`` line)."""
    for line in daemon.lines:
        if match := PROMETHEUS.search(line):
            return match[1]
    raise AssertionError(f"the daemon logged no Prometheus endpoint:\n{daemon}")


async def scrape(url: str) -> str:
    """GET the Prometheus text."""
    async with httpx.AsyncClient() as client:
        response = await client.get(url, timeout=CALL_TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def ref(connection_id: str, integration: str) -> pb.ConnectionRef:
    """A connection in environment dev."""
    return pb.ConnectionRef(environment="dev", integration=integration, connection_id=connection_id)


async def emit(
    address: str,
    event: int,
    connection_id: str,
    integration: str,
    *,
    traceparent: str = "",
    **fields: Any,
) -> pb.EmitLifecycleEventResponse:
    """One EmitLifecycleEvent over a fresh channel (the caller's ``traceparent`` in the metadata when given)."""
    request = pb.EmitLifecycleEventRequest(connection=ref(connection_id, integration), event=event, **fields)
    metadata = (("traceparent", traceparent),) if traceparent else None
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        return await stub.EmitLifecycleEvent(request, metadata=metadata, timeout=CALL_TIMEOUT)


async def read_log(address: str) -> list[pb.EventRecord]:
    """Every record of the daemon's log."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        return [r async for r in stub.ReadEvents(pb.ReadEventsRequest(), timeout=CALL_TIMEOUT)]


async def follow_until(address: str, predicate: Callable[[pb.EventRecord], bool]) -> list[pb.EventRecord]:
    """Follow the daemon's log from the start until a record matches ``predicate``; the records read."""
    seen: list[pb.EventRecord] = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.OrchestratorStub(channel).ReadEvents(pb.ReadEventsRequest(follow=True))
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                async for record in call:
                    seen.append(record)
                    if predicate(record):
                        return seen
        finally:
            call.cancel()
    raise AssertionError(f"the log ended after {[r.type for r in seen]}")
