"""Followers: emit latency with no follower vs 200 ``ReadEvents(follow=true)`` streams on the same daemon.

One daemon (``orchestrator serve --listen 127.0.0.1:0`` on an SQLite log in a
temporary directory, no event functions for the ``bench`` integration) serves
both runs of a round, back to back, in alternating order:

- **Baseline**: a fresh emitter process sends ``post-connection-creation``
  emits (one record each) paced at :data:`RATE` per second (``--follower-rate``),
  open loop (each emit starts on schedule, whether or not the one before was
  answered), and times each call.
- **Followers**: the same, while :data:`FOLLOWERS` streams of
  ``ReadEvents(follow=true)`` over :data:`CHANNELS` connections are open in
  one separate client process (started once for the section). That process
  does the least it can: it takes each message as bytes and decodes only its
  position (the first field), to check that every stream receives every
  record exactly once, in order. For each run it opens its streams at the
  position of a marker emit of its own, and the window starts once every
  stream has received that marker (all of them caught up). After the window
  it waits until every stream has received the last emitted record, then
  closes them.

The figure is the emit's p50 (and p99) latency with followers over the
baseline's, paired by round. Alongside: how long a record took to reach the
last of the followers (from the emit's send), and the CPU each process used
over the window (the daemon's from ``/proc``, the clients' own ``getrusage``),
since on a small machine the followers' client competes for the same cores;
from those, the CPU one delivered message costs the daemon (above its
baseline) and the followers' client.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench._harness import (
    BenchError,
    Server,
    Settings,
    in_child,
    log,
    median,
    paired_ratio,
    percentile,
    process_cpu_seconds,
    run_loop,
    serve_command,
)

FOLLOWERS = 200
"""Concurrent ``ReadEvents(follow=true)`` streams in the followers' run."""
CHANNELS = 8
"""Client connections the followers' streams are spread over."""
RATE = 20.0
"""Emits per second, paced (open loop): 4,000 messages a second to the followers, which on two cores shared
with their client leaves the machine room (50/s and 100/s are in docs/reliability.md)."""
_CALL_TIMEOUT_S = 30.0
_DELIVERY_TIMEOUT_S = 60.0
"""How long after the last emit every follower must have received it."""
_READ_EVENTS = "/orchestrator.v1.Orchestrator/ReadEvents"
_EMIT = "/orchestrator.v1.Orchestrator/EmitLifecycleEvent"


def _position(raw: bytes) -> int:
    """The position of a serialised ``EventRecord``: its first field (1, a varint), decoded by hand."""
    if not raw or raw[0] != 0x08:
        raise ValueError("an EventRecord without a position")
    value, shift = 0, 0
    for byte in raw[1:11]:
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value
        shift += 7
    raise ValueError("a position that is not a varint")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit_request(connection_id: str) -> Any:
    from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb

    message = pb.EmitLifecycleEventRequest(
        connection=pb.ConnectionRef(environment="bench", integration="bench", connection_id=connection_id),
        event=pb.LIFECYCLE_EVENT_POST_CONNECTION_CREATION,
    )
    message.connection_config.update({"instance_url": "acme.my.salesforce.com"})
    message.payload.update({"source": "bench", "scopes": ["api", "refresh_token"]})
    return message


def emitter(address: str, daemon_pid: int, rate: float, warmup_s: float, duration_s: float, run: str) -> dict[str, Any]:
    """``rate`` emits a second for ``warmup_s``, then for ``duration_s`` timed; runs in a child process."""
    import grpc

    from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb

    warmup = round(warmup_s * rate)
    total = warmup + round(duration_s * rate)
    latencies: list[float] = []
    sent_at: dict[int, float] = {}
    errors: list[str] = []
    last = [0]

    async def main() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(address) as channel:
            emit = channel.unary_unary(
                _EMIT,
                request_serializer=pb.EmitLifecycleEventRequest.SerializeToString,
                response_deserializer=pb.EmitLifecycleEventResponse.FromString,
            )
            await channel.channel_ready()

            async def one(n: int) -> None:
                request = _emit_request(f"{run}-{n}")
                sent = time.perf_counter()
                try:
                    response = await emit(request, timeout=_CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}"[:300])
                    return
                answered = time.perf_counter()
                last[0] = max(last[0], response.position)
                if n >= warmup:
                    latencies.append(answered - sent)
                    sent_at[response.position] = sent

            started = time.perf_counter()
            marks: dict[str, float] = {}
            async with asyncio.TaskGroup() as tg:
                for n in range(total):
                    if n == warmup:
                        marks = {"opened": time.perf_counter(), "cpu": _cpu_seconds()}
                        marks["daemon_cpu"] = process_cpu_seconds(daemon_pid)
                    delay = started + n / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)  # pacing: the next emit's time has not come
                    tg.create_task(one(n))
            elapsed = time.perf_counter() - marks["opened"]
            measured = sorted(latencies)
            return {
                "ops": len(measured),
                "seconds": elapsed,
                "rate": len(measured) / elapsed,
                "p50_ms": percentile(measured, 0.50) * 1000,
                "p99_ms": percentile(measured, 0.99) * 1000,
                "errors": len(errors),
                "first_error": errors[0] if errors else "",
                "emitter_cpu": (_cpu_seconds() - marks["cpu"]) / elapsed,
                "daemon_cpu": (process_cpu_seconds(daemon_pid) - marks["daemon_cpu"]) / elapsed,
                "last_position": last[0],
                "sent_at": sent_at,
            }

    return run_loop(main())


def followers(address: str, count: int, channels: int, control: Connection) -> None:
    """The followers' process: opens ``count`` follow streams on command, reports what they received.

    Commands on ``control``: ``("open", run)`` emits a marker and opens the streams at
    its position, answering ``("ready", None)`` once each has received it;
    ``("until", position)`` waits until every stream has received ``position``, closes
    them and answers ``("done", figures)``; ``("stop", None)`` ends. A failure is
    answered ``("failed", text)``.
    """
    import grpc

    from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb

    async def follow(opened: list[Any], run: str) -> dict[str, Any]:
        emit = opened[0].unary_unary(
            _EMIT,
            request_serializer=pb.EmitLifecycleEventRequest.SerializeToString,
            response_deserializer=pb.EmitLifecycleEventResponse.FromString,
        )
        marker = await emit(_emit_request(f"{run}-followers"), timeout=_CALL_TIMEOUT_S)
        start = marker.position
        request = pb.ReadEventsRequest(from_position=start, follow=True)
        expected = [start] * count
        problems: list[str] = []
        arrived: dict[int, float] = {}
        target = [sys.maxsize]
        ready, done = asyncio.Event(), asyncio.Event()
        started, finished = [0], [0]

        async def stream(index: int) -> None:
            read = opened[index % channels].unary_stream(
                _READ_EVENTS, request_serializer=pb.ReadEventsRequest.SerializeToString
            )
            async for raw in read(request):
                position = _position(raw)
                if position != expected[index] and len(problems) < 100:
                    problems.append(f"stream {index}: position {position}, expected {expected[index]}")
                arrived[position] = time.perf_counter()  # the last stream to receive it writes last
                if position == start:
                    started[0] += 1
                    if started[0] == count:
                        ready.set()
                expected[index] = position + 1
                if expected[index] == target[0] + 1:
                    finished[0] += 1
                    if finished[0] == count:
                        done.set()

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(stream(i)) for i in range(count)]
            await asyncio.wait_for(ready.wait(), _CALL_TIMEOUT_S)
            cpu, wall = _cpu_seconds(), time.perf_counter()
            control.send(("ready", None))
            _, until = await asyncio.to_thread(control.recv)
            target[0] = until
            finished[0] = sum(1 for e in expected if e > until)
            if finished[0] == count:
                done.set()
            try:
                await asyncio.wait_for(done.wait(), _DELIVERY_TIMEOUT_S)
            except TimeoutError:
                problems.append(f"{count - finished[0]} streams had not received position {until}")
            cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
            for task in tasks:
                task.cancel()
        return {"cpu": cpu / wall, "problems": problems, "arrived": arrived}

    async def main() -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel, not one shared
        opened = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
        try:
            while True:
                kind, run = await asyncio.to_thread(control.recv)
                if kind == "stop":
                    return
                control.send(("done", await follow(opened, run)))
        finally:
            for channel in opened:
                await channel.close()

    try:
        run_loop(main())
    except BaseException as exc:
        control.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        control.close()


class _Followers:
    """The followers' process (:func:`followers`), driven through a pipe; stopped by its own handle."""

    def __init__(self, address: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, theirs = context.Pipe()
        self._process = context.Process(target=followers, args=(address, FOLLOWERS, CHANNELS, theirs), daemon=True)
        self._process.start()
        theirs.close()

    def _answer(self, expected: str, timeout: float) -> Any:
        if not self._control.poll(timeout):
            raise BenchError(f"the followers did not answer within {timeout:.0f}s")
        kind, value = self._control.recv()
        if kind != expected:
            raise BenchError(f"the followers failed: {value}")
        return value

    @contextmanager
    def open(self, run: str) -> Iterator[None]:
        """The streams open and caught up for the block."""
        self._control.send(("open", run))
        self._answer("ready", _CALL_TIMEOUT_S + 30)
        yield

    def delivered(self, emitted: dict[str, Any]) -> dict[str, Any]:
        """Once every stream has the last emitted record: CPU, delivery lag of the timed records, problems."""
        self._control.send(("until", emitted["last_position"]))
        figures = self._answer("done", _DELIVERY_TIMEOUT_S + 10)
        arrived: dict[int, float] = figures.pop("arrived")
        lags = sorted(arrived[p] - sent for p, sent in emitted["sent_at"].items() if p in arrived)
        missing = sum(1 for p in emitted["sent_at"] if p not in arrived)
        return {
            "follower_cpu": figures["cpu"],
            "lag_p50_ms": percentile(lags, 0.50) * 1000,
            "lag_p99_ms": percentile(lags, 0.99) * 1000,
            "problems": figures["problems"] + ([f"{missing} records reached no follower"] if missing else []),
        }

    def stop(self) -> None:
        """Ask it to end; kill it if it does not."""
        try:
            self._control.send(("stop", None))
        except OSError:
            pass  # it is gone already
        self._control.close()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def _log(name: str, round_: int, result: dict[str, Any]) -> None:
    line = (
        f"followers {FOLLOWERS if name == 'followers' else 0:3} round {round_ + 1}:"
        f" emit p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms,"
        f" daemon CPU {result['daemon_cpu']:.2f}, errors {result['errors']}"
    )
    if name == "followers":
        line += (
            f"; delivered p50 {result['lag_p50_ms']:.1f} ms, p99 {result['lag_p99_ms']:.1f} ms,"
            f" followers' CPU {result['follower_cpu']:.2f}, problems {len(result['problems'])}"
        )
    log(line)


def measure(settings: Settings, workdir: Path, rate: float = RATE) -> dict[str, Any]:
    """The followers figures: emit latency with none and with :data:`FOLLOWERS`, and their ratio."""
    database = f"sqlite://{workdir / 'followers-events.db'}"
    argv = serve_command(database)
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "followers": []}
    timeout = settings.warmup_s + settings.duration_s + 120
    with Server(argv, name="orchestrator serve") as daemon:
        following = _Followers(daemon.address)
        try:
            for round_ in range(settings.rounds):
                for name in ("none", "followers") if round_ % 2 == 0 else ("followers", "none"):
                    run = f"r{round_}{name[0]}"
                    args = (daemon.address, daemon.pid, rate, settings.warmup_s, settings.duration_s, run)
                    if name == "none":
                        result = in_child(emitter, *args, timeout=timeout)
                    else:
                        with following.open(run):
                            result = in_child(emitter, *args, timeout=timeout)
                        result.update(following.delivered(result))
                    result.pop("sent_at")
                    _log(name, round_, result)
                    runs[name].append(result)
        finally:
            following.stop()
        exit_code = daemon.stop()

    def figure(rs: list[dict[str, Any]], *keys: str) -> dict[str, Any]:
        out: dict[str, Any] = {key: median([r[key] for r in rs]) for key in keys}
        problems = [p for r in rs for p in [r["first_error"], *r.get("problems", ())] if p]
        out["errors"] = sum(r["errors"] + len(r.get("problems", ())) for r in rs)
        out["first_error"] = problems[0] if problems else ""
        out["rounds"] = rs
        return out

    # What one delivered message costs in CPU: the daemon's above its own baseline, and the followers' client.
    pairs = list(zip(runs["followers"], runs["none"], strict=True))
    daemon_us = median([(f["daemon_cpu"] - n["daemon_cpu"]) / (f["rate"] * FOLLOWERS) * 1e6 for f, n in pairs])
    client_us = median([f["follower_cpu"] / (f["rate"] * FOLLOWERS) * 1e6 for f, _ in pairs])
    common = ("rate", "p50_ms", "p99_ms", "daemon_cpu", "emitter_cpu")
    return {
        "followers_count": FOLLOWERS,
        "rate": rate,
        "none": figure(runs["none"], *common),
        "followers": figure(runs["followers"], *common, "lag_p50_ms", "lag_p99_ms", "follower_cpu"),
        "ratio": {key: paired_ratio(runs["followers"], runs["none"], key) for key in ("p50_ms", "p99_ms")},
        "cpu_us_per_message": {"daemon": daemon_us, "followers_client": client_us},
        "daemon_exit_code": exit_code,
    }
