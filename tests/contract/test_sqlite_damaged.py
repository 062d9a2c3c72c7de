"""A file that is not an event log, or a damaged one, is refused with a StoreError naming it: never a traceback."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from orchestrator.errors import StoreError
from orchestrator.store import open_store

pytestmark = pytest.mark.anyio

GOLDEN = Path(__file__).parent.parent / "golden" / "e915399-failures" / "events.db"


def random_bytes(path: Path) -> Path:
    """A file of bytes that are no SQLite database."""
    path.write_bytes(bytes(range(256)) * 20)
    return path


def truncated(path: Path) -> Path:
    """A real event log cut short, as a full disk or a bad copy leaves it."""
    shutil.copyfile(GOLDEN, path)
    with path.open("r+b") as fh:
        fh.truncate(GOLDEN.stat().st_size // 2)
    return path


@pytest.mark.parametrize("damage", [random_bytes, truncated], ids=["random-bytes", "truncated"])
@pytest.mark.parametrize("readonly", [True, False], ids=["read-only", "read-write"])
async def test_a_damaged_file_is_refused_with_a_store_error(
    tmp_path: Path, damage: Callable[[Path], Path], readonly: bool
) -> None:
    """Opening it raises StoreError naming the file (replay and serve print one line and exit 1)."""
    path = await anyio.to_thread.run_sync(damage, tmp_path / "events.db")  # file I/O: off the event loop
    with pytest.raises(StoreError, match=r"events\.db"):
        async with open_store(f"sqlite://{path}", readonly=readonly):
            pass
