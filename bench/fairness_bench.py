"""Fair sharing under a flood: one client's Recommend latency alone, then while another client floods the server.

    python -m bench.fairness_bench --bundle bundles/ml-100k/<version> --out reports/bench

For each server configuration (`--configs`; a fresh llmrec-server subprocess each, bench.bench.start_llmrec):
  * `fair`: the defaults (per-client caps of half of max_sessions and of max_queue, fair encoder queue);
  * `wide-caps`: per-client caps as large as the server-wide ones (max_sessions, max_queue), so only the encoder's
    fair order protects the calm client;
  * `before` (with --before-pythonpath): the same server from another checkout, e.g. the commit before fair
    sharing (no per-client caps, a first-come-first-served encoder queue): DIR holds that checkout's `llmrec`
    package tree (its llmrec/, with server/, clients/, training/, export/ inside and its generated v1/ stubs),
    put first on PYTHONPATH; --before-bundle is a bundle that checkout accepts.
Two phases each, in one run:
  1. quiet: the calm client (client id "calm") sends `--calm-requests` Recommends one at a time, each a real
     user's 20 most recent items (about 128 model tokens), and times each;
  2. flood: a flood process (client id "flood", its own process so that its event loop does not delay the calm
     client's) opens `--flood-sessions` sessions and keeps every one busy (the next interaction as soon as the
     last is answered), plus `--flood-recommenders` callers sending Recommends back to back (10 ms pause after a
     refusal, ignoring RetryInfo: an aggressive client). Once its sessions are open and answering, the calm
     client repeats phase 1.
Reports p50/p90/p99/max of the calm client's latency per phase and its failures by status, and what the flood
got (sessions opened and refused, events answered, Recommends answered and refused). Writes fairness.json and
fairness.md under --out. Client, flood and server share the machine's cores: run it on an otherwise idle
machine (or say so), and compare the phases of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from llmrec.clients.client import RecommenderClient, RecommenderError
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc

CONFIGS = {
    "fair": [],
    "wide-caps": ["--max-sessions-per-client", "1000", "--max-inflight-per-client", "128"],  # = the defaults'
}                                                                                           # server-wide caps
HISTORY_ITEMS = 20
FLOOD_ID, CALM_ID = "flood", "calm"


def histories(item_ids: list[str], count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    return [rng.sample(item_ids, HISTORY_ITEMS) for _ in range(count)]


def summary(samples_s: list[float]) -> dict[str, float]:
    if not samples_s:
        return {"count": 0}
    values = np.asarray(samples_s) * 1e3
    return {"count": len(samples_s), "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p90_ms": round(float(np.percentile(values, 90)), 1), "p99_ms": round(float(np.percentile(values, 99)), 1),
            "max_ms": round(float(values.max()), 1), "mean_ms": round(float(values.mean()), 1)}


def calm_phase(client: RecommenderClient, requests: list[list[str]], max_seconds: float) -> dict:
    """Recommends one at a time (client id "calm"): latency of each answered one, failures by status."""
    latencies: list[float] = []
    failures: collections.Counter = collections.Counter()
    ended = time.monotonic() + max_seconds
    for history in requests:
        if time.monotonic() > ended:
            break
        started = time.perf_counter()
        try:
            client.recommend(history, k=10)
            latencies.append(time.perf_counter() - started)
        except RecommenderError as error:
            failures[error.code.name] += 1
    return {**summary(latencies), "failures": dict(failures), "sent": len(latencies) + sum(failures.values())}


# --- the flood (a subprocess: python -m bench.fairness_bench flood ...) ----------------------------------------


async def flood(target: str, sessions: int, recommenders: int, requests: list[list[str]], item_ids: list[str]) -> dict:
    """Runs until SIGTERM; prints "ready" once every session has been answered or refused, then its counts."""
    counts: collections.Counter = collections.Counter()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    settled = asyncio.Event()
    metadata = (("llmrec-client-id", FLOOD_ID),)

    def session_settled() -> None:
        counts["sessions_settled"] += 1
        if counts["sessions_settled"] == sessions:
            settled.set()

    async def busy_session(stub, n: int) -> None:
        call = stub.Session(metadata=metadata)
        rng = random.Random(n)
        first = True
        try:
            await call.write(pb.SessionRequest(event_id="0", config=pb.SessionConfig(
                k=10, history=[pb.HistoryItem(item_id=i) for i in requests[n % len(requests)]])))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                counts["events_ok" if response.status.code == 0 else f"event_code_{response.status.code}"] += 1
                if first:
                    first = False
                    counts["sessions_opened"] += 1
                    session_settled()
                if stop.is_set():
                    break
                await call.write(pb.SessionRequest(event_id="i", interaction=pb.HistoryItem(
                    item_id=rng.choice(item_ids))))
            await call.done_writing()
        except grpc.aio.AioRpcError:
            pass  # the status is read below
        code = await call.code()
        if first:
            counts[f"sessions_{code.name}"] += 1
            session_settled()

    async def busy_recommends(stub, n: int) -> None:
        number = n
        while not stop.is_set():
            number += recommenders
            request = pb.RecommendRequest(history=[pb.HistoryItem(item_id=i) for i in requests[number % len(requests)]],
                                          k=10)
            try:
                await stub.Recommend(request, timeout=30, metadata=metadata)
                counts["recommend_ok"] += 1
            except grpc.aio.AioRpcError as error:
                counts[f"recommend_{error.code().name}"] += 1
                await asyncio.sleep(0.01)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        tasks = [asyncio.ensure_future(busy_session(stub, n)) for n in range(sessions)]
        await settled.wait()
        tasks += [asyncio.ensure_future(busy_recommends(stub, n)) for n in range(recommenders)]
        started = time.monotonic()
        print("ready", flush=True)
        await stop.wait()
        counts["flood_seconds"] = round(time.monotonic() - started, 1)
        await asyncio.wait(tasks, timeout=30)
    return dict(counts)


def start_flood(target: str, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "bench.fairness_bench", "flood", "--target", target,
               "--flood-sessions", str(args.flood_sessions), "--flood-recommenders", str(args.flood_recommenders),
               "--seed", str(args.seed + 1)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # "ready" once its sessions are answering
    if line.strip() != "ready":
        process.kill()
        raise RuntimeError(f"the flood did not start (said {line!r})")
    return process


def stop_flood(process: subprocess.Popen) -> dict:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    return json.loads(output.strip().splitlines()[-1])


# --- main ------------------------------------------------------------------------------------------------------


def run_config(name: str, bundle: Path, args: argparse.Namespace, logs: Path) -> dict:
    from bench.bench import start_llmrec  # the same server launch as make bench

    # `before`: the server subprocess imports the other checkout, never this one (PYTHONSAFEPATH: not even from
    # the working directory, which `python -m` would otherwise put first).
    overrides = {"PYTHONPATH": str(args.before_pythonpath), "PYTHONSAFEPATH": "1"} if name == "before" else {}
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        server = start_llmrec(args.before_bundle or bundle if name == "before" else bundle,
                              logs / f"fairness-{name}.log", CONFIGS.get(name, []))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    try:
        with RecommenderClient(server.target, timeout_s=60) as client:
            item_ids = [item.item_id for item in client.iter_items()]
        requests = histories(item_ids, args.calm_requests + 1, args.seed)
        with RecommenderClient(server.target, timeout_s=30, client_id=CALM_ID) as calm:
            calm.recommend(requests[0], k=10)  # a warm channel, not timed; it serves both phases
            quiet = calm_phase(calm, requests[1:], args.max_phase_seconds)
            print(f"{name}: quiet  p50 {quiet.get('p50_ms')} ms  p99 {quiet.get('p99_ms')} ms  failures "
                  f"{quiet['failures']}", flush=True)
            process = start_flood(server.target, args)
            try:
                flooded = calm_phase(calm, requests[1:], args.max_phase_seconds)
            finally:
                flood_counts = stop_flood(process)
        print(f"{name}: flood  p50 {flooded.get('p50_ms')} ms  p99 {flooded.get('p99_ms')} ms  failures "
              f"{flooded['failures']}; flood got {flood_counts}", flush=True)
        return {"server_flags": CONFIGS.get(name, []), "quiet": quiet, "flood": flooded,
                "flood_client": flood_counts}
    finally:
        server.stop()


def markdown(report: dict) -> str:
    lines = [f"# Fair sharing under a flood ({report['settings']['flood_sessions']} busy sessions + "
             f"{report['settings']['flood_recommenders']} Recommend callers)", "",
             f"Bundle {report['bundle']} ({report['item_count']} items); {report['machine']['cpus']} cores shared by "
             f"the server, the calm client and the flood; load average {report['machine']['load_average_start']} at "
             "the start.", "",
             "| server | phase | calm p50 ms | p90 | p99 | max | answered | failed |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, result in report["configs"].items():
        for phase in ("quiet", "flood"):
            row = result[phase]
            lines.append(f"| {name} | {phase} | {row.get('p50_ms', '-')} | {row.get('p90_ms', '-')} | "
                         f"{row.get('p99_ms', '-')} | {row.get('max_ms', '-')} | {row['count']} | "
                         f"{row['failures'] or 0} |")
    lines += ["", "What the flooding client got:", ""]
    for name, result in report["configs"].items():
        lines.append(f"* {name}: {json.dumps(result['flood_client'], sort_keys=True)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "flood"),
                        help="run: the benchmark; flood: the flooding client (started by run)")
    parser.add_argument("--bundle", type=Path, help="bundle directory to serve (run)")
    parser.add_argument("--target", help="server host:port (flood)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, of {', '.join(CONFIGS)} (and before, added by --before-pythonpath)")
    parser.add_argument("--before-pythonpath", type=Path, help="another checkout's llmrec package tree: adds `before`")
    parser.add_argument("--before-bundle", type=Path, help="the bundle for `before` (default: --bundle)")
    parser.add_argument("--calm-requests", type=int, default=100)
    parser.add_argument("--flood-sessions", type=int, default=200)
    parser.add_argument("--flood-recommenders", type=int, default=32)
    parser.add_argument("--max-phase-seconds", type=float, default=120.0, help="a phase ends after this, if sooner")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)

    if args.mode == "flood":
        with RecommenderClient(args.target, timeout_s=60) as client:
            item_ids = [item.item_id for item in client.iter_items()]
        counts = asyncio.run(flood(args.target, args.flood_sessions, args.flood_recommenders,
                                   histories(item_ids, 256, args.seed), item_ids))
        print(json.dumps(counts), flush=True)
        return 0

    if args.bundle is None:
        parser.error("--bundle is needed")
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = round(os.getloadavg()[0], 2)
    names = args.configs.split(",") + (["before"] if args.before_pythonpath else [])
    results = {name: run_config(name, args.bundle, args, args.out) for name in names}
    report = {
        "benchmark": "calm client's Recommend latency, alone and during another client's flood",
        "bundle": str(args.bundle),
        "item_count": sum(1 for _ in (args.bundle / "items" / "items.jsonl").open()),
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("mode", "target")},
        "machine": {"python": platform.python_version(), "machine": platform.machine(),
                    "cpus": len(os.sched_getaffinity(0)), "load_average_start": load_start,
                    "load_average_end": round(os.getloadavg()[0], 2)},
        "configs": results,
    }
    (args.out / "fairness.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "fairness.md").write_text(markdown(report))
    print(f"wrote {args.out / 'fairness.json'} and fairness.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
