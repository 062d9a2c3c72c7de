"""A small synchronous gRPC client for the CLI's ``emit``, ``connections``, ``events``, ``credentials`` and ``jobs``.

It speaks TLS when given :class:`ClientTls` (a CA to trust, and for mutual TLS
a certificate and key), and sends ``authorization: Bearer <token>`` on every
call when given a token.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType

import grpc

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.model import Connection, ConnectionRef, ConnectionState, EmitRequest, EmitResult, Job, JobStatus
from orchestrator.records import Record
from orchestrator.rpc import wire


class ClientError(Exception):
    """A call failed; the message is ``CODE: details``, fit for one line on stderr."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS for the client: the CA that signed the daemon's certificate (None: the system's), and a client pair."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """As grpc takes them."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


_HANDSHAKE = ("handshake", "ssl", "tls", "certificate")


def _fail(exc: grpc.RpcError, address: str, tls: bool) -> ClientError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    if code is grpc.StatusCode.UNAVAILABLE and any(word in details.lower() for word in _HANDSHAKE):
        details = (
            f"the TLS handshake with {address} failed: check --tls-ca (the CA that signed the daemon's"
            " certificate, which must name this address), and --tls-cert/--tls-key if the daemon asks for a"
            f" client certificate ({details})"
        )
    elif code is grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        hint = (
            "; if it asks for a client certificate, pass --tls-cert and --tls-key"
            if tls
            else "; if it serves TLS, pass --tls-ca"
        )
        details = f"cannot reach the daemon at {address} (is `orchestrator serve` running there{hint}?)"
    elif code is grpc.StatusCode.UNAUTHENTICATED:
        details += " (give the daemon's token with --token-file or ORCHESTRATOR_TOKEN)"
    return ClientError(code.name, details)


@dataclass(frozen=True, slots=True)
class CredentialsUpdate:
    """What UpdateCredentials answered."""

    fingerprint: str
    key_id: str
    version: int
    changed: bool


class Client:
    """``orchestrator.v1.Orchestrator`` over one channel (TLS with ``tls``; ``token`` on every call)."""

    def __init__(self, address: str, *, timeout: float = 60.0, tls: ClientTls | None = None, token: str = "") -> None:
        self._address = address
        self._timeout = timeout
        self._tls = tls is not None
        self._channel = (
            grpc.secure_channel(address, tls.credentials()) if tls is not None else grpc.insecure_channel(address)
        )
        self._stub = pb_grpc.OrchestratorStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None

    def _error(self, exc: grpc.RpcError) -> ClientError:
        return _fail(exc, self._address, self._tls)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._channel.close()

    def emit(self, request: EmitRequest) -> EmitResult:
        """Emit one lifecycle event."""
        try:
            response = self._stub.EmitLifecycleEvent(
                wire.emit_request_to_proto(request),
                timeout=self._timeout,
                wait_for_ready=False,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return wire.emit_response_from_proto(response)

    def update_credentials(self, ref: ConnectionRef, credentials: Mapping[str, str]) -> CredentialsUpdate:
        """Replace a connection's credentials."""
        try:
            response = self._stub.UpdateCredentials(
                wire.update_credentials_to_proto(ref, credentials), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return CredentialsUpdate(response.fingerprint, response.key_id, response.version, response.changed)

    def get_connection(self, ref: ConnectionRef) -> Connection:
        """One connection."""
        try:
            response = self._stub.GetConnection(
                pb.GetConnectionRequest(connection=wire.ref_to_proto(ref)),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return wire.connection_from_proto(response.connection)

    def list_connections(
        self,
        *,
        environment: str = "",
        integration: str = "",
        state: ConnectionState | None = None,
        page_size: int = 0,
    ) -> Iterator[Connection]:
        """Every matching connection, following page tokens."""
        token = ""
        while True:
            request = pb.ListConnectionsRequest(
                environment=environment,
                integration=integration,
                state=wire.STATES[state] if state else pb.CONNECTION_STATE_UNSPECIFIED,
                page_size=page_size,
                page_token=token,
            )
            try:
                response = self._stub.ListConnections(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise self._error(exc) from None
            for message in response.connections:
                yield wire.connection_from_proto(message)
            token = response.next_page_token
            if not token:
                return

    def list_jobs(
        self, *, ref: ConnectionRef | None = None, statuses: Collection[JobStatus] = (), page_size: int = 0
    ) -> Iterator[Job]:
        """Every matching job, following page tokens."""
        token = ""
        while True:
            request = pb.ListJobsRequest(
                statuses=[wire.JOB_STATUSES[s] for s in statuses], page_size=page_size, page_token=token
            )
            if ref is not None:
                request.connection.CopyFrom(wire.ref_to_proto(ref))
            try:
                response = self._stub.ListJobs(request, timeout=self._timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise self._error(exc) from None
            for message in response.jobs:
                yield wire.job_from_proto(message)
            token = response.next_page_token
            if not token:
                return

    def retry_job(self, job_id: str) -> Job:
        """Queue a job that gave up or was cancelled again."""
        try:
            response = self._stub.RetryJob(
                pb.RetryJobRequest(job_id=job_id), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return wire.job_from_proto(response)

    def cancel_job(self, job_id: str, reason: str = "") -> Job:
        """Cancel a queued job."""
        try:
            response = self._stub.CancelJob(
                pb.CancelJobRequest(job_id=job_id, reason=reason), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return wire.job_from_proto(response)

    def read_events(
        self, *, ref: ConnectionRef | None = None, from_position: int = 0, follow: bool = False
    ) -> Iterator[Record]:
        """Records from a position; with ``follow``, until interrupted."""
        request = pb.ReadEventsRequest(from_position=from_position, follow=follow)
        if ref is not None:
            request.connection.CopyFrom(wire.ref_to_proto(ref))
        try:
            for message in self._stub.ReadEvents(
                request, timeout=None if follow else self._timeout, metadata=self._metadata
            ):
                yield wire.record_from_proto(message)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
