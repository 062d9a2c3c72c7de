"""Figures the reliability tests measure: printed in pytest's summary, written as JSON when asked.

A test hands its figures to :func:`report` under a name; at the end of the run
they are printed (a ``reliability`` section of the terminal summary) and, when
``$ORCHESTRATOR_RELIABILITY_REPORT`` names a file, written there as one JSON
object ``{name: {figure: value}}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

ENV = "ORCHESTRATOR_RELIABILITY_REPORT"
"""The environment variable naming the JSON file to write."""
_REPORTS = pytest.StashKey[dict[str, dict[str, Any]]]()


def report(config: pytest.Config, name: str, figures: Mapping[str, Any]) -> None:
    """Keep ``figures`` (JSON values) under ``name`` for the summary and the JSON file; a later call replaces them."""
    config.stash.setdefault(_REPORTS, {})[name] = dict(figures)


def reports(config: pytest.Config) -> dict[str, dict[str, Any]]:
    """Every report so far, by name."""
    return dict(config.stash.get(_REPORTS, {}))


def write(config: pytest.Config) -> Path | None:
    """Write the reports to ``$ORCHESTRATOR_RELIABILITY_REPORT`` when it is set (and there are some); the path."""
    target = os.environ.get(ENV)
    found = reports(config)
    if not target or not found:
        return None
    path = Path(target)
    path.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    return path
