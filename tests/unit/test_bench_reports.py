"""The benchmark's reporting: goals met or with their gap, replay figures found, profiles parsed, windows closed."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from bench import _harness, plots, profile, run


def _cpu(**ratios: float) -> dict[str, Any]:
    """A ``cpu`` section whose rows have these CPU ratios (and calls/s 0.6, p99 2.0 for ``create``)."""
    section: dict[str, Any] = {"labels": {row: row for row in ratios}}
    for row, value in ratios.items():
        section[row] = {"ratio": {"cpu_us": value, "rate": 0.6, "p99_ms": 2.0}}
    return section


def test_goals_table_says_met_or_the_gap() -> None:
    """A figure within its bound is met; one beyond it shows how many times the bound it is; absent, not measured."""
    results = {
        "cpu": _cpu(create=3.0, create_otlp=2.5, validate=6.0),
        "rss": {"ratio": 1.02, "small": {"connections": 10_000}, "large": {"connections": 100_000}},
    }
    lines = run._goals_table(results)
    by_goal = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert "**gap**: 1.50 times the bound" in by_goal["emit server CPU per call / echo's, exporters none"]
    assert by_goal["emit server CPU per call / echo's, every span exported over OTLP"].endswith("| met |")
    assert by_goal["emit calls/s / echo's, 64 in flight"].endswith("| met |")  # 0.6 >= 0.5
    assert by_goal["emit p99 / echo's, 64 in flight"].endswith("| met |")  # 2.0 <= 2.5
    assert (
        "**gap**: 2.00 times the bound"
        in by_goal["validate-connection, one trivial function: server CPU per call / echo's"]
    )
    assert (
        "1.02 (rss: 100,000 / 10,000 connections) | met"
        in by_goal["daemon RSS after 100,000 new connections / after 10,000"]
    )
    replay = [line for goal, line in by_goal.items() if goal.startswith("replay of 1,000,000")]
    assert len(replay) == 3
    assert all("not measured" in line for line in replay)


def test_goals_table_does_not_round_a_miss_into_the_bound() -> None:
    """A figure just beyond its bound is printed with the digit that shows it (1.101 against 1.1), and is a gap."""
    results = {"rss": {"ratio": 1.101, "small": {"connections": 500}, "large": {"connections": 5_000}}}
    [line] = [line for line in run._goals_table(results) if line.startswith("| daemon RSS")]
    assert line.endswith("| 1.101 (rss: 5,000 / 500 connections) | **gap**: 1.001 times the bound |")


def test_goals_table_reads_a_million_record_replay() -> None:
    """The replay goals take the figure at 1,000,000 records: its ratio, seconds and peak RSS (KiB read as MB)."""
    replay = {
        "sizes": {
            "100000": {"records": 100_000, "ratio": 1.1, "baseline": {"rate": 1.0}, "replay": {"rate": 1.1}},
            "1000000": {
                "records": 1_000_000,
                "ratio": 1.6,
                "baseline": {"rate": 300_000.0, "seconds": 3.3},
                "replay": {"rate": 480_000.0, "seconds": 2.1, "peak_rss_kib": 150_000},
            },
        }
    }
    lines = run._goals_table({"replay": replay})
    million = [line for line in lines if line.startswith("| replay of 1,000,000")]
    assert [line.rsplit(" | ", 2)[1:] for line in million] == [
        ["1.60", "met |"],
        ["2.10", "met |"],
        ["153.60", "**gap**: 1.28 times the bound |"],
    ]


def test_replay_points_reads_one_size_or_several() -> None:
    """The replay section's figures are found whether it measured one log or several, sorted by size."""
    one = {"records": 30_000, "ratio": 0.25, "baseline": {"rate": 200.0}, "replay": {"rate": 50.0, "seconds": 0.6}}
    assert plots.replay_points(one) == [
        {"records": 30_000, "baseline": 200.0, "replay": 50.0, "ratio": 0.25, "seconds": 0.6}
    ]
    several = {
        "runs": [
            {"records": 1_000_000, "ratio": 1.5, "baseline": {"rate": 2.0}, "fast": {"rate": 3.0}},
            {"records": 10_000, "ratio": 1.0, "baseline": {"rate": 1.0}, "fast": {"rate": 1.0}, "peak_rss_mib": 100},
        ]
    }
    points = plots.replay_points(several)
    assert [p["records"] for p in points] == [10_000, 1_000_000]
    assert points[0]["peak_rss_mb"] == pytest.approx(104.8576)
    assert plots.replay_points({"error": "it failed"}) == []


def test_profile_parse_splits_threads_and_areas() -> None:
    """Collapsed stacks are counted per thread, by the area of the running frame and by function."""
    raw = "\n".join(
        [
            "thread (11): MainThread;run (asyncio/runners.py:86);emit (orchestrator/service.py:181);"
            "info (logging/__init__.py:1479) 3",
            "thread (11): MainThread;run (asyncio/runners.py:86) 5",
            "thread (12): AnyIO worker thread;_commit (orchestrator/store/_sqlite_writer.py:380) 2",
            "not a stack line",
        ]
    )
    root, threads = profile.parse(raw)
    assert root.samples == 10
    main = threads["thread (11): MainThread"]
    assert (main.tid, main.samples) == (11, 8)
    assert main.areas == {"logging": 3, "the event loop's native code (uvloop, gRPC's Cython)": 5}
    assert main.inclusive["emit (orchestrator/service.py:181)"] == 3
    assert threads["thread (12): AnyIO worker thread"].areas == {"SQLite and the store": 2}


def test_profile_short_keeps_the_path_from_the_package_on() -> None:
    """Full file names lose the interpreter's and the repository's prefix, so areas match on package paths."""
    frame = "export (/x/.venv/lib/python3.11/site-packages/opentelemetry/exporter/otlp/proto/grpc/exporter.py:408)"
    assert profile.short(frame) == "export (opentelemetry/exporter/otlp/proto/grpc/exporter.py:408)"
    assert profile.area(profile.short(frame)) == "OpenTelemetry"
    assert profile.short(f"emit ({profile.ROOT}/orchestrator/service.py:181)") == "emit (orchestrator/service.py:181)"


def test_closed_loop_ends_its_window_when_the_work_runs_out() -> None:
    """A call raising Exhausted closes the window there, without an error; the meter is read at open and close."""
    readings = itertools.count(10.0, 2.5)
    done = 0

    async def call(worker: int, n: int) -> None:
        nonlocal done
        if done == 7:
            raise _harness.Exhausted
        done += 1
        await asyncio.sleep(0)

    result = asyncio.run(
        _harness.closed_loop(
            call, in_flight=1, warmup_s=0.0, duration_s=60.0, max_ops=1000, meter=lambda: next(readings)
        )
    )
    assert result["errors"] == 0
    assert result["completed"] == 7
    assert 0 < result["ops"] <= 7
    assert result["metered"] == 2.5
