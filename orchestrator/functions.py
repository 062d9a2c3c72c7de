"""The plugin API: :func:`on_event` turns a function into an event function.

    from orchestrator import Context, on_event

    @on_event("post-connection-creation", integration="salesforce",
              description="Register a Salesforce webhook", metadata=Metadata)
    async def register_webhook(ctx: Context) -> None:
        ...

A plugin lists its functions under the entry-point group
``orchestrator.functions``; the entry-point name is the function's name.

Exceptions a function may raise to steer its delivery::

    Exception
    ├── Rejected        validate-connection: reject with this clean message
    └── NonRetryable    stop retrying: the failure will not go away by itself
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from pydantic import BaseModel

from orchestrator.errors import InvalidArgument
from orchestrator.model import LifecycleEvent, check_name
from orchestrator.retry import RetryPolicy

if TYPE_CHECKING:
    from orchestrator.context import Context

Handler: TypeAlias = "Callable[[Context], Awaitable[None] | None]"


class Rejected(Exception):
    """Raise in a validate-connection function to reject the connection with ``message``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NonRetryable(Exception):
    """Raise to stop retrying: the failure is recorded and the function gives up at once."""


@dataclass(frozen=True, slots=True)
class EventFunction:
    """A function registered for one lifecycle event of one integration."""

    handler: Callable[..., Any]
    event: LifecycleEvent
    integration: str
    description: str = ""
    metadata: type[BaseModel] | None = None
    timeout: float | None = None
    retry: RetryPolicy | None = None

    @property
    def is_async(self) -> bool:
        """Coroutine functions (and objects with an ``async def __call__``) run on the loop; plain ones in a thread."""
        call = type(self.handler).__call__ if not inspect.isroutine(self.handler) else None
        return inspect.iscoroutinefunction(self.handler) or inspect.iscoroutinefunction(call)

    @property
    def qualname(self) -> str:
        """Where the handler is defined, for messages."""
        return describe(self.handler)

    def call_problem(self) -> str | None:
        """Why the handler cannot be called with the context alone (as the runner calls it), or None.

        An event function takes exactly one parameter, the context; more parameters must have
        defaults. Plugin discovery reports such a function as a broken plugin, so that the
        mistake shows before any attempt, not as a ``TypeError`` at each retry.
        """
        try:
            signature = inspect.signature(self.handler)
        except (TypeError, ValueError):  # a callable without a signature to read: its calls tell
            return None
        try:
            signature.bind(None)
        except TypeError:
            plain = signature.replace(
                parameters=[p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()],
                return_annotation=inspect.Signature.empty,
            )
            name = getattr(self.handler, "__name__", "handler")
            return (
                f"{self.qualname}{plain} cannot be called with the context alone: an event function takes exactly"
                f" one parameter, the context (def {name}(ctx): ...)"
            )
        return None


def describe(target: object) -> str:
    """``target`` named for a message: ``module.qualname`` (whole) for a function or class, else its type's."""
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    kind = type(target)
    return f"a {kind.__module__}.{kind.__qualname__} instance"


def on_event(
    event: str | LifecycleEvent,
    *,
    integration: str,
    description: str = "",
    metadata: type[BaseModel] | None = None,
    timeout: float | None = None,
    retry: RetryPolicy | None = None,
) -> Callable[[Callable[..., Any]], EventFunction]:
    """Declare an event function for ``event`` of ``integration``.

    ``metadata`` is a pydantic model that validates the connection's metadata
    for ``ctx.get_metadata()`` / ``set_metadata()``; ``timeout`` (seconds) and
    ``retry`` override the defaults for this function.
    """
    try:
        lifecycle = LifecycleEvent(event)
    except ValueError:
        names = ", ".join(e.value for e in LifecycleEvent)
        raise InvalidArgument(f"on_event: {event!r} is not a lifecycle event (one of {names})") from None
    check_name("on_event integration", integration)
    if timeout is not None and timeout <= 0:
        raise InvalidArgument(f"on_event: timeout must be more than 0 seconds, not {timeout}")
    if metadata is not None and not (isinstance(metadata, type) and issubclass(metadata, BaseModel)):
        raise InvalidArgument("on_event: metadata must be a pydantic BaseModel subclass")

    def decorate(handler: Callable[..., Any]) -> EventFunction:
        if not callable(handler):
            raise InvalidArgument(f"on_event must decorate a function, not {handler!r}")
        return EventFunction(handler, lifecycle, integration, description, metadata, timeout, retry)

    return decorate
