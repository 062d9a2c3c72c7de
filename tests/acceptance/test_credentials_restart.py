"""Credentials survive SIGKILL: a creation job and a cleanup job, retried after restarts, use the original token."""

from __future__ import annotations

import json
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from tests.support.process import arun, serve, sqlite_url, start
from tests.support.provider import WebhookProvider, write_config

from ._support import create_acme

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

TOKEN = "00Dxx-original-access-token-4711"
WAIT = 30.0
RETRIES = ("--retry-initial-interval", "0.2", "--retry-max-interval", "0.5", "--retry-max-attempts", "1000")
"""Fast retries that never run out while the test, on a loaded machine, gets round to fixing the provider."""


def sealed_rows(database: Path) -> list[tuple[str, str]]:
    """(stream, key id) of every sealed credentials row."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        return db.execute("SELECT stream, key_id FROM credentials").fetchall()


async def follow_to(address: str, count: int, record_type: str) -> list[dict[str, object]]:
    """Follow the log until ``count`` records of ``record_type`` have been written; every record so far."""
    seen: list[dict[str, object]] = []
    async with start("events", "--follow", "--json", "--address", address, stream="stdout") as follower:
        while sum(r["type"] == record_type for r in seen) < count:
            line = await follower.wait_for(r"^\{", within=WAIT)
            seen.append(json.loads(line.string))
        await follower.stop()
    return seen


async def test_a_creation_job_and_a_cleanup_job_run_with_the_sealed_credential_after_sigkill(
    tmp_path: Path, provider: WebhookProvider
) -> None:
    """Creation fails twice around a SIGKILL, then succeeds; the cleanup fails, SIGKILL, and succeeds after restart."""
    database = tmp_path / "events.db"
    config = write_config(tmp_path / "o.toml", provider.url, auth="bearer")
    args = ("--config", str(config), *RETRIES)
    provider.fail["POST"] = 503
    with anyio.fail_after(150):
        async with serve(database, *args) as first:
            emitted = await create_acme(first.address, "--credential", f"access_token={TOKEN}")
            assert emitted.code == 0, str(emitted)
            assert TOKEN not in emitted.out + emitted.err
            await follow_to(first.address, 1, "function-failed")
            assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        assert sealed_rows(database)[0][0] == "dev/salesforce/acme", "sealed with the emit, before the kill"

        async with serve(database, *args) as second:
            # Whatever the killed daemon began, the job fails once more after the restart, then the provider recovers.
            so_far = await arun("events", "--json", "--address", second.address)
            failures = sum(r["type"] == "function-failed" for r in so_far.json_lines())
            await follow_to(second.address, failures + 1, "function-failed")
            del provider.fail["POST"]
            log = await follow_to(second.address, 1, "function-succeeded")
            assert provider.created == ["wh1"]
            # The cleanup: it fails inside the deletion, goes on as a job, and the daemon is killed.
            provider.fail["DELETE"] = 503
            deleted = await arun("emit", "pre-connection-deletion", "acme", "-i", "salesforce", "--json",
                                 "--address", second.address)  # fmt: skip
            assert deleted.code == 0, str(deleted)
            assert deleted.json()["state"] == "deleted"
            assert sealed_rows(database), "a cleanup job remains: the credentials stay"
            assert await second.stop(signal.SIGKILL) == -signal.SIGKILL
        del provider.fail["DELETE"]

        async with serve(database, *args) as third:
            log = await follow_to(third.address, 1, "credentials-destroyed")
            assert await third.stop() == 0, str(third)

    assert {r.headers["authorization"] for r in provider.requests} == {f"Bearer {TOKEN}"}
    posts = provider.requests_to("POST", "/acme/webhooks")
    assert len(posts) >= 3, "failed twice at least, then succeeded"
    assert provider.webhooks == {}, "the cleanup after the restart deleted the webhook"
    assert [r.method for r in provider.requests].count("DELETE") >= 2
    types = [str(r["type"]) for r in log if r["stream"] == "dev/salesforce/acme"]
    assert types.index("connection-deleted") < types.index("function-succeeded", types.index("connection-deleted"))
    assert types[-1] == "credentials-destroyed"
    assert sealed_rows(database) == []
    verified = await arun("replay", "--database", sqlite_url(database), "--verify")
    assert verified.code == 0, str(verified)
    assert TOKEN not in json.dumps(log)
