"""Every exception the orchestrator raises, each with a message a person can act on.

    OrchestratorError
    ├── InvalidArgument        a request field is malformed (names the field)
    ├── Unauthenticated        the call carries no valid bearer token
    ├── PermissionDenied       the caller's token may not touch that environment
    ├── NotFound               the connection does not exist
    ├── FailedPrecondition     the event is not allowed in the connection's current state
    │   ├── InvalidTransition  a record cannot follow the state before it (a refused event or a corrupt log)
    │   ├── Misconfigured      a provider call needs a setting the daemon lacks (an integration's base_url)
    │   └── SealError          sealed credentials do not open (altered, or moved to another connection)
    │       └── KeyMissing     they were sealed under a key that is not configured
    ├── VersionConflict        ``expected_version`` does not match (carries the current version)
    ├── IdempotencyConflict    an idempotency key was reused with a different request
    ├── ResourceExhausted      a limit or the write queue is full
    ├── Unavailable            the daemon is draining or the store is closed
    ├── StoreError             the backend failed (the driver's exception is chained)
    │   └── LogInUse           another process owns the log (carries the path and the owner's pid)
    ├── LeaseLost              a job was claimed or started meanwhile; the write was refused (fencing)
    ├── PluginError            an installed plugin is broken
    └── ProviderError          a provider answered with an error status, or could not be reached

Event functions raise two more, which are not errors of the orchestrator's
own (see :mod:`orchestrator.functions`): ``Rejected`` and ``NonRetryable``; the
provider proxy raises ``CredentialsUnavailable``, a ``NonRetryable``, when the
connection has no usable credentials for its integration's auth scheme. Either
that or ``Misconfigured``, raised by the proxy, fails the attempt without retries,
and a validation that meets one is refused as a whole (FAILED_PRECONDITION,
nothing written): the daemon's settings, not the customer's connection, are at fault.

Each class is mapped to a gRPC status code in :mod:`orchestrator.rpc.server`
(``STATUS_CODES``) and to an exit code in :mod:`orchestrator.cli`, and
nowhere else. A backend wraps its driver's exceptions at its edge with
``raise StoreError(...) from exc``.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error the orchestrator reports to a caller."""


class InvalidArgument(OrchestratorError):
    """A request field is malformed; the message names the field."""


class Unauthenticated(OrchestratorError):
    """The call carries no bearer token, or one the daemon does not know."""


class PermissionDenied(OrchestratorError):
    """The caller's token is not scoped to the environment the call touches; nothing was done."""


class NotFound(OrchestratorError):
    """The connection (or other named thing) does not exist."""


class FailedPrecondition(OrchestratorError):
    """The event is not allowed from the connection's current state."""


class InvalidTransition(FailedPrecondition):
    """A record cannot follow the connection's current state (a refused event or a corrupt log)."""


class Misconfigured(FailedPrecondition):
    """A provider call needs a setting the daemon lacks (an integration's ``base_url``, or an unusable one).

    ``setting`` names it as the config spells it (``integrations.salesforce.base_url``); the
    message says what to set where. Not the customer's fault: not retried, and a validation
    that meets it is refused rather than rejecting the connection.
    """

    def __init__(self, message: str, *, setting: str = "") -> None:
        super().__init__(message)
        self.setting = setting


class SealError(FailedPrecondition):
    """Sealed credentials could not be opened: altered, moved to another connection, or their key is missing."""


class KeyMissing(SealError):
    """Credentials were sealed under a key that is not in the key ring; ``key_id`` names it."""

    def __init__(self, message: str, *, key_id: str = "") -> None:
        super().__init__(message)
        self.key_id = key_id


class VersionConflict(OrchestratorError):
    """The stream's current version is not the expected one."""

    def __init__(self, stream: str, expected: int, current: int) -> None:
        super().__init__(f"{stream}: expected version {expected}, but the current version is {current}")
        self.stream = stream
        self.expected = expected
        self.current = current


class IdempotencyConflict(OrchestratorError):
    """An idempotency key was already used for a different request on this connection."""


class ResourceExhausted(OrchestratorError):
    """A size limit was exceeded or the daemon is saturated."""


class Unavailable(OrchestratorError):
    """The daemon is draining or the store is closed; retry elsewhere or later."""


class StoreError(OrchestratorError):
    """The event store's backend failed; the cause is chained."""


class LogInUse(StoreError):
    """Another process (a running daemon) owns the log; ``holder`` is its pid (or a description)."""

    def __init__(self, message: str, *, path: object = None, holder: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


class LeaseLost(OrchestratorError):
    """A job was claimed again after this worker's lease, or started before a deletion could cancel it.

    Nothing was written; the caller may retry (fencing).
    """


class PluginError(OrchestratorError):
    """An installed plugin is broken (import error, not an event function, duplicate name)."""


class ProviderError(OrchestratorError):
    """A provider answered with an error status (or could not be reached); ``status`` is 0 for the latter."""

    def __init__(self, message: str, *, status: int = 0, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body
