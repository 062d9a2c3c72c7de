"""Values written before today's limits (megabytes of metadata, JSON nested past protobuf's
recursion limit) stay readable: every reply that would carry one carries a note instead,
and the records after it can be read past."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import limits, records
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.model import ConnectionRef, LifecycleEvent
from orchestrator.plugins import Registry
from orchestrator.records import ConnectionValidated, Lifecycle, MetadataUpdated
from orchestrator.rpc import wire
from tests.support.daemon import run_daemon, seed

pytestmark = pytest.mark.anyio

REF = ConnectionRef("dev", "acme", "old-timer")
HUGE = {"blob": "x" * (5 * 1024 * 1024)}
"""Past a client's default 4 MiB message limit on its own."""


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": True}
    for _ in range(levels - 1):
        value = {"down": value}
    return value


DEEP = nested(60)
"""Past protobuf's 100-level recursion limit once a record wraps it."""


async def test_oversized_and_overdeep_legacy_values_are_replaced_by_a_note_in_every_reply(database: str) -> None:
    validation = records.new(Lifecycle(LifecycleEvent.VALIDATE_CONNECTION, DEEP, {}))
    written = await seed(
        database,
        REF,
        [validation, records.new(ConnectionValidated(), causation_id=validation.event_id)],
        [records.new(MetadataUpdated("register", HUGE, merge=False))],
        [records.new(MetadataUpdated("register", {"small": 1}, merge=True))],
    )
    positions = [r.position for r in written]
    async with run_daemon(database, registry=Registry()) as daemon:
        got = await daemon.stub.GetConnection(pb.GetConnectionRequest(connection=wire.ref_to_proto(REF)))
        page = await daemon.stub.ListConnections(pb.ListConnectionsRequest())
        replies = [r async for r in daemon.stub.ReadEvents(pb.ReadEventsRequest(from_position=0))]

    # GetConnection and ListConnections answer; the values too big or deep come as a note.
    for connection in (got.connection, page.connections[0]):
        metadata = wire.struct_to_dict(connection.metadata)
        config = wire.struct_to_dict(connection.config)
        assert set(metadata) == {wire.OMITTED}
        assert str(limits.MAX_REPLY_VALUE_BYTES) in metadata[wire.OMITTED]["reason"]
        assert "orchestrator replay --connection old-timer" in metadata[wire.OMITTED]["read_with"]
        assert set(config) == {wire.OMITTED}
        assert "60 levels deep" in config[wire.OMITTED]["reason"]

    # Every record is read, in order, past the unreadable ones.
    assert [r.position for r in replies] == positions
    data = [wire.struct_to_dict(r.data) for r in replies]
    assert set(data[0]) == {wire.OMITTED} and f"record {positions[0]}'s data" in data[0][wire.OMITTED]["reason"]
    assert data[1] == {}
    assert set(data[2]) == {wire.OMITTED} and f"record {positions[2]}'s data" in data[2][wire.OMITTED]["reason"]
    assert data[3] == {"function": "register", "metadata": {"small": 1}, "merge": True}


def test_values_within_the_limits_are_carried_whole() -> None:
    """The widest and deepest values the limits admit are never replaced."""
    widest = {"blob": "y" * (limits.MAX_METADATA_BYTES - 20)}
    deepest = nested(limits.MAX_JSON_DEPTH)
    assert wire.struct_to_dict(wire.reply_struct(widest, "metadata", "")) == widest
    assert wire.struct_to_dict(wire.reply_struct({"metadata": deepest}, "data", "")) == {"metadata": deepest}
