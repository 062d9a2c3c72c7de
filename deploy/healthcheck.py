#!/usr/bin/env python3
"""Exit 0 when the orchestrator's gRPC health service says SERVING, 1 otherwise.

The container image installs this as ``orchestrator-healthcheck`` for its
``HEALTHCHECK`` (and compose's): it asks ``grpc.health.v1.Health/Check``
with the libraries the daemon already ships, so the image needs no
downloaded ``grpc_health_probe`` binary. The daemon reports SERVING only once
its log is open and its plugins are loaded, and NOT_SERVING while it drains
after SIGTERM; an unreachable daemon or an unknown service is unhealthy too.

    orchestrator-healthcheck [--address HOST:PORT] [--service NAME] [--timeout S]

The address defaults to the port of ``ORCHESTRATOR_LISTEN`` on loopback (a
wildcard listen address such as ``0.0.0.0:50051`` is probed at
``127.0.0.1:50051``). It speaks plaintext gRPC: once the daemon serves TLS,
this probe needs the same credentials.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_WILDCARDS = {"0.0.0.0", "::", "[::]", ""}


def default_address(listen: str) -> str:
    """Where to probe a daemon listening on ``listen`` from inside its own container."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        return "127.0.0.1:50051"
    return f"127.0.0.1:{port}" if host in _WILDCARDS else listen


def main(argv: list[str] | None = None) -> int:
    """Check the health service once; return the process's exit code."""
    parser = argparse.ArgumentParser(prog="orchestrator-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default=default_address(os.environ.get("ORCHESTRATOR_LISTEN", "127.0.0.1:50051")),
        help="the daemon's gRPC address (default: from ORCHESTRATOR_LISTEN, on loopback)",
    )
    parser.add_argument(
        "--service",
        default="",
        help='the service to ask about: "" (the server as a whole) or orchestrator.v1.Orchestrator',
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)

    with grpc.insecure_channel(args.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
            details = (exc.details() if isinstance(exc, grpc.Call) else str(exc)) or "no details"
            if code == "NOT_FOUND":
                details = f"no health status for service {args.service!r} (yet)"
            print(f"orchestrator-healthcheck: {args.address}: {code}: {details}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"orchestrator-healthcheck: {args.address} {args.service or '(server)'}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
