"""Load generator for an llmrec server over real gRPC (grpc.aio): closed loop and open loop.

    python -m bench.loadgen --target 127.0.0.1:50051 --data data/ml-100k --method recommend --concurrency 16
    python -m bench.loadgen --target 127.0.0.1:50051 --data data/ml-100k --rate 50 --arrivals poisson

Requests are drawn from real interaction data (training.data loaders): a user's 20 consecutive items, oldest
first, with the timestamp of the next interaction as context (about 128 model tokens once rendered).

Modes:
* closed loop: `concurrency` callers, each sending its next request as soon as the last one is answered.
* open loop: requests start at fixed times (constant rate, or Poisson arrivals at that mean rate) whether or
  not earlier ones finished; latency is counted from the scheduled start, so a server that falls behind
  shows it (no coordinated omission).

Methods: Recommend (unary), RecommendStream (latency to the last page), Session (one latency per event; each
stream starts with a config event carrying the history, then sends interactions with the user's next items,
and is replaced by a new user's stream after `session_events` events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import grpc
import numpy as np
import typer
from google.protobuf.timestamp_pb2 import Timestamp

from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc

METHODS = ("recommend", "stream", "session")


# --- workload -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserCase:
    """One request's worth of a real user: history (catalogue ids, oldest first), what came next, and when."""

    history: tuple[str, ...]
    following: tuple[str, ...]  # the user's next items (Session interactions)
    timestamp: float | None


# Serving paths a workload may pin (server.recommender): "full" sets force_full_path; a response on another path
# than the pinned one is an error of the call.
_PATHS = {"fast": pb.SERVING_PATH_FAST, "full": pb.SERVING_PATH_FULL}


@dataclasses.dataclass(frozen=True)
class Workload:
    users: tuple[UserCase, ...]
    k: int = 10
    page_size: int = 5
    path: str | None = None  # None: whatever path the server picks; "fast" or "full": that path, checked
    # Built once per user: the load generator shares the CPU with the server, so it does as little as it can.
    _requests: dict[int, pb.RecommendRequest] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def recommend_request(self, number: int) -> pb.RecommendRequest:
        slot = number % len(self.users)
        request = self._requests.get(slot)
        if request is None:
            user = self.users[slot]
            request = self._requests[slot] = pb.RecommendRequest(
                history=_history(user.history), context=_context(user.timestamp), k=self.k, page_size=self.page_size,
                force_full_path=self.path == "full")
        return request

    def on_path(self, path: str) -> Workload:
        """The same requests pinned to a serving path ("fast" or "full")."""
        if path not in _PATHS:
            raise ValueError(f"path must be one of {tuple(_PATHS)}, got {path!r}")
        return Workload(self.users, self.k, self.page_size, path)

    def check_path(self, served: int) -> None:
        """Raise if a response's serving_path is not the pinned one."""
        if self.path is not None and served != _PATHS[self.path]:
            raise RuntimeError(f"served on path {served}, not the {self.path} path")

    def session_events(self, number: int, count: int) -> list[pb.SessionRequest]:
        """A config event with the user's history, then interactions with their next items (cycled)."""
        user = self.users[number % len(self.users)]
        events = [pb.SessionRequest(event_id="0", config=pb.SessionConfig(k=self.k, history=_history(user.history),
                                                                           force_full_path=self.path == "full"))]
        following = user.following or user.history
        for event, item_id in zip(range(1, count), itertools.cycle(following)):
            events.append(pb.SessionRequest(event_id=str(event), interaction=pb.HistoryItem(item_id=item_id)))
        return events


def _history(item_ids: Sequence[str]) -> list[pb.HistoryItem]:
    return [pb.HistoryItem(item_id=item_id) for item_id in item_ids]


def _context(timestamp: float | None) -> pb.Context | None:
    if timestamp is None:
        return None
    stamp = Timestamp()
    stamp.FromSeconds(int(timestamp))
    return pb.Context(timestamp=stamp)


def build_workload(data: Path, count: int = 512, history_items: int = 20, following_items: int = 8,
                   seed: int = 0, k: int = 10) -> Workload:
    """`count` user cases drawn from a data set: users with at least history_items + 1 interactions, each
    at a random point of their sequence."""
    from llmrec.training.data import load_interactions  # torch-free loader of every supported format

    interactions = load_interactions(data)
    rng = random.Random(seed)
    eligible = [u for u, seq in enumerate(interactions.sequences) if len(seq) > history_items]
    if not eligible:
        raise ValueError(f"{data}: no user has more than {history_items} interactions")
    users = []
    for _ in range(count):
        user = rng.choice(eligible)
        sequence = interactions.sequences[user]
        end = rng.randrange(history_items, len(sequence))
        ids = [interactions.item_ids[i] for i in sequence]
        users.append(UserCase(
            history=tuple(ids[end - history_items : end]),
            following=tuple(ids[end : end + following_items]),
            timestamp=interactions.timestamp(user, end),
        ))
    return Workload(tuple(users), k=k)


# --- results ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """One load level: what was sent, what came back, how fast."""

    name: str
    method: str
    mode: str  # "closed", "constant" or "poisson"
    level: float  # concurrency (closed) or target rate per second (open)
    duration_s: float
    ok: int
    errors: dict[str, int]
    latencies_ms: list[float] = dataclasses.field(repr=False, default_factory=list)
    # Open loop only: how late each recorded request left the load generator (its own busy time, not the server's).
    send_lateness_ms: list[float] = dataclasses.field(repr=False, default_factory=list)

    @property
    def qps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        return {
            "name": self.name, "method": self.method, "mode": self.mode, "level": self.level,
            "duration_s": round(self.duration_s, 3), "ok": self.ok, "errors": dict(self.errors),
            "error_count": sum(self.errors.values()), "qps": round(self.qps, 2),
            "p50_ms": round(self.percentile(50), 3), "p95_ms": round(self.percentile(95), 3),
            "p99_ms": round(self.percentile(99), 3),
            "mean_ms": round(float(np.mean(self.latencies_ms)), 3) if self.latencies_ms else float("nan"),
            **({"send_lateness_p50_ms": round(float(np.percentile(self.send_lateness_ms, 50)), 3),
                "send_lateness_p99_ms": round(float(np.percentile(self.send_lateness_ms, 99)), 3)}
               if self.send_lateness_ms else {}),
        }


class _Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.recording = False

    def ok(self, seconds: float) -> None:
        if self.recording:
            self.latencies.append(seconds * 1e3)

    def error(self, code: str) -> None:
        if self.recording:
            self.errors[code] += 1


def _code_name(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    if isinstance(error, asyncio.TimeoutError):
        return "CLIENT_TIMEOUT"
    return type(error).__name__


# --- callers ------------------------------------------------------------------------------------------------


class Caller:
    """Issues one kind of call. `call(number)` performs request `number` and raises on failure."""

    def __init__(self, stub: pb_grpc.RecommenderStub, workload: Workload, method: str, timeout: float = 10.0,
                 session_events: int = 8) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.stub = stub
        self.workload = workload
        self.method = method
        self.timeout = timeout
        self.session_events = session_events

    async def call(self, number: int) -> None:
        request = self.workload.recommend_request(number)
        if self.method == "recommend":
            response = await self.stub.Recommend(request, timeout=self.timeout)
            if not response.items:
                raise RuntimeError("empty ranking")
            self.workload.check_path(response.serving_path)
        elif self.method == "stream":
            last = False
            async for page in self.stub.RecommendStream(request, timeout=self.timeout):
                last = page.last
                self.workload.check_path(page.serving_path)
            if not last:
                raise RuntimeError("stream ended without its last page")
        else:
            raise ValueError("Session calls go through SessionStream")


class SessionStream:
    """One open Session stream; `event()` sends the next event and waits for its own response.

    Events of one stream are answered in order, so responses are matched to events first in, first out.
    """

    def __init__(self, stub: pb_grpc.RecommenderStub, events: list[pb.SessionRequest], timeout: float) -> None:
        self._call = stub.Session(timeout=timeout)
        self._events = events
        self._next = 0
        self._lock = asyncio.Lock()

    @property
    def remaining(self) -> int:
        return len(self._events) - self._next

    async def event(self) -> None:
        async with self._lock:  # one event in flight per stream: a user's events are sequential
            request = self._events[self._next]
            self._next += 1
            await self._call.write(request)
            response = await self._call.read()
        if response is grpc.aio.EOF:
            raise RuntimeError("session ended early")
        if response.status.code != 0:
            raise RuntimeError(f"event status {response.status.code}: {response.status.message}")

    def cancel(self) -> None:
        self._call.cancel()

    async def close(self) -> None:
        try:
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError:
            pass


# --- load patterns ------------------------------------------------------------------------------------------


async def closed_loop(caller: Caller, concurrency: int, duration: float, warmup: float = 1.0,
                      name: str = "") -> RunResult:
    """`concurrency` callers back to back for warmup + duration seconds; only `duration` is recorded."""
    recorder = _Recorder()
    numbers = itertools.count()
    stop_at = 0.0

    async def one_caller(worker: int) -> None:
        stream: SessionStream | None = None
        try:
            while time.perf_counter() < stop_at:
                number = next(numbers)
                started = time.perf_counter()
                try:
                    if caller.method == "session":
                        if stream is None or stream.remaining == 0:
                            if stream is not None:
                                await stream.close()
                            stream = SessionStream(caller.stub, caller.workload.session_events(
                                number, caller.session_events), caller.timeout)
                        await stream.event()
                    else:
                        await caller.call(number)
                    recorder.ok(time.perf_counter() - started)
                except Exception as error:  # noqa: BLE001 - every failure is counted by its status
                    recorder.error(_code_name(error))
                    if stream is not None:
                        stream.cancel()
                        stream = None
        finally:
            if stream is not None:
                await stream.close()

    stop_at = time.perf_counter() + warmup + duration
    tasks = [asyncio.create_task(one_caller(w)) for w in range(concurrency)]
    await asyncio.sleep(warmup)
    recorder.recording = True
    measured_from = time.perf_counter()
    await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
    recorder.recording = False
    elapsed = time.perf_counter() - measured_from
    await asyncio.gather(*tasks)
    return RunResult(name or f"{caller.method} closed c={concurrency}", caller.method, "closed", concurrency,
                     elapsed, len(recorder.latencies), dict(recorder.errors), recorder.latencies)


def arrival_times(rate: float, duration: float, poisson: bool, seed: int = 0) -> list[float]:
    """Start offsets (seconds) of the requests of an open-loop run: every 1/rate, or Poisson at `rate`."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if not poisson:
        return [i / rate for i in range(int(duration * rate))]
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(duration * rate * 1.5) + 16)
    times = np.cumsum(gaps) - gaps[0]
    return times[times < duration].tolist()


async def open_loop(caller: Caller, rate: float, duration: float, poisson: bool, warmup: float = 1.0,
                    seed: int = 0, sessions: int = 64, name: str = "") -> RunResult:
    """Requests at scheduled times (warmup seconds unrecorded first); latency from the scheduled start, and how
    late each left (the generator's own delay, which the latency includes)."""
    recorder = _Recorder()
    lateness: list[float] = []
    schedule = arrival_times(rate, warmup + duration, poisson, seed)
    streams: list[SessionStream | None] = [None] * sessions
    counter = itertools.count()

    async def one(number: int, scheduled: float, recorded: bool) -> None:
        if recorded:
            lateness.append((time.perf_counter() - scheduled) * 1e3)
        try:
            if caller.method == "session":
                slot = number % sessions
                stream = streams[slot]
                if stream is None or stream.remaining == 0:
                    if stream is not None:
                        asyncio.create_task(stream.close())
                    stream = streams[slot] = SessionStream(caller.stub, caller.workload.session_events(
                        next(counter), caller.session_events), caller.timeout)
                await stream.event()
            else:
                await caller.call(number)
            if recorded:
                recorder.latencies.append((time.perf_counter() - scheduled) * 1e3)
        except Exception as error:  # noqa: BLE001
            if recorded:
                recorder.errors[_code_name(error)] += 1
            if caller.method == "session" and streams[number % sessions] is not None:
                streams[number % sessions].cancel()
                streams[number % sessions] = None

    tasks = []
    start = time.perf_counter()
    for number, offset in enumerate(schedule):
        scheduled = start + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(number, scheduled, offset >= warmup)))
    await asyncio.gather(*tasks)
    for stream in streams:
        if stream is not None:
            await stream.close()
    mode = "poisson" if poisson else "constant"
    return RunResult(name or f"{caller.method} {mode} {rate:g}/s", caller.method, mode, rate, duration,
                     len(recorder.latencies), dict(recorder.errors), recorder.latencies, lateness)


def channel(target: str) -> grpc.aio.Channel:
    limit = 16 << 20
    return grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", limit),
                                                      ("grpc.max_receive_message_length", limit)])


async def run_level(target: str, workload: Workload, method: str, *, concurrency: int | None = None,
                    rate: float | None = None, poisson: bool = True, duration: float = 5.0, warmup: float = 1.0,
                    timeout: float = 10.0, name: str = "") -> RunResult:
    """Open a channel, run one load level (closed loop if concurrency is given, else open loop), close."""
    async with channel(target) as open_channel:
        caller = Caller(pb_grpc.RecommenderStub(open_channel), workload, method, timeout)
        if concurrency is not None:
            return await closed_loop(caller, concurrency, duration, warmup, name)
        assert rate is not None
        return await open_loop(caller, rate, duration, poisson, warmup, name=name)


# --- command line -------------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


@app.command()
def main(
    target: Annotated[str, typer.Option(help="Server address, host:port.")] = "127.0.0.1:50051",
    data: Annotated[Path, typer.Option(help="Data set the requests are drawn from.")] = Path("data/ml-100k"),
    method: Annotated[str, typer.Option(help="recommend, stream or session.")] = "recommend",
    concurrency: Annotated[list[int] | None, typer.Option(help="Closed loop at this concurrency (repeatable).")]
        = None,
    rate: Annotated[list[float] | None, typer.Option(help="Open loop at this rate per second (repeatable).")]
        = None,
    arrivals: Annotated[str, typer.Option(help="Open-loop arrivals: poisson or constant.")] = "poisson",
    duration: Annotated[float, typer.Option(help="Seconds recorded per level.")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Seconds of load before recording, per level.")] = 1.0,
    timeout: Annotated[float, typer.Option(help="Deadline per call, seconds.")] = 10.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results here.")] = None,
) -> None:
    """Run closed- and/or open-loop load levels and print QPS, latency percentiles and errors."""
    if arrivals not in ("poisson", "constant"):
        raise typer.BadParameter("arrivals must be poisson or constant")
    workload = build_workload(data)
    levels: list[dict] = [{"concurrency": c} for c in concurrency or []]
    levels += [{"rate": r, "poisson": arrivals == "poisson"} for r in rate or []]
    if not levels:
        levels = [{"concurrency": 1}, {"concurrency": 16}]
    results = []
    for level in levels:
        result = asyncio.run(run_level(target, workload, method, duration=duration, warmup=warmup,
                                       timeout=timeout, **level))
        summary = result.summary()
        results.append(summary)
        typer.echo(f"{summary['name']:<32} {summary['qps']:>8.1f} qps  p50 {summary['p50_ms']:>7.2f}  "
                   f"p95 {summary['p95_ms']:>7.2f}  p99 {summary['p99_ms']:>7.2f} ms  errors {summary['errors']}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    app()
