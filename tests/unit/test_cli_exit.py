"""The one mapping from what a command raised to the line on stderr and the exit code."""

from __future__ import annotations

import pytest

from orchestrator.cli import _exit
from orchestrator.errors import InvalidArgument, NotFound
from orchestrator.rpc.client import ClientError


def test_the_codes() -> None:
    """The codes docs/cli.md promises, and 130 for Ctrl-C."""
    assert (_exit.OK, _exit.FAILURE, _exit.USAGE, _exit.INTERRUPTED) == (0, 1, 2, 130)


@pytest.mark.parametrize(
    "exc",
    [NotFound("no connection dev/acme/x"), ClientError("NOT_FOUND", "no connection dev/acme/x")],
    ids=["orchestrator error", "client error"],
)
def test_an_error_a_person_can_act_on_is_one_line_and_failure(exc: Exception) -> None:
    """Its message, and exit code 1."""
    assert _exit.outcome(exc) == (str(exc), _exit.FAILURE)


def test_a_task_groups_errors_are_told_by_the_first_when_all_are_actionable() -> None:
    """Nested groups are looked into; one error of another kind leaves the group to propagate."""
    first, second = InvalidArgument("first"), ClientError("UNAVAILABLE", "second")
    assert _exit.outcome(BaseExceptionGroup("g", [first, ExceptionGroup("inner", [second])])) == (
        "first",
        _exit.FAILURE,
    )
    assert _exit.outcome(ExceptionGroup("g", [first, ValueError("bug")])) is None
    assert _exit.outcome(BaseExceptionGroup("g", [KeyboardInterrupt()])) is None


def test_ctrl_c_is_130_without_a_message_and_anything_else_propagates() -> None:
    """A bug keeps its traceback; SystemExit and click's own exceptions keep their codes."""
    assert _exit.outcome(KeyboardInterrupt()) == ("", _exit.INTERRUPTED)
    assert _exit.outcome(ValueError("bug")) is None
    assert _exit.outcome(SystemExit(3)) is None


def test_leave_prints_one_error_line_and_exits(capsys: pytest.CaptureFixture[str]) -> None:
    """``orchestrator: error: MESSAGE`` on stderr; nothing at all for an empty message."""
    with pytest.raises(SystemExit) as exited:
        _exit.fail("no event log at /x.db")
    assert exited.value.code == _exit.FAILURE
    with pytest.raises(SystemExit) as interrupted:
        _exit.leave("", _exit.INTERRUPTED)
    assert interrupted.value.code == _exit.INTERRUPTED
    assert capsys.readouterr() == ("", "orchestrator: error: no event log at /x.db\n")
