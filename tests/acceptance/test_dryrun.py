"""``orchestrator dryrun`` as a plugin author runs it: real provider calls, a metadata diff, nothing written."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import pytest

from tests.support.process import COMMAND, Result, arun, environment, serve, snapshot, sqlite_url
from tests.support.provider import Reply, WebhookProvider, write_config

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
    assert result.err == (
        f"orchestrator: warning: delete-webhook sends DELETE {log.provider.url}/acme/webhooks/wh1: this changes the"
        " provider for real (--yes: no warning)\n"
    ), str(result)
    lines = result.out.splitlines()
    assert lines[0] == "delete-webhook (orchestrator-salesforce 1.0.0) on dev/salesforce/acme"
    assert f"  http  DELETE {log.provider.url}/acme/webhooks/wh1 -> 204" in lines
    assert '  meta  ~ webhook_id: "wh1" -> null' in lines
    assert re.fullmatch(
        r"succeeded in \d+ ms; nothing was written to the log \(pass --commit to record it\);"
        r" at the provider: 1 changing request was sent",
        lines[-1],
    )
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
    assert result.out.splitlines()[-1].endswith("; at the provider: 0 changing requests were sent")
    assert result.err == "", "no changing request, no warning"
    assert log.provider.requests == []
    assert snapshot(log.database) == before


async def test_json_output_parses(log: Log) -> None:
    """--json prints one document with the calls, logs, metadata before and after, and committed false."""
    result = await log.dryrun("delete-webhook", "acme", "--json", "--yes")
    assert result.code == 0, str(result)
    assert result.err == "", "--yes: no warning"
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
        "in_log": True,
        "changing_requests": 1,
        "saved": None,
    }
    assert isinstance(data["duration_ms"], int)


async def test_commit_appends_the_outcome_and_the_metadata_update(log: Log) -> None:
    """With --commit the metadata-updated and function-succeeded records are appended and the read model follows."""
    before = snapshot(log.database)
    result = await log.dryrun("delete-webhook", "acme", "--commit")
    assert result.code == 0, str(result)
    assert result.out.splitlines()[-1].endswith("; recorded in the log; at the provider: 1 changing request was sent")
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
    assert result.err.endswith(
        " (to try one that is not in the log, give it with --connection-config and --metadata)\n"
    )
    assert log.provider.requests == []


async def test_a_connection_that_is_not_in_the_log_runs_from_its_given_config_and_metadata(
    tmp_path: Path, provider: WebhookProvider
) -> None:
    """--connection-config and --metadata run delete-webhook for a connection never emitted, with no log at all:
    the DELETE goes to the given instance, the diff starts from the given metadata, and no log is created."""
    config = write_config(tmp_path / "o.toml", provider.url)
    provider.webhooks["wh9"] = "globex"
    result = await arun(
        "dryrun",
        "delete-webhook",
        "new-one",
        "--connection-config",
        '{"instance": "globex"}',
        "--metadata",
        '{"webhook_id": "wh9"}',
        "--credential",
        "access_token=T",
        "--config",
        str(config),
        "--database",
        sqlite_url(tmp_path / "events.db"),
        "--yes",
        cwd=tmp_path,
    )
    assert result.code == 0, str(result)
    lines = result.out.splitlines()
    assert lines[0] == "delete-webhook (orchestrator-salesforce 1.0.0) on dev/salesforce/new-one"
    assert f"  http  DELETE {provider.url}/globex/webhooks/wh9 -> 204" in lines
    assert '  meta  ~ webhook_id: "wh9" -> null' in lines
    assert lines[-1].endswith(
        "; nothing was written to the log (the connection is not in it); at the provider: 1 changing request was sent"
    )
    assert provider.webhooks == {}
    assert not (tmp_path / "events.db").exists()


async def test_commit_of_a_connection_that_is_not_in_the_log_is_refused(tmp_path: Path) -> None:
    """--commit with --connection-config is one line on stderr, exit 1, before any call."""
    result = await arun(
        "dryrun", "delete-webhook", "new-one", "--connection-config", "{}", "--commit",
        "--database", sqlite_url(tmp_path / "events.db"),
    )  # fmt: skip
    assert result.code == 1, str(result)
    assert result.err == (
        "orchestrator: error: --commit records the run in the log, which does not have a connection given with"
        " --connection-config or --metadata: emit it first, or drop --commit\n"
    )
    assert not (tmp_path / "events.db").exists()


def answered(args: list[str], answer: bytes) -> tuple[bytes, int, str]:
    """Run ``orchestrator ARGS`` with stdin and stderr on a terminal; once it asks, answer ``answer``.

    What the terminal showed, the exit code and stdout.
    """
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*COMMAND, *args], stdin=follower, stderr=follower, stdout=subprocess.PIPE, env=environment(), text=True
    )
    os.close(follower)
    try:
        seen = b""
        while b"Send it? [y/N]: " not in seen:
            readable, _, _ = select.select([leader], [], [], 30)
            assert readable, f"no question within 30 s: {seen!r}"
            seen += os.read(leader, 4096)
        os.write(leader, answer)
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
        os.close(leader)
    return seen, process.returncode, out


async def test_on_a_terminal_it_asks_before_changing_the_provider_and_a_no_sends_nothing(log: Log) -> None:
    """With stdin and stderr on a terminal, dryrun asks before the DELETE; answered "n", it is not sent, the run
    fails saying so, and the summary counts no changing request."""
    args = ["dryrun", "delete-webhook", "acme", "--database", sqlite_url(log.database), "--config", str(log.config)]
    seen, code, out = await anyio.to_thread.run_sync(answered, [*args, "--credential", "access_token=T"], b"n\n")
    asked = f"orchestrator: delete-webhook is about to send DELETE {log.provider.url}/acme/webhooks/wh1: this"
    assert asked.encode() in seen
    assert code == 1, out
    assert log.provider.requests == []
    assert "failed: ChangeDeclined: DELETE /acme/webhooks/wh1 was not sent: the change was not confirmed" in out
    assert out.splitlines()[-1].endswith("; at the provider: 0 changing requests were sent")


async def test_save_responses_writes_each_exchange_with_the_credentials_redacted(log: Log, tmp_path: Path) -> None:
    """--save-responses DIR writes DIR/delete-webhook.json: the DELETE relative to the base URL, its answer, and
    no credential anywhere (the provider echoes the token in a header and the body)."""
    log.provider.route(
        "DELETE",
        "/acme/webhooks/wh1",
        Reply(200, {"deleted": True, "by": "Bearer T0K3N-SECRET"}, headers={"X-Echo": "T0K3N-SECRET"}),
    )
    saved = tmp_path / "responses"
    result = await arun(
        "dryrun", "delete-webhook", "acme", "--database", sqlite_url(log.database), "--config", str(log.config),
        "--credential", "access_token=T0K3N-SECRET", "--save-responses", str(saved), "--yes",
    )  # fmt: skip
    assert result.code == 0, str(result)
    assert f"  saved 1 exchange(s) to {saved}/delete-webhook.json" in result.out.splitlines()
    text = (saved / "delete-webhook.json").read_text()
    assert "T0K3N-SECRET" not in text
    document = json.loads(text)
    [exchange] = document.pop("exchanges")
    assert document == {
        "format": "orchestrator-responses/1",
        "function": "delete-webhook",
        "integration": "salesforce",
        "base_url": f"{log.provider.url}/acme",
    }
    headers = dict(exchange.pop("headers"))
    assert exchange == {
        "method": "DELETE",
        "path": "/webhooks/wh1",
        "query": "",
        "request_body": "",
        "status": 200,
        "body": '{"deleted": true, "by": "Bearer [redacted]"}',
    }
    assert headers["X-Echo"] == "[redacted]"
    assert headers["Content-Type"] == "application/json"


async def test_responses_saved_by_a_dry_run_replay_with_no_provider_to_the_same_outcome_and_metadata(
    tmp_path: Path,
) -> None:
    """register-webhook then delete-webhook, dry-run against a real provider with --save-responses; the provider
    stopped, orchestrator.testing replays each from the saved responses (under another base URL) to the outcome and
    metadata the dry run printed."""
    from orchestrator_salesforce.webhooks import delete_webhook, register_webhook

    from orchestrator import testing

    saved = tmp_path / "responses"
    ran: dict[str, dict[str, object]] = {}
    with WebhookProvider() as provider:
        config = write_config(tmp_path / "o.toml", provider.url)
        metadata = "{}"
        for name in ("register-webhook", "delete-webhook"):
            result = await arun(
                "dryrun", name, "acme", "--connection-config", '{"instance": "acme"}', "--metadata", metadata,
                "--credential", "access_token=T", "--config", str(config), "--save-responses", str(saved),
                "--yes", "--json", "--database", sqlite_url(tmp_path / "events.db"),
            )  # fmt: skip
            assert result.code == 0, str(result)
            ran[name] = result.json()
            metadata = json.dumps(ran[name]["metadata_after"])
        assert provider.created == ["wh1"] and provider.webhooks == {}
    assert ran["register-webhook"]["metadata_after"] == {"webhook_id": "wh1"}
    assert ran["delete-webhook"]["metadata_after"] == {"webhook_id": None}
    for function, before in ((register_webhook, {}), (delete_webhook, {"webhook_id": "wh1"})):
        name = function.handler.__name__.replace("_", "-")
        replayed = await testing.arun(
            function,
            provider=saved,
            connection_config={"instance_url": "elsewhere.test"},
            metadata=before,
            credentials={"access_token": "T"},
        )
        assert replayed.ok == ran[name]["ok"] is True, replayed
        assert replayed.metadata == ran[name]["metadata_after"]
        calls: list[str] = ran[name]["calls"]  # type: ignore[assignment]
        assert [str(r) for r in replayed.requests] == [call.replace(f"{provider.url}/acme", "") for call in calls]
