"""The caller of an RPC in its span: the token's fingerprint as ``enduser.id``, never the token."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.access import fingerprint
from orchestrator.plugins import Registry
from tests.support.daemon import run_daemon
from tests.support.grpc import RPC_EMIT, VALIDATE, WAIT, emit_request

from ._inproc import Spans, named, new_traceparent, wait_for_spans

pytestmark = pytest.mark.anyio

TOKEN = "trace-token-0123456789abcdef"


async def test_the_rpc_span_names_the_caller_by_its_token_fingerprint(tmp_path: Path, exporter: Spans) -> None:
    """``enduser.id`` is ``token:<8 hex>`` of the caller's token; the token is in no attribute."""
    tokens = tmp_path / "tokens"
    tokens.touch(mode=0o600)
    tokens.write_text(f"{TOKEN} dev\n")
    traceparent, trace_id, _ = new_traceparent()
    async with run_daemon(f"sqlite://{tmp_path}/events.db", registry=Registry(), auth_token_file=tokens) as daemon:
        metadata = (("authorization", f"Bearer {TOKEN}"), ("traceparent", traceparent))
        await daemon.stub.EmitLifecycleEvent(emit_request(VALIDATE, "c-1"), metadata=metadata, timeout=WAIT)
        spans = await wait_for_spans(exporter, trace_id, lambda found: bool(named(found, RPC_EMIT)))
    (rpc,) = named(spans, RPC_EMIT)
    assert rpc.attributes is not None
    assert rpc.attributes["enduser.id"] == fingerprint(TOKEN)
    assert all(TOKEN not in str(value) for span in spans for value in (span.attributes or {}).values())
