"""Benchmark the orchestrator against baselines measured in the same run; report ratios.

Usage: ``python bench/run.py [--quick] [--only SECTION ...] [--output PATH] [--follower-rate N]``.
Prints a Markdown table on stdout (progress goes to stderr) and writes every
figure, round by round, to ``bench/results.json``. ``--quick`` (CI smoke)
takes well under a minute, the default mode a few minutes. Nothing listens
beyond 127.0.0.1; every file lives in a temporary directory removed at the end.
Exit code 1 when a section failed or a call returned an error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if not __package__:
    # Run as `python bench/run.py`: import `bench` as a package from the repository
    # root (and keep bench/ itself off the path, so its modules shadow nothing).
    sys.path[0] = str(ROOT)

from bench import (  # noqa: E402 - needs the path set just above
    _harness,
    append,
    fold,
    followers,
    isolation,
    rpc,
    startup,
)

SECTIONS = ("grpc", "followers", "append", "replay", "startup", "isolation")


def _machine() -> dict[str, Any]:
    import grpc

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "uvloop": _harness.uvloop_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_average_at_start": list(os.getloadavg()),
    }


def _revision() -> dict[str, Any]:
    """The commit measured, and whether tracked files differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _n(value: float, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _errors(*figures: dict[str, Any]) -> str:
    count = sum(f.get("errors", 0) for f in figures)
    return f" **{count} errors**" if count else ""


def _load_rows(
    titles: tuple[str, str, str],
    baseline: tuple[dict[str, Any], str],
    subject: tuple[dict[str, Any], str],
    r: dict[str, float],
) -> list[tuple[str, str, str, str]]:
    """A closed-loop figure's two rows, rate and latency: ``titles`` are theirs and the load's (``1 in flight``)."""
    (rate, latency, load), (base, base_name), (ours, our_name) = titles, baseline, subject
    return [
        (
            f"{rate}, {load}",
            f"{_n(base['rate'])} ({base_name})",
            f"{_n(ours['rate'])} ({our_name}){_errors(base, ours)}",
            _n(r["rate"], 2),
        ),
        (
            f"{latency}, {load}",
            f"{_n(base['p50_ms'], 2)} / {_n(base['p99_ms'], 2)}",
            f"{_n(ours['p50_ms'], 2)} / {_n(ours['p99_ms'], 2)}",
            f"{_n(r['p50_ms'], 2)} / {_n(r['p99_ms'], 2)}",
        ),
    ]


def _rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    if "grpc" in results and "error" not in results["grpc"]:
        for in_flight in rpc.CONCURRENCY:
            fig = results["grpc"][str(in_flight)]
            titles = ("gRPC calls/s", "gRPC latency p50 / p99 ms", f"{in_flight} in flight")
            rows += _load_rows(titles, (fig["echo"], "echo"), (fig["emit"], "EmitLifecycleEvent"), fig["ratio"])
    if "followers" in results and "error" not in results["followers"]:
        fig = results["followers"]
        none, some, r = fig["none"], fig["followers"], fig["ratio"]
        rows.append(
            (
                f"Emit latency p50 / p99 ms, {_n(fig['rate'])} emits/s, {fig['followers_count']} followers",
                f"{_n(none['p50_ms'], 2)} / {_n(none['p99_ms'], 2)} (no follower)",
                f"{_n(some['p50_ms'], 2)} / {_n(some['p99_ms'], 2)} (followers; every record at every follower"
                f" in {_n(some['lag_p50_ms'], 1)} / {_n(some['lag_p99_ms'], 1)} ms){_errors(none, some)}",
                f"{_n(r['p50_ms'], 2)} / {_n(r['p99_ms'], 2)}",
            )
        )
    if "append" in results and "error" not in results["append"]:
        fig = results["append"]
        base = fig["baseline"]
        for appenders in append.APPENDERS:
            store = fig[f"store_{appenders}"]
            rows.append(
                (
                    f"Store appends/s, {appenders} appender{'s' if appenders > 1 else ''}",
                    f"{_n(base['rate'])} (sqlite3, 1 commit per event)",
                    f"{_n(store['rate'])} (SQLiteEventStore.append){_errors(store)}",
                    _n(fig["ratio"][str(appenders)], 2),
                )
            )
    if "replay" in results and "error" not in results["replay"]:
        rows += fold.rows(results["replay"], _n)
    if "startup" in results and "error" not in results["startup"]:
        fig = results["startup"]
        rows.append(
            (
                "Startup to serving, s",
                f"{_n(fig['empty']['seconds'], 3)} (empty log)",
                f"{_n(fig['large']['seconds'], 3)} ({_n(fig['large']['records'])} records)",
                _n(fig["ratio"], 2),
            )
        )
    if "isolation" in results and "error" not in results["isolation"]:
        rows.extend(_isolation_rows(results["isolation"]))
    rows.extend(
        (f"{name}: FAILED", "", str(results[name]["error"]).splitlines()[0], "")
        for name in SECTIONS
        if name in results and "error" in results[name]
    )
    return rows


def _isolation_rows(fig: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    for function, label in isolation.FUNCTIONS.items():
        for in_flight in isolation.IN_FLIGHT:
            run = fig[function][str(in_flight)]
            titles = ("Attempts/s", "Attempt latency p50 / p99 ms", f"{label}, {in_flight} in flight")
            process = (run["process"], f"process, {fig['pool']} workers")
            rows += _load_rows(titles, (run["thread"], "thread"), process, run["ratio"])
    started, rss = fig["seconds"], fig["rss_mib"]
    rows.append(
        (
            "Worker process start to ready, s",
            f"{_n(started['bare'], 3)} (python -c)",
            f"{_n(started['worker'], 3)} (worker, plugins imported)",
            _n(started["ratio"], 2),
        )
    )
    rows.append(
        (
            "Worker process memory, MiB RSS",
            f"{_n(rss['bare'], 1)} (python -c)",
            f"{_n(rss['worker'], 1)} (worker, plugins imported)",
            _n(rss["ratio"], 2),
        )
    )
    return rows


def _markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["settings"]
    load = "/".join(f"{x:.1f}" for x in m["load_average_at_start"])
    rev = results["revision"]
    commit = f"commit {rev['commit']}" if rev["commit"] else "no commit"
    if rev["dirty"]:
        commit += " + uncommitted changes"
    lines = [
        f"*{results['mode']} mode, {commit}, {m['cpus']} CPUs, Python {m['python']}, grpcio {m['grpcio']},"
        f" uvloop {m['uvloop'] or 'absent'}, SQLite {m['sqlite']}, load average {load} at start;"
        f" medians of {s['rounds']} round(s) of {s['duration_s']:g} s (startup: {s['startup_rounds']} starts"
        " each); ratio = median over rounds of orchestrator / baseline, the two run back to back.*",
        "",
        "| Figure | Baseline | Orchestrator | Ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _rows(results)]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """JSON has no NaN: unknown figures are written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _section(results: dict[str, Any], name: str, fn: Any, *args: Any) -> None:
    started = time.perf_counter()
    _harness.log(f"{name}: starting")
    try:
        results[name] = fn(*args)
    except (_harness.BenchError, RuntimeError, OSError) as exc:
        _harness.log(f"{name}: FAILED: {exc}")
        results[name] = {"error": str(exc)}
    results[name]["elapsed_s"] = time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections; print the table; write the JSON; 0 unless something failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: one short round of everything (< 1 min)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).with_name("results.json"), help="where to write the JSON"
    )
    parser.add_argument("--records", type=int, help="records in the replay/startup log (default 100,000)")
    parser.add_argument(
        "--follower-rate",
        type=float,
        default=followers.RATE,
        help=f"emits per second in the followers section (default {followers.RATE:g})",
    )
    args = parser.parse_args(argv)
    settings = _harness.QUICK if args.quick else _harness.FULL
    if args.records:
        settings = _harness.Settings(**{**asdict(settings), "log_records": args.records})
    started = time.perf_counter()
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "revision": _revision(),
        "machine": _machine(),
        "settings": asdict(settings),
    }
    with tempfile.TemporaryDirectory(prefix="orchestrator-bench-") as tmp:
        workdir = Path(tmp)
        if "grpc" in args.only:
            _section(results, "grpc", rpc.measure, settings, workdir)
        if "followers" in args.only:
            _section(results, "followers", followers.measure, settings, workdir, args.follower_rate)
        if "append" in args.only:
            _section(results, "append", append.measure, settings, workdir)
        if {"replay", "startup"} & set(args.only):
            large, empty = workdir / "large.db", workdir / "empty.db"
            _harness.log(f"writing a log of {settings.log_records:,} records with the orchestrator's store")
            built = _harness.in_child(fold.build_log, str(large), settings.log_records, timeout=600)
            _harness.log(f"log written: {built['records']:,} records in {built['seconds']:.1f}s")
            results["log"] = built
            if "replay" in args.only:
                _section(results, "replay", fold.measure, settings, workdir, {built["records"]: large})
            if "startup" in args.only:
                _harness.in_child(fold.create_empty, str(empty), timeout=60)
                _section(results, "startup", startup.measure, settings, empty, large, built["records"])
        if "isolation" in args.only:
            _section(results, "isolation", isolation.measure, settings, workdir)
    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    table = _markdown(results)
    results["markdown"] = table
    args.output.write_text(json.dumps(_plain(results), indent=2) + "\n", encoding="utf-8")
    print(table)
    _harness.log(f"done in {results['elapsed_s']:.0f}s; figures in {args.output}")
    failed = any("error" in results.get(name, {}) for name in SECTIONS)
    errors = "errors**" in table
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
