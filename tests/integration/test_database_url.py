"""The daemon keeps its log where the ``--database`` URL says, and finds it again after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.errors import InvalidArgument

from ._daemon import run_daemon

pytestmark = pytest.mark.anyio

REF = pb.ConnectionRef(environment="dev", integration="crm", connection_id="acme")


async def create_then_restart(url: str) -> pb.Connection:
    """Create a connection on a daemon serving ``url``, stop it, start another on ``url`` and read it back."""
    async with run_daemon(url) as daemon:
        created = await daemon.stub.EmitLifecycleEvent(
            pb.EmitLifecycleEventRequest(connection=REF, event=pb.LIFECYCLE_EVENT_POST_CONNECTION_CREATION)
        )
        assert created.version == 1
    async with run_daemon(url) as daemon:
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
    ],
)
async def test_log_is_kept_at_the_named_path_across_restarts(tmp_path: Path, url: str, folder: str) -> None:
    """The log file is created at the path the URL names, and a restarted daemon serves what it holds."""
    connection = await create_then_restart(url.format(tmp=tmp_path, folder=folder))

    assert (tmp_path / folder / "events.db").is_file()
    assert (connection.state, connection.version) == (pb.CONNECTION_STATE_ACTIVE, 1)


@pytest.mark.xfail(
    strict=True,
    reason="bug: orchestrator.store.sqlite_path parses the URL with urlsplit, so '#...' and '?...' are dropped"
    " as fragment/query and the daemon silently serves a log at the truncated path",
)
@pytest.mark.parametrize("folder", ["a#b", "a?b"])
async def test_url_with_hash_or_question_mark_is_not_truncated(tmp_path: Path, folder: str) -> None:
    """A folder with '#' or '?' either holds the log or the URL is refused; the log never lands elsewhere."""
    refused = False
    try:
        await create_then_restart(f"sqlite://{tmp_path}/{folder}/events.db")
    except* InvalidArgument:
        refused = True

    assert refused or (tmp_path / folder / "events.db").is_file()
    assert not (tmp_path / "a").exists(), "the log was written at the path cut at '#' or '?'"
