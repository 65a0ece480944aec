"""Session latency: the time from sending one event to receiving the updated list, at several concurrencies.

    python -m bench.session_bench --target 127.0.0.1:50051 --sessions 1,16 --events 100 --out session_bench.json

For each concurrency level, that many sessions (one channel each, like separate users) run at once. Each
session configures k and a random history of catalogue ids (untimed), sends a few untimed warm-up events,
waits for the others, then sends `--events` interactions with random catalogue ids, one at a time, timing each
from send to answer (every interaction changes the user text: one inference per event). Then `--reuse-events`
config events that only change k (the session reuses its cached user vector: no inference) are timed apart.
Prints a table and writes JSON with p50/p90/p99/mean/max in milliseconds and events per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from llmrec.clients.client import RecommenderClient


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    if not samples_ms:
        return {"count": 0}
    values = np.asarray(samples_ms)
    return {
        "count": len(samples_ms),
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(statistics.fmean(samples_ms)),
        "max_ms": float(values.max()),
    }


def run_level(target: str, sessions: int, events: int, reuse_events: int, warmup: int, history: int, k: int,
              explain: bool, item_ids: list[str], seed: int) -> dict:
    """One concurrency level: `sessions` sessions at once. Returns the latency summary."""
    barrier = threading.Barrier(sessions)
    interaction_ms: list[list[float]] = [[] for _ in range(sessions)]
    reuse_ms: list[list[float]] = [[] for _ in range(sessions)]
    errors: list[str] = []

    def one_session(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        try:
            with RecommenderClient(target, timeout_s=60) as client, client.session() as live:
                update = live.configure(k=k, history=rng.sample(item_ids, min(history, len(item_ids))),
                                        explain=explain)
                if not update.ok:
                    raise RuntimeError(f"config failed: {update.code_name}: {update.message}")
                for _ in range(warmup):
                    live.interact(rng.choice(item_ids))
                barrier.wait(timeout=120)
                for _ in range(events):
                    item = rng.choice(item_ids)
                    started = time.perf_counter()
                    update = live.interact(item)
                    interaction_ms[index].append((time.perf_counter() - started) * 1e3)
                    if not update.ok or len(update.items) != min(k, len(item_ids)):
                        raise RuntimeError(f"event failed: {update.code_name}: {update.message}")
                for n in range(reuse_events):
                    started = time.perf_counter()
                    update = live.configure(k=k - 1 if n % 2 == 0 and k > 1 else k, explain=explain)
                    reuse_ms[index].append((time.perf_counter() - started) * 1e3)
                    if not update.ok:
                        raise RuntimeError(f"config failed: {update.code_name}: {update.message}")
        except Exception as error:  # reported, and the level fails
            errors.append(f"session {index}: {error}")
            barrier.abort()

    threads = [threading.Thread(target=one_session, args=(i,), daemon=True) for i in range(sessions)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    flat = [x for per_session in interaction_ms for x in per_session]
    measured_s = max(sum(per_session) for per_session in interaction_ms) / 1e3 if flat else 0.0
    return {
        "sessions": sessions,
        "interaction": {**percentiles(flat), "events_per_s": len(flat) / measured_s if measured_s else 0.0},
        "reuse_cached_vector": percentiles([x for per_session in reuse_ms for x in per_session]),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.session_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--sessions", default="1,16", help="comma-separated concurrency levels")
    parser.add_argument("--events", type=int, default=100, help="timed interactions per session")
    parser.add_argument("--reuse-events", type=int, default=20, help="timed k-only config events per session")
    parser.add_argument("--warmup", type=int, default=5, help="untimed interactions per session first")
    parser.add_argument("--history", type=int, default=10, help="catalogue ids in each session's starting history")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--explain", action="store_true", help="ask for explanations on every event")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("session_bench.json"), help="JSON result file")
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.sessions.split(",") if n.strip()]
    if not levels or min(levels) < 1 or args.events < 1 or args.k < 1:
        parser.error("--sessions levels, --events and --k must be positive")

    with RecommenderClient(args.target, timeout_s=60) as client:
        client.wait_until_serving(timeout_s=120)
        info = client.model_info()
        item_ids = [item.item_id for item in client.iter_items()]
    results = []
    for sessions in levels:
        result = run_level(args.target, sessions, args.events, args.reuse_events, args.warmup, args.history,
                           args.k, args.explain, item_ids, args.seed)
        results.append(result)
        i, r = result["interaction"], result["reuse_cached_vector"]
        print(f"{sessions:>3} sessions: event -> list p50 {i['p50_ms']:7.1f} ms  p99 {i['p99_ms']:7.1f} ms  "
              f"({i['count']} events, {i['events_per_s']:.0f}/s);  cached-vector config p50 "
              f"{r.get('p50_ms', float('nan')):.1f} ms  p99 {r.get('p99_ms', float('nan')):.1f} ms")
    report = {
        "benchmark": "session event -> updated list latency",
        "target": args.target,
        "model_version": info.model_version,
        "index_version": info.index_version,
        "execution_provider": info.execution_provider,
        "item_count": info.item_count,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "client_host": {"python": platform.python_version(), "machine": platform.machine(),
                        "cpus": len(os.sched_getaffinity(0))},
        "levels": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
