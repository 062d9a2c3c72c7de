"""The gRPC baseline: a bare grpc.aio unary server that returns the request bytes.

``python bench/echo_server.py --listen 127.0.0.1:0`` serves ``/bench.Echo/Echo``
(bytes in, the same bytes out: no protobuf parsing, no work) and prints the
same kind of ``serving ... on HOST:PORT`` line on stderr as the daemon, on
uvloop when it is importable, as ``orchestrator serve`` does. SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def serve(listen: str) -> None:
    """Serve the echo method on ``listen`` until killed."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rpartition(":")[0]
    print(f"serving {SERVICE} on {host}:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main() -> None:
    """Parse ``--listen`` and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.listen))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args.listen))


if __name__ == "__main__":
    main()
