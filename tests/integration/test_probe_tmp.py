import anyio, grpc
import pytest
from .test_server import emit, conn, get, read_events, VALIDATE, CREATE, DELETE, struct, read_request, next_record
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb

pytestmark = pytest.mark.anyio

@pytest.mark.parametrize("rnd", range(10))
async def test_ryw(stub, rnd):
    failures = []
    done = anyio.Event()
    async def writer(i):
        c = conn(f"c{i:02}")
        for n in range(10):
            try:
                r = await emit(stub, CREATE, c)
                g = await get(stub, c)
                if g.version < r.version:
                    failures.append(("stale get", i, n, g.version, r.version))
            except grpc.aio.AioRpcError as e:
                failures.append((e.code(), e.details()))
    async def follower():
        call = stub.ReadEvents(read_request(follow=True))
        async for _ in call:
            if done.is_set():
                call.cancel()
                return
    async with anyio.create_task_group() as tg:
        async def lister():
            while not done.is_set():
                await stub.ListConnections(pb.ListConnectionsRequest())
        for _ in range(10):
            tg.start_soon(lister)
        async with anyio.create_task_group() as w:
            for i in range(10):
                w.start_soon(writer, i)
        done.set()
        await emit(stub, CREATE, conn("last"))
    print("\nFAILS", len(failures), failures[:2])
