"""The exceptions the orchestrator raises, each with a message a person can act on.

    OrchestratorError
    ├── InvalidArgument        a request field is malformed (names the field)
    ├── NotFound               the connection does not exist
    ├── FailedPrecondition     the event is not allowed in the connection's current state
    ├── VersionConflict        ``expected_version`` does not match (carries the current version)
    ├── IdempotencyConflict    an idempotency key was reused with a different request
    ├── ResourceExhausted      a limit or the write queue is full
    ├── Unavailable            the daemon is draining or the store is closed
    ├── StoreError             the backend failed (wraps the driver's exception)
    ├── LeaseLost              a job's outcome came from a claim that is no longer current
    └── PluginError            an installed plugin is broken

They are mapped to gRPC status codes in ``orchestrator.server`` and to exit
codes in ``orchestrator.cli``, and nowhere else.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error the orchestrator reports to a caller."""


class InvalidArgument(OrchestratorError):
    """A request field is malformed; the message names the field."""


class NotFound(OrchestratorError):
    """The connection (or other named thing) does not exist."""


class FailedPrecondition(OrchestratorError):
    """The event is not allowed from the connection's current state."""


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


class LeaseLost(OrchestratorError):
    """A job was claimed again after this worker's lease; its outcome is not recorded (fencing)."""


class PluginError(OrchestratorError):
    """An installed plugin is broken (import error, not an event function, duplicate name)."""
