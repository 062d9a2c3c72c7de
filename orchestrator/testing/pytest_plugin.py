"""The pytest plugin of :mod:`orchestrator.testing` (entry point ``pytest11``): the ``run_function`` fixture.

    def test_registers_a_webhook(run_function):
        result = run_function(register_webhook, provider={"POST /webhooks": (201, {"id": "wh1"})})
        assert result.ok, result

When a test that used it fails, its report gets a section with each run: the
outcome, the requests, the log lines and the metadata before and after. Only
pytest is imported here until a test asks for the fixture.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from orchestrator.testing import Runner

_RUNNER = pytest.StashKey["Runner"]()


@pytest.fixture
def run_function(request: pytest.FixtureRequest) -> Runner:
    """Runs an event function as the daemon would, against a stand-in provider (see :mod:`orchestrator.testing`)."""
    from orchestrator.testing import Runner

    runner = Runner()
    request.node.stash[_RUNNER] = runner
    return runner


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A failing test's report shows what each of its function runs did."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    runner = item.stash.get(_RUNNER, None)
    if report.when == "call" and report.failed and runner is not None and runner.results:
        report.sections.append(("orchestrator: function runs", "\n\n".join(map(str, runner.results))))
