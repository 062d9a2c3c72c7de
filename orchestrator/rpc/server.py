"""The gRPC adapter: messages in, :class:`~orchestrator.service.Service` calls, messages out.

Errors are mapped to status codes here and only here (:data:`STATUS_CODES`);
an unexpected exception becomes INTERNAL with a reference to the daemon's
log, never a traceback on the wire. A request that does not decode is
INVALID_ARGUMENT (:mod:`orchestrator.rpc.guard`); a caller that goes away is
a DEBUG line, not an error. :class:`GrpcServer` is the server's life as the
daemon sees it: bind, serve (health SERVING), drain (health NOT_SERVING, new
calls refused by the service), stop. Who may call, and which environments
each caller may touch, is :mod:`orchestrator.rpc.auth`'s (the token) and
:func:`caller`'s (checked here, per call); the transport is
:mod:`orchestrator.rpc.tls`'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from functools import wraps
from typing import Any, NoReturn, TypeVar, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from orchestrator import errors, tracing
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from orchestrator.access import ANYONE, Tokens
from orchestrator.ids import uuid7
from orchestrator.limits import MAX_MESSAGE_BYTES
from orchestrator.logs import Throttle
from orchestrator.model import check_name
from orchestrator.records import Record
from orchestrator.rpc import wire
from orchestrator.rpc.auth import AccessGuard, caller
from orchestrator.rpc.guard import WireGuard
from orchestrator.rpc.tls import ServerTls
from orchestrator.service import Service

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

# grpc-stubs predates the asyncio health servicer, so it is typed here by hand.
HealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Orchestrator"].full_name

STATUS_CODES: dict[type[errors.OrchestratorError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.VersionConflict: grpc.StatusCode.ABORTED,
    errors.IdempotencyConflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.StoreError: grpc.StatusCode.INTERNAL,
    # A job started or was claimed meanwhile: nothing was written, and the same call may succeed now.
    errors.LeaseLost: grpc.StatusCode.ABORTED,
    errors.PluginError: grpc.StatusCode.FAILED_PRECONDITION,
    # An upstream the daemon depends on failed; a later retry may find it back.
    errors.ProviderError: grpc.StatusCode.UNAVAILABLE,
}


def status_code(exc: errors.OrchestratorError) -> grpc.StatusCode:
    """The status code for an error (the nearest mapped base class wins)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.UNKNOWN


async def _abort(context: grpc.aio.ServicerContext[object, object], exc: Exception) -> NoReturn:
    if isinstance(exc, errors.OrchestratorError):
        await context.abort(status_code(exc), str(exc))
    incident = uuid7()
    log.exception("internal error %s in %s", incident, context.peer(), exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error {incident}; see the daemon's log")


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self", bound="OrchestratorServicer")
Ctx = grpc.aio.ServicerContext[object, object]


def _sent_traceparent(context: Ctx) -> str:
    """The ``traceparent`` metadata as the caller sent it (the last one, if several; ``""`` when none)."""
    sent = ""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent" and isinstance(value, str):
            sent = value
    return sent


def _traceparent(context: Ctx) -> str:
    """The caller's ``traceparent``; ``""`` when absent or not a valid W3C traceparent (then never stored or used)."""
    sent = _sent_traceparent(context)
    return tracing.valid_traceparent(sent) if sent else ""


def _checked_traceparent(name: str, context: Ctx, throttle: Throttle) -> str:
    """:func:`_traceparent`, saying (throttled) when the caller sent one that is not valid."""
    sent = _sent_traceparent(context)
    if not sent:
        return ""
    traceparent = tracing.valid_traceparent(sent)
    if not traceparent:
        # Its value is not logged: it can be anything, of any length.
        throttle.log(
            logging.WARNING,
            "invalid traceparent",
            "%s from %s: ignored a traceparent that is not a W3C traceparent (%d characters)",
            name,
            context.peer(),
            len(sent),
        )
    return traceparent


def _went_away(name: str, context: Ctx) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s from %s ended: the caller cancelled or went away", name, context.peer())


@contextmanager
def _server_span(name: str, context: Ctx, throttle: Throttle) -> Iterator[trace.Span]:
    """The RPC's span, continuing the caller's ``traceparent``; failures set its status.

    With traces off there is no span: the block gets the API's invalid span, which records nothing.
    """
    traceparent = _checked_traceparent(name, context, throttle)
    if not tracing.traces_on():
        try:
            yield trace.INVALID_SPAN
        except asyncio.CancelledError:
            _went_away(name, context)
            raise
        return
    attributes = {"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": name}
    who = caller()
    if who is not ANYONE:
        attributes["enduser.id"] = who.name  # the token's fingerprint, never the token
    with tracer.start_as_current_span(
        f"{SERVICE_NAME}/{name}",
        context=tracing.context_from(traceparent),
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except asyncio.CancelledError:
            # The caller cancelled or went away (grpc cancels the call's task): nothing failed here.
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.CANCELLED.value[0])
            _went_away(name, context)
            raise


def _failed(span: trace.Span, exc: Exception) -> None:
    if not span.is_recording():
        return
    code = status_code(exc) if isinstance(exc, errors.OrchestratorError) else grpc.StatusCode.INTERNAL
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    # A refused request is the caller's error; only our own failures are recorded with a traceback.
    tracing.span_error(span, exc, record=code is grpc.StatusCode.INTERNAL)


def _unary(
    method: Callable[[Self, Req, Ctx], Awaitable[Resp]],
) -> Callable[[Self, Req, Ctx], Awaitable[Resp]]:
    name = method.__name__

    @wraps(method)
    async def wrapper(self: Self, request: Req, context: Ctx) -> Resp:
        if not tracing.traces_on():
            # No span to open or close: only the mapping of errors, and the invalid traceparent said.
            _checked_traceparent(name, context, self.throttle)
            try:
                return await method(self, request, context)
            except asyncio.CancelledError:
                _went_away(name, context)
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                await _abort(context, exc)
                raise AssertionError("unreachable: abort raises") from exc
        with _server_span(name, context, self.throttle) as span:
            try:
                response = await method(self, request, context)
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                _failed(span, exc)
                await _abort(context, exc)
                raise AssertionError("unreachable: abort raises") from exc
            span.set_attribute("rpc.grpc.status_code", 0)
            return response

    return wrapper


def _environment(record: Record) -> str:
    return record.stream.partition("/")[0]


class OrchestratorServicer(pb_grpc.OrchestratorServicer):
    """``orchestrator.v1.Orchestrator`` over a :class:`Service`.

    Every method checks the environments it touches against the caller's
    scope: ``caller().require(environment)`` (PERMISSION_DENIED, before
    anything is read or written) for a named connection or environment, and
    ``caller().allows(environment)`` to leave out what it lists of other
    environments. A new method gets the same with one such line.
    """

    def __init__(self, service: Service, throttle: Throttle | None = None) -> None:
        self._service = service
        self.throttle = throttle or Throttle(log)
        """What a caller can repeat at will (an invalid traceparent) is logged at most every few seconds."""
        self._encoded = wire.EncodedRecords()
        """ReadEvents writes each record as bytes encoded once for every follower (see :func:`handlers`)."""

    @_unary
    async def EmitLifecycleEvent(
        self, request: pb.EmitLifecycleEventRequest, context: Ctx
    ) -> pb.EmitLifecycleEventResponse:
        """See the proto."""
        emit = wire.emit_request_from_proto(request, traceparent=_traceparent(context))
        caller().require(emit.ref.environment)
        return wire.emit_response_to_proto(await self._service.emit(emit))

    @_unary
    async def GetConnection(self, request: pb.GetConnectionRequest, context: Ctx) -> pb.GetConnectionResponse:
        """See the proto."""
        if not request.HasField("connection"):
            raise errors.InvalidArgument("connection is required")
        ref = wire.ref_from_proto(request.connection)
        caller().require(ref.environment)
        connection = await self._service.get_connection(ref)
        return pb.GetConnectionResponse(connection=wire.connection_to_proto(connection))

    @_unary
    async def ListConnections(self, request: pb.ListConnectionsRequest, context: Ctx) -> pb.ListConnectionsResponse:
        """See the proto."""
        if request.environment:
            check_name("environment", request.environment)
            caller().require(request.environment)
        if request.integration:
            check_name("integration", request.integration)
        page = await self._service.list_connections(
            environment=request.environment,
            integration=request.integration,
            state=wire.state_from_proto(request.state),
            page_size=request.page_size,
            page_token=request.page_token,
            environments=caller().environments,
        )
        return pb.ListConnectionsResponse(
            connections=[wire.connection_to_proto(c) for c in page.connections],
            next_page_token=page.next_page_token,
        )

    @_unary
    async def UpdateCredentials(
        self, request: pb.UpdateCredentialsRequest, context: Ctx
    ) -> pb.UpdateCredentialsResponse:
        """See the proto."""
        ref, credentials = wire.update_credentials_from_proto(request)
        caller().require(ref.environment)
        updated = await self._service.update_credentials(ref, credentials, traceparent=_traceparent(context))
        return pb.UpdateCredentialsResponse(
            fingerprint=updated.fingerprint, key_id=updated.key_id, version=updated.version, changed=updated.changed
        )

    @_unary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        """See the proto."""
        ref = wire.ref_from_proto(request.connection) if request.HasField("connection") else None
        who = caller()
        if ref is not None:
            who.require(ref.environment)
        page = await self._service.list_jobs(
            ref=ref,
            statuses=wire.job_statuses_from_proto(request.statuses),
            page_size=request.page_size,
            page_token=request.page_token,
            environments=who.environments,
        )
        return pb.ListJobsResponse(jobs=[wire.job_to_proto(j) for j in page.jobs], next_page_token=page.next_page_token)

    @_unary
    async def RetryJob(self, request: pb.RetryJobRequest, context: Ctx) -> pb.Job:
        """See the proto."""
        who = caller()
        job = await self._service.retry_job(
            request.job_id, by=who.name, check=who.require, traceparent=_traceparent(context)
        )
        return wire.job_to_proto(job)

    @_unary
    async def CancelJob(self, request: pb.CancelJobRequest, context: Ctx) -> pb.Job:
        """See the proto."""
        who = caller()
        job = await self._service.cancel_job(
            request.job_id, reason=request.reason, by=who.name, check=who.require, traceparent=_traceparent(context)
        )
        return wire.job_to_proto(job)

    # grpc.aio's reader/writer form (a coroutine that writes) rather than an async generator: when the
    # caller goes away, grpc cancels this coroutine's task where it waits, so the span and the log's
    # reader are closed right there, in the call's own context. (An async generator suspended at a
    # yield would be closed later by the loop's finaliser, in another context, where OpenTelemetry
    # fails to detach the span's context and logs an ERROR with a traceback for every dropped stream.)
    async def ReadEvents(self, request: pb.ReadEventsRequest, context: Ctx) -> None:  # type: ignore[override]
        """See the proto."""
        with _server_span("ReadEvents", context, self.throttle) as span:
            try:
                ref = wire.ref_from_proto(request.connection) if request.HasField("connection") else None
                who = caller()
                if ref is not None:
                    who.require(ref.environment)
                records = cast(
                    AsyncGenerator[Record, None],
                    self._service.read_events(from_position=request.from_position, ref=ref, follow=request.follow),
                )
            except Exception as exc:
                _failed(span, exc)
                await _abort(context, exc)
            async with aclosing(records):
                while True:
                    try:
                        record = await anext(records, None)
                        if record is None:
                            break
                        if not who.allows(_environment(record)):
                            continue
                        message = self._encoded(record)
                    except Exception as exc:
                        if isinstance(exc, grpc.aio.AbortError):
                            raise
                        _failed(span, exc)
                        await _abort(context, exc)
                    # Outside the mapping above: a write to a caller that went away is grpc's to handle.
                    await context.write(message)
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", 0)


MethodHandler = Any  # grpc.RpcMethodHandler, generic in grpc-stubs only


class _Collect:
    """Stands in for the server in the generated registration, to keep its method handlers."""

    def __init__(self) -> None:
        self.methods: dict[str, MethodHandler] = {}

    def add_generic_rpc_handlers(self, generic: Any) -> None:
        """The same handlers as :meth:`add_registered_method_handlers` gives: taken from there."""

    def add_registered_method_handlers(self, service: str, methods: dict[str, MethodHandler]) -> None:
        """Keep the service's handlers."""
        self.methods.update(methods)


def handlers(servicer: OrchestratorServicer) -> dict[str, MethodHandler]:
    """The servicer's method handlers, as generated, but for ReadEvents' serialiser: there is none.

    ReadEvents writes each record as the bytes of its ``EventRecord``, encoded once
    for every follower (:class:`~orchestrator.rpc.wire.EncodedRecords`).
    """
    collect = _Collect()
    pb_grpc.add_OrchestratorServicer_to_server(servicer, cast(grpc.aio.Server, collect))
    read = collect.methods["ReadEvents"]
    collect.methods["ReadEvents"] = grpc.unary_stream_rpc_method_handler(
        read.unary_stream, request_deserializer=read.request_deserializer, response_serializer=None
    )
    return collect.methods


def build_server(
    service: Service, health_servicer: Any, tokens: Callable[[], Tokens | None] = lambda: None
) -> grpc.aio.Server:
    """A server with the orchestrator, health and reflection services (not yet bound or started).

    ``tokens`` gives the tokens in force for each call (None: no token file, every caller is allowed).
    """
    throttle = Throttle(log)
    server = grpc.aio.server(
        # The token first: a caller without one learns nothing, not even whether its request decodes.
        interceptors=[AccessGuard(tokens, throttle), WireGuard(throttle)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", 16 * MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),  # a second daemon on the same port must fail, not share it
        ],
    )
    methods = handlers(OrchestratorServicer(service, throttle))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))
    cast(Any, server).add_registered_method_handlers(SERVICE_NAME, methods)  # newer than grpc-stubs
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return server


class GrpcServer:
    """The daemon's gRPC server: health follows its life (NOT_SERVING until :meth:`serving`, again on drain)."""

    def __init__(
        self,
        service: Service,
        *,
        tokens: Callable[[], Tokens | None] = lambda: None,
        tls: ServerTls | None = None,
    ) -> None:
        self._health = HealthServicer()
        self._server = build_server(service, self._health, tokens)
        self._tls = tls

    async def start(self, listen: str) -> int:
        """Bind ``listen`` (health NOT_SERVING), with TLS if configured, and start; returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            if self._tls is not None:
                port = self._server.add_secure_port(listen, self._tls.credentials())
            else:
                port = self._server.add_insecure_port(listen)
        except RuntimeError as exc:
            raise errors.InvalidArgument(f"cannot listen on {listen}: {exc}") from exc
        if port == 0:
            raise errors.InvalidArgument(f"cannot listen on {listen}: the address is in use or unavailable")
        await self._server.start()
        return port

    async def serving(self) -> None:
        """Everything behind the server is ready: health SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def draining(self) -> None:
        """Health NOT_SERVING for good (the service refuses new calls itself)."""
        await self._health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Close the server, giving calls still open ``grace`` seconds."""
        await self._server.stop(grace)

    async def _set_health(self, status: Any) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)
