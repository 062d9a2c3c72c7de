"""The log throttle: one line per kind per interval, and the next line counts what was left out."""

from __future__ import annotations

import logging

import pytest

from orchestrator.logs import Throttle


class Ticks:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        """The current reading."""
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages logged by the test's logger."""
    return [r.getMessage() for r in caplog.records if r.name == "test.throttle"]


def test_one_line_per_kind_per_interval_then_the_count_of_those_left_out(caplog: pytest.LogCaptureFixture) -> None:
    """A flood gives one line; once the interval is over, the next line says how many were not logged."""
    ticks = Ticks()
    throttle = Throttle(logging.getLogger("test.throttle"), interval=10, monotonic=ticks)

    with caplog.at_level(logging.WARNING):
        written = [throttle.log(logging.WARNING, "bad", "bad request %d", i) for i in range(1000)]
        ticks.now += 9.9
        written.append(throttle.log(logging.WARNING, "bad", "bad request %d", 1000))
        ticks.now += 0.1
        written.append(throttle.log(logging.WARNING, "bad", "bad request %d", 1001))
        written.append(throttle.log(logging.WARNING, "bad", "bad request %d", 1002))

    assert written.count(True) == 2
    assert lines(caplog) == ["bad request 0", "bad request 1001 (1000 more like it were not logged in the last 10 s)"]
    assert [getattr(r, "suppressed", None) for r in caplog.records] == [0, 1000]


def test_kinds_are_throttled_apart(caplog: pytest.LogCaptureFixture) -> None:
    """A flood of one kind does not hide the first line of another."""
    throttle = Throttle(logging.getLogger("test.throttle"), interval=10, monotonic=Ticks())

    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            throttle.log(logging.WARNING, "a", "kind a")
            throttle.log(logging.WARNING, "b", "kind b")

    assert lines(caplog) == ["kind a", "kind b"]
    assert all(r.exc_info is None for r in caplog.records)
