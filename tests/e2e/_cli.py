"""The daemon's gRPC API as a platform service calls it, for the end-to-end tests.

:class:`Api` arranges state quickly (a command costs a Python start-up) when
the command under test is another one. The commands themselves run through
:mod:`tests.support.process`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.support.process import COMMAND_TIMEOUT


class Api:
    """The daemon's gRPC API over one channel, answering like ``emit --json``."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.OrchestratorStub(self._channel)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def emit(
        self,
        event: str,
        connection: str,
        integration: str,
        *,
        environment: str = "dev",
        config: Mapping[str, Any] | None = None,
        idempotency_key: str = "",
    ) -> dict[str, Any]:
        """Emit one lifecycle event; the response's event_id, position, version, state and deduplicated."""
        request = pb.EmitLifecycleEventRequest(
            connection=pb.ConnectionRef(environment=environment, integration=integration, connection_id=connection),
            event=pb.LifecycleEvent.Value("LIFECYCLE_EVENT_" + event.upper().replace("-", "_")),
            idempotency_key=idempotency_key,
        )
        if config:
            request.connection_config.update(config)
        response = self.stub.EmitLifecycleEvent(request, timeout=COMMAND_TIMEOUT)
        return {
            "event_id": response.event_id,
            "position": response.position,
            "version": response.version,
            "state": pb.ConnectionState.Name(response.state).removeprefix("CONNECTION_STATE_").lower(),
            "deduplicated": response.deduplicated,
        }

    def lifecycle(self, connection: str, integration: str) -> list[dict[str, Any]]:
        """Validate, create and delete one connection; the three responses."""
        return [
            self.emit(event, connection, integration)
            for event in ("validate-connection", "post-connection-creation", "pre-connection-deletion")
        ]
