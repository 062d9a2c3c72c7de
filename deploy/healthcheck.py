#!/usr/bin/env python3
"""Exit 0 when the orchestrator's gRPC health service says SERVING, 1 otherwise.

The container image installs this as ``orchestrator-healthcheck`` for its
``HEALTHCHECK`` (and compose's): it asks ``grpc.health.v1.Health/Check``
with the libraries the daemon already ships, so the image needs no
downloaded ``grpc_health_probe`` binary. The daemon reports SERVING only once
its log is open and its plugins are loaded, and NOT_SERVING while it drains
after SIGTERM; an unreachable daemon or an unknown service is unhealthy too.

    orchestrator-healthcheck [--address HOST:PORT] [--service NAME] [--timeout S]
                             [--tls-ca FILE [--tls-server-name NAME] [--tls-cert FILE --tls-key FILE]]

The address defaults to the port of ``ORCHESTRATOR_LISTEN`` on loopback (a
wildcard listen address such as ``0.0.0.0:50051`` is probed at
``127.0.0.1:50051``). It speaks plaintext gRPC unless given ``--tls-ca`` (the
CA that signed the daemon's certificate); ``--tls-server-name`` is the name
the certificate carries when it does not name the probed address (e.g.
``orchestrator`` for 127.0.0.1), and ``--tls-cert``/``--tls-key`` a client
certificate when the daemon asks for one (mutual TLS). The health service
needs no bearer token. (The kubelet's own gRPC probes cannot speak TLS: with
TLS on, Kubernetes runs this instead.)
"""

from __future__ import annotations

import argparse
import os
import sys

# gRPC's C core prints a line per failed TLS handshake unless told to keep to errors.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_WILDCARDS = {"0.0.0.0", "::", "[::]", ""}


def default_address(listen: str) -> str:
    """Where to probe a daemon listening on ``listen`` from inside its own container."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        return "127.0.0.1:50051"
    return f"127.0.0.1:{port}" if host in _WILDCARDS else listen


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


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
    parser.add_argument("--tls-ca", help="speak TLS, trusting the CA in this PEM file")
    parser.add_argument("--tls-server-name", default="", help="the name the daemon's certificate carries")
    parser.add_argument("--tls-cert", help="mutual TLS: a client certificate (PEM), with --tls-key")
    parser.add_argument("--tls-key", help="mutual TLS: the key of --tls-cert (PEM)")
    args = parser.parse_args(argv)

    if args.tls_ca is None:
        channel = grpc.insecure_channel(args.address)
    else:
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(args.tls_ca),
                private_key=_read(args.tls_key) if args.tls_key else None,
                certificate_chain=_read(args.tls_cert) if args.tls_cert else None,
            )
        except OSError as exc:
            print(f"orchestrator-healthcheck: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 1
        options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
        channel = grpc.secure_channel(args.address, credentials, options=options)
    with channel:
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
