"""Retry policies: exponential backoff, capped, with full jitter."""

from __future__ import annotations

import random

import pytest

from orchestrator.errors import InvalidArgument
from orchestrator.retry import DEFAULT_RETRY, RetryPolicy


def test_defaults_match_the_design() -> None:
    """5 attempts, 1 s initial, x2, 60 s cap."""
    assert DEFAULT_RETRY == RetryPolicy(max_attempts=5, initial_interval=1.0, backoff=2.0, max_interval=60.0)


def test_ceiling_grows_by_the_backoff_factor_and_caps_at_max_interval() -> None:
    """The largest delay after attempt n is initial * backoff ** (n - 1), never above max_interval."""
    policy = RetryPolicy(max_attempts=10, initial_interval=1.0, backoff=3.0, max_interval=20.0)

    assert [policy.ceiling(n) for n in range(1, 6)] == [1.0, 3.0, 9.0, 20.0, 20.0]
    assert policy.ceiling(100) == 20.0


def test_ceiling_with_backoff_one_is_constant() -> None:
    """A backoff of 1 retries at a constant ceiling."""
    policy = RetryPolicy(initial_interval=0.5, backoff=1.0)

    assert {policy.ceiling(n) for n in range(1, 20)} == {0.5}


def test_delay_is_full_jitter_within_zero_and_the_ceiling() -> None:
    """Every delay lies in [0, ceiling] and delays are spread out, not all at the ceiling."""
    policy = RetryPolicy(initial_interval=1.0, backoff=2.0, max_interval=8.0)
    rng = random.Random(1234)

    for attempt in range(1, 8):
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= policy.ceiling(attempt) for d in delays)
        assert min(delays) < policy.ceiling(attempt) / 4
        assert max(delays) > policy.ceiling(attempt) * 3 / 4


def test_delay_is_reproducible_with_a_seeded_random() -> None:
    """The same seed gives the same delays (tests can inject the randomness)."""
    policy = RetryPolicy()

    first = [policy.delay(n, random.Random(7)) for n in range(1, 6)]
    second = [policy.delay(n, random.Random(7)) for n in range(1, 6)]

    assert first == second


def test_zero_interval_means_no_delay() -> None:
    """An initial interval of 0 retries at once."""
    assert RetryPolicy(initial_interval=0).delay(3, random.Random(1)) == 0.0


def test_gives_up_after_the_last_allowed_attempt() -> None:
    """gives_up_after is false before max_attempts and true from it on."""
    policy = RetryPolicy(max_attempts=3)

    assert [policy.gives_up_after(n) for n in range(1, 6)] == [False, False, True, True, True]
    assert RetryPolicy(max_attempts=1).gives_up_after(1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be at least 1"),
        ({"initial_interval": -1}, "0 or more seconds"),
        ({"max_interval": -0.1}, "0 or more seconds"),
        ({"backoff": 0.5}, "backoff must be at least 1"),
    ],
)
def test_invalid_policies_are_refused(fields: dict[str, float], message: str) -> None:
    """A policy that cannot work is refused with a message naming the field."""
    with pytest.raises(InvalidArgument, match=message):
        RetryPolicy(**fields)  # type: ignore[arg-type]
