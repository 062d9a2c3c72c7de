"""Fixtures for the acceptance tests: the orchestrator as a user installs and runs it, against a local provider."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.process import run
from tests.support.provider import WebhookProvider

from ._support import INSTALL_TIMEOUT, FreshVenv

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def provider() -> Iterator[WebhookProvider]:
    """A local webhook provider on 127.0.0.1:0, stopped after the test."""
    with WebhookProvider() as running:
        yield running


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> FreshVenv:
    """One plain venv per session with ``pip install . ./plugins/salesforce ./plugins/github`` (from PyPI).

    The sources are copied first: pip builds a local directory in place, and the
    build/ and *.egg-info it leaves must not land in the working tree.
    """
    root = tmp_path_factory.mktemp("fresh")
    sources = root / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "tests")
    shutil.copytree(REPO / "orchestrator", sources / "orchestrator", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, sources / name)
    for plugin in ("salesforce", "github"):
        shutil.copytree(REPO / "plugins" / plugin, sources / "plugins" / plugin, ignore=skip)
    venv = FreshVenv(root / "venv")
    made = run("-m", "venv", str(venv.path), command=(sys.executable,), timeout=INSTALL_TIMEOUT)
    assert made.code == 0, str(made)
    venv.pip("install", str(sources), str(sources / "plugins" / "salesforce"), str(sources / "plugins" / "github"))
    return venv
