"""Profile the daemon under the benchmark's load (py-spy), or ``orchestrator replay``, and summarise where CPU goes.

    .venv/bin/python bench/profile.py emit --seconds 10          # the daemon answering new-connection emits
    .venv/bin/python bench/profile.py validate                   # ... validate-connection, one trivial function
    .venv/bin/python bench/profile.py create_otlp                # ... emits, every span exported over OTLP
    .venv/bin/python bench/profile.py replay --records 100000    # orchestrator replay of a log of that size

For a daemon target (``emit`` is ``create``; the others are the rows of the
``cpu`` section: ``create``, ``create_otlp``, ``validate``, ``delete``,
``reconnect``, ``get``, and ``echo``, the bare grpc.aio server) it starts the
servers as ``bench/run.py --only cpu`` does, drives them with the same client
(64 calls in flight), and after a one-second warm-up attaches ``py-spy
record`` to the server for ``--seconds``. For ``replay`` it writes a log
with the replay section's lives and records ``orchestrator replay`` reading
it from start to end.

It writes to ``--output`` (default ``bench/results/``):

- ``profile-TARGET.svg``: a flame graph of the samples (one tower per thread;
  hover a frame for its samples and share), drawn here from py-spy's
  collapsed stacks, coloured by area (gRPC, OpenTelemetry, logging, SQLite
  and the store, JSON, asyncio/anyio/threads, the fold, the rest of the
  orchestrator);
- ``profile-TARGET.txt``: the summary printed at the end: each thread's CPU
  over the window from ``/proc/PID/task/*/stat`` (threads without Python
  frames, gRPC's C core among them, are seen only there), the calls answered
  and the CPU per call, then the Python samples' self time by area and the
  functions with the most inclusive and self time.

py-spy samples 100 times a second (``--rate``) and pauses the process for
each sample, which slows it a little; idle threads are left out. It needs
ptrace on the target (root, or ``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if not __package__:
    sys.path[0] = str(ROOT)  # run as `python bench/profile.py`: import `bench` from the root

from bench import cpu, fold  # noqa: E402 - needs the path set just above
from bench._harness import BenchError, Server, in_child, log, orchestrator_command  # noqa: E402

TARGETS = ("emit", *cpu.ROWS, "echo", "replay")
AREAS = (
    ("the event loop's native code (uvloop, gRPC's Cython)", ("asyncio/runners.py",)),
    ("thread hand-offs (locks, queues, conditions)", ("threading.py", "queue.py", "concurrent/")),
    ("OpenTelemetry", ("opentelemetry/",)),
    ("gRPC", ("grpc/", "grpc_", "_cython/", "cygrpc")),
    ("logging", ("logging/", "orchestrator/logs.py")),
    ("SQLite and the store", ("sqlite3/", "aiosqlite/", "orchestrator/store/")),
    ("JSON", ("json/", "orjson", "msgspec", "orchestrator/codec.py")),
    ("protobuf", ("google/protobuf/",)),
    ("rich (the CLI's tables)", ("rich/",)),
    ("click (the CLI)", ("click/",)),
    ("the fold and records", ("orchestrator/state.py", "orchestrator/records.py", "orchestrator/model.py")),
    ("asyncio, anyio", ("asyncio/", "anyio/", "selectors.py")),
    ("the orchestrator, other", ("orchestrator/",)),
)
_COLOURS = {
    "the event loop's native code (uvloop, gRPC's Cython)": "#9fc5e8",
    "thread hand-offs (locks, queues, conditions)": "#b4a7d6",
    "gRPC": "#e8a33d",
    "OpenTelemetry": "#b07cc6",
    "logging": "#e06666",
    "SQLite and the store": "#6aa84f",
    "JSON": "#f1c232",
    "protobuf": "#c27ba0",
    "rich (the CLI's tables)": "#93c47d",
    "click (the CLI)": "#d5a6bd",
    "the fold and records": "#45818e",
    "asyncio, anyio": "#a4c2f4",
    "the orchestrator, other": "#6fa8dc",
    "other": "#cccccc",
}


_PREFIXES = re.compile(r"\((?:.*/site-packages/|.*/lib/python3\.\d+/|" + re.escape(f"{ROOT}/") + ")")


def short(frame: str) -> str:
    """A frame of ``py-spy --full-filenames`` with its path from the package on (``opentelemetry/sdk/...``)."""
    return _PREFIXES.sub("(", frame, count=1)


def area(frame: str) -> str:
    """The area a py-spy frame (``function (package/file.py:line)``) belongs to."""
    where = frame.rpartition("(")[2]
    for name, markers in AREAS:
        if any(marker in where for marker in markers):
            return name
    return "other"


@dataclass
class Node:
    """A frame in the flame graph: its samples and its callees."""

    name: str
    samples: int = 0
    children: dict[str, Node] = field(default_factory=dict)


@dataclass
class Thread:
    """One thread's samples: per area of the running frame, by running frame (self) and by frame on the stack."""

    label: str
    tid: int | None
    samples: int = 0
    areas: Counter[str] = field(default_factory=Counter)
    own: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)


def parse(raw: str) -> tuple[Node, dict[str, Thread]]:
    """py-spy's collapsed stacks (``--threads``): the tree, and each thread's samples."""
    root = Node("all")
    threads: dict[str, Thread] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [short(frame) for frame in stack.split(";")]
        label = frames[0]
        if label not in threads:
            tid = label.partition("(")[2].partition(")")[0]
            threads[label] = Thread(label, int(tid) if tid.isdigit() else None)
        thread = threads[label]
        thread.samples += samples
        thread.areas[area(frames[-1])] += samples
        thread.own[frames[-1]] += samples
        for frame in set(frames[1:]):
            thread.inclusive[frame] += samples
        node = root
        node.samples += samples
        for frame in frames:
            node = node.children.setdefault(frame, Node(frame))
            node.samples += samples
    return root, threads


def flamegraph(root: Node, title: str, path: Path, width: int = 1400) -> None:
    """A static SVG flame graph of ``root`` (frames narrower than a pixel are left out; hover shows counts)."""
    row = 17
    rects: list[str] = []
    depth_max = [0]

    def draw(node: Node, x: float, depth: int) -> None:
        w = node.samples / root.samples * width
        if w < 1:
            return
        depth_max[0] = max(depth_max[0], depth)
        y = depth
        share = node.samples / root.samples * 100
        colour = _COLOURS.get(area(node.name) if depth > 1 else "other", "#cccccc")
        if depth == 0:
            colour = "#dddddd"
        label = node.name if w > 7 * len(node.name) else node.name[: max(0, int(w / 7) - 2)] + ".." if w > 30 else ""
        tip = html.escape(f"{node.name}: {node.samples} samples, {share:.1f}%")
        rects.append(
            f'<g><title>{tip}</title><rect x="{x:.1f}" y="{{Y{y}}}" width="{w:.1f}" height="{row - 1}"'
            f' fill="{colour}" rx="2"/><text x="{x + 3:.1f}" y="{{T{y}}}">{html.escape(label)}</text></g>'
        )
        offset = x
        for child in sorted(node.children.values(), key=lambda c: c.name):
            draw(child, offset, depth + 1)
            offset += child.samples / root.samples * width

    draw(root, 0.0, 0)
    entries, x, y = [], 10, 0
    for name, colour in _COLOURS.items():
        advance = 24 + 7 * len(name)
        if x + advance > width:
            x, y = 10, y + row
        entries.append((x, y, name, colour))
        x += advance
    legend_height = y + row + 10
    height = (depth_max[0] + 1) * row + 40 + legend_height
    body = "\n".join(rects)
    for depth in range(depth_max[0] + 1):
        top = height - legend_height - 10 - (depth + 1) * row  # the root at the bottom, callees above
        body = body.replace(f"{{Y{depth}}}", str(top)).replace(f"{{T{depth}}}", str(top + row - 5))
    base = height - legend_height
    legend = "\n".join(
        f'<rect x="{x}" y="{base + y}" width="12" height="12" fill="{c}"/>'
        f'<text x="{x + 16}" y="{base + y + 10}">{html.escape(n)}</text>'
        for x, y, n, c in entries
    )
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 20}" height="{height}"'
        f' font-family="monospace" font-size="11">\n<text x="10" y="16" font-size="14">{html.escape(title)}</text>\n'
        f"{body}\n{legend}\n</svg>\n",
        encoding="utf-8",
    )


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of ``pid``: its name (``comm``) and CPU seconds so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rpartition(")")[2].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise BenchError("py-spy is not installed: .venv/bin/pip install -e '.[bench]'")
    return found


def _record(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise BenchError(
            f"py-spy failed ({done.returncode}): {done.stderr.strip()[-500:]}"
            " (it needs ptrace on the process: root, or kernel.yama.ptrace_scope 0)"
        )


def profile_daemon(target: str, seconds: float, spy: list[str], workdir: Path, raw: Path) -> dict[str, Any]:
    """Load the server of ``target`` and record it; the figures of the window."""
    row = "create" if target == "emit" else target
    site = cpu.install(workdir)
    stack: list[Server] = []
    try:
        if row == "echo":
            server = Server(cpu.ECHO_ARGV, name="echo server").__enter__()
            stack.append(server)
        elif row == "create_otlp":
            receiver = Server(cpu.RECEIVER_ARGV, name="OTLP receiver").__enter__()
            stack.append(receiver)
            env = cpu.otlp_env(receiver.address)
            server = Server(cpu.daemon_argv(workdir / "events.db"), name="orchestrator serve", env=env).__enter__()
            stack.append(server)
        else:
            env = cpu.plain_env(site)
            server = Server(cpu.daemon_argv(workdir / "events.db"), name="orchestrator serve", env=env).__enter__()
            stack.append(server)
        pool, spare, run = 4096, 0, "profile"
        if row in ("reconnect", "get"):
            in_child(cpu.prepare, server.address, [f"pool-{i}" for i in range(pool)], timeout=600)
        if row == "delete":
            spare = math.ceil(3000 * (seconds + 3))  # deletions the window may make, made before it
            log(f"profile: creating {spare:,} connections to delete")
            in_child(cpu.prepare, server.address, cpu.victim_ids(run, spare), timeout=900)
        warmup = 1.0
        result: dict[str, Any] = {}

        def load() -> None:
            try:
                result.update(
                    in_child(
                        cpu.client,
                        row,
                        server.address,
                        server.pid,
                        warmup,
                        seconds + 2,
                        10**8,
                        run,
                        pool,
                        spare,
                        False,
                        timeout=seconds + 300,
                    )
                )
            except BenchError as exc:
                result["failed"] = str(exc)

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(warmup + 0.2)
        before, started = thread_cpu(server.pid), time.perf_counter()
        _record([*spy, "-p", str(server.pid), "-d", str(round(seconds)), "-f", "raw", "-o", str(raw)])
        after, elapsed = thread_cpu(server.pid), time.perf_counter() - started
        loader.join()
        if "failed" in result:
            raise BenchError(result["failed"])
    finally:
        for started_server in reversed(stack):
            started_server.stop()
    per_thread = {
        tid: (name, cpu_s - before.get(tid, (name, 0.0))[1]) for tid, (name, cpu_s) in after.items() if tid in before
    }
    return {"row": row, "elapsed": elapsed, "threads": per_thread, "load": result}


def profile_replay(records: int, spy: list[str], workdir: Path, raw: Path) -> dict[str, Any]:
    """Write a log of ``records`` and record ``orchestrator replay`` over it."""
    path = workdir / "replay.db"
    built = in_child(fold.build_log, str(path), records, timeout=900)
    log(f"profile: a log of {built['records']:,} records written in {built['seconds']:.1f}s")
    command = [*orchestrator_command(), "replay", "--database", f"sqlite://{path}"]
    started = time.perf_counter()
    _record([*spy, "-f", "raw", "-o", str(raw), "--", *command])
    return {"row": "replay", "elapsed": time.perf_counter() - started, "threads": {}, "records": built["records"]}


def summary(target: str, figures: dict[str, Any], raw_text: str, rate: int) -> tuple[str, Node]:
    """The text summary of a profile, and its tree.

    py-spy counts a thread waiting for the GIL (or in a wait it cannot tell
    from work) as busy, so samples overstate the CPU of threads that mostly
    wait. Where each thread's CPU is known (``/proc``), each thread's CPU is
    split over its frames in proportion to their samples: an estimate of the
    CPU per area and function, per call.
    """
    root, threads = parse(raw_text)
    cpu_of: dict[int | None, float] = {tid: seconds for tid, (_, seconds) in figures["threads"].items()}
    load = figures.get("load", {})
    calls = load.get("rate", 0.0) * figures["elapsed"]
    per_call = calls > 0

    def weight(thread: Thread) -> float:
        """CPU seconds one sample of ``thread`` stands for."""
        if thread.tid in cpu_of and thread.samples:
            return cpu_of[thread.tid] / thread.samples
        return 0.0 if cpu_of else 1.0 / rate

    unit = "µs per call" if per_call else "s"
    scale = 1e6 / calls if per_call else 1.0

    def amount(seconds: float) -> str:
        return f"{seconds * scale:10,.0f} {unit}" if per_call else f"{seconds:8.2f} s"

    lines = [f"profile of {target}: {root.samples:,} samples at {rate} Hz over {figures['elapsed']:.1f} s", ""]
    total_cpu = sum(cpu_of.values())
    if cpu_of:
        lines.append(f"process CPU over the window (/proc, every thread): {total_cpu:.2f} s")
        if per_call:
            lines.append(
                f"calls answered: {load['rate']:,.0f}/s at {cpu.IN_FLIGHT} in flight (p50 {load['p50_ms']:.1f} ms,"
                f" p99 {load['p99_ms']:.1f} ms), about {calls:,.0f} in the window:"
                f" {total_cpu * scale:,.0f} µs of CPU per call (py-spy's sampling included)"
            )
        lines += ["", "CPU by thread (the OS's name, Python's name):"]
        for tid, (name, seconds) in sorted(figures["threads"].items(), key=lambda t: -t[1][1]):
            if seconds <= 0:
                continue
            python = next((t.label.split(": ", 1)[-1] for t in threads.values() if t.tid == tid), "no Python frame")
            lines.append(f"  {tid:>8} {name:<16} {amount(seconds)}  {seconds / total_cpu * 100:5.1f}%  ({python})")
    elif figures.get("records"):
        lines.append(f"replay of {figures['records']:,} records: {figures['elapsed']:.2f} s with py-spy attached")
        lines.append("(a command that ended: no /proc figures, each sample counts 1 / rate s, waits included)")
    areas: Counter[str] = Counter()  # CPU seconds (floats) by area
    for thread in threads.values():
        for name, n in thread.areas.items():
            areas[name] += n * weight(thread)  # type: ignore[assignment]  # a Counter of seconds
    unseen = sum(seconds for tid, seconds in cpu_of.items() if not any(t.tid == tid for t in threads.values()))
    if unseen:
        areas["threads with no Python frame (gRPC's C core, ...)"] += unseen  # type: ignore[assignment]
    whole = sum(areas.values()) or 1.0
    lines += ["", "CPU by area of the frame running (self time; estimated from the samples, see above):"]
    lines += [f"  {amount(v)}  {v / whole * 100:5.1f}%  {name}" for name, v in areas.most_common()]
    for thread in sorted(threads.values(), key=lambda t: -weight(t) * t.samples):
        spent = weight(thread) * thread.samples
        if spent / whole < 0.02:
            continue
        lines += ["", f"{thread.label}: {amount(spent)}, {thread.samples:,} samples"]
        lines.append("  by area (self time):")
        lines += [
            f"    {amount(n * weight(thread))}  {n / thread.samples * 100:5.1f}%  {name}"
            for name, n in thread.areas.most_common(6)
        ]
        lines.append("  most inclusive time (frames on every sample of the thread left out):")
        chosen = [(f, n) for f, n in thread.inclusive.most_common() if n < thread.samples][:15]
        lines += [f"    {amount(n * weight(thread))}  {n / thread.samples * 100:5.1f}%  {f}" for f, n in chosen]
        lines.append("  most self time:")
        lines += [
            f"    {amount(n * weight(thread))}  {n / thread.samples * 100:5.1f}%  {f}"
            for f, n in thread.own.most_common(10)
        ]
    return "\n".join(lines) + "\n", root


def main(argv: list[str] | None = None) -> int:
    """Profile one target; write its flame graph and summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=TARGETS, help="what to profile (emit = create)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to record a daemon (default 10)")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    parser.add_argument("--records", type=int, default=100_000, help="records in the log, for replay (default 100,000)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results", help="where to write the files")
    parser.add_argument("--lines", action="store_true", help="a frame per line of code, not per function")
    parser.add_argument("--native", action="store_true", help="also sample native frames (C, Cython): slower")
    parser.add_argument(
        "--keep-raw", action="store_true", help="keep py-spy's collapsed stacks (profile-TARGET.folded)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 600:
        parser.error("--seconds must be from 1 to 600")
    if not 1 <= args.rate <= 1000:
        parser.error("--rate must be from 1 to 1000")
    if args.records < 10:
        parser.error("--records must be at least 10")
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="orchestrator-profile-") as scratch:
        workdir = Path(scratch)
        raw = workdir / "stacks.folded"
        spy = [_py_spy(), "record", "-r", str(args.rate), "--threads", "--full-filenames"]
        spy += ["--native"] if args.native else []
        spy += [] if args.lines else ["--function"]  # one frame per function, not per line, unless --lines
        try:
            if args.target == "replay":
                figures = profile_replay(args.records, spy, workdir, raw)
            else:
                figures = profile_daemon(args.target, args.seconds, spy, workdir, raw)
        except BenchError as exc:
            print(f"profile: {exc}", file=sys.stderr)
            return 1
        raw_text = raw.read_text(encoding="utf-8")
        if args.keep_raw:
            shutil.copy(raw, args.output / f"profile-{args.target}.folded")
    text, root = summary(args.target, figures, raw_text, args.rate)
    digest = hashlib.sha256(raw_text.encode()).hexdigest()[:8]
    svg = args.output / f"profile-{args.target}.svg"
    flamegraph(root, f"orchestrator bench/profile.py {args.target} ({root.samples:,} samples, {digest})", svg)
    (args.output / f"profile-{args.target}.txt").write_text(text, encoding="utf-8")
    print(text)
    log(f"profile: {svg} and {svg.with_suffix('.txt')} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
