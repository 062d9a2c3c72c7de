"""A daemon that has said it serves stops cleanly on SIGTERM, whenever the signal comes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.process import serve

pytestmark = pytest.mark.anyio

TRIES = 5
"""Before the fix, 9 starts in 10 lost the race; 5 clean stops in a row make a regression all but certain to show."""


async def test_sigterm_right_after_the_serving_line_drains_to_exit_0(tmp_path: Path) -> None:
    """SIGTERM sent the moment the daemon logs that it serves drains it to exit code 0 (each of 5 starts)."""
    codes: list[int] = []
    for attempt in range(TRIES):
        async with serve(tmp_path / f"events-{attempt}.db") as daemon:
            codes.append(await daemon.stop())
        if codes[-1] != 0:
            break  # one lost race is enough to show it
    assert codes == [0] * TRIES, codes
