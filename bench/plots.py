"""Plots of a benchmark run (matplotlib, Agg): PNG files for docs/performance.md.

``bench/run.py`` calls :func:`write` after a run (see its ``--plots``); on its
own, ``python bench/plots.py [bench/results.json] [--out bench/results]``
draws them again from a results file. Each plot is drawn only when its
section is in the results, and is skipped (with a line on stderr) otherwise:

- ``cpu.png``: the daemon's CPU per call for each RPC of the ``cpu`` section,
  next to the bare echo server's, with each ratio and the issue's goals;
- ``rss.png``: the daemon's RSS after every step of new connections (``rss``);
- ``replay.png``: records/s against the log's size, the replay and its raw
  ``sqlite3`` + ``json.loads`` baseline (``replay``; the peer's replay is in
  ``peer.png``, as a ratio to its own baseline run: absolute rates of two
  sections are not comparable on a shared machine);
- ``peer.png``: ours and ``eventsourcing``'s appends/s and replay records/s,
  each as a ratio to the same baseline (``append``, ``replay``, ``peer``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "bench" / "results"
_SHORT = {
    "echo": "echo\n(bare grpc.aio)",
    "create": "emit: create\nexporters none",
    "create_otlp": "emit: create\nOTLP export",
    "validate": "emit: validate\n1 function",
    "delete": "emit: delete",
    "reconnect": "emit: reconnect",
    "get": "GetConnection",
}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


_RSS_KEYS = {
    "peak_rss_mb": 1.0,
    "peak_rss_mib": 1.048576,
    "rss_mib": 1.048576,
    "peak_rss_kib": 1.024e-3,
    "peak_rss_bytes": 1e-6,
}
"""A replay figure's peak RSS, under any of these names, and the factor to MB (10**6 bytes)."""


def _peak_rss_mb(node: dict[str, Any]) -> float | None:
    for key, factor in _RSS_KEYS.items():
        if _number(node.get(key)):
            return float(node[key]) * factor
    return None


def replay_points(section: Any) -> list[dict[str, float]]:
    """Every replay figure found in the replay section: records, baseline and replay records/s, ratio.

    A figure is any mapping in the section with ``records``, ``ratio`` and a
    ``baseline`` with a ``rate``; the replay's rate is its ``replay`` entry's
    (else the first other entry with a ``rate``), with its ``seconds`` and
    its peak RSS (``peak_rss_mb``, ``_mib``, ``_kib`` or ``_bytes``, there or
    beside ``records``) when given. So a section with one log size and one
    with several (mappings per size) are both read.
    """
    points: list[dict[str, float]] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            base = node.get("baseline")
            if _number(node.get("records")) and _number(node.get("ratio")) and isinstance(base, dict):
                ours = node.get("replay")
                if not (isinstance(ours, dict) and _number(ours.get("rate"))):
                    ours = next(
                        (
                            v
                            for k, v in node.items()
                            if k != "baseline" and isinstance(v, dict) and _number(v.get("rate"))
                        ),
                        None,
                    )
                if ours is not None and _number(base.get("rate")):
                    point = {"records": node["records"], "baseline": base["rate"], "replay": ours["rate"]}
                    point["ratio"] = node["ratio"]
                    if _number(ours.get("seconds")):
                        point["seconds"] = ours["seconds"]
                    peak = _peak_rss_mb(ours) or _peak_rss_mb(node)
                    if peak is not None:
                        point["peak_rss_mb"] = peak
                    points.append(point)
                    return
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(section)
    return sorted(points, key=lambda p: p["records"])


def matplotlib_ticker() -> Any:
    """``matplotlib.ticker``, imported once matplotlib is (by :func:`write`)."""
    import matplotlib.ticker

    return matplotlib.ticker


def _usable(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    section = results.get(name)
    return section if isinstance(section, dict) and "error" not in section else None


def _cpu(results: dict[str, Any], plt: Any, path: Path) -> bool:
    fig_ = _usable(results, "cpu")
    if fig_ is None:
        return False
    rows = ["echo", *(row for row in fig_.get("labels", {}) if row in fig_)]
    values = [fig_[row]["cpu_us"] for row in rows]
    figure, axes = plt.subplots(figsize=(10, 5))
    colours = ["#999999" if row == "echo" else "#3b6ea5" for row in rows]
    bars = axes.bar([_SHORT.get(row, row) for row in rows], values, color=colours)
    for bar, row in zip(bars, rows, strict=True):
        label = "baseline" if row == "echo" else f"{fig_[row]['ratio']['cpu_us']:.1f}x"
        axes.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    echo = fig_["echo"]["cpu_us"]
    for times, style in ((2.0, "--"), (3.0, ":")):
        axes.axhline(echo * times, color="#c0392b", linestyle=style, linewidth=1, label=f"goal: {times:.1f}x echo")
    axes.set_ylabel("server CPU per call, µs (median of rounds)")
    axes.set_title(f"Server CPU per call, {fig_.get('in_flight', 64)} calls in flight")
    axes.legend(loc="upper left")
    axes.tick_params(axis="x", labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _rss(results: dict[str, Any], plt: Any, path: Path) -> bool:
    fig_ = _usable(results, "rss")
    if fig_ is None or not fig_.get("readings"):
        return False
    readings = fig_["readings"]
    x = [r["connections"] for r in readings]
    y = [r["rss_kib"] / 1024 for r in readings]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(x, y, marker="o", color="#3b6ea5", label="daemon RSS")
    axes.axhline(y[0] * 1.1, color="#c0392b", linestyle="--", linewidth=1, label="goal: 1.1x the first reading")
    axes.set_xlabel("new connections with credentials")
    axes.set_ylabel("RSS, MiB")
    if "at_start_rss_kib" in fig_:
        axes.plot(
            [0], [fig_["at_start_rss_kib"] / 1024], marker="x", linestyle="none", color="#999999", label="at start"
        )
    axes.set_ylim(bottom=0, top=max(*y, y[0] * 1.1) * 1.15)
    axes.set_title(f"Daemon RSS: last / first reading = {fig_['ratio']:.3f}")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _replay(results: dict[str, Any], plt: Any, path: Path) -> bool:
    section = _usable(results, "replay")
    points = replay_points(section) if section is not None else []
    if not points:
        return False
    x = [p["records"] for p in points]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(x, [p["baseline"] for p in points], marker="s", color="#999999", label="sqlite3 + json.loads (baseline)")
    axes.plot(x, [p["replay"] for p in points], marker="o", color="#3b6ea5", label="orchestrator replay")
    if len(x) > 1:
        axes.set_xscale("log")
    else:
        axes.set_xlim(0, x[0] * 2)
    axes.yaxis.set_major_formatter(matplotlib_ticker().FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axes.set_xlabel("records in the log")
    axes.set_ylabel("records/s")
    axes.set_ylim(bottom=0)
    axes.set_title("Replay throughput against the log's size")
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _peer(results: dict[str, Any], plt: Any, path: Path) -> bool:
    peer = _usable(results, "peer")
    if peer is None:
        return False
    labels, ours, theirs = [], [], []
    store = _usable(results, "append")
    for appenders in peer.get("appenders", ()):
        labels.append(f"appends/s\n{appenders} appender{'s' if appenders > 1 else ''}")
        ours.append(store["ratio"].get(str(appenders), math.nan) if store else math.nan)
        theirs.append(peer["append"]["ratio"][str(appenders)])
    labels.append(f"replay records/s\n{peer['replay']['records']:,} records")
    replay = _usable(results, "replay")
    same = [p for p in (replay_points(replay) if replay else []) if p["records"] == peer["replay"]["records"]]
    ours.append(same[0]["ratio"] if same else math.nan)
    theirs.append(peer["replay"]["ratio"])
    figure, axes = plt.subplots(figsize=(8, 4.5))
    positions = range(len(labels))
    width = 0.38
    axes.bar([p - width / 2 for p in positions], ours, width, color="#3b6ea5", label="orchestrator")
    axes.bar(
        [p + width / 2 for p in positions], theirs, width, color="#e67e22", label=f"eventsourcing {peer['version']}"
    )
    for p, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for offset, value in ((-width / 2, a), (width / 2, b)):
            text = "not run" if math.isnan(value) else f"{value:.2f}"
            axes.annotate(text, (p + offset, 0 if math.isnan(value) else value), ha="center", va="bottom", fontsize=8)
    axes.axhline(1.0, color="#999999", linewidth=1)
    axes.set_xticks(list(positions), labels)
    axes.set_ylabel("ratio to the same raw sqlite3 baseline")
    axes.set_title("Ours and a peer's, each to the same baseline (1.0 = the raw sqlite3 floor)")
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


PLOTS: dict[str, Callable[[dict[str, Any], Any, Path], bool]] = {
    "cpu.png": _cpu,
    "rss.png": _rss,
    "replay.png": _replay,
    "peer.png": _peer,
}


def write(results: dict[str, Any], directory: Path) -> Iterator[tuple[str, Path | None]]:
    """Draw each plot whose section is in ``results`` into ``directory``; yields (name, path or None if skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    for name, draw in PLOTS.items():
        path = directory / name
        yield name, path if draw(results, plt, path) else None


def main(argv: list[str] | None = None) -> int:
    """Draw the plots of a results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="where to write the PNG files")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {args.results}: {exc}")
    for name, path in write(results, args.out):
        print(f"{name}: {path if path else 'skipped (its section is not in the results)'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
