"""Plugins pip-installed into a fresh venv are discovered by entry points; a broken one is named and refused."""

from __future__ import annotations

import base64
import hashlib
import signal
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.process import Result, arun, run, serve, table

from ._support import FreshVenv

# func_only: the 120 s bound is each test's own; the session's pip install from PyPI has its own bound.
pytestmark = [pytest.mark.slow, pytest.mark.anyio, pytest.mark.timeout(120, func_only=True)]

BROKEN = "orchestrator-broken-demo"
PACKAGE = "orchestrator_broken_demo"
BROKEN_ENTRY_POINT = f"explode = {PACKAGE}:explode"
INSTALLED = {
    "register-webhook": ["salesforce", "post-connection-creation", "orchestrator-salesforce", "1.0.0"],
    "delete-webhook": ["salesforce", "pre-connection-deletion", "orchestrator-salesforce", "1.0.0"],
    "check-token-scopes": ["github", "validate-connection", "orchestrator-github", "1.0.0"],
}


async def orchestrator(venv: FreshVenv, *args: str, cwd: Path) -> Result:
    """Run the fresh venv's ``orchestrator ARGS`` in a new process."""
    return await arun(*args, command=venv.orchestrator, env=venv.environment(), cwd=cwd)


def broken_wheel(directory: Path) -> Path:
    """Write a wheel of a plugin whose entry point's module imports a module that does not exist."""
    dist_info = f"{PACKAGE}-0.0.1.dist-info"
    files = {
        f"{PACKAGE}/__init__.py": '"""A plugin whose import fails."""\n\nimport orchestrator_no_such_module\n',
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {BROKEN}\nVersion: 0.0.1\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": f"[orchestrator.functions]\n{BROKEN_ENTRY_POINT}\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = directory / f"{PACKAGE}-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.fixture
def broken_plugin(fresh_venv: FreshVenv, tmp_path: Path) -> Iterator[str]:
    """A throwaway distribution with a broken entry point, installed into the fresh venv for the test only.

    It is a wheel written by hand: no build backend to download, so installing it is quick and offline.
    """
    fresh_venv.pip("install", "--no-index", "--no-deps", str(broken_wheel(tmp_path)))
    try:
        yield BROKEN
    finally:
        fresh_venv.pip("uninstall", "-y", BROKEN)


async def test_functions_lists_the_installed_plugins(fresh_venv: FreshVenv, tmp_path: Path) -> None:
    """``orchestrator functions`` in a fresh process lists each plugin function with its distribution and version."""
    result = await orchestrator(fresh_venv, "functions", cwd=tmp_path)
    assert result.code == 0, str(result)
    assert result.err == "", str(result)
    header, *rows = table(result.out)
    assert header == ["INTEGRATION", "EVENT", "NAME", "DESCRIPTION", "DISTRIBUTION", "VERSION"]
    listed = {row[2]: [row[0], row[1], row[4], row[5]] for row in rows}
    assert listed == INSTALLED  # and nothing else: the fresh venv has no hubspot plugin


async def test_functions_json_parses(fresh_venv: FreshVenv, tmp_path: Path) -> None:
    """``functions --json`` is one document naming each function's distribution, version and entry point."""
    result = await orchestrator(fresh_venv, "functions", "--json", cwd=tmp_path)
    assert result.code == 0, str(result)
    data = result.json()
    assert data["broken"] == []
    by_name = {f["name"]: f for f in data["functions"]}
    assert {name: [f["integration"], f["event"], f["distribution"], f["version"]] for name, f in by_name.items()} == (
        INSTALLED
    )
    assert by_name["register-webhook"]["entry_point"] == "orchestrator_salesforce.webhooks:register_webhook"
    assert by_name["check-token-scopes"]["sync"] is False


async def test_functions_names_a_broken_plugin_and_exits_1(
    fresh_venv: FreshVenv, broken_plugin: str, tmp_path: Path
) -> None:
    """A plugin whose import fails is reported by distribution and entry point, with exit 1; the rest still list."""
    result = await orchestrator(fresh_venv, "functions", cwd=tmp_path)
    assert result.code == 1, str(result)
    assert result.err.startswith(
        f"orchestrator: broken plugin: {broken_plugin} 0.0.1: entry point {BROKEN_ENTRY_POINT}"
    )
    assert "ModuleNotFoundError" in result.err and "orchestrator_no_such_module" in result.err
    assert "Traceback" not in result.err
    assert {row[2] for row in table(result.out)[1:]} == set(INSTALLED)


async def test_serve_refuses_to_start_with_a_broken_plugin(
    fresh_venv: FreshVenv, broken_plugin: str, tmp_path: Path
) -> None:
    """The daemon exits 1 naming the plugin and suggesting --skip-broken-plugins, before serving."""
    result = await orchestrator(
        fresh_venv, "serve", "--listen", "127.0.0.1:0", "--database", f"sqlite://{tmp_path}/events.db", cwd=tmp_path
    )
    assert result.code == 1, str(result)
    error = result.err.splitlines()[-1]
    assert error.startswith("orchestrator: error: 1 broken plugin(s): "), str(result)
    assert f"{broken_plugin} 0.0.1: entry point {BROKEN_ENTRY_POINT}" in error
    assert "--skip-broken-plugins" in error
    assert "serving" not in result.err
    assert "Traceback" not in result.err


async def test_serve_skip_broken_plugins_starts_and_stops(
    fresh_venv: FreshVenv, broken_plugin: str, tmp_path: Path
) -> None:
    """With --skip-broken-plugins the daemon warns about the plugin, serves, and SIGTERM stops it with exit 0."""
    env = fresh_venv.environment()
    async with serve(
        tmp_path / "events.db", "--skip-broken-plugins", command=fresh_venv.orchestrator, env=env
    ) as daemon:
        warned = f"broken plugin: {broken_plugin} 0.0.1: entry point {BROKEN_ENTRY_POINT}"
        # Piped stderr gets JSON lines: a warning from the daemon's logger naming the plugin.
        assert any(
            warned in line and '"level": "warning"' in line and '"logger": "orchestrator.daemon"' in line
            for line in daemon.lines
        ), str(daemon)
        listed = await arun(
            "connections", "list", "--address", daemon.address, command=fresh_venv.orchestrator, env=env
        )
        assert listed.code == 0, str(listed)
        # It answers calls, not only logs that it serves.
        assert await daemon.stop(signal.SIGTERM) == 0, str(daemon)
    assert "Traceback" not in daemon.text


def test_the_fresh_venv_is_not_the_development_one(fresh_venv: FreshVenv) -> None:
    """The venv under test sees neither the development checkout nor its site-packages."""
    probe = run(
        "-c",
        "import orchestrator, sys; print(orchestrator.__file__); print(sys.prefix)",
        command=fresh_venv.python,
        env=fresh_venv.environment(),
        cwd=fresh_venv.path,
        timeout=60,
    )
    assert probe.code == 0, str(probe)
    module, prefix = probe.out.splitlines()
    assert Path(module).is_relative_to(fresh_venv.path), module
    assert Path(prefix) == fresh_venv.path
    assert not fresh_venv.has("orchestrator_hubspot")
