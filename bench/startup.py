"""Startup: process start to the daemon's ``serving`` log line, on an empty log vs a large one.

``orchestrator serve --listen 127.0.0.1:0`` is started as a user starts it;
the figure is the time from just before the process is created to the moment
its ``serving orchestrator.v1.Orchestrator on 127.0.0.1:PORT`` line is read
(interpreter start and imports included, the same in both). The daemon keeps
its read model up to date on every append and does not replay the log (its
one pass over the file is a bounded ``quick_check``, 0.07 s for 100,000
records from the page cache), so the ratio should be about 1. Both logs already exist
and are migrated, so that only their size differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench._harness import Server, Settings, log, median, ratio, serve_command


def _start(database: Path) -> tuple[float, int | None]:
    argv = serve_command(f"sqlite://{database}", grace_period=0)
    with Server(argv, name="orchestrator serve") as daemon:
        ready_after = daemon.ready_after
        code = daemon.stop()
    return ready_after, code


def measure(settings: Settings, empty: Path, large: Path, records: int) -> dict[str, Any]:
    """The startup figures: median seconds to SERVING on each log, and large/empty."""
    runs: dict[str, list[float]] = {"empty": [], "large": []}
    codes: list[int | None] = []
    _start(empty)  # untimed: warms the file cache for the interpreter and packages
    for round_ in range(settings.startup_rounds):
        for name in ("empty", "large") if round_ % 2 == 0 else ("large", "empty"):
            seconds, code = _start(empty if name == "empty" else large)
            codes.append(code)
            log(f"startup {name:5} round {round_ + 1}: {seconds:.3f}s to serving (exit code {code})")
            runs[name].append(seconds)
    return {
        "empty": {"seconds": median(runs["empty"]), "rounds": runs["empty"]},
        "large": {"seconds": median(runs["large"]), "records": records, "rounds": runs["large"]},
        "ratio": median([ratio(a, b) for a, b in zip(runs["large"], runs["empty"], strict=True)]),
        "exit_codes": sorted({c for c in codes if c is not None}),
    }
