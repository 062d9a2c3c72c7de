"""Benchmark the orchestrator against baselines measured in the same run; report ratios.

Usage: ``python bench/run.py [--quick] [--only SECTION ...] [--output PATH] [--follower-rate N]
[--plots DIR | --no-plots]``. Prints Markdown tables on stdout (the figures, the ``cpu``
section's, issue 12's goals met or with their gap; progress goes to stderr), writes
every figure, round by round, to ``bench/results.json`` and draws the plots into
``bench/results/``. ``--quick`` (CI smoke) takes a few minutes, the default mode
about 13. Nothing listens beyond 127.0.0.1; every file lives in a temporary directory
removed at the end. Exit code 1 when a section failed or a call returned an error.
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
    console,
    cpu,
    credentials_rss,
    fold,
    followers,
    isolation,
    plots,
    postgres,
    rpc,
    startup,
)

SECTIONS = (
    "grpc",
    "cpu",
    "followers",
    "append",
    "replay",
    "startup",
    "peer",
    "isolation",
    "rss",
    "console",
    "postgres",
)
GOALS: tuple[tuple[str, str, float], ...] = (
    ("emit server CPU per call / echo's, exporters none", "<=", 2.0),
    ("emit server CPU per call / echo's, every span exported over OTLP", "<=", 3.0),
    ("emit calls/s / echo's, 64 in flight", ">=", 0.5),
    ("emit p99 / echo's, 64 in flight", "<=", 2.5),
    ("validate-connection, one trivial function: server CPU per call / echo's", "<=", 3.0),
    ("replay of 1,000,000 records: records/s / raw sqlite3 + json.loads scan's", ">=", 1.5),
    ("replay of 1,000,000 records: seconds", "<", 3.0),
    ("replay of 1,000,000 records: peak RSS, MB", "<=", 120.0),
    ("daemon RSS after 100,000 new connections / after 10,000", "<=", 1.1),
)
"""Issue 12's goals: what, how it compares, the bound."""


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
    if "peer" in results and "error" not in results["peer"]:
        rows.extend(_peer_rows(results))
    if "isolation" in results and "error" not in results["isolation"]:
        rows.extend(_isolation_rows(results["isolation"]))
    if "rss" in results and "error" not in results["rss"]:
        fig = results["rss"]
        first, last = fig["small"], fig["large"]
        rows.append(
            (
                "Daemon RSS, MiB, new connections with credentials",
                f"{_n(first['rss_kib'] / 1024, 1)} ({_n(first['connections'])} connections)",
                f"{_n(last['rss_kib'] / 1024, 1)} ({_n(last['connections'])} connections){_errors(fig)}",
                _n(fig["ratio"], 3),
            )
        )
    if "console" in results and "error" not in results["console"]:
        fig = results["console"]
        titles = ("Emit calls/s", "Emit latency p50 / p99 ms", f"{fig['in_flight']} in flight, web console")
        idle = (fig["idle"], "console idle")
        busy = (fig["open"], f"{fig['pollers']} pollers and a live tail")
        rows += _load_rows(titles, idle, busy, fig["ratio"])
    if "postgres" in results and "error" not in results["postgres"]:
        rows.extend(_postgres_rows(results["postgres"]))
    rows.extend(
        (f"{name}: FAILED", "", str(results[name]["error"]).splitlines()[0], "")
        for name in SECTIONS
        if name in results and "error" in results[name]
    )
    return rows


def _postgres_rows(fig: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Emits at 64 in flight on one SQLite daemon and on 1, 2, 3 daemons sharing a PostgreSQL log, to echo."""
    load = f"{fig['in_flight']} in flight"
    rows = _load_rows(
        ("Emit calls/s", "Emit latency p50 / p99 ms", f"{load}, SQLite"),
        (fig["echo"], "echo"),
        (fig["sqlite"], "1 daemon, SQLite"),
        fig["sqlite"]["ratio"],
    )
    for n in fig["daemons"]:
        ours = fig[f"postgres_{n}"]
        daemons = f"{n} daemon{'s' if n > 1 else ''}"
        rows += _load_rows(
            ("Emit calls/s", "Emit latency p50 / p99 ms", f"{load}, {daemons} on PostgreSQL"),
            (fig["echo"], "echo"),
            (ours, f"{daemons}, PostgreSQL; {_n(ours['ratio_to_sqlite']['rate'], 2)} of SQLite's"),
            ours["ratio"],
        )
    return rows


def _peer_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The peer's figures, each beside ours where ours ran (the same kind of baseline, the same run)."""
    fig = results["peer"]
    name = f"eventsourcing {fig['version']}"
    rows: list[tuple[str, str, str, str]] = []
    store = results.get("append", {})
    for appenders in fig["appenders"]:
        ours = store.get("ratio", {}).get(str(appenders)) if "error" not in store else None
        peer = fig["append"][f"peer_{appenders}"]
        rows.append(
            (
                f"Peer appends/s, {appenders} appender{'s' if appenders > 1 else ''}",
                f"{_n(fig['append']['baseline']['rate'])} (sqlite3, 1 commit per event)",
                f"{_n(peer['rate'])} ({name}; ours: {_n(ours, 2) if ours is not None else 'not run'}){_errors(peer)}",
                _n(fig["append"]["ratio"][str(appenders)], 2),
            )
        )
    replay = fig["replay"]
    same = [p for p in plots.replay_points(results.get("replay", {})) if p["records"] == replay["records"]]
    rows.append(
        (
            f"Peer replay records/s, {_n(replay['records'])} records",
            f"{_n(replay['baseline']['rate'])} (sqlite3 + json.loads)",
            f"{_n(replay['peer']['rate'])} ({name}; ours: {_n(same[0]['ratio'], 2) if same else 'not run'})",
            _n(replay["ratio"], 2),
        )
    )
    return rows


def _cpu_table(fig: dict[str, Any]) -> list[str]:
    """The ``cpu`` section's table: one row per RPC, each figure with its ratio to echo's."""
    lines = [
        f"| RPC, {fig['in_flight']} calls in flight | server CPU µs per call | / echo | calls/s | / echo"
        " | p50 / p99 ms | p99 / echo |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    echo = fig["echo"]
    lines.append(
        f"| echo (bare grpc.aio, the baseline) | {_n(echo['cpu_us'])} | 1 | {_n(echo['rate'])} | 1"
        f" | {_n(echo['p50_ms'], 1)} / {_n(echo['p99_ms'], 1)} | 1 |"
    )
    for row, label in fig["labels"].items():
        r = fig[row]
        lines.append(
            f"| {label}{_errors(r)} | {_n(r['cpu_us'])} | {_n(r['ratio']['cpu_us'], 2)} | {_n(r['rate'])}"
            f" | {_n(r['ratio']['rate'], 2)} | {_n(r['p50_ms'], 1)} / {_n(r['p99_ms'], 1)}"
            f" | {_n(r['ratio']['p99_ms'], 2)} |"
        )
    otlp = fig["otlp"]
    lines += [
        "",
        f"*The OTLP receiver got {_n(otlp['spans'])} spans ({_n(otlp['spans_per_call'], 2)} per emit) in"
        f" {_n(otlp['trace_requests'])} exports, and {_n(otlp['metric_requests'])} metric exports.*",
    ]
    return lines


def _replay_figure(results: dict[str, Any], records: int) -> dict[str, Any] | None:
    replay = results.get("replay")
    if not isinstance(replay, dict) or "error" in replay:
        return None
    return next((p for p in plots.replay_points(replay) if p["records"] == records), None)


def _goal_figures(results: dict[str, Any]) -> list[tuple[float | None, str]]:
    """Each goal's measured figure (None when this run did not measure it) and where it comes from."""
    cpu_fig = results.get("cpu") if "error" not in results.get("cpu", {"error": 1}) else None
    rss = results.get("rss") if "error" not in results.get("rss", {"error": 1}) else None

    def from_cpu(row: str, key: str) -> tuple[float | None, str]:
        return (cpu_fig[row]["ratio"][key], "cpu") if cpu_fig else (None, "cpu section not run")

    million = _replay_figure(results, 1_000_000)
    absent = (None, "replay of 1,000,000 records not run")
    rss_note = "rss section not run"
    if rss:
        rss_note = f"rss: {_n(rss['large']['connections'])} / {_n(rss['small']['connections'])} connections"
    return [
        from_cpu("create", "cpu_us"),
        from_cpu("create_otlp", "cpu_us"),
        from_cpu("create", "rate"),
        from_cpu("create", "p99_ms"),
        from_cpu("validate", "cpu_us"),
        (million["ratio"], "replay") if million else absent,
        (million["seconds"], "replay") if million and "seconds" in million else absent,
        (million["peak_rss_mb"], "replay") if million and "peak_rss_mb" in million else absent,
        (rss["ratio"] if rss else None, rss_note),
    ]


def _goals_table(results: dict[str, Any]) -> list[str]:
    """Issue 12's goals, each met or with its gap."""
    lines = ["| Goal | Bound | Measured | Met? |", "| --- | ---: | ---: | --- |"]
    for (goal, compare, bound), (value, source) in zip(GOALS, _goal_figures(results), strict=True):
        if value is None or math.isnan(value):
            lines.append(f"| {goal} | {compare} {bound:g} | n/a | not measured ({source}) |")
            continue
        met = {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[compare]
        gap = value / bound if compare != ">=" else bound / value
        digits = 2 if f"{value:.2f}" != f"{bound:.2f}" else 3  # 1.101 is not within 1.1, so do not print 1.10
        verdict = "met" if met else f"**gap**: {gap:.{digits}f} times the bound"
        where = f" ({source})" if source.startswith("rss") else ""  # --quick's curve is shorter than the goal's
        lines.append(f"| {goal} | {compare} {bound:g} | {value:,.{digits}f}{where} | {verdict} |")
    return lines


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
    ]
    rows = _rows(results)
    if rows:
        lines += ["", "| Figure | Baseline | Orchestrator | Ratio |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if "cpu" in results and "error" not in results["cpu"]:
        window = f"windows of {results['cpu'].get('window_s', 2.0):g} s"
        lines += ["", f"Server CPU per call (the `cpu` section, {window}):", "", *_cpu_table(results["cpu"])]
    lines += ["", "Issue 12's goals:", "", *_goals_table(results)]
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
    except (_harness.BenchError, RuntimeError, OSError, ImportError) as exc:
        _harness.log(f"{name}: FAILED: {exc}")
        results[name] = {"error": str(exc)}
    results[name]["elapsed_s"] = time.perf_counter() - started


def _peer(settings: _harness.Settings, workdir: Path, log_path: Path, records: int) -> dict[str, Any]:
    try:
        from bench import peer  # needs eventsourcing, of the `bench` extra
    except ImportError as exc:
        raise ImportError(f"the peer section needs eventsourcing: pip install -e '.[bench]' ({exc})") from exc
    return peer.measure(settings, workdir, log_path, records)


def _draw(results: dict[str, Any], directory: Path) -> None:
    try:
        drawn = list(plots.write(_plain(results), directory))
    except ImportError as exc:
        _harness.log(f"no plots: matplotlib is missing (pip install -e '.[bench]'): {exc}")
        return
    for name, path in drawn:
        _harness.log(f"plot {name}: {path if path else 'skipped, its section did not run'}")


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections; print the table; write the JSON; 0 unless something failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: one short round of everything (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these")
    parser.add_argument("--output", type=Path, help="where to write the JSON (default: bench/results.json)")
    parser.add_argument("--records", type=int, help="records in the replay/startup log (default 100,000)")
    parser.add_argument(
        "--follower-rate",
        type=float,
        default=followers.RATE,
        help=f"emits per second in the followers section (default {followers.RATE:g})",
    )
    drawing = parser.add_mutually_exclusive_group()
    drawing.add_argument(
        "--plots",
        type=Path,
        help="where to draw the PNG plots (default: bench/results/ when --output is not given, none otherwise)",
    )
    drawing.add_argument("--no-plots", action="store_true", help="draw no plot")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = Path(__file__).with_name("results.json")
        if args.plots is None:
            args.plots = plots.DEFAULT_DIR  # the full run's figures, beside its results.json
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
        if "cpu" in args.only:
            _section(results, "cpu", cpu.measure, settings, workdir)
        if "followers" in args.only:
            _section(results, "followers", followers.measure, settings, workdir, args.follower_rate)
        if "append" in args.only:
            _section(results, "append", append.measure, settings, workdir)
        if {"replay", "startup", "peer"} & set(args.only):
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
            if "peer" in args.only:
                _section(results, "peer", _peer, settings, workdir, large, built["records"])
        if "isolation" in args.only:
            _section(results, "isolation", isolation.measure, settings, workdir)
        if "console" in args.only:
            _section(results, "console", console.measure, settings, workdir)
        if "rss" in args.only:
            _section(results, "rss", credentials_rss.measure, settings, workdir)
        if "postgres" in args.only:
            _section(results, "postgres", postgres.measure, settings, workdir)
    results["elapsed_s"] = time.perf_counter() - started
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    table = _markdown(results)
    results["markdown"] = table
    args.output.write_text(json.dumps(_plain(results), indent=2) + "\n", encoding="utf-8")
    print(table)
    if args.plots is not None and not args.no_plots:
        _draw(results, args.plots)
    _harness.log(f"done in {results['elapsed_s']:.0f}s; figures in {args.output}")
    failed = any("error" in results.get(name, {}) for name in SECTIONS)
    errors = "errors**" in table
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
