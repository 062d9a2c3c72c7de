"""What the daemon logs at INFO (the default) and what only at DEBUG (docs/operations.md lists the lines).

INFO and above carry one line per failure, per rejection and per refused call; each
emit's outcome and each successful attempt are DEBUG lines, built only when DEBUG is on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator import Context, Rejected, dispatch, service
from tests.support.daemon import function, serving
from tests.support.grpc import ACTIVE, CREATE, DELETE, PENDING, REJECTED, VALIDATE, emit

pytestmark = pytest.mark.anyio


def check(ctx: Any) -> None:
    """A plain def validate function: ``bad-*`` connections break it, ``no-*`` ones it rejects, others pass."""
    connection_id = ctx.connection.connection_id
    if connection_id.startswith("bad"):
        raise RuntimeError("the provider's answer made no sense")
    if connection_id.startswith("no"):
        raise Rejected("unknown account")


async def register(ctx: Context) -> None:
    """A creation function (a job): it succeeds."""


async def flow(tmp_path: Path) -> None:
    """A validation that passes, a creation whose job succeeds, a failure, a rejection and a refused emit."""
    functions = (
        function("check", "validate-connection", check),
        function("register", "post-connection-creation", register),
    )
    async with serving(tmp_path, *functions) as daemon:
        assert (await emit(daemon.stub, VALIDATE, "good")).state == PENDING
        assert (await emit(daemon.stub, CREATE, "good", wait=True)).state == ACTIVE
        assert (await emit(daemon.stub, VALIDATE, "bad")).state == REJECTED
        assert (await emit(daemon.stub, VALIDATE, "no")).state == REJECTED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await emit(daemon.stub, DELETE, "nobody")
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND


def about_connections(lines: list[str]) -> list[tuple[str, str, str]]:
    """(level, connection, event or function) of each line about a connection's emit or attempt, in order."""
    parsed = [json.loads(line) for line in lines]
    return [
        (line["level"], line["connection"].rpartition("/")[2], line.get("function") or line["event"])
        for line in parsed
        if "connection" in line and ("event" in line or "function" in line)
    ]


async def test_info_has_one_line_per_failure_rejection_and_refusal_and_none_per_emit(
    tmp_path: Path, log_lines: list[str]
) -> None:
    """At INFO: the failed attempt (WARNING), each rejection and the refused emit; not a line per emit or success."""
    await flow(tmp_path)
    assert about_connections(log_lines) == [
        ("warning", "bad", "check"),
        ("info", "bad", "validate-connection"),
        ("info", "no", "validate-connection"),
        ("info", "nobody", "pre-connection-deletion"),
    ]
    rejections = [json.loads(line)["message"] for line in log_lines if '"state": "rejected"' in line]
    assert rejections == [
        "validate-connection dev/acme/bad: rejected (check: the provider's answer made no sense)",
        "validate-connection dev/acme/no: rejected (check: unknown account)",
    ]


async def test_debug_adds_a_line_per_emit_and_per_successful_attempt(
    tmp_path: Path, debug_log_lines: list[str]
) -> None:
    """At DEBUG every emit and every attempt has its line, in order."""
    await flow(tmp_path)
    assert about_connections(debug_log_lines) == [
        ("debug", "good", "check"),
        ("debug", "good", "validate-connection"),
        ("debug", "good", "register"),  # wait=true: the job ran before the emit answered
        ("debug", "good", "post-connection-creation"),
        ("warning", "bad", "check"),
        ("info", "bad", "validate-connection"),
        ("debug", "no", "check"),
        ("info", "no", "validate-connection"),
        ("info", "nobody", "pre-connection-deletion"),
    ]


class Spy:
    """A logger's stand-in that notes the level of every line asked for, and passes it on."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.asked: list[int] = []

    def isEnabledFor(self, level: int) -> bool:
        """As the logger says."""
        return self.logger.isEnabledFor(level)

    def log(self, level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        self.asked.append(level)
        self.logger.log(level, msg, *args, **kwargs)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.DEBUG, msg, *args, **kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.INFO, msg, *args, **kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.log(logging.WARNING, msg, *args, **kwargs)


async def test_a_debug_line_is_not_even_asked_for_when_debug_is_off(
    tmp_path: Path, log_lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At INFO the emit and attempt paths build no DEBUG line (no ``extra`` dict, no message): they check first."""
    spies = [Spy(service.log), Spy(dispatch.log)]
    monkeypatch.setattr(service, "log", spies[0])
    monkeypatch.setattr(dispatch, "log", spies[1])
    await flow(tmp_path)
    asked = spies[0].asked + spies[1].asked
    assert logging.DEBUG not in asked
    assert asked.count(logging.INFO) == 3 and asked.count(logging.WARNING) == 1
