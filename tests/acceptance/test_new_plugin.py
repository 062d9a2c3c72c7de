"""From ``orchestrator new`` to a dry run, in a fresh venv: the scaffold installs, its tests pass as generated,
``orchestrator functions`` lists it, and each function dry-runs against a local provider."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.process import Result, run, sqlite_url, table
from tests.support.provider import ProviderServer, Reply

from ._support import INSTALL_TIMEOUT, FreshVenv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * INSTALL_TIMEOUT, func_only=True)]

NAME = "orchestrator-acme"
FUNCTIONS = {
    "check-credentials": ["acme", "validate-connection", NAME, "0.1.0"],
    "register-webhook": ["acme", "post-connection-creation", NAME, "0.1.0"],
    "delete-webhook": ["acme", "pre-connection-deletion", NAME, "0.1.0"],
}


def orchestrator(venv: FreshVenv, *args: str, cwd: Path) -> Result:
    """The fresh venv's ``orchestrator ARGS``."""
    return run(*args, command=venv.orchestrator, env=venv.environment(), cwd=cwd)


@pytest.fixture
def scaffolded(fresh_venv: FreshVenv, tmp_path: Path) -> Iterator[Path]:
    """``orchestrator new orchestrator-acme -i acme``, pip-installed (editable, with its test extra) into the fresh
    venv for this test only."""
    created = orchestrator(fresh_venv, "new", NAME, "--integration", "acme", cwd=tmp_path)
    assert created.code == 0, str(created)
    fresh_venv.pip("install", "-e", f"{tmp_path / NAME}[test]")
    try:
        yield tmp_path / NAME
    finally:
        fresh_venv.pip("uninstall", "-y", NAME)


def test_a_new_plugin_installs_passes_its_tests_lists_and_dry_runs(
    fresh_venv: FreshVenv, scaffolded: Path, tmp_path: Path
) -> None:
    """The generated tests pass with the venv's pytest; the functions are listed; each one dry-runs against a local
    provider on a connection given by --connection-config (none is in any log)."""
    pytest = (*fresh_venv.python, "-m", "pytest")
    tested = run("-q", "-p", "no:cacheprovider", command=pytest, env=fresh_venv.environment(), cwd=scaffolded)
    assert tested.code == 0, str(tested)
    assert tested.out.splitlines()[-1].startswith("6 passed"), str(tested)

    listed = orchestrator(fresh_venv, "functions", cwd=tmp_path)
    assert listed.code == 0, str(listed)
    rows = {row[2]: [row[0], row[1], row[4], row[5]] for row in table(listed.out)[1:] if row[0] == "acme"}
    assert rows == FUNCTIONS

    with ProviderServer() as provider:
        provider.route("GET", "/me", Reply(200, {"id": "user-1"}))
        provider.route("POST", "/webhooks", Reply(201, {"id": "wh7"}))
        provider.route("DELETE", "/webhooks/wh7", Reply(204))
        config = tmp_path / "orchestrator.toml"
        config.write_text(f'[integrations.acme]\nbase_url = "{provider.url}"\nauth = "bearer"\nretries = 0\n')
        said = {}
        for name, metadata in (
            ("check-credentials", "{}"),
            ("register-webhook", "{}"),
            ("delete-webhook", '{"webhook_id": "wh7"}'),
        ):
            result = orchestrator(
                fresh_venv, "dryrun", name, "try-1", "-i", "acme", "--connection-config", "{}", "--metadata", metadata,
                "--credential", "access_token=T", "--config", str(config), "--yes",
                "--database", sqlite_url(tmp_path / "events.db"), cwd=tmp_path,
            )  # fmt: skip
            assert result.code == 0, str(result)
            said[name] = result.out.splitlines()
        requests = [(r.method, r.path, r.headers["authorization"]) for r in provider.requests]
    assert requests == [
        ("GET", "/me", "Bearer T"),
        ("POST", "/webhooks", "Bearer T"),
        ("DELETE", "/webhooks/wh7", "Bearer T"),
    ]
    assert said["check-credentials"][1:3] == [
        f"  http  GET {provider.url}/me -> 200",
        "  log   info: credentials accepted for user-1",
    ]
    assert '  meta  + webhook_id: "wh7"' in said["register-webhook"]
    assert '  meta  ~ webhook_id: "wh7" -> null' in said["delete-webhook"]
    assert said["delete-webhook"][-1].endswith("; at the provider: 1 changing request was sent")
    assert not (tmp_path / "events.db").exists()
