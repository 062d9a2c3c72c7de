"""``orchestrator dryrun`` as a plugin author runs it: real provider calls, a metadata diff, nothing written."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.process import Result, arun, serve, snapshot, sqlite_url
from tests.support.provider import WebhookProvider, write_config

from ._support import create_acme

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Log:
    """A log prepared by a daemon: dev/salesforce/acme created, its webhook wh1 registered; the daemon stopped."""

    database: Path
    config: Path
    provider: WebhookProvider

    async def dryrun(self, *args: str) -> Result:
        """``orchestrator dryrun ARGS`` on this log, with the connection's credential and the daemon's config."""
        return await arun(
            "dryrun",
            *args,
            "--database",
            sqlite_url(self.database),
            "--config",
            str(self.config),
            "--credential",
            "access_token=T",
            cwd=self.database.parent,
        )


@pytest.fixture
async def log(tmp_path: Path, provider: WebhookProvider) -> AsyncIterator[Log]:
    """Emit post-connection-creation with --wait through a real daemon, then stop it with SIGTERM."""
    database = tmp_path / "events.db"
    config = write_config(tmp_path / "o.toml", provider.url)
    async with serve(database, "--config", str(config)) as daemon:
        created = await create_acme(daemon.address, "--credential", "access_token=T", "--wait")
        assert created.code == 0, str(created)
        assert [(o["name"], o["status"]) for o in created.json()["outcomes"]] == [("register-webhook", "succeeded")]
        assert await daemon.stop() == 0, str(daemon)
    assert provider.webhooks == {"wh1": "acme"}
    provider.clear_requests()
    yield Log(database, config, provider)


async def test_delete_webhook_prints_the_call_and_the_diff_and_writes_nothing(log: Log) -> None:
    """dryrun delete-webhook makes the real DELETE, prints it and the metadata diff, exits 0 and writes nothing."""
    before = snapshot(log.database)
    result = await log.dryrun("delete-webhook", "acme", "-e", "dev")
    assert result.code == 0, str(result)
    assert result.err == "", str(result)
    lines = result.out.splitlines()
    assert lines[0] == "delete-webhook (orchestrator-salesforce 1.0.0) on dev/salesforce/acme"
    assert f"  http  DELETE {log.provider.url}/acme/webhooks/wh1 -> 204" in lines
    assert '  meta  ~ webhook_id: "wh1" -> null' in lines
    assert re.fullmatch(r"succeeded in \d+ ms; nothing was written \(pass --commit to record it\)", lines[-1])
    assert [(r.method, r.path, r.headers["Authorization"]) for r in log.provider.requests] == [
        ("DELETE", "/acme/webhooks/wh1", "Bearer T")
    ]
    assert log.provider.webhooks == {}
    assert snapshot(log.database) == before


async def test_register_webhook_of_a_registered_connection_calls_nothing(log: Log) -> None:
    """dryrun register-webhook runs against the recorded metadata: already registered, so no call and no diff."""
    before = snapshot(log.database)
    result = await log.dryrun("register-webhook", "acme")
    assert result.code == 0, str(result)
    assert result.out.splitlines()[1:3] == [
        "  log   info: webhook already registered: wh1",
        "  meta  (metadata unchanged)",
    ]
    assert log.provider.requests == []
    assert snapshot(log.database) == before


async def test_json_output_parses(log: Log) -> None:
    """--json prints one document with the calls, logs, metadata before and after, and committed false."""
    result = await log.dryrun("delete-webhook", "acme", "--json")
    assert result.code == 0, str(result)
    data = result.json()
    assert {k: v for k, v in data.items() if k != "duration_ms"} == {
        "function": "delete-webhook",
        "connection": "dev/salesforce/acme",
        "ok": True,
        "error": "",
        "calls": [f"DELETE {log.provider.url}/acme/webhooks/wh1 -> 204"],
        "logs": [],
        "metadata_before": {"webhook_id": "wh1"},
        "metadata_after": {"webhook_id": None},
        "committed": False,
    }
    assert isinstance(data["duration_ms"], int)


async def test_commit_appends_the_outcome_and_the_metadata_update(log: Log) -> None:
    """With --commit the metadata-updated and function-succeeded records are appended and the read model follows."""
    before = snapshot(log.database)
    result = await log.dryrun("delete-webhook", "acme", "--commit")
    assert result.code == 0, str(result)
    assert result.out.splitlines()[-1].endswith("; recorded in the log")
    after = snapshot(log.database)
    assert after["events"][: len(before["events"])] == before["events"]
    added = after["events"][len(before["events"]) :]
    assert [row[4] for row in added] == ["metadata-updated", "function-succeeded"]
    update, outcome = (json.loads(row[5]) for row in added)
    assert update == {"function": "delete-webhook", "metadata": {"webhook_id": None}, "merge": False, "dryrun": True}
    assert {k: outcome[k] for k in ("function", "attempt", "distribution", "version", "dryrun")} == {
        "function": "delete-webhook",
        "attempt": 1,
        "distribution": "orchestrator-salesforce",
        "version": "1.0.0",
        "dryrun": True,
    }
    verify = await arun("replay", "--database", sqlite_url(log.database), "--verify")
    assert verify.code == 0, str(verify)
    timeline = await arun("replay", "--database", sqlite_url(log.database), "--connection", "acme", "--json")
    assert timeline.code == 0, str(timeline)
    assert timeline.json()[-1]["connection"]["metadata"] == {"webhook_id": None}
    # The committed state is what the next dry run starts from: register-webhook now registers for real.
    again = await log.dryrun("register-webhook", "acme")
    assert again.code == 0, str(again)
    assert f"  http  POST {log.provider.url}/acme/webhooks -> 201" in again.out.splitlines()
    assert '  meta  ~ webhook_id: null -> "wh2"' in again.out.splitlines()
    assert snapshot(log.database) == after


async def test_works_read_only_while_the_daemon_runs_but_commit_is_refused(log: Log) -> None:
    """Without --commit dryrun reads the log of a running daemon; --commit then exits 1 and writes nothing."""
    async with serve(log.database, "--config", str(log.config)) as daemon:
        before = snapshot(log.database)
        looked = await log.dryrun("delete-webhook", "acme")
        assert looked.code == 0, str(looked)
        committed = await log.dryrun("delete-webhook", "acme", "--commit")
        assert committed.code == 1, str(committed)
        assert re.fullmatch(
            r"orchestrator: error: the event log \S+ is in use by pid \d+ \(a running daemon\):"
            r" stop the daemon or omit --commit .*\n",
            committed.err,
        )
        assert snapshot(log.database) == before
        assert await daemon.stop() == 0, str(daemon)


async def test_a_failing_function_exits_1_and_writes_nothing(log: Log) -> None:
    """A provider refusing the DELETE (403) fails the run: the error is printed, exit 1, nothing written."""
    log.provider.fail["DELETE"] = 403
    before = snapshot(log.database)
    result = await log.dryrun("delete-webhook", "acme")
    assert result.code == 1, str(result)
    assert f"  http  DELETE {log.provider.url}/acme/webhooks/wh1 -> 403" in result.out.splitlines()
    assert re.search(r"^failed: ProviderError: DELETE \S+ answered 403 Forbidden", result.out, re.M), str(result)
    assert "(metadata unchanged)" in result.out
    assert snapshot(log.database) == before


async def test_an_unknown_function_exits_1_naming_the_installed_ones(tmp_path: Path) -> None:
    """A function nobody installed is one clear line on stderr listing the installed functions, and exit 1."""
    result = await arun("dryrun", "no-such-function", "acme", "--database", sqlite_url(tmp_path / "events.db"))
    assert result.code == 1, str(result)
    assert result.out == ""
    assert result.err.startswith("orchestrator: error: no event function 'no-such-function' (")
    assert "delete-webhook" in result.err and "register-webhook" in result.err
    assert len(result.err.splitlines()) == 1
    assert not (tmp_path / "events.db").exists()


async def test_an_unknown_connection_exits_1(log: Log) -> None:
    """A connection the log does not have is reported by name, with exit 1 and no provider call."""
    result = await log.dryrun("delete-webhook", "ghost")
    assert result.code == 1, str(result)
    assert result.err.startswith("orchestrator: error: connection dev/salesforce/ghost not found in ")
    assert log.provider.requests == []
