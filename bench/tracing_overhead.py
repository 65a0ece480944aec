"""What OpenTelemetry tracing adds to a Recommend call at concurrency 1, and what its imports cost at start-up.

    python -m bench.tracing_overhead --bundle bundles/tiny/<version> --calls 400 --out reports/bench

Two llmrec-server subprocesses serve the same bundle with the same settings, one without tracing and one with
--otlp-endpoint pointing at an OTLP/gRPC receiver run by this process (it accepts and counts the spans, so the
exporter does its real work: batching, serialising, sending). One client process holds one channel to each and
sends --calls sequential Recommend calls per mode, alternating the mode call by call (the order rotating each
round) so that the machine's drift hits both alike. Added latency is read two ways: p50 (and p99) minus the
untraced one, and the median of the per-round differences (the least hurt by drift). The CPU time each server
process spent per timed call (/proc/PID/stat, its exporter thread included) is the figure least hurt by other
load on the machine.

Start-up: the median over --import-runs fresh interpreters of the time to import llmrec.server.app, alone and
followed by the SDK, the OTLP exporter and the gRPC instrumentation (what a traced server imports).

Writes tracing_overhead.json and .md under --out. On a shared 2-core machine the differences are at the edge of
the noise: compare p50s, and rerun before trusting a p99.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.security_latency import HISTORY, free_port, summary
from llmrec.clients.client import RecommenderClient, RecommenderError

MODES = ("tracing off", "tracing on")
TRACING_IMPORTS = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
                   "opentelemetry.instrumentation.grpc")


class SpanCounter(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that only counts."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request, context):  # noqa: N802 - the OTLP service's name
        self.spans += sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def start_server(bundle: Path, extra: list[str], log: Path, timeout_s: float = 180
                 ) -> tuple[subprocess.Popen, RecommenderClient]:
    port = free_port()
    command = [sys.executable, "-m", "llmrec.server", "--bundle", str(bundle), "--host", "127.0.0.1", "--port",
               str(port), "--metrics-port", "0", "--cpu-only", "--log-level", "warning", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    client = RecommenderClient(f"127.0.0.1:{port}", timeout_s=30)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.wait_until_serving(timeout_s=1)
            return process, client
        except RecommenderError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                client.close()
                raise RuntimeError(f"server {extra} did not start:\n{log.read_text()[-3000:]}") from None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(clients: dict[str, RecommenderClient], pids: dict[str, int], calls: int, warmup: int
            ) -> dict[str, dict[str, float]]:
    for client in clients.values():
        for _ in range(warmup):
            client.recommend(HISTORY, k=10)
    cpu_before = {mode: cpu_seconds(pid) for mode, pid in pids.items()}
    samples: dict[str, list[float]] = {mode: [] for mode in clients}
    modes = list(clients)
    for index in range(calls):
        for offset in range(len(modes)):
            mode = modes[(index + offset) % len(modes)]
            started = time.perf_counter()
            clients[mode].recommend(HISTORY, k=10)
            samples[mode].append(time.perf_counter() - started)
    time.sleep(6)  # the traced server's exporter sends its batch every 5 s: count that work too
    results = {mode: {**summary(values), "server_cpu_ms_per_call": round(
        (cpu_seconds(pids[mode]) - cpu_before[mode]) / calls * 1e3, 3)} for mode, values in samples.items()}
    paired = np.asarray(samples[modes[1]]) - np.asarray(samples[modes[0]])
    results[modes[1]]["paired_median_added_ms"] = round(float(np.median(paired)) * 1e3, 3)
    return results


def import_seconds(modules: tuple[str, ...], runs: int) -> float:
    """Median time, over fresh interpreters, to import llmrec.server.app and then `modules`."""
    code = ("import time; started = time.perf_counter(); import llmrec.server.app; "
            + "".join(f"import {module}; " for module in modules) + "print(time.perf_counter() - started)")
    times = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
             for _ in range(runs)]
    return float(np.median(times))


def markdown(report: dict) -> str:
    off, on = (report["results"][mode] for mode in MODES)
    lines = [
        "# Tracing overhead: Recommend at concurrency 1, tracing off vs on", "",
        f"{report['calls']} sequential Recommend calls per mode (history of 3, k=10), modes interleaved call by "
        f"call; {report['bundle_items']}-item bundle, one server process per mode, spans sent over OTLP/gRPC to a "
        f"receiver in the client process ({report['spans_received']} spans received, "
        f"{report['spans_per_call']:.1f} per traced call). Machine: {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores shared with other work, load average {report['load_average_before']} "
        f"before and {report['load_average_after']} after: a loaded machine, so differences of a few tenths of a "
        "millisecond are within the noise.", "",
        "| mode | p50 ms | p90 ms | p99 ms | mean ms | server CPU ms per call |", "|---|---:|---:|---:|---:|---:|",
        *(f"| {mode} | {row['p50_ms']:.3f} | {row['p90_ms']:.3f} | {row['p99_ms']:.3f} | {row['mean_ms']:.3f} | "
          f"{row['server_cpu_ms_per_call']:.3f} |" for mode, row in report["results"].items()),
        "",
        f"Added by tracing: p50 {on['p50_ms'] - off['p50_ms']:+.3f} ms, p99 {on['p99_ms'] - off['p99_ms']:+.3f} ms; "
        f"median of the paired per-round differences {on['paired_median_added_ms']:+.3f} ms; server CPU "
        f"{on['server_cpu_ms_per_call'] - off['server_cpu_ms_per_call']:+.3f} ms per call.", "",
        f"Start-up: importing llmrec.server.app takes {report['import_ms']['server']:.0f} ms, "
        f"{report['import_ms']['server_and_tracing']:.0f} ms with the OpenTelemetry SDK, OTLP exporter and gRPC "
        f"instrumentation (median of {report['import_runs']} fresh interpreters): a server without tracing never "
        "imports them.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="Bundle to serve (the tiny test bundle).")
    parser.add_argument("--calls", type=int, default=400, help="Timed calls per mode.")
    parser.add_argument("--warmup", type=int, default=30, help="Untimed calls per mode first.")
    parser.add_argument("--import-runs", type=int, default=5, help="Fresh interpreters per import measurement.")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    counter = SpanCounter()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, receiver)
    receiver_port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    processes: dict[str, subprocess.Popen] = {}
    clients: dict[str, RecommenderClient] = {}
    try:
        for mode, extra in zip(MODES, ([], ["--otlp-endpoint", f"http://127.0.0.1:{receiver_port}"])):
            processes[mode], clients[mode] = start_server(args.bundle, extra,
                                                          args.out / f"tracing_overhead_{mode[8:]}.log")
        load_before = os.getloadavg()
        results = measure(clients, {mode: process.pid for mode, process in processes.items()}, args.calls,
                          args.warmup)
        load_after = os.getloadavg()
        item_count = clients[MODES[0]].model_info().item_count
    finally:
        for client in clients.values():
            client.close()
        for process in processes.values():  # SIGTERM: the traced server flushes its last spans
            process.terminate()
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        receiver.stop(None)
    traced_calls = args.calls + args.warmup  # readiness (health) and model_info (the untraced server) add none
    report = {
        "calls": args.calls, "warmup": args.warmup, "bundle": str(args.bundle), "bundle_items": item_count,
        "spans_received": counter.spans, "spans_per_call": counter.spans / traced_calls,
        "machine": {"cpu": next((line.split(":", 1)[1].strip() for line in
                                 Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                                platform.processor()),
                    "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "grpcio": grpc.__version__},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "results": results,
        "import_runs": args.import_runs,
        "import_ms": {"server": round(import_seconds((), args.import_runs) * 1e3, 1),
                      "server_and_tracing": round(import_seconds(TRACING_IMPORTS, args.import_runs) * 1e3, 1)},
    }
    (args.out / "tracing_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "tracing_overhead.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
