"""An attempt resumed after SIGKILL and a restart still lands in the trace of the emit that caused it."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.grpc import CREATE, RPC_EMIT, emit, records
from tests.support.process import environment, serve
from tests.support.provider import WebhookProvider, reached, write_config

from ._inproc import new_traceparent
from ._otlp import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


@pytest.fixture
def provider() -> Iterator[WebhookProvider]:
    """The webhook provider, whose POSTs a test can hold open."""
    with WebhookProvider() as running:
        yield running


async def test_the_attempt_resumed_after_a_restart_joins_the_original_trace(
    tmp_path: Path, provider: WebhookProvider
) -> None:
    """SIGKILL mid-attempt, restart: the re-run's span has the caller's trace id and the first RPC span as parent."""
    traceparent, trace_id, caller_span = new_traceparent()
    database = tmp_path / "events.db"
    config = write_config(tmp_path / "o.toml", provider.url, auth="none")
    held = provider.hold("POST")
    with Receiver.grpc() as receiver:
        env = environment(**receiver.environment())
        async with serve(database, "--config", str(config), env=env) as first:
            await emit(
                first.address,
                CREATE,
                "acme",
                "salesforce",
                traceparent=traceparent,
                connection_config={"instance": "acme"},
            )
            assert await reached(held.arrived), "the provider never received the POST"
            [rpc] = await receiver.wait_for(lambda s: s.name == RPC_EMIT and s.trace_id == trace_id)
            assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        held.release.set()
        assert await reached(held.answered)

        async with serve(database, "--config", str(config), env=env) as second:
            [resumed] = await receiver.wait_for(
                lambda s: s.name == "function register-webhook" and s.attributes["orchestrator.outcome"] == "succeeded"
            )
            log = await records(second.address)
            assert await second.stop() == 0, str(second)

    assert rpc.parent_span_id == caller_span
    assert resumed.trace_id == trace_id
    assert resumed.parent_span_id == rpc.span_id
    assert resumed.attributes["orchestrator.attempt"] >= 2
    assert resumed.resource["service.instance.id"] != rpc.resource["service.instance.id"], "not the restarted daemon"
    # Its provider call is in the same trace, and told the provider so.
    [call] = receiver.matching(lambda s: s.name == "HTTP POST" and s.parent_span_id == resumed.span_id)
    assert call.trace_id == trace_id
    assert provider.requests[-1].headers["traceparent"] == f"00-{trace_id}-{call.span_id}-01"
    # The stored traceparent is what carried it across the restart.
    assert [r.type for r in log][-1] == "function-succeeded"
    assert {r.traceparent for r in log if r.type != "metadata-updated"} == {f"00-{trace_id}-{rpc.span_id}-01"}
