"""Once ``orchestrator serve`` serves, what start-up made is frozen out of the garbage collector's sight."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.daemon import GC_YOUNG_THRESHOLD
from tests.support.process import READY, serve

pytestmark = pytest.mark.anyio


async def test_serve_freezes_start_up_once_it_serves(tmp_path: Path) -> None:
    """The DEBUG line that says so comes after the one that says the daemon serves, and counts what it froze."""
    async with serve(tmp_path / "events.db", "--log-level", "debug") as daemon:
        await daemon.wait_for("froze ")
        assert await daemon.stop() == 0
    messages = [json.loads(line)["message"] for line in daemon.lines if line.startswith("{")]
    serving = next(i for i, m in enumerate(messages) if READY.search(m))
    [frozen] = [i for i, m in enumerate(messages) if m.startswith("froze ")]
    assert frozen > serving
    count = int(messages[frozen].split()[1])
    assert count > 10_000, messages[frozen]  # the modules, the plugins, the engine


def test_freezing_start_up_freezes_what_is_alive_and_collects_the_young_less_often() -> None:
    """In a fresh interpreter: nothing is frozen before, what was alive is after, and generation 0 waits longer."""
    code = (
        "import gc; from orchestrator import daemon; before = gc.get_freeze_count();"
        " daemon.freeze_start_up(); print(before, gc.get_freeze_count(), gc.get_threshold()[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    before, after, young = map(int, out.stdout.split())
    assert (before, young) == (0, GC_YOUNG_THRESHOLD)
    assert after > 1000
    assert gc.get_freeze_count() == 0, "the test's own process froze nothing"
