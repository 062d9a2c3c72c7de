"""The reliability tests' long mode, their time limits and their report.

``--long`` (registered in tests/conftest.py, so that ``pytest --long`` works
from the repository's root) selects the long mode of every test here: read
it with the :func:`long_mode` fixture or ``request.config.getoption("--long")``.
In the long mode a test here may run for up to :data:`LONG_TIMEOUT` seconds.

Figures a test hands to :func:`tests.reliability._report.report` are printed
at the end of the run and written to ``$ORCHESTRATOR_RELIABILITY_REPORT``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ._report import reports, write

HERE = Path(__file__).resolve().parent
LONG_TIMEOUT = 3600.0
"""Seconds a reliability test may take with ``--long`` (instead of its own limit)."""


@pytest.fixture(scope="session")
def long_mode(pytestconfig: pytest.Config) -> bool:
    """Whether ``--long`` was given."""
    return bool(pytestconfig.getoption("--long"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With ``--long``, the tests of this folder get :data:`LONG_TIMEOUT` seconds (ahead of their own limit)."""
    if not config.getoption("--long"):
        return
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT), append=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print every reliability report, one line per test, and where the JSON went."""
    found = reports(config)
    if not found:
        return
    terminalreporter.section("reliability")
    for name, figures in found.items():
        terminalreporter.write_line(f"{name}: " + ", ".join(f"{key}={value}" for key, value in figures.items()))
    path = write(config)
    if path is not None:
        terminalreporter.write_line(f"written to {path}")
