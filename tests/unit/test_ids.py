"""UUIDv7 event ids."""

from __future__ import annotations

import time

from orchestrator.ids import uuid7


def test_uuid7_layout() -> None:
    """Ids are RFC 9562 version 7, variant 10, stamped with the current millisecond."""
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert value.version == 7
    assert value.int >> 62 & 0b11 == 0b10
    assert before <= value.int >> 80 <= after + 1


def test_uuid7_is_monotonic_within_the_process() -> None:
    """Ids made in a burst sort in creation order (what keeps B-tree inserts cheap)."""
    ids = [uuid7() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
