"""Time-ordered identifiers (UUIDv7, RFC 9562).

Python 3.11 has no ``uuid.uuid7``. Time-ordered keys keep B-tree inserts at
the right edge of the index, which is what makes batched appends fast.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0
_POOL_BYTES = 4096
_pool = b""
_taken = 0


def _forget_pool() -> None:
    """A forked child draws its own random bytes, never the parent's (its ids would repeat them)."""
    global _pool, _taken
    _pool, _taken = b"", 0


os.register_at_fork(after_in_child=_forget_pool)


def _random(size: int) -> int:
    """``size`` random bytes as an integer, from a pool of ``os.urandom``'s refilled 4 KiB at a time (hold _lock).

    ``os.urandom`` lets go of the GIL for its system call; called per id on the event loop, each call
    could wait for the GIL behind the daemon's other threads. Drawn from a pool, one call serves 400 ids.
    """
    global _pool, _taken
    if _taken + size > len(_pool):
        _pool, _taken = os.urandom(_POOL_BYTES), 0
    start = _taken
    _taken += size
    return int.from_bytes(_pool[start : start + size], "big")


def uuid7() -> uuid.UUID:
    """Return a new UUIDv7, monotonic within this process.

    The 12-bit ``rand_a`` field is a counter seeded randomly each millisecond
    (RFC 9562, method 1), so ids made in the same millisecond still sort in
    creation order.
    """
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = _random(2) & 0x7FF  # leave headroom for increments
        else:
            _counter += 1
            if _counter > 0xFFF:  # counter overflow: borrow the next millisecond
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        counter = _counter
        rand_b = _random(8) & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= rand_b
    return uuid.UUID(int=value)
