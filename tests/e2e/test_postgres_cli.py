"""Two ``orchestrator serve --database postgresql://...`` on one log, used with the CLI as a user would."""

from __future__ import annotations

import json
import signal
from functools import partial
from pathlib import Path

import anyio.to_thread
import pytest

from tests.support.postgres import Schemas
from tests.support.process import Daemon, arun, environment, start

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WAIT = 30.0


async def test_two_daemons_on_one_log_serve_emit_follow_get_and_replay(
    postgres_schemas: Schemas, tmp_path: Path
) -> None:
    """An emit through daemon B is followed through daemon A (``events --follow``) at once, ``connections get``
    answers the same on both, ``replay --verify`` finds the read model in step, and both drain to exit code 0."""
    url = await postgres_schemas.new()
    made = await arun("keygen")
    assert made.code == 0, str(made)
    env = environment(ORCHESTRATOR_SECRET_KEY=made.out.strip())
    daemons: list[Daemon] = []
    try:
        for name in ("a", "b"):  # one after the other: each start is awaited on a thread
            daemon = await anyio.to_thread.run_sync(partial(Daemon, tmp_path / name, url=url, env=env))
            daemons.append(daemon)
        at_a, at_b = (environment(ORCHESTRATOR_ADDRESS=d.address) for d in daemons)
        async with start("events", "--follow", "--json", env=at_a, stream="stdout") as follower:
            emitted = await arun("emit", "post-connection-creation", "c1", "-i", "acme", "--json", env=at_b)
            assert emitted.code == 0, str(emitted)
            line = await follower.wait_for(r'"position":\s*1\b', within=WAIT)
            assert json.loads(line.string)["stream"] == "dev/acme/c1"
        answers = [await arun("connections", "get", "c1", "-i", "acme", "--json", env=e) for e in (at_a, at_b)]
        assert [(r.code, r.json()["state"], r.json()["version"]) for r in answers] == [(0, "active", 1)] * 2
        verified = await arun("replay", "--database", url, "--verify", env=environment())
        assert verified.code == 0 and "read model matches the log" in verified.out, str(verified)
    finally:
        codes = [await anyio.to_thread.run_sync(d.signal, signal.SIGTERM) for d in daemons]
    assert codes == [0, 0], "\n".join(str(d) for d in daemons)
    assert all("Traceback" not in d.stderr.text for d in daemons)
