"""The wire guard: a request body that does not decode is INVALID_ARGUMENT, not a traceback.

grpc.aio decodes a request with the method's ``request_deserializer`` before
any handler runs; when that raises, grpc logs an ERROR with a traceback and
answers UNKNOWN. :class:`WireGuard`, a server interceptor, gives every
method (the orchestrator's, health's and reflection's) a deserializer that
hands over an :class:`Undecodable` instead of raising, and wraps the handler
so that such a request is answered INVALID_ARGUMENT "the request is not a
valid <message>". The daemon's log gets one WARNING line, without a
traceback, at most every few seconds (:class:`~orchestrator.logs.Throttle`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from orchestrator.logs import Throttle

log = logging.getLogger(__name__)

Handler = Any  # grpc.RpcMethodHandler; grpc-stubs types its behaviours too narrowly for wrapping


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What the guarded deserializer returns for bytes that are not a valid ``message``."""

    message: str
    error: Exception


def message_name(deserializer: Callable[[bytes], Any]) -> str:
    """The protobuf message a deserializer decodes (``Message.FromString``), by its full name."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "")) or "message"


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    name = message_name(deserializer)

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # whatever the decoder raises, the bytes are the caller's
            return Undecodable(name, exc)

    return deserialize


class WireGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic in grpc-stubs only
    """Answers requests that do not decode with INVALID_ARGUMENT, logging one throttled WARNING line."""

    def __init__(self, throttle: Throttle | None = None) -> None:
        self._throttle = throttle or Throttle(log)
        self._guarded: dict[str, tuple[Handler, Handler]] = {}
        """method -> (its handler, the same guarded); handlers are found once and kept by grpc."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]], details: grpc.HandlerCallDetails
    ) -> Handler:
        """The method's handler, guarded (None, an unknown method, stays None: UNIMPLEMENTED)."""
        handler = await continuation(details)
        if handler is None:
            return None
        known = self._guarded.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._guard(handler, details.method)
        self._guarded[details.method] = (handler, guarded)
        return guarded

    async def refuse(self, request: Undecodable, context: grpc.aio.ServicerContext[Any, Any], method: str) -> NoReturn:
        """Log (throttled) and answer INVALID_ARGUMENT; raises grpc's AbortError, as ``abort`` does."""
        self._throttle.log(
            logging.WARNING,
            "undecodable request",
            "a request to %s from %s is not a valid %s (%s: %s): answered INVALID_ARGUMENT",
            method,
            context.peer(),
            request.message,
            type(request.error).__name__,
            str(request.error)[:200],
        )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {request.message}")
        raise AssertionError("unreachable: abort raises")

    def _guard(self, handler: Handler, method: str) -> Handler:
        behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler  # a synchronous handler (none here): grpc runs it on a thread, left as it is
        deserializer = _tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.request_streaming:
            wrapped = self._stream_request(behaviour, method)
            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(wrapped, deserializer, serializer)
            return grpc.stream_unary_rpc_method_handler(wrapped, deserializer, serializer)
        wrapped = self._unary_request(behaviour, method)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(wrapped, deserializer, serializer)
        return grpc.unary_unary_rpc_method_handler(wrapped, deserializer, serializer)

    def _unary_request(self, behaviour: Any, method: str) -> Any:
        """``behaviour`` refusing an undecodable request before it runs."""
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await self.refuse(request, context, method)
                async with aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response

            return stream

        async def call(request: Any, context: Any) -> Any:
            if isinstance(request, Undecodable):
                await self.refuse(request, context, method)
            return await behaviour(request, context)

        return call

    def _stream_request(self, behaviour: Any, method: str) -> Any:
        """``behaviour`` reading requests that end the call, refused, at the first undecodable one."""

        async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await self.refuse(request, context, method)
                yield request

        if inspect.isasyncgenfunction(behaviour):

            async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                async with aclosing(behaviour(checked(requests, context), context)) as responses:
                    async for response in responses:
                        yield response

            return stream

        async def call(requests: AsyncIterator[Any], context: Any) -> Any:
            return await behaviour(checked(requests, context), context)

        return call
