"""What TLS and bearer-token authorization add to a call, at concurrency 1 (server.security).

    python -m bench.security_latency --bundle bundles/tiny/<version> --calls 300 --out reports/bench

Four llmrec-server subprocesses serve the same bundle: plaintext, plaintext + auth, TLS, TLS + auth (tokens;
certificates made here with `cryptography`, a dev dependency). One client process holds one channel to each
and sends `--calls` sequential calls per mode, rotating the mode on every call so that drift (the machine's
other load, CPU frequency) hits every mode alike. Measured per mode: Recommend (one inference, the real
workload), GetModelInfo (no inference: the overhead alone) and the first call on a new channel (TCP + TLS
handshake + the call). Added latency is read two ways: p50 minus plaintext's p50, and the median of the
per-round differences (each round's calls run back to back, so this one is the least hurt by drift). Writes
security_latency.json and .md under --out. On a shared or small machine the
differences are at the edge of the noise: compare p50s, and rerun before trusting a p99.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from llmrec.clients.client import RecommenderClient, RecommenderError
from llmrec.server.security import hash_token

MODES = ("plaintext", "plaintext+token", "tls", "tls+token")
HISTORY = ["m1", "m2", "m5"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_certificates(directory: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "integration"))
    from tls_certs import make_pki  # the tests' certificate factory

    pki = make_pki(directory)
    return {"ca": pki.ca, "cert": pki.server_cert, "key": pki.server_key}


def start_server(bundle: Path, mode: str, certificates: dict[str, Path], token: str, log: Path,
                 timeout_s: float = 180) -> tuple[subprocess.Popen, Callable[..., RecommenderClient]]:
    port = free_port()
    command = [sys.executable, "-m", "llmrec.server", "--bundle", str(bundle), "--host", "127.0.0.1", "--port",
               str(port), "--cpu-only", "--log-level", "warning", "--no-metrics"]
    if mode.startswith("tls"):
        command += ["--tls-cert", str(certificates["cert"]), "--tls-key", str(certificates["key"])]
    if mode.endswith("+token"):
        command += ["--auth-tokens", f"bench@{hash_token(token)}=read"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)

    def connect(**kwargs) -> RecommenderClient:
        return RecommenderClient(f"127.0.0.1:{port}", timeout_s=30,
                                 tls_ca=certificates["ca"] if mode.startswith("tls") else None,
                                 token=token if mode.endswith("+token") else None, **kwargs)

    deadline = time.monotonic() + timeout_s
    with connect() as probe:
        while True:
            try:
                probe.wait_until_serving(timeout_s=1)
                return process, connect
            except RecommenderError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(f"{mode} server did not start:\n{log.read_text()[-3000:]}") from None


def summary(samples_s: list[float]) -> dict[str, float]:
    values = np.asarray(samples_s) * 1e3
    return {"count": len(values), "p50_ms": round(float(np.percentile(values, 50)), 3),
            "p90_ms": round(float(np.percentile(values, 90)), 3), "p99_ms": round(float(np.percentile(values, 99)), 3),
            "mean_ms": round(float(values.mean()), 3)}


def measure(clients: dict[str, RecommenderClient], connects: dict[str, Callable], calls: int, warmup: int,
            new_channels: int) -> dict[str, dict[str, dict[str, float]]]:
    samples = {mode: {"recommend": [], "model_info": [], "new_channel": []} for mode in clients}
    for mode, client in clients.items():  # warm: connections open, code paths and caches hot
        for _ in range(warmup):
            client.recommend(HISTORY, k=10)
            client.model_info()
    modes = list(clients)
    for index in range(calls):
        for offset in range(len(modes)):  # every mode once per round, the order rotating
            mode = modes[(index + offset) % len(modes)]
            started = time.perf_counter()
            clients[mode].recommend(HISTORY, k=10)
            samples[mode]["recommend"].append(time.perf_counter() - started)
        for offset in range(len(modes)):
            mode = modes[(index + offset) % len(modes)]
            started = time.perf_counter()
            clients[mode].model_info()
            samples[mode]["model_info"].append(time.perf_counter() - started)
    for index in range(new_channels):
        for offset in range(len(modes)):
            mode = modes[(index + offset) % len(modes)]
            started = time.perf_counter()
            with connects[mode]() as fresh:
                fresh.model_info()
                samples[mode]["new_channel"].append(time.perf_counter() - started)
    results = {mode: {kind: summary(values) for kind, values in kinds.items()} for mode, kinds in samples.items()}
    for mode in modes:  # the same round's calls, one per mode, ran back to back: their difference drifts least
        for kind in ("recommend", "model_info"):
            paired = np.asarray(samples[mode][kind]) - np.asarray(samples[modes[0]][kind])
            results[mode][kind]["paired_median_added_ms"] = round(float(np.median(paired)) * 1e3, 3)
    return results


def markdown(report: dict) -> str:
    results, base = report["results"], report["results"]["plaintext"]
    lines = [
        "# Security latency: plaintext vs TLS vs bearer tokens (c=1)", "",
        f"{report['calls']} sequential calls per mode, modes interleaved call by call; tiny bundle, one "
        f"server process per mode, client in one process. Machine: {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores, load average {report['load_average_before']} before and "
        f"{report['load_average_after']} after (shared and noisy: differences under ~0.1 ms are noise).", "",
    ]
    for kind, title in (("recommend", "Recommend (history of 3, k=10: one inference)"),
                        ("model_info", "GetModelInfo (no inference: the transport and auth alone)"),
                        ("new_channel", f"New channel + first GetModelInfo ({report['new_channels']} per mode)")):
        lines += [f"## {title}", "", "| mode | p50 ms | p99 ms | mean ms | p50 added vs plaintext | "
                  "median of paired differences |", "|---|---:|---:|---:|---:|---:|"]
        for mode in MODES:
            row = results[mode][kind]
            added = row["p50_ms"] - base[kind]["p50_ms"]
            paired = f"{row['paired_median_added_ms']:+.3f}" if "paired_median_added_ms" in row else "-"
            lines.append(f"| {mode} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['mean_ms']:.3f} | "
                         f"{added:+.3f} | {paired} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="Bundle to serve (the tiny test bundle).")
    parser.add_argument("--calls", type=int, default=300, help="Timed calls per mode and RPC.")
    parser.add_argument("--warmup", type=int, default=30, help="Untimed calls per mode first.")
    parser.add_argument("--new-channels", type=int, default=30, help="Fresh channels timed per mode.")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    processes: list[subprocess.Popen] = []
    clients: dict[str, RecommenderClient] = {}
    with tempfile.TemporaryDirectory(prefix="security-latency-") as scratch:
        certificates = make_certificates(Path(scratch))
        try:
            connects = {}
            for mode in MODES:
                process, connects[mode] = start_server(args.bundle, mode, certificates, token,
                                                       Path(scratch) / f"{mode}.log")
                processes.append(process)
                clients[mode] = connects[mode]()
            load_before = os.getloadavg()
            results = measure(clients, connects, args.calls, args.warmup, args.new_channels)
            load_after = os.getloadavg()
        finally:
            for client in clients.values():
                client.close()
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
    report = {
        "calls": args.calls, "warmup": args.warmup, "new_channels": args.new_channels, "bundle": str(args.bundle),
        "machine": {"cpu": next((line.split(":", 1)[1].strip() for line in
                                 Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                                platform.processor()),
                    "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "grpcio": grpc.__version__},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "results": results,
    }
    (args.out / "security_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "security_latency.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
