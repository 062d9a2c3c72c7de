"""A daemon killed with SIGKILL in the middle of a post-creation job re-runs the job after a restart."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import pytest

from tests.support.process import arun, serve, snapshot, sqlite_url, start
from tests.support.provider import WebhookProvider, reached, write_config

from ._support import create_acme

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

STREAM = "dev/salesforce/acme"
WAIT = 30.0


async def test_a_job_killed_mid_call_reruns_after_restart_and_completes(
    tmp_path: Path, provider: WebhookProvider
) -> None:
    """SIGKILL while register-webhook's POST is held: after a restart the job runs again (attempt 2) and succeeds."""
    database = tmp_path / "events.db"
    # The credential is sealed with the emit: the re-run after the restart sends it too.
    config = write_config(tmp_path / "o.toml", provider.url, auth="bearer")
    held = provider.hold("POST")
    with anyio.fail_after(100):
        async with serve(database, "--config", str(config)) as first:
            emitted = await create_acme(first.address, "--credential", "access_token=t0k3n-of-acme")
            assert emitted.code == 0, str(emitted)
            assert emitted.json()["state"] == "active"
            assert await reached(held.arrived), "the provider never received the POST"
            assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        # The killed attempt's request is answered into the void, before the restart, so ids are wh1 then wh2.
        held.release.set()
        assert await reached(held.answered)
        assert [r.method for r in provider.requests] == ["POST"]

        async with serve(database, "--config", str(config)) as second:
            async with start("events", "--follow", "--json", "--address", second.address, stream="stdout") as follower:
                await follower.wait_for(r'"type":\s*"function-succeeded"', within=WAIT)
                await follower.stop()
            log = await arun("events", "--json", "--address", second.address)
            assert log.code == 0, str(log)
            records = [r for r in log.json_lines() if r["stream"] == STREAM]
            assert [r["type"] for r in records] == [
                "post-connection-creation",
                "credentials-updated",
                "metadata-updated",
                "function-succeeded",
            ]
            done = records[-1]["data"]
            assert done["function"] == "register-webhook"
            assert done["attempt"] >= 2, done
            shown = await arun("connections", "get", "acme", "-i", "salesforce", "--json", "--address", second.address)
            assert shown.code == 0, str(shown)
            assert shown.json()["metadata"] == {"webhook_id": "wh2"}
            assert await second.stop() == 0, str(second)

        assert [(r.method, r.path) for r in provider.requests] == [("POST", "/acme/webhooks")] * 2
        assert {r.headers["authorization"] for r in provider.requests} == {"Bearer t0k3n-of-acme"}
        assert provider.created == ["wh1", "wh2"]
        assert snapshot(database)["jobs"] == []
        verified = await arun("replay", "--database", sqlite_url(database), "--verify")
        assert verified.code == 0, str(verified)
        assert verified.out == "read model matches the log\n"
