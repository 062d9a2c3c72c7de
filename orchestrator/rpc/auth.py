"""The access guard: every call but a health check carries a bearer token the daemon knows.

:class:`AccessGuard` is a server interceptor. With a token file
(``serve --auth-token-file``) it reads the call's ``authorization: Bearer
<token>`` metadata before the handler runs: a missing or unknown token is
UNAUTHENTICATED "missing or invalid bearer token" (and nothing more), logged
as one WARNING line without the token, at most one every 10 s
(:class:`~orchestrator.logs.Throttle`). A known token's caller
(:class:`~orchestrator.access.Principal`) is what :func:`caller` returns for the
rest of the call; the servicer checks it against the environments a call
touches (PERMISSION_DENIED) and filters what it lists. Without a token file
every caller is :data:`~orchestrator.access.ANYONE`.

``grpc.health.v1.Health`` answers without a token (probes and load balancers
carry none); server reflection needs one, like the orchestrator's own RPCs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from contextvars import ContextVar
from typing import Any

import grpc

from orchestrator.access import ANYONE, Principal, Tokens
from orchestrator.logs import Throttle

log = logging.getLogger(__name__)

Handler = Any  # grpc.RpcMethodHandler; grpc-stubs types its behaviours too narrowly for wrapping

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
"""Methods answered without a token: the health service's."""
UNAUTHENTICATED = "missing or invalid bearer token"
"""The whole message of an UNAUTHENTICATED answer: it says nothing of which part was wrong."""

_CALLER: ContextVar[Principal | None] = ContextVar("orchestrator_caller", default=None)


def caller() -> Principal:
    """The authenticated caller of the current call (set by :class:`AccessGuard` before the handler runs).

    Raises RuntimeError outside a guarded call, so that a handler the guard did not wrap fails closed.
    """
    found = _CALLER.get()
    if found is None:
        raise RuntimeError("no caller: this call did not pass the access guard")
    return found


def bearer_token(metadata: Any) -> str | None:
    """The token of the call's ``authorization: Bearer <token>`` metadata (None when there is none)."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


class AccessGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in grpc-stubs only
    """Authenticates every call but health checks against ``tokens()`` (None: no token file, everyone is allowed)."""

    def __init__(self, tokens: Callable[[], Tokens | None], throttle: Throttle | None = None) -> None:
        self._tokens = tokens
        self._throttle = throttle or Throttle(log)
        self._guarded: dict[str, tuple[Handler, Handler]] = {}
        """method -> (its handler, the same guarded); handlers are found once and kept by grpc."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        """The method's handler, made to authenticate its caller first (health and unknown methods as they are)."""
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        known = self._guarded.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._guard(handler, details.method)
        self._guarded[details.method] = (handler, guarded)
        return guarded

    async def admit(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        """Set the call's caller, or answer UNAUTHENTICATED (raising grpc's AbortError, as ``abort`` does)."""
        tokens = self._tokens()
        if tokens is None:
            _CALLER.set(ANYONE)
            return
        token = bearer_token(context.invocation_metadata())
        principal = tokens.authenticate(token) if token is not None else None
        if principal is not None:
            _CALLER.set(principal)
            return
        # Neither the token nor the header's value is logged: only which case it was.
        self._throttle.log(
            logging.WARNING,
            "unauthenticated call",
            "a call to %s from %s carried %s: answered UNAUTHENTICATED",
            method,
            context.peer(),
            "a bearer token the daemon does not know" if token is not None else "no bearer token",
        )
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        raise AssertionError("unreachable: abort raises")

    def _guard(self, handler: Handler, method: str) -> Handler:
        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await self.admit(context, method)
                async with aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response

            wrapped: Any = stream
        elif inspect.iscoroutinefunction(behaviour):

            async def call(request: Any, context: Any) -> Any:
                await self.admit(context, method)
                return await behaviour(request, context)

            wrapped = call
        else:
            # A synchronous handler (none here) runs on a thread where this guard cannot await: refuse it outright.
            raise TypeError(f"{method}: the access guard needs an async handler")
        kind = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming and handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return kind(wrapped, handler.request_deserializer, handler.response_serializer)
