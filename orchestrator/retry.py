"""Retry policies: exponential backoff with full jitter, as Temporal and AWS describe it."""

from __future__ import annotations

import random
from dataclasses import dataclass

from orchestrator.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How an asynchronous function is retried.

    The delay before attempt ``n + 1`` is drawn uniformly from
    ``[0, min(max_interval, initial_interval * backoff ** (n - 1))]`` ("full
    jitter"), so that many connections failing together do not retry together.
    """

    max_attempts: int = 5
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.initial_interval < 0 or self.max_interval < 0:
            raise InvalidArgument("retry intervals must be 0 or more seconds")
        if self.backoff < 1:
            raise InvalidArgument(f"backoff must be at least 1, not {self.backoff}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_interval, self.initial_interval * self.backoff ** (attempt - 1))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A jittered delay after failed attempt number ``attempt``."""
        return (rng or random).uniform(0.0, self.ceiling(attempt))

    def gives_up_after(self, attempt: int) -> bool:
        """Whether failed attempt number ``attempt`` was the last one allowed."""
        return attempt >= self.max_attempts


DEFAULT_RETRY = RetryPolicy()
