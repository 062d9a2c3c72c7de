"""``orchestrator jobs``, ``jobs retry`` and ``jobs cancel`` as a user runs them: subprocesses against a daemon
subprocess whose plugin calls a local HTTP provider that fails until the test fixes it.

Waiting for the daemon's worker is following the log (``orchestrator events --follow``) until the line comes.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support import plugins
from tests.support.process import Cli, Process, drained, environment, fields, rows
from tests.support.provider import ProviderServer, Reply

FOLLOW_TIMEOUT = 20.0
PLUGIN = """
from orchestrator import RetryPolicy, on_event


@on_event("post-connection-creation", integration="hooks",
          retry=RetryPolicy(max_attempts=2, initial_interval=0.01, max_interval=0.01))
async def register(ctx):
    await ctx.post("/webhooks", json={"url": "https://platform.test/hooks"})


@on_event("post-connection-creation", integration="patient",
          retry=RetryPolicy(max_attempts=3, initial_interval=3600, max_interval=3600))
async def sync(ctx):
    await ctx.post("/sync", json={})
"""


@dataclass(frozen=True)
class Setup:
    """The CLI, its daemon, and the provider the plugin's functions call."""

    cli: Cli
    provider: ProviderServer
    env: dict[str, str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A daemon running the plugin above, with integrations ``hooks`` and ``patient`` at a local provider."""
    tmp = tmp_path_factory.mktemp("jobs")
    (tmp / "plugin").mkdir()
    (tmp / "plugin" / "jobs_plugin.py").write_text(PLUGIN)
    site = plugins.install(
        tmp / "site", "jobs-plugin", {"register": "jobs_plugin:register", "sync": "jobs_plugin:sync"}
    )
    with ProviderServer() as provider:
        config = tmp / "orchestrator.toml"
        config.write_text(
            "".join(
                f'[integrations.{name}]\nbase_url = "{provider.url}"\nauth = "none"\nretries = 0\n'
                for name in ("hooks", "patient")
            )
        )
        env = environment(PYTHONPATH=plugins.pythonpath(tmp / "plugin", site))
        with drained(tmp / "events.db", "--config", str(config), env=env) as daemon:
            yield Setup(Cli(daemon, tmp), provider, environment(ORCHESTRATOR_ADDRESS=daemon.address))


def follow_until(setup: Setup, pattern: str, *args: str) -> list[str]:
    """Run ``orchestrator events --follow ARGS`` until a line matches ``pattern``; the lines it printed."""
    follower = Process("events", "--follow", *args, env=setup.env, cwd=setup.cli.cwd)
    try:
        follower.stdout.wait_for(pattern, FOLLOW_TIMEOUT)
    finally:
        follower.signal(signal.SIGINT)
    return follower.stdout.lines


def head(setup: Setup) -> int:
    """The position of the last record of the log."""
    lines = setup.cli.ok("events", "--json").json_lines()
    return int(lines[-1]["position"]) if lines else 0


def test_a_job_that_gave_up_is_listed_and_retried_once_the_provider_is_fixed(setup: Setup) -> None:
    """``jobs`` shows the job GAVE_UP with its error; after the fix ``jobs retry`` runs it: retried, succeeded."""
    cli, provider = setup.cli, setup.provider
    provider.route("POST", "/webhooks", Reply(503, "maintenance"))
    emitted = cli("emit", "post-connection-creation", "c1", "-i", "hooks", "--wait")
    assert emitted.code == 1 and "register gave-up" in emitted.err, str(emitted)

    (job,) = cli.ok("jobs", "--connection", "c1", "-i", "hooks", "--json").json()
    assert (job["stream"], job["function"], job["event"], job["status"]) == (
        "dev/hooks/c1",
        "register",
        "post-connection-creation",
        "gave-up",
    )
    assert (job["attempts"], job["max_attempts"], job["next_attempt_at"]) == (2, 2, None)
    assert "answered 503" in job["last_error"]
    assert job["ref"] == {"environment": "dev", "integration": "hooks", "connection_id": "c1"}
    assert job["id"] in [j["id"] for j in cli.ok("jobs", "--status", "gave-up", "--json").json()]
    table = {row["JOB"]: row for row in rows(cli.ok("jobs").out)}
    row = table[job["id"]]
    assert (row["CONNECTION"], row["FUNCTION"], row["STATUS"], row["ATTEMPTS"], row["NEXT ATTEMPT IN"]) == (
        "dev/hooks/c1",
        "register",
        "gave-up",
        "2/2",
        "-",
    )
    assert "answered 503" in row["LAST ERROR"]

    provider.route("POST", "/webhooks", Reply(201, {"id": "wh_1"}))
    start = head(setup) + 1
    retried = cli.ok("jobs", "retry", job["id"])
    shown = fields(retried.out)
    assert (shown["job"], shown["connection"], shown["function"]) == (job["id"], "dev/hooks/c1", "register")
    assert shown["status"] in ("queued", "running", "succeeded")
    follow_until(setup, r"function-succeeded", "--connection", "c1", "-i", "hooks", "--from", str(start))

    log = cli.ok("events", "--connection", "c1", "-i", "hooks", "--json").json_lines()
    types = [r["type"] for r in log]
    assert types[types.index("function-gave-up") :] == ["function-gave-up", "function-retried", "function-succeeded"]
    retried_record = log[types.index("function-retried")]
    assert retried_record["data"]["job_id"] == job["id"]
    assert retried_record["data"]["attempts_before"] == 2
    text = cli.ok("events", "--connection", "c1", "-i", "hooks").out
    assert f"register job {job['id']} queued again by anonymous (gave-up after 2)" in text
    (done,) = cli.ok("jobs", "--connection", "c1", "-i", "hooks", "--json").json()
    assert (done["status"], done["attempts"], done["last_error"]) == ("succeeded", 1, "")


def test_a_job_waiting_for_its_next_attempt_is_cancelled(setup: Setup) -> None:
    """``jobs cancel --reason`` of a queued job: cancelled, and the log says why."""
    cli, provider = setup.cli, setup.provider
    provider.route("POST", "/sync", Reply(500, "oops"))
    start = head(setup) + 1
    cli.ok("emit", "post-connection-creation", "p1", "-i", "patient")
    follow_until(setup, r"function-failed", "--connection", "p1", "-i", "patient", "--from", str(start))
    (job,) = cli.ok("jobs", "--connection", "p1", "-i", "patient", "--status", "queued", "--json").json()
    assert job["attempts"] == 1 and job["next_attempt_at"] is not None
    (row,) = [r for r in rows(cli.ok("jobs", "--status", "queued").out) if r["JOB"] == job["id"]]
    assert re.fullmatch(r"\d+m \d+s|\d+s", row["NEXT ATTEMPT IN"]), row

    cancelled = cli.ok("jobs", "cancel", job["id"], "--reason", "the customer churned", "--json").json()
    assert (cancelled["id"], cancelled["status"], cancelled["next_attempt_at"]) == (job["id"], "cancelled", None)
    last = cli.ok("events", "--connection", "p1", "-i", "patient", "--json").json_lines()[-1]
    assert (last["type"], last["data"]["reason"], last["data"]["by"]) == (
        "function-cancelled",
        "the customer churned",
        "anonymous",
    )
    again = cli("jobs", "cancel", job["id"])
    assert again.code == 1, str(again)
    assert again.err.startswith("orchestrator: error: FAILED_PRECONDITION: job ") and again.err.count("\n") == 1
    assert "has ended (cancelled)" in again.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs", "retry", "not-a-job"], "JOB_ID 'not-a-job' is not a job id"),
        (["jobs", "cancel", "01900000-0000-7000-8000-00000000000Z"], "is not a job id"),
        (["jobs", "--connection", "c1"], "--connection needs --integration"),
        (["jobs", "-i", "hooks"], "use it with --connection"),
        (["jobs", "-e", "prod"], "use it with --connection"),
        (["jobs", "--status", "done"], "'done' is not one of"),
    ],
)
def test_usage_errors_exit_2_and_say_what_is_wrong(setup: Setup, args: list[str], message: str) -> None:
    """Arguments the daemon would refuse are refused before it is asked."""
    result = setup.cli(*args)
    assert result.code == 2, str(result)
    assert message in result.err, str(result)


def test_refusals_of_the_daemon_exit_1_in_one_line(setup: Setup) -> None:
    """An unknown job: NOT_FOUND; nothing is written."""
    before = head(setup)
    unknown = "01900000-0000-7000-8000-000000000000"
    for args in (["jobs", "retry", unknown], ["jobs", "cancel", unknown, "--reason", "x"]):
        result = setup.cli(*args)
        assert result.code == 1, str(result)
        assert result.err == f"orchestrator: error: NOT_FOUND: job {unknown} not found\n"
    assert head(setup) == before


def test_jobs_of_a_connection_with_none_print_an_empty_array(setup: Setup) -> None:
    """``--json`` prints ``[]`` when nothing matches, like ``connections --json``."""
    assert setup.cli.ok("jobs", "--connection", "nobody", "-i", "hooks", "--json").out == "[]\n"
