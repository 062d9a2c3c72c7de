"""The daemon keeps its log where the ``--database`` URL says, and finds it again after a restart."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.plugins import Registry
from tests.support.daemon import run_daemon

pytestmark = pytest.mark.anyio

REF = pb.ConnectionRef(environment="dev", integration="crm", connection_id="acme")


async def create_then_restart(url: str) -> pb.Connection:
    """Create a connection on a daemon serving ``url``, stop it, start another on ``url`` and read it back."""
    async with run_daemon(url, registry=Registry()) as daemon:
        created = await daemon.stub.EmitLifecycleEvent(
            pb.EmitLifecycleEventRequest(connection=REF, event=pb.LIFECYCLE_EVENT_POST_CONNECTION_CREATION)
        )
        assert created.version == 1
    async with run_daemon(url, registry=Registry()) as daemon:
        response = await daemon.stub.GetConnection(pb.GetConnectionRequest(connection=REF))
    return response.connection


@pytest.mark.parametrize(
    ("url", "folder"),
    [
        pytest.param("sqlite://{tmp}/{folder}/events.db", "logs", id="sqlite-three-slashes"),
        pytest.param("sqlite:///{tmp}/{folder}/events.db", "logs", id="sqlite-four-slashes"),
        pytest.param("{tmp}/{folder}/events.db", "logs", id="bare-path"),
        pytest.param("sqlite://{tmp}/{folder}/events.db", "my logs", id="space-in-folder"),
        pytest.param("sqlite://{tmp}/{folder}/events.db", "100%41", id="percent-in-folder"),
        pytest.param("sqlite://{tmp}/{folder}/events.db", "a#b", id="hash-in-folder"),
        pytest.param("sqlite://{tmp}/{folder}/events.db", "a?b", id="question-mark-in-folder"),
    ],
)
async def test_log_is_kept_at_the_named_path_across_restarts(tmp_path: Path, url: str, folder: str) -> None:
    """The log file is created at the literal path the URL names, and a restarted daemon serves what it holds."""
    await anyio.Path(tmp_path / folder).mkdir()  # a log is created only in an existing directory
    connection = await create_then_restart(url.format(tmp=tmp_path, folder=folder))

    assert await anyio.Path(tmp_path / folder / "events.db").is_file()
    beside = [path.name async for path in anyio.Path(tmp_path).iterdir()]
    assert beside == [folder], "nothing is written outside the named folder"
    assert (connection.state, connection.version) == (pb.CONNECTION_STATE_ACTIVE, 1)
