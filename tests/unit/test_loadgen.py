"""bench.loadgen without a server: the workload, arrival schedules and result statistics."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from bench import loadgen
from tests.conftest import FIXTURES


def test_workload_draws_real_histories_with_context():
    workload = loadgen.build_workload(FIXTURES / "tiny", count=20, history_items=5, seed=3)
    assert len(workload.users) == 20
    request = workload.recommend_request(0)
    assert len(request.history) == 5 and request.k == 10 and request.context.HasField("timestamp")
    assert all(entry.item_id.startswith("m") for entry in request.history)
    events = workload.session_events(1, count=4)
    assert events[0].WhichOneof("event") == "config" and len(events[0].config.history) == 5
    assert [e.WhichOneof("event") for e in events[1:]] == ["interaction"] * 3
    assert loadgen.build_workload(FIXTURES / "tiny", count=20, history_items=5, seed=3) == workload


def test_a_workload_pinned_to_a_path_asks_for_it_and_checks_the_answer():
    workload = loadgen.build_workload(FIXTURES / "tiny", count=4, history_items=5, seed=3)
    full, fast = workload.on_path("full"), workload.on_path("fast")
    assert full.recommend_request(0).force_full_path and full.session_events(0, 2)[0].config.force_full_path
    assert not fast.recommend_request(0).force_full_path and fast.users == workload.users
    fast.check_path(loadgen.pb.SERVING_PATH_FAST)
    workload.check_path(loadgen.pb.SERVING_PATH_FULL)  # unpinned: any path
    with pytest.raises(RuntimeError, match="not the fast path"):
        fast.check_path(loadgen.pb.SERVING_PATH_FULL)
    with pytest.raises(ValueError, match="path must be one of"):
        workload.on_path("quick")


def test_workload_needs_long_enough_histories():
    with pytest.raises(ValueError, match="more than"):
        loadgen.build_workload(FIXTURES / "tiny", history_items=10_000)


def test_arrival_schedules():
    constant = loadgen.arrival_times(50, 2.0, poisson=False)
    assert len(constant) == 100 and np.allclose(np.diff(constant), 0.02)
    poisson = loadgen.arrival_times(200, 20.0, poisson=True, seed=1)
    gaps = np.diff(poisson)
    assert abs(len(poisson) / 20.0 - 200) < 10 and poisson[-1] < 20.0
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential gaps: coefficient of variation 1
    assert loadgen.arrival_times(200, 20.0, poisson=True, seed=1) == poisson


def test_result_summary():
    result = loadgen.RunResult("x", "recommend", "closed", 4, 2.0, 100, {"UNAVAILABLE": 2},
                               [float(i) for i in range(1, 101)])
    summary = result.summary()
    assert summary["qps"] == 50 and summary["error_count"] == 2
    assert summary["p50_ms"] == pytest.approx(50.5) and summary["p99_ms"] == pytest.approx(99.01)


def test_the_open_loop_records_how_late_a_busy_generator_sent():
    class Blocking:
        """A caller that holds the event loop 20 ms per call: every later request leaves late."""

        method = "recommend"

        async def call(self, number: int) -> None:
            time.sleep(0.02)

    result = asyncio.run(loadgen.open_loop(Blocking(), rate=100, duration=0.2, poisson=False, warmup=0.0))
    summary = result.summary()
    assert result.ok == len(result.send_lateness_ms) == 20
    # request n is due at 10 n ms but cannot leave before the n calls ahead of it have held the loop 20 ms each
    assert result.send_lateness_ms[-1] >= 19 * 20 - 19 * 10
    assert summary["send_lateness_p99_ms"] >= summary["send_lateness_p50_ms"] > 0
    assert all(latency >= late for latency, late in zip(result.latencies_ms, result.send_lateness_ms))


def test_the_bench_rewrites_only_what_lies_between_its_markers(tmp_path):
    from bench.bench import RESULTS_BEGIN, RESULTS_END, rewrite_section

    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nhand-written\n\n{RESULTS_BEGIN}\n\nold table\n{RESULTS_END}\n\nwhy\n")
    rewrite_section(docs, RESULTS_BEGIN, RESULTS_END, "new table\n")
    assert docs.read_text() == f"# Benchmarks\n\nhand-written\n\n{RESULTS_BEGIN}\n\nnew table\n\n{RESULTS_END}\n\nwhy\n"
    docs.write_text("no markers")
    with pytest.raises(ValueError, match="lacks the markers"):
        rewrite_section(docs, RESULTS_BEGIN, RESULTS_END, "x")


def test_round_robin_spreads_an_open_loop_over_the_processes():
    from bench.poisson_lanes import RoundRobin

    class Counting:
        def __init__(self) -> None:
            self.numbers: list[int] = []

        async def call(self, number: int) -> None:
            self.numbers.append(number)

    callers = [Counting(), Counting()]
    result = asyncio.run(loadgen.open_loop(RoundRobin(callers), rate=200, duration=0.05, poisson=False, warmup=0.0))
    assert result.ok == 10 and callers[0].numbers == [0, 2, 4, 6, 8] and callers[1].numbers == [1, 3, 5, 7, 9]
