"""The dispatch settings' checks, and how many worker processes process isolation runs."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.config import DispatchConfig
from orchestrator.errors import InvalidArgument


@pytest.mark.parametrize(
    ("settings", "workers"),
    [
        ({}, 0),
        ({"processes": 8}, 0),
        ({"isolation": "process"}, 4),
        ({"isolation": "process", "processes": 8, "concurrency": 2}, 2),
        ({"isolation": "process", "processes": 1}, 1),
    ],
)
def test_worker_processes_run_only_with_process_isolation_and_never_above_the_concurrency(
    settings: dict[str, Any], workers: int
) -> None:
    """``pool_size``: none with thread isolation (the default), else ``processes`` capped at ``concurrency``."""
    assert DispatchConfig(**settings).pool_size == workers


@pytest.mark.parametrize(("settings", "says"), [({"isolation": "fork"}, "isolation 'fork'"), ({"processes": 0}, "0")])
def test_a_bad_isolation_setting_is_refused(settings: dict[str, Any], says: str) -> None:
    """An isolation that does not exist, or no worker process at all, is an InvalidArgument naming it."""
    with pytest.raises(InvalidArgument, match=says):
        DispatchConfig(**settings)
