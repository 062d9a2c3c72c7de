"""Metadata is bounded per write and per connection, and a page of connections is bounded in bytes."""

from __future__ import annotations

import pytest

from orchestrator import limits
from orchestrator.context import Context
from orchestrator.model import ConnectionState
from orchestrator.records import FunctionFailed, FunctionGaveUp
from orchestrator.retry import RetryPolicy
from tests.support.engine import ACME, CREATE, VALIDATE, function, running

pytestmark = pytest.mark.anyio

BIG = "x" * (limits.MAX_METADATA_WRITE_BYTES + 1)


async def test_a_too_big_metadata_write_fails_the_function_without_retries() -> None:
    """A 20 MB set_metadata is refused naming the limit, recorded as a non-retryable failure, and nothing is stored."""

    async def register(ctx: Context) -> None:
        await ctx.set_metadata({"blob": "x" * 20_000_000})

    async with running(function("register", CREATE, register, retry=RetryPolicy(max_attempts=5)), worker=True) as h:
        await h.emit(CREATE)
        await h.records_up_to(3)
        bodies = await h.bodies()
        connection = await h.service.get_connection(ACME)
    failed = next(b for b in bodies if isinstance(b, FunctionFailed))
    assert (failed.error_type, failed.retryable) == ("ResourceExhausted", False)
    assert str(limits.MAX_METADATA_WRITE_BYTES) in failed.error
    assert [type(b).__name__ for b in bodies[1:]] == ["FunctionFailed", "FunctionGaveUp"]
    assert isinstance(bodies[2], FunctionGaveUp) and bodies[2].reason == "not retryable"
    assert connection.metadata == {}


async def test_merges_cannot_grow_metadata_past_the_connection_limit() -> None:
    """Small update_metadata writes that would take the whole past MAX_METADATA_BYTES are refused."""
    chunk = "y" * (limits.MAX_METADATA_WRITE_BYTES - 100)

    async def check(ctx: Context) -> None:
        for i in range(limits.MAX_METADATA_BYTES // len(chunk) + 1):
            await ctx.update_metadata({f"k{i}": chunk})

    async with running(function("check", VALIDATE, check)) as h:
        result = await h.emit(VALIDATE)
    assert result.state is ConnectionState.REJECTED
    assert "the connection's metadata after this write" in result.rejection_reason


async def test_a_page_of_connections_stops_at_its_byte_budget() -> None:
    """Connections with big metadata come back in shorter pages, with a token, never one oversized reply."""
    per_row = limits.MAX_METADATA_BYTES - 1000

    async def fill(ctx: Context) -> None:
        for i in range(per_row // (limits.MAX_METADATA_WRITE_BYTES - 100)):
            await ctx.update_metadata({f"k{i}": "z" * (limits.MAX_METADATA_WRITE_BYTES - 100)})

    rows = limits.MAX_PAGE_BYTES // (per_row // 2) + 2
    async with running(function("fill", VALIDATE, fill)) as h:
        for n in range(rows):
            await h.emit(VALIDATE, ACME.__class__(ACME.environment, ACME.integration, f"c{n:03}"))
        first = await h.service.list_connections(page_size=1000)
        rest = await h.service.list_connections(page_size=1000, page_token=first.next_page_token)
    weight = sum(limits.page_bytes(c.metadata, c.config) for c in first.connections)
    assert first.next_page_token and len(first.connections) < rows
    assert weight <= limits.MAX_PAGE_BYTES
    assert len(first.connections) + len(rest.connections) == rows


def test_the_limits_fit_inside_one_grpc_message() -> None:
    """A page's byte budget, and a connection's metadata and config, stay under the largest message sent."""
    assert limits.MAX_PAGE_BYTES + limits.MAX_METADATA_BYTES + limits.MAX_CONFIG_BYTES < 16 * limits.MAX_MESSAGE_BYTES


@pytest.mark.parametrize("method", ["set_metadata", "update_metadata"])
async def test_metadata_nested_too_deep_fails_the_function_without_retries(method: str) -> None:
    """Metadata nested past MAX_JSON_DEPTH is refused naming the limit (and never reaches recursive code)."""
    value: dict[str, object] = {"leaf": 1}
    for _ in range(5000):  # deep enough to overflow a recursive encoder or validator
        value = {"down": value}

    async def register(ctx: Context) -> None:
        await getattr(ctx, method)(value)

    async with running(function("register", CREATE, register, retry=RetryPolicy(max_attempts=5)), worker=True) as h:
        await h.emit(CREATE)
        await h.records_up_to(3)
        bodies = await h.bodies()
        connection = await h.service.get_connection(ACME)
    failed = next(b for b in bodies if isinstance(b, FunctionFailed))
    assert (failed.error_type, failed.retryable) == ("InvalidArgument", False)
    assert f"the limit is {limits.MAX_JSON_DEPTH}" in failed.error
    assert connection.metadata == {}
