"""Whether more server processes shorten the fast path's Poisson tail: one process against two, the same load.

    python -m bench.poisson_lanes --bundle bundles/ml-100k/<version> --data data/ml-100k --rounds 3

A fast request runs on its server's one event-loop thread, so Poisson bursts queue in one lane. Two llmrec-server
subprocesses serve the same bundle (the fast path is read-only: no catalogue to share); the load generator sends
the same Poisson arrivals (half of one process's c=16 capacity) to the first alone, then round robin to both, in
alternating rounds, each bracketed by a c=1 run of the first. Reported: p99 / c=1 p50 per round and their medians,
and how late the generator itself sent (bench.loadgen). Writes poisson_lanes.json and .md under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from pathlib import Path

from bench import loadgen
from bench.bench import load, start_llmrec, summarise
from llmrec.v1 import recommender_pb2_grpc as pb_grpc


class RoundRobin:
    """A loadgen caller that sends request n to callers[n % len(callers)]."""

    method = "recommend"

    def __init__(self, callers: list[loadgen.Caller]) -> None:
        self.callers = callers

    async def call(self, number: int) -> None:
        await self.callers[number % len(self.callers)].call(number)


async def poisson(targets: list[str], workload: loadgen.Workload, rate: float, seconds: float) -> dict:
    channels = [loadgen.channel(target) for target in targets]
    try:
        caller = RoundRobin([loadgen.Caller(pb_grpc.RecommenderStub(c), workload, "recommend") for c in channels])
        result = await loadgen.open_loop(caller, rate, seconds, poisson=True, warmup=1.0,
                                         name=f"Poisson, {len(targets)} process(es)")
    finally:
        for channel in channels:
            await channel.close()
    return result.summary()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="A bundle with a fast path.")
    parser.add_argument("--data", type=Path, default=Path("data/ml-100k"), help="Data set of the requests.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="Recorded seconds per Poisson run.")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workload = loadgen.build_workload(args.data, count=512).on_path("fast")
    servers = [start_llmrec(args.bundle, args.out / "logs" / f"poisson-lanes-{n}.log") for n in (1, 2)]
    rounds: list[dict] = []
    try:
        capacity = summarise(load(servers[0].target, workload, "recommend", "one process c=16", concurrency=16,
                                  duration=3.0))["qps"]
        rate = capacity / 2
        load_before = os.getloadavg()
        for number in range(args.rounds):
            entry = {}
            for processes in ((1, 2) if number % 2 == 0 else (2, 1)):
                c1 = summarise(load(servers[0].target, workload, "recommend", "c=1", concurrency=1,
                                    duration=3.0))["p50_ms"]
                run = asyncio.run(poisson([s.target for s in servers[:processes]], workload, rate, args.seconds))
                entry[str(processes)] = {**run, "c1_p50_ms": c1, "ratio": run["p99_ms"] / c1}
            rounds.append(entry)
        load_after = os.getloadavg()
    finally:
        for server in servers:
            server.stop()
    medians = {n: statistics.median(r[n]["ratio"] for r in rounds) for n in ("1", "2")}
    report = {"bundle": str(args.bundle), "capacity_one_process_qps": capacity, "rate": rate, "rounds": rounds,
              "median_ratio": medians, "load_before": load_before, "load_after": load_after}
    (args.out / "poisson_lanes.json").write_text(json.dumps(report, indent=2))
    lines = ["# Fast path Poisson tail: one server process vs two", "",
             f"Poisson arrivals at {rate:.1f}/s (half of one process's c=16 capacity, {capacity:.1f}/s); load "
             f"average before/after {', '.join(f'{x:.1f}' for x in load_before)} / "
             f"{', '.join(f'{x:.1f}' for x in load_after)}.", "",
             "| round | processes | p50 ms | p99 ms | c=1 p50 ms | p99 / c=1 p50 | generator lateness p99 ms |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for number, entry in enumerate(rounds):
        for processes, run in sorted(entry.items()):
            lines.append(f"| {number + 1} | {processes} | {run['p50_ms']:.2f} | {run['p99_ms']:.2f} | "
                         f"{run['c1_p50_ms']:.2f} | {run['ratio']:.1f} | {run['send_lateness_p99_ms']:.2f} |")
    lines += ["", f"Median p99 / c=1 p50: one process {medians['1']:.1f}, two processes {medians['2']:.1f}."]
    (args.out / "poisson_lanes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
