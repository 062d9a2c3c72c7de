"""Credentials of each connection, as the emits brought them (kept in the daemon's memory for now)."""

from __future__ import annotations

from collections.abc import Mapping

from orchestrator.model import ConnectionRef


class Credentials:
    """The latest credentials of each connection, from its emits."""

    def __init__(self) -> None:
        self._by_stream: dict[str, dict[str, str]] = {}

    def remember(self, ref: ConnectionRef, credentials: Mapping[str, str]) -> None:
        """Keep the latest non-empty credentials of ``ref``."""
        if credentials:
            self._by_stream[ref.stream] = dict(credentials)

    def get(self, ref: ConnectionRef) -> Mapping[str, str]:
        """The credentials of ``ref`` (empty when unknown)."""
        return self._by_stream.get(ref.stream, {})

    def forget(self, ref: ConnectionRef) -> None:
        """Drop ``ref``'s credentials (the connection is gone)."""
        self._by_stream.pop(ref.stream, None)
