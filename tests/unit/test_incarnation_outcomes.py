"""What ``connections get`` lists: the last outcome of every function of the connection's current incarnation."""

from __future__ import annotations

import pytest

from orchestrator import state
from orchestrator.context import Context
from orchestrator.functions import NonRetryable
from orchestrator.model import FunctionStatus
from tests.support.engine import ACME, CREATE, DELETE, VALIDATE, function, running

pytestmark = pytest.mark.anyio


async def test_a_creation_failure_stays_in_view_after_deletion_and_goes_with_the_incarnation() -> None:
    async def check(ctx: Context) -> None:
        pass

    async def register(ctx: Context) -> None:
        raise NonRetryable("the provider refuses webhooks")

    async def cleanup(ctx: Context) -> None:
        pass

    installed = (
        function("check", VALIDATE, check),
        function("register", CREATE, register),
        function("cleanup", DELETE, cleanup),
    )
    async with running(*installed, worker=True) as h:
        await h.emit(VALIDATE)
        await h.emit(CREATE, wait=True)
        await h.emit(DELETE)
        deleted = state.incarnation_outcomes(await h.log())
        latest_only = (await h.service.get_connection(ACME)).outcomes
        await h.emit(VALIDATE)  # a new incarnation
        fresh = state.incarnation_outcomes(await h.log())

    assert [(o.name, o.status) for o in deleted] == [
        ("check", FunctionStatus.SUCCEEDED),
        ("register", FunctionStatus.GAVE_UP),
        ("cleanup", FunctionStatus.SUCCEEDED),
    ]
    assert next(o for o in deleted if o.name == "register").error == "the provider refuses webhooks"
    assert [o.name for o in latest_only] == ["cleanup"], "the read model keeps the latest event's outcomes only"
    assert [(o.name, o.status) for o in fresh] == [("check", FunctionStatus.SUCCEEDED)]
