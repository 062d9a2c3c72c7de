"""Closing the SQLite log when its owner is cancelled (a daemon task group torn down, Ctrl-C in a script)."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from orchestrator.model import ConnectionRef
from orchestrator.records import NewEvent
from orchestrator.store import open_store

pytestmark = pytest.mark.anyio


async def write_one(url: str, *, cancel: bool) -> None:
    """Open the log, append one record and leave the block, cancelled or not."""
    with anyio.CancelScope() as scope:
        async with open_store(url) as store:
            record = NewEvent("01a216b9-e56c-73c4-a7ba-cf456f51db2a", "post-connection-creation", {"config": {}})
            await store.append(ConnectionRef("dev", "acme", "c1"), None, [record])
            if cancel:
                scope.cancel()
                await anyio.lowlevel.checkpoint()


async def test_a_closed_log_leaves_no_write_ahead_log(tmp_path: Path) -> None:
    """Leaving the store's block closes its connections: SQLite checkpoints and removes events.db-wal."""
    await write_one(f"sqlite://{tmp_path}/events.db", cancel=False)

    assert not (tmp_path / "events.db-wal").exists()


async def test_a_cancelled_log_still_closes_its_connections(tmp_path: Path) -> None:
    """Leaving the store's block by cancellation closes its connections too (no events.db-wal left behind)."""
    await write_one(f"sqlite://{tmp_path}/events.db", cancel=True)

    assert not (tmp_path / "events.db-wal").exists()
