"""Failures as the CLI shows them: ``orchestrator emit`` fails (exit 1, the answer still printed) when the
connection was rejected or, with ``--wait``, when a function did not succeed, so a script can trust its
exit code; ``events`` and ``replay --connection`` print each failure's error on its line."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import plugins
from tests.support.process import Cli, drained, environment

PLUGIN = """
from orchestrator import NonRetryable, Rejected, on_event


@on_event("validate-connection", integration="picky")
async def check(ctx):
    raise Rejected("the token lacks the repo scope")


@on_event("post-connection-creation", integration="picky")
async def register(ctx):
    raise NonRetryable("the provider refuses webhooks")
"""


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """The CLI and a daemon whose ``picky`` integration rejects every validation and fails every creation."""
    tmp = tmp_path_factory.mktemp("exit-codes")
    (tmp / "plugin").mkdir()
    (tmp / "plugin" / "picky_plugin.py").write_text(PLUGIN)
    functions = {"check": "picky_plugin:check", "register": "picky_plugin:register"}
    path = plugins.pythonpath(tmp / "plugin", plugins.install(tmp / "site", "picky-plugin", functions))
    with drained(tmp / "events.db", env=environment(PYTHONPATH=path)) as daemon:
        yield Cli(daemon, tmp)


def test_a_rejected_validation_exits_1_after_printing_the_answer(cli: Cli) -> None:
    result = cli("emit", "validate-connection", "c1", "-i", "picky", "--json")
    assert result.code == 1, str(result)
    assert result.json()["state"] == "rejected"
    assert result.err == "orchestrator: error: dev/picky/c1 was rejected: check: the token lacks the repo scope\n"


def test_an_awaited_function_that_gave_up_exits_1(cli: Cli) -> None:
    result = cli("emit", "post-connection-creation", "c2", "-i", "picky", "--wait")
    assert result.code == 1, str(result)
    assert "active" in result.out
    assert result.err == (
        "orchestrator: error: 1 of 1 function(s) did not succeed: register gave-up (the provider refuses webhooks)\n"
    )


def test_without_wait_a_scheduled_function_does_not_fail_the_command(cli: Cli) -> None:
    result = cli("emit", "post-connection-creation", "c3", "-i", "picky")
    assert (result.code, result.err) == (0, ""), str(result)


def test_events_and_replay_print_each_failures_error_on_its_line(cli: Cli) -> None:
    cli("emit", "post-connection-creation", "c4", "-i", "picky", "--wait")
    failure = "register attempt 1: NonRetryable: the provider refuses webhooks"
    gave_up = "register after attempt 1: not retryable: the provider refuses webhooks"
    events = cli.ok("events", "--connection", "c4", "-i", "picky").out.splitlines()
    assert [line.split("  ")[-1] for line in events if "function-" in line] == [failure, gave_up]
    replay = cli.ok("replay", "--connection", "c4", "-i", "picky", "--database", cli.daemon.url).out
    assert failure in replay and gave_up in replay
