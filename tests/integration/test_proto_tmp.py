import pytest
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb


@pytest.mark.anyio
async def test_a(stub):
    r = await stub.EmitLifecycleEvent(
        pb.EmitLifecycleEventRequest(
            connection=pb.ConnectionRef(environment="dev", integration="x", connection_id="c"),
            event=pb.LIFECYCLE_EVENT_VALIDATE_CONNECTION,
        )
    )
    print(r)


@pytest.mark.anyio
async def test_b(stub):
    r = await stub.EmitLifecycleEvent(
        pb.EmitLifecycleEventRequest(
            connection=pb.ConnectionRef(environment="dev", integration="x", connection_id="c"),
            event=pb.LIFECYCLE_EVENT_VALIDATE_CONNECTION,
        )
    )
    print(r)
