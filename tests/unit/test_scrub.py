"""A function's log lines and error message are redacted before they are cut to size, so a
credential the cut would halve is never kept in part."""

from __future__ import annotations

import pytest

from orchestrator.context import MAX_LOG_LINE, Context, cut
from orchestrator.records import FunctionFailed
from orchestrator.runner import MAX_ERROR, MAX_TRACEBACK
from tests.support.engine import VALIDATE, function, running

pytestmark = pytest.mark.anyio

TOKEN = "tok-3f9a1c77e2b04d5e9c1a"


@pytest.mark.parametrize("offset", [10, len(TOKEN) // 2, len(TOKEN) - 3])
async def test_a_credential_straddling_the_cut_is_redacted_not_halved(offset: int) -> None:
    """The token starts ``offset`` characters before each limit: a cut first would keep its head."""

    line = "x" * (MAX_LOG_LINE - len("info: ") - offset) + TOKEN + " and more"
    error = "y" * (MAX_ERROR - offset) + TOKEN + " and more"

    async def check(ctx: Context) -> None:
        ctx.log(line)
        raise RuntimeError(error)

    async with running(function("check", VALIDATE, check)) as h:
        await h.emit(VALIDATE, credentials={"access_token": TOKEN})
        failed = next(b for b in await h.bodies() if isinstance(b, FunctionFailed))
    for text in (failed.error, *failed.logs):
        assert not any(TOKEN[:n] in text for n in range(4, len(TOKEN) + 1))
    assert failed.logs == (cut("info: " + line.replace(TOKEN, "[redacted]"), MAX_LOG_LINE),)
    assert failed.error == cut(error.replace(TOKEN, "[redacted]"), MAX_ERROR)


@pytest.mark.parametrize("offset", [10, len(TOKEN) // 2, len(TOKEN) - 3])
async def test_a_credential_in_the_tracebacks_exception_line_is_redacted_not_halved(offset: int) -> None:
    """The token straddles the 1,000th character of the traceback's last line (where a cut once halved it)."""
    error = "y" * (1000 - len("RuntimeError: ") - offset) + TOKEN + " and more"

    async def check(ctx: Context) -> None:
        raise RuntimeError(error)

    async with running(function("check", VALIDATE, check)) as h:
        await h.emit(VALIDATE, credentials={"access_token": TOKEN})
        failed = next(b for b in await h.bodies() if isinstance(b, FunctionFailed))
    assert not any(TOKEN[:n] in failed.traceback for n in range(4, len(TOKEN) + 1))
    assert failed.traceback.splitlines()[-1] == "RuntimeError: " + error.replace(TOKEN, "[redacted]")
    assert len(failed.traceback) <= MAX_TRACEBACK
